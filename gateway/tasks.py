"""Task semantics: terminal states, the id rule, and reading upstream answers about tasks."""

from __future__ import annotations

import re
from typing import Any

import orjson

from gateway.protocol import TASK_ID_PATTERN

__all__ = [
    "is_not_found",
    "parse_task",
    "parse_task_list",
    "valid_task_id",
]

_TASK_ID = re.compile(TASK_ID_PATTERN)


def valid_task_id(value: object) -> bool:
    """Task ids are 1-64 characters of ``A-Z a-z 0-9 _ -``; nothing else reaches an upstream."""
    return isinstance(value, str) and _TASK_ID.fullmatch(value) is not None


def is_not_found(status: int, body: bytes) -> bool:
    """Every way an upstream says "no such task": 200 empty or ``null``, 204, 404, and the
    new-api relays' 400 ``task_no_found``."""
    if status in (204, 404):
        return True
    if status == 200:
        stripped = body.strip()
        return stripped in (b"", b"null")
    if status == 400:
        return b"task_no_found" in body
    return False


def parse_task(body: bytes) -> dict[str, Any] | None:
    """The task in an upstream's answer, or None when the body is not a task object."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(value, dict) and valid_task_id(value.get("id")):
        return value
    return None


def parse_task_list(body: bytes) -> list[dict[str, Any]] | None:
    """The tasks in a list answer (ill-formed entries skipped), or None if it is not a list."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if value is None:
        return []
    if not isinstance(value, list):
        return None
    return [t for t in value if isinstance(t, dict) and valid_task_id(t.get("id"))]
