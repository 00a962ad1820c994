"""Orders of the simulated upstream: the total order ``/task/query`` sorts by, and the
scrambled order of list answers.

Written apart from the gateway's own ordering on purpose: the simulator checks the gateway's
merged pages against its own, so the two must not share a mistake.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import orjson

from gateway.sim.tasks import Json, SimTask

__all__ = ["json_order", "scrambled", "sort_rows"]

_MISSING, _NUMBER, _TEXT, _OTHER = range(4)


def json_order(value: Any) -> tuple[int, float, str]:
    """A total order over JSON values: missing or null first, then numbers (booleans among
    them), then strings, then arrays and objects by their canonical JSON text."""
    if value is None:
        return (_MISSING, 0.0, "")
    if isinstance(value, int | float):  # bool is an int
        return (_NUMBER, float(value), "")
    if isinstance(value, str):
        return (_TEXT, 0.0, value)
    return (_OTHER, 0.0, orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode())


def sort_rows(rows: list[Json], orders: Sequence[tuple[str, bool]]) -> None:
    """Sort in place by each (field, descending) of ``orders``, the first one leading; ties
    go by id, in the first order's direction."""
    rows.sort(key=lambda task: str(task.get("id")), reverse=orders[0][1])
    # Python's sort is stable: sorting by the last key first leaves the first one leading.
    for field, descending in reversed(orders):
        rows.sort(key=lambda task: json_order(task.get(field)), reverse=descending)


def scrambled(tasks: Iterable[SimTask], asked: list[str]) -> list[SimTask]:
    """Tasks in an order that differs from ``asked`` whenever there are two or more.

    Real upstreams answer list lookups in no particular order; a fixed, always-different
    order makes a caller that forgets to reorder fail every time instead of sometimes.
    """
    ordered = sorted(tasks, key=lambda task: task.task_id, reverse=True)
    if [task.task_id for task in ordered] == asked:
        ordered.reverse()
    return ordered
