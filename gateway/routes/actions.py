"""Acting on one task (``image-seed``, ``cancel``, ...) at its owner, and ``passthrough``."""

from __future__ import annotations

import asyncio
import re

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.auth import caller
from gateway.context import request_info
from gateway.errors import GatewayError, UpstreamError, UpstreamFailures
from gateway.routes.common import allowed, forward, services
from gateway.services import Services
from gateway.tasks import is_not_found
from gateway.upstreams import call, failed_answer
from gateway.validation import NAME_SEGMENT, read_json_object, require_task_id

__all__ = ["passthrough", "task_action"]

# Task actions after which an upstream's answer for the task differs from the cached one.
CHANGES_TASK = frozenset({"image-seed", "cancel"})
INVALIDATE_AGAIN_S = 2.0
_SAFE_QUERY = re.compile(r"[A-Za-z0-9_.~%&=+,-]*")


async def task_action(mode: str, request: Request) -> Response:
    """``/mj/task/{id}/{action}``: forwarded to the task's owner; the cache forgets the task
    when the action changes it."""
    task_id = require_task_id(request.path_params["task_id"])
    action = request.path_params["action"]
    if not NAME_SEGMENT.fullmatch(action):
        raise GatewayError(404, f"unknown task action: {action!r}")
    svc = services(request)
    data = None
    if request.method == "POST":
        data = await read_json_object(request, svc.config.server.max_body_bytes, optional=True)
    info = request_info(request.scope)
    owner = None
    if await svc.visibility.check(caller(request.scope), task_id):
        owner = await svc.lookup.owner_of(mode, task_id, allowed(request), info)
    if owner is None:
        raise GatewayError(404, f"task {task_id} not found")
    body = orjson.dumps(data) if data is not None else None
    try:
        response = await call(owner, info, "task_action", request.method, request.url.path, body)
    finally:
        if action in CHANGES_TASK:
            await _invalidate(svc, task_id)
    if error := failed_answer(response):
        raise UpstreamFailures([error])  # mjgate's 502 JSON, never an upstream's bare 5xx
    if is_not_found(response.status, response.content):
        raise GatewayError(404, f"task {task_id} not found")
    return forward(response)


async def _invalidate(svc: Services, task_id: str) -> None:
    """Drop a task that an action changed from every tier, and once more a moment later:
    a lookup already in flight during the action could otherwise write the old body
    back (the "delayed double delete")."""
    names = [u.name for u in svc.pool.all]
    await svc.cache.invalidate([task_id], names)

    async def again() -> None:
        await asyncio.sleep(INVALIDATE_AGAIN_S)
        await svc.cache.invalidate([task_id], names)

    svc.background.spawn(again())


async def passthrough(request: Request) -> Response:
    """A path the config lists under ``passthrough``: forwarded as it is to one upstream."""
    svc = services(request)
    data = None
    if request.method == "POST":
        data = await read_json_object(request, svc.config.server.max_body_bytes, optional=True)
    query = request.url.query
    if not _SAFE_QUERY.fullmatch(query):
        raise GatewayError(400, "query string has characters that are not allowed")
    path = request.url.path + (f"?{query}" if query else "")
    targets = svc.pool.submit_order(allowed(request))
    if not targets:
        raise GatewayError(503, "no upstream is available")
    info = request_info(request.scope)
    body = orjson.dumps(data) if data is not None else None
    for upstream in targets:
        try:
            response = await call(upstream, info, "passthrough", request.method, path, body)
            return forward(response)
        except UpstreamError as exc:
            if exc.sent or upstream is targets[-1]:
                raise UpstreamFailures([exc]) from None
    raise AssertionError("unreachable")
