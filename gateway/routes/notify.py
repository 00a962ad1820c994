"""``POST /mj/notify/{upstream}/{token}``: an upstream pushing a task's change to mjgate.

No caller key: the URL's token (``gateway.push``) is the credential. A wrong upstream or
token is answered as an unknown route, and nothing changes.
"""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.cache import encode_task
from gateway.context import request_info
from gateway.errors import GatewayError
from gateway.protocol import STATUSES, TERMINAL
from gateway.routes.common import services
from gateway.tasks import valid_task_id
from gateway.validation import read_json_object

__all__ = ["notify"]

_TAKEN = orjson.dumps({"code": 1, "description": "ok"})


async def notify(request: Request) -> Response:
    """Take a pushed task into the cache (and so the ledger, its events and callbacks)."""
    svc = services(request)
    name = request.path_params["upstream"]
    upstream = svc.pushes.upstream_for(name, request.path_params["token"])
    if upstream is None:
        # Never echo the path: it would hand the token back to whoever guessed at it.
        raise GatewayError(404, "no such route")
    request_info(request.scope).client = f"upstream:{name}"
    task = await read_json_object(request, svc.config.server.max_body_bytes)
    if not valid_task_id(task.get("id")) or task.get("status") not in STATUSES:
        raise GatewayError(400, "the body must be a task with a valid id and status")
    if not await svc.pushes.belongs(name, task):
        raise GatewayError(404, f"task {task['id']} is not one of {name}'s")
    await svc.owners.record(task["id"], name)
    held = svc.cache.local(name, task["id"])
    # A push that arrives late never takes a finished task back to running.
    if held is None or not held.terminal or task["status"] in TERMINAL:
        await svc.cache.put_tasks([(name, task, encode_task(task))])
    return Response(_TAKEN, media_type="application/json")
