"""Reading tasks: fetch one, list by ids, paged query, and the recent and queued lists.

A caller with visibility ``own`` or ``team`` reads only the tasks it may see: others are
answered as unknown ids (fetch) or left out (lists); its ``query`` and ``list`` search the
tasks the ledger holds for it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.auth import caller
from gateway.config import ClientConfig
from gateway.context import RequestInfo, request_info
from gateway.errors import GatewayError
from gateway.lookup import Answer
from gateway.metrics import PARTIAL_ANSWERS
from gateway.query import MAX_DEPTH, RECENT_LIMIT, Merged, page_object, parse_query, sort_rows
from gateway.routes.common import allowed, services
from gateway.services import Services
from gateway.validation import read_ids, read_json_object, require_task_id
from gateway.visibility import restricted

__all__ = ["fetch", "fetch_task", "list_by_ids", "query", "recent"]


async def fetch(mode: str, request: Request) -> Response:
    """``GET /mj/task/{id}/fetch``: one task, from cache or its owner. (A GET the front
    layer sees runs ``fetch_task`` itself, without the router: this serves HEAD.)"""
    task_id = require_task_id(request.path_params["task_id"])
    info = request_info(request.scope)
    answer = await fetch_task(services(request), caller(request.scope), mode, task_id, info)
    return Response(answer.body, answer.status, headers={"content-type": answer.content_type})


async def fetch_task(
    svc: Services, client: ClientConfig, mode: str, task_id: str, info: RequestInfo
) -> Answer:
    """The task's answer for this caller; GatewayError 404 for a task it may not see or
    that no upstream knows."""
    if not await svc.visibility.check(client, task_id):
        info.tier = "upstream"  # as an unknown id's answer says
        raise GatewayError(404, f"task {task_id} not found")
    answer = await svc.lookup.fetch(mode, task_id, svc.pool.allowed(client.upstreams), info)
    info.cache, info.tier = answer.cache, answer.tier
    if not answer.found:
        raise GatewayError(404, f"task {task_id} not found")
    return answer


async def list_by_ids(mode: str, request: Request) -> Response:
    """``POST /mj/task/list-by-ids`` and ``list-by-condition``: tasks in the caller's order."""
    config = services(request).config
    ids = await read_ids(request, config.server.max_body_bytes, config.fanout.max_ids)
    visible = await services(request).visibility.visible(caller(request.scope), ids)
    ids = [task_id for task_id in ids if task_id in visible]
    info = request_info(request.scope)
    result = await services(request).lookup.list_tasks(mode, ids, allowed(request), info)
    response = _merged(result.body, result.failed, info)
    info.cache = result.cache  # HIT when every id came from the cache
    return response


async def query(mode: str, request: Request) -> Response:
    """``POST /mj/task/query``: a Spring-style page of the merged, sorted search."""
    body = await read_json_object(request, services(request).config.server.max_body_bytes)
    spec = parse_query(body)
    info = request_info(request.scope)
    svc = services(request)
    client = caller(request.scope)
    if restricted(client):
        # Only the caller's own (or team's) tasks, named by the ledger, are searched.
        mine = await svc.ledger.visible_ids(client, MAX_DEPTH)
        seen = set(mine)
        ids = [i for i in spec.ids if i in seen] if spec.ids else mine
        if not ids:
            return _merged(orjson.dumps(page_object([], 0, spec)), [], info)
        filters = {k: v for k, v in spec.filters.items() if k != "id"} | {"ids": ids}
        spec = dataclasses.replace(spec, filters=filters)
    merged = await svc.search.query(mode, spec, allowed(request), info)
    await _drop_invisible(svc, request, merged)
    page = page_object(merged.rows, merged.total, spec)
    return _merged(orjson.dumps(page), merged.failed, info)


async def recent(mode: str, request: Request) -> Response:
    """``GET /mj/task/list`` and ``/mj/task/queue``, merged across upstreams."""
    kind = request.url.path.rsplit("/", 1)[1]
    info = request_info(request.scope)
    svc = services(request)
    client = caller(request.scope)
    if kind == "list" and restricted(client):
        # The caller's newest tasks, by the ledger: the upstreams' lists hold everyone's.
        ids = await svc.ledger.visible_ids(client, RECENT_LIMIT)
        result = await svc.lookup.list_tasks(mode, ids, allowed(request), info)
        rows: list[dict[str, Any]] = orjson.loads(result.body)
        sort_rows(rows, ("submitTime", True))
        return _merged(orjson.dumps(rows), result.failed, info)
    merged = await svc.search.recent(mode, kind, allowed(request), info)
    await _drop_invisible(svc, request, merged)
    return _merged(orjson.dumps(merged.rows), merged.failed, info)


async def _drop_invisible(svc: Services, request: Request, merged: Merged) -> None:
    """Leave out of merged rows every task the caller may not see."""
    client = caller(request.scope)
    if not restricted(client):
        return
    visible = await svc.visibility.visible(client, [str(row.get("id")) for row in merged.rows])
    kept = [row for row in merged.rows if str(row.get("id")) in visible]
    merged.total -= len(merged.rows) - len(kept)
    merged.rows = kept


def _merged(body: bytes, failed: list[str], info: RequestInfo) -> Response:
    headers = {"x-gateway-partial": ",".join(failed)} if failed else None
    info.cache = "PARTIAL" if failed else "MISS"
    for name in failed:
        PARTIAL_ANSWERS.labels(name).inc()
    return Response(body, headers=headers, media_type="application/json")
