"""``/task/query`` of the simulated upstream: filter, sort, and one Spring-style page."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from gateway.sim.order import sort_rows
from gateway.sim.tasks import Json

__all__ = ["query_page"]

_EXACT_FILTERS = ("id", "status", "action", "state")
_TEXT_FILTERS = ("prompt", "promptEn", "description", "failReason")


def _as_int(value: Any, default: int) -> int:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return default


def _matches(task: Json, body: Mapping[str, Any]) -> bool:
    for name in _EXACT_FILTERS:
        wanted = body.get(name)
        if wanted not in (None, "") and str(task.get(name)) != str(wanted):
            return False
    for name in _TEXT_FILTERS:
        wanted = body.get(name)
        if isinstance(wanted, str) and wanted:
            value = task.get(name)
            if not isinstance(value, str) or wanted.casefold() not in value.casefold():
                return False
    for name, field in (("ids", "id"), ("statusSet", "status")):
        wanted = body.get(name)
        if isinstance(wanted, list) and wanted and str(task.get(field)) not in map(str, wanted):
            return False
    return True


def _parse_sort(raw: Any) -> list[tuple[str, bool]]:
    specs = raw if isinstance(raw, list) else [raw]
    orders: list[tuple[str, bool]] = []
    for spec in specs:
        if not isinstance(spec, str) or not spec.strip():
            continue
        field, _, direction = spec.partition(",")
        orders.append((field.strip(), direction.strip().lower() == "desc"))
    return orders or [("submitTime", True)]


def query_page(views: list[Json], body: Mapping[str, Any]) -> Json:
    """``/task/query``: filter, sort (ties by id, in the first order's direction), page."""
    rows = [task for task in views if _matches(task, body)]
    sort_rows(rows, _parse_sort(body.get("sort")))
    number = max(0, _as_int(body.get("pageNumber"), 0))
    size = _as_int(body.get("pageSize"), 10)
    size = 10 if size < 1 else min(size, 10_000)
    content = rows[number * size : (number + 1) * size]
    total_pages = math.ceil(len(rows) / size)
    sort = {"empty": False, "sorted": True, "unsorted": False}
    return {
        "content": content,
        "pageable": {
            "sort": sort,
            "offset": number * size,
            "pageNumber": number,
            "pageSize": size,
            "paged": True,
            "unpaged": False,
        },
        "last": number >= total_pages - 1,
        "totalPages": total_pages,
        "totalElements": len(rows),
        "size": size,
        "number": number,
        "sort": sort,
        "first": number == 0,
        "numberOfElements": len(content),
        "empty": not content,
    }
