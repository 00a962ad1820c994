"""Live progress: ``GET /mj/task/{id}/events`` streams a task as Server-Sent Events.

One event per change (``id:`` is the task log's, so ``Last-Event-ID`` resumes where a
connection broke), heartbeats between, and the stream ends after the terminal event. Events
come from the task's log in the store, which the watcher, lookups and pushes feed: any
worker serves any subscriber, and a subscriber costs no upstream call of its own.

Auth and visibility are those of fetch. A browser's ``EventSource`` cannot send a key
header, so ``POST /mj/task/{id}/events/token`` (with the key) hands out a short-lived token,
signed with ``server.secret_key``, for ``?token=`` on the stream URL: the key itself never
goes into a URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

from gateway.auth import caller, set_caller
from gateway.context import request_info
from gateway.errors import GatewayError, StoreError
from gateway.events import EVENT_ID, TaskEvent
from gateway.lookup import Answer
from gateway.metrics import EVENT_STREAMS
from gateway.routes.common import allowed, services
from gateway.services import Services
from gateway.validation import require_task_id

__all__ = ["TOKEN_TTL_S", "has_stream_token", "stream", "stream_token"]

TOKEN_TTL_S = 600
HEARTBEAT_S = 15
RETRY_MS = 2000


def has_stream_token(scope: Scope) -> bool:
    """A stream request that brings a token instead of a key (checked by the route)."""
    return scope["path"].endswith("/events") and b"token=" in scope.get("query_string", b"")


async def stream_token(mode: str, request: Request) -> Response:
    """``POST /mj/task/{id}/events/token``: a token for ``?token=`` on the stream URL."""
    task_id = require_task_id(request.path_params["task_id"])
    svc = services(request)
    if not svc.stream_tokens.enabled:
        raise GatewayError(503, "server.secret_key is not set, so no stream tokens are made")
    await _visible_task(svc, mode, task_id, request)
    expires = int(time.time()) + TOKEN_TTL_S
    token = svc.stream_tokens.make(caller(request.scope).name, task_id, expires)
    body = {
        "token": token,
        "expires_at": expires,
        "url": f"{mode}/mj/task/{task_id}/events?token={token}",
    }
    return Response(orjson.dumps(body), media_type="application/json")


async def stream(mode: str, request: Request) -> Response:
    """``GET /mj/task/{id}/events``: the task's changes as Server-Sent Events."""
    task_id = require_task_id(request.path_params["task_id"])
    svc = services(request)
    _authenticate(svc, request, task_id)
    last = request.headers.get("last-event-id", "").strip()
    if last and not EVENT_ID.fullmatch(last):
        raise GatewayError(400, "Last-Event-ID is not an id this stream sent")
    answer = await _visible_task(svc, mode, task_id, request)
    upstreams, info = allowed(request), request_info(request.scope)

    async def refresh() -> None:
        """The task as fetch finds it (the cache first, one upstream call per worker at
        most): a task the watcher does not follow still moves on."""
        with contextlib.suppress(GatewayError):
            await svc.lookup.fetch(mode, task_id, upstreams, info)

    events = _events(svc, task_id, last, answer.body, refresh)
    return EventSourceResponse(events, ping=HEARTBEAT_S)


def _authenticate(svc: Services, request: Request, task_id: str) -> None:
    """A request without a key must bring a valid token: it names the caller."""
    with contextlib.suppress(KeyError):
        caller(request.scope)
        return  # the key was presented
    token = request.query_params.get("token", "")
    client = svc.stream_tokens.client_of(token, task_id, time.time())
    if client is None:
        raise GatewayError(401, "missing API key, or a stream token that is invalid or expired")
    set_caller(request.scope, client)
    request_info(request.scope).client = client.name


async def _visible_task(svc: Services, mode: str, task_id: str, request: Request) -> Answer:
    """The task as fetch answers it; 404 exactly where fetch says not found."""
    info = request_info(request.scope)
    visible = await svc.visibility.check(caller(request.scope), task_id)
    answer = await svc.lookup.fetch(mode, task_id, allowed(request), info) if visible else None
    if answer is None or not answer.found:
        raise GatewayError(404, f"task {task_id} not found")
    return answer


async def _events(
    svc: Services,
    task_id: str,
    last: str,
    current: bytes,
    refresh: Callable[[], Awaitable[None]],
) -> AsyncIterator[ServerSentEvent]:
    """The events after ``last`` (or from the latest state), until the terminal one."""
    quiet_s = 2 * svc.config.watcher.interval_s
    EVENT_STREAMS.inc()
    try:
        with svc.hub.watch(task_id) as wake:
            latest = await _latest(svc, task_id, current)
            if latest is not None and not last:
                yield _sse(latest)
                last = latest.id
            if latest is not None and latest.terminal and latest.id == last:
                return
            while True:
                wake.clear()
                for event in await _after(svc, task_id, last):
                    yield _sse(event)
                    last = event.id
                    if event.terminal:
                        return
                try:
                    async with asyncio.timeout(quiet_s):
                        await wake.wait()
                except TimeoutError:
                    await refresh()
    finally:
        EVENT_STREAMS.dec()


async def _latest(svc: Services, task_id: str, current: bytes) -> TaskEvent | None:
    """The task's latest logged state; an empty log first takes the state fetch found."""
    try:
        latest = await svc.events.latest(task_id)
        if latest is None:
            await svc.events.record([(orjson.loads(current), current)])
            latest = await svc.events.latest(task_id)
    except StoreError:
        return None
    return latest


async def _after(svc: Services, task_id: str, last: str) -> list[TaskEvent]:
    try:
        return await svc.events.after(task_id, last)
    except StoreError:
        return []  # the next wake or refresh reads again


def _sse(event: TaskEvent) -> ServerSentEvent:
    return ServerSentEvent(data=event.body.decode(), id=event.id, retry=RETRY_MS)
