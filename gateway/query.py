"""Paged search (``/mj/task/query``) and the recent/queued lists, merged across upstreams.

Upstreams that serve ``query`` themselves are asked for enough rows to fill the requested
page; the others are searched through list lookups when the filter names ids. Rows are
merged in one order, then paged, so page N of the merge is what one upstream holding all the
tasks would have answered. Order: the sort fields in turn, ties broken by id in the first
field's direction; missing values sort before any value.
"""

from __future__ import annotations

import math
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.context import RequestInfo
from gateway.errors import GatewayError, UpstreamError, UpstreamFailures
from gateway.lookup import TaskLookup
from gateway.protocol import STATUSES
from gateway.tasks import parse_task_list, valid_task_id
from gateway.upstreams import Upstream, call, failed_answer, gather_within

__all__ = [
    "Merged",
    "QuerySpec",
    "TaskSearch",
    "page_object",
    "parse_query",
    "sort_key",
    "sort_rows",
]

SORT_FIELDS = frozenset(
    {"id", "action", "status", "progress", "prompt", "promptEn", "description", "state"}
    | {"submitTime", "startTime", "finishTime", "failReason"}
)
_EXACT = ("id", "status", "action", "state")
_TEXT = ("prompt", "promptEn", "description", "failReason")
MAX_DEPTH = 10_000  # rows an upstream may be asked for: (pageNumber + 1) * pageSize
RECENT_LIMIT = 100


@dataclass(frozen=True, slots=True)
class QuerySpec:
    page: int
    size: int
    order: tuple[str, bool]  # (field, descending)
    filters: dict[str, Any]

    @property
    def ids(self) -> list[str]:
        ids = list(self.filters.get("ids") or [])
        if "id" in self.filters:
            ids.append(self.filters["id"])
        return list(dict.fromkeys(ids))


@dataclass(slots=True)
class Merged:
    """Rows from one or more upstreams; ``failed`` names the upstreams that did not answer."""

    rows: list[dict[str, Any]]
    total: int
    failed: list[str]


def parse_query(body: dict[str, Any]) -> QuerySpec:
    """Check a query body field by field; what passes is all an upstream will see."""
    page = _int_field(body, "pageNumber", 0, 0)
    size = _int_field(body, "pageSize", 10, 1)
    if (page + 1) * size > MAX_DEPTH:
        limit = f"(pageNumber + 1) * pageSize must be <= {MAX_DEPTH}"
        raise GatewayError(400, f"page too deep: {limit}")
    filters: dict[str, Any] = {}
    for name in (*_EXACT, *_TEXT):
        value = body.get(name)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise GatewayError(400, f"field '{name}' must be a string")
        filters[name] = value
    if "id" in filters and not valid_task_id(filters["id"]):
        raise GatewayError(400, "field 'id' must be a task id")
    if "status" in filters and filters["status"] not in STATUSES:
        raise GatewayError(400, f"field 'status' must be one of {', '.join(sorted(STATUSES))}")
    lists = (("ids", valid_task_id, "task ids"), ("statusSet", STATUSES.__contains__, "statuses"))
    for name, check, what in lists:
        value = body.get(name)
        if value is None or value == []:
            continue
        if not isinstance(value, list) or not all(isinstance(v, str) and check(v) for v in value):
            raise GatewayError(400, f"field '{name}' must be an array of {what}")
        filters[name] = value
    return QuerySpec(page, size, _parse_sort(body.get("sort")), filters)


def _int_field(body: dict[str, Any], name: str, default: int, minimum: int) -> int:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise GatewayError(400, f"field '{name}' must be an integer >= {minimum}")
    return value


def _parse_sort(raw: Any) -> tuple[str, bool]:
    if raw is None or raw == "":
        return ("submitTime", True)
    field, _, direction = raw.partition(",") if isinstance(raw, str) else ("", "", "")
    field, direction = field.strip(), direction.strip().lower() or "asc"
    if field not in SORT_FIELDS or direction not in ("asc", "desc"):
        fields = ", ".join(sorted(SORT_FIELDS))
        raise GatewayError(
            400, f"field 'sort' must be 'FIELD,asc' or 'FIELD,desc', FIELD one of {fields}"
        )
    return (field, direction == "desc")


def matches(task: dict[str, Any], filters: dict[str, Any]) -> bool:
    for name in _EXACT:
        if name in filters and str(task.get(name)) != filters[name]:
            return False
    for name in _TEXT:
        if name in filters:
            value = task.get(name)
            if not isinstance(value, str) or filters[name].casefold() not in value.casefold():
                return False
    if "ids" in filters and str(task.get("id")) not in filters["ids"]:
        return False
    return not ("statusSet" in filters and str(task.get("status")) not in filters["statusSet"])


def sort_key(value: Any) -> tuple[int, float, str]:
    """A total order over JSON values: missing first, then numbers, strings, the rest."""
    if value is None:
        return (0, 0.0, "")
    if isinstance(value, bool | int | float):
        return (1, float(value), "")
    if isinstance(value, str):
        return (2, 0.0, value)
    return (3, 0.0, orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode())


def sort_rows(rows: list[dict[str, Any]], order: tuple[str, bool]) -> None:
    """Sort in place by one field, ties broken by id in the same direction."""
    field, descending = order
    rows.sort(key=lambda t: (sort_key(t.get(field)), str(t.get("id"))), reverse=descending)


def page_object(rows: list[dict[str, Any]], total: int, spec: QuerySpec) -> dict[str, Any]:
    """The Spring-style page for ``spec`` out of the merged, sorted ``rows``."""
    start = spec.page * spec.size
    content = rows[start : start + spec.size]
    pages = math.ceil(total / spec.size)
    sort = {"empty": False, "sorted": True, "unsorted": False}
    return {
        "content": content,
        "totalElements": total,
        "totalPages": pages,
        "number": spec.page,
        "size": spec.size,
        "numberOfElements": len(content),
        "first": spec.page == 0,
        "last": spec.page >= pages - 1,
        "empty": not content,
        "pageable": {
            "offset": start,
            "pageNumber": spec.page,
            "pageSize": spec.size,
            "paged": True,
            "unpaged": False,
            "sort": sort,
        },
        "sort": sort,
    }


class TaskSearch:
    """``query``, ``list`` and ``queue`` across every upstream a caller may use."""

    def __init__(self, lookup: TaskLookup, deadline_s: float) -> None:
        self.lookup = lookup
        self.deadline_s = deadline_s

    async def query(
        self, mode: str, spec: QuerySpec, allowed: Sequence[Upstream], info: RequestInfo
    ) -> Merged:
        native = [u for u in allowed if u.config.supports_query]
        others = [u for u in allowed if not u.config.supports_query]
        field, descending = spec.order
        body = orjson.dumps(
            {
                **spec.filters,
                "pageNumber": 0,
                "pageSize": (spec.page + 1) * spec.size,
                "sort": f"{field},{'desc' if descending else 'asc'}",
            }
        )
        calls: list[tuple[Upstream, Coroutine[Any, Any, Merged]]] = [
            (u, self._query_one(mode, u, body, info)) for u in native
        ]
        if spec.ids and others:
            calls.append((others[0], self._query_by_ids(mode, spec, others, info)))
        merged = _merge(await gather_within(self.deadline_s, calls))
        sort_rows(merged.rows, spec.order)
        return merged

    async def _query_one(
        self, mode: str, upstream: Upstream, body: bytes, info: RequestInfo
    ) -> Merged:
        path = f"{mode}/mj/task/query"
        response = await call(upstream, info, "query", "POST", path, body, self.deadline_s)
        if error := failed_answer(response):
            raise error
        try:
            page = orjson.loads(response.content)
            rows = [t for t in page["content"] if isinstance(t, dict)]
            return Merged(self._rewritten(rows), int(page["totalElements"]), [])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            detail = f"answered HTTP {response.status} with something other than a page"
            raise UpstreamError(upstream.name, "broken", True, detail) from None

    async def _query_by_ids(
        self, mode: str, spec: QuerySpec, upstreams: list[Upstream], info: RequestInfo
    ) -> Merged:
        result = await self.lookup.list_tasks(mode, spec.ids, upstreams, info)
        rows = [t for t in parse_task_list(result.body) or [] if matches(t, spec.filters)]
        return Merged(rows, len(rows), result.failed)

    async def recent(
        self, mode: str, kind: str, allowed: Sequence[Upstream], info: RequestInfo
    ) -> Merged:
        """``list`` (newest first, at most 100) or ``queue`` (oldest first)."""
        calls = [(u, self._recent_one(mode, kind, u, info)) for u in allowed]
        merged = _merge(await gather_within(self.deadline_s, calls))
        newest_first = kind == "list"
        sort_rows(merged.rows, ("submitTime", newest_first))
        if newest_first:
            merged.rows = merged.rows[:RECENT_LIMIT]
        return merged

    def _rewritten(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows as mjgate answers them: image links rewritten, when images.rewrite is on."""
        for row in rows:
            self.lookup.cache.images.rewrite(row)
        return rows

    async def _recent_one(
        self, mode: str, kind: str, upstream: Upstream, info: RequestInfo
    ) -> Merged:
        path = f"{mode}/mj/task/{kind}"
        response = await call(upstream, info, kind, "GET", path, timeout_s=self.deadline_s)
        if error := failed_answer(response):
            raise error
        rows = parse_task_list(response.content)
        if rows is None:
            detail = f"answered HTTP {response.status} with something other than a task list"
            raise UpstreamError(upstream.name, "broken", True, detail)
        return Merged(self._rewritten(rows), len(rows), [])


def _merge(outcomes: list[Merged | UpstreamFailures]) -> Merged:
    """One merge of every call's rows; raises when every call failed."""
    merged = Merged(rows=[], total=0, failed=[])
    errors: list[UpstreamError] = []
    for outcome in outcomes:
        if isinstance(outcome, UpstreamFailures):
            errors += outcome.errors
        else:
            merged.rows += outcome.rows
            merged.total += outcome.total
            merged.failed += outcome.failed
    if outcomes and all(isinstance(o, UpstreamFailures) for o in outcomes):
        raise UpstreamFailures(errors)
    merged.failed = list(dict.fromkeys([*merged.failed, *(e.upstream for e in errors)]))
    return merged
