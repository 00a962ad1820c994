"""``GET /admin/usage`` and ``GET /admin/tasks``: the ledger, for ``admin: true`` clients."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.configfile import CLIENT_NAME
from gateway.errors import GatewayError
from gateway.ledger import (
    COUNTS,
    GROUPS,
    TaskQuery,
    UsageQuery,
    parse_day,
    parse_time_ms,
    usage_csv,
)
from gateway.protocol import STATUSES
from gateway.routes.admin import require_admin
from gateway.routes.common import services

__all__ = ["tasks", "usage"]

_ACTION = re.compile(r"[A-Z][A-Z_]{0,31}")
MAX_LIMIT = 1000


async def usage(request: Request) -> Response:
    """What each caller spent: ``?from=&to=&client=&group_by=day|client|action|upstream``
    (several joined by commas), as JSON or ``format=csv``. Days are whole UTC days; days
    outside the retention window (or after ``to``) hold nothing."""
    require_admin(request)
    params = request.query_params
    today = datetime.now(UTC).date()
    end = parse_day(params["to"], "to") if params.get("to") else today
    start = parse_day(params["from"], "from") if params.get("from") else end.replace(day=1)
    group_by = tuple(dict.fromkeys((params.get("group_by") or "client").split(",")))
    if not set(group_by) <= set(GROUPS):
        raise GatewayError(400, f"group_by must name some of: {', '.join(GROUPS)}")
    answer_format = params.get("format") or "json"
    if answer_format not in ("json", "csv"):
        raise GatewayError(400, "format must be json or csv")
    query = UsageQuery(start, end, _client_param(params.get("client")), group_by)
    rows = await services(request).ledger.usage(query)
    if answer_format == "csv":
        return Response(usage_csv(rows, group_by), media_type="text/csv; charset=utf-8")
    totals = {name: sum(row[name] for row in rows) for name in (*COUNTS, "unfinished")}
    body = {
        "from": start.isoformat(),
        "to": end.isoformat(),
        "group_by": list(group_by),
        "rows": rows,
        "totals": totals,
    }
    return Response(orjson.dumps(body), media_type="application/json")


async def tasks(request: Request) -> Response:
    """The task log, newest first: ``?client=&status=&action=&since=&until=&limit=&cursor=``,
    and ``state=stuck`` for tasks unfinished ``ledger.stuck_after_s`` after their submit."""
    require_admin(request)
    params = request.query_params
    status = params.get("status") or None
    if status is not None and status not in STATUSES:
        raise GatewayError(400, f"status must be one of {', '.join(sorted(STATUSES))}")
    action = params.get("action") or None
    if action is not None and not _ACTION.fullmatch(action):
        raise GatewayError(400, "action must be an upstream's action name, like IMAGINE")
    state = params.get("state") or None
    if state not in (None, "stuck"):
        raise GatewayError(400, "state must be stuck (or left out)")
    query = TaskQuery(
        client=_client_param(params.get("client")),
        status=status,
        action=action,
        since_ms=parse_time_ms(params["since"], "since") if params.get("since") else None,
        until_ms=parse_time_ms(params["until"], "until") if params.get("until") else None,
        limit=_limit(params.get("limit")),
        cursor=params.get("cursor") or None,
        stuck=state == "stuck",
    )
    page = await services(request).ledger.tasks(query)
    body = {"tasks": page.tasks, "next_cursor": page.next_cursor}
    return Response(orjson.dumps(body), media_type="application/json")


def _client_param(value: str | None) -> str | None:
    if not value:
        return None
    if not CLIENT_NAME.match(value):
        raise GatewayError(400, "client must be a client's name")
    return value


def _limit(value: str | None) -> int:
    if not value:
        return 100
    if not value.isdigit() or not 1 <= int(value) <= MAX_LIMIT:
        raise GatewayError(400, f"limit must be 1 to {MAX_LIMIT}")
    return int(value)
