"""Checking what callers send before anything of it reaches an upstream."""

from __future__ import annotations

import re
from typing import Any

import orjson
from starlette.requests import Request

from gateway.errors import GatewayError
from gateway.tasks import valid_task_id

__all__ = [
    "check_submit_fields",
    "parent_task_id",
    "read_ids",
    "read_json_object",
    "require_task_id",
]

NAME_SEGMENT = re.compile(r"[a-z][a-z0-9-]{0,39}")
ID_RULE = "1-64 characters of A-Z a-z 0-9 _ -"

# Types of the submit fields the gateway knows. Unknown fields pass: upstreams add many.
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "prompt": str,
    "taskId": str,
    "customId": str,
    "action": str,
    "index": int,
    "content": str,
    "base64": str,
    "base64Array": list,
    "maskBase64": str,
    "sourceBase64": str,
    "targetBase64": str,
    "notifyHook": str,
    "state": str,
    "dimensions": str,
    "botType": str,
    "accountFilter": dict,
}
_TYPE_NAMES = {str: "a string", int: "an integer", list: "an array", dict: "an object"}
# Follow-ups act on a parent task, which only its owner upstream knows.
_PARENT_REQUIRED = frozenset({"action", "modal", "change"})


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise GatewayError(413, f"request body is larger than the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise GatewayError(413, f"request body is larger than the limit of {limit} bytes")
    return bytes(body)


async def read_json_object(request: Request, limit: int, *, optional: bool = False) -> Any:
    """The body parsed as a JSON object (None for an allowed empty body), else 400."""
    body = await read_body(request, limit)
    if not body.strip():
        if optional:
            return None
        raise GatewayError(400, "request body is empty; expected a JSON object")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise GatewayError(400, "request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise GatewayError(400, "request body must be a JSON object")
    return data


def require_task_id(value: object, field: str = "task id") -> str:
    if not valid_task_id(value):
        raise GatewayError(400, f"{field} must be {ID_RULE}")
    assert isinstance(value, str)
    return value


async def read_ids(request: Request, limit: int, max_ids: int) -> list[str]:
    """The ``ids`` of a list-by-ids body, each checked, at most ``max_ids`` of them."""
    data = await read_json_object(request, limit)
    ids = data.get("ids")
    if not isinstance(ids, list):
        raise GatewayError(400, "body must have 'ids': an array of task ids")
    if len(ids) > max_ids:
        raise GatewayError(400, f"too many ids: {len(ids)} given, at most {max_ids} allowed")
    for index, task_id in enumerate(ids):
        if not valid_task_id(task_id):
            raise GatewayError(400, f"ids[{index}] must be a task id of {ID_RULE}")
    return ids


def check_submit_fields(data: dict[str, Any]) -> None:
    """Refuse known fields of the wrong type, naming the field."""
    for name, expected in _FIELD_TYPES.items():
        value = data.get(name)
        if value is None:
            continue
        if not isinstance(value, expected) or isinstance(value, bool):
            type_name = _TYPE_NAMES.get(expected, "valid") if isinstance(expected, type) else ""
            raise GatewayError(400, f"field '{name}' must be {type_name}")


def parent_task_id(kind: str, data: dict[str, Any]) -> str | None:
    """The task a submit acts on, if any: ``taskId``, or the first word of a simple-change."""
    if kind == "simple-change":
        content = data.get("content")
        if not isinstance(content, str) or not content.strip():
            raise GatewayError(400, "simple-change needs 'content' like '<taskId> U2'")
        return require_task_id(content.split()[0], "the task id in 'content'")
    if data.get("taskId") is not None:
        return require_task_id(data["taskId"], "field 'taskId'")
    if kind in _PARENT_REQUIRED:
        raise GatewayError(400, f"{kind} needs 'taskId', the task it acts on")
    return None
