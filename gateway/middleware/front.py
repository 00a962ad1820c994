"""The gateway's front layer: one pure ASGI middleware in front of the Starlette app.

In order: request id, caller authentication, rate limit, then a task fetch's own path
(``gateway.middleware.fetch``) or the app, and finally metrics and the one access-log line.
One layer instead of one per concern: every layer re-wraps ``send`` and rebuilds header
lists, and a cached fetch, the request the team makes most, is cheap enough for that to be a
third of its cost.

Requests refused here (400, 401, 429) are counted and logged under the template of the route
they asked for, found only on those paths. ``X-Cache`` goes only on answers about tasks.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Sequence

import structlog
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.auth import missing_key_response, set_caller
from gateway.context import RequestInfo, attach, request_info
from gateway.errors import GatewayError, error_response
from gateway.logs import log_access
from gateway.metrics import INFLIGHT, L1_HIT, observe_request
from gateway.middleware.deadline import body_deadline
from gateway.middleware.fetch import (
    FETCH_ROUTES,
    body_headers,
    cached_fetch,
    direct_fetch,
    fetch_target,
    gateway_headers,
    says_about_tasks,
    send_answer,
)
from gateway.protocol import MODES
from gateway.ratelimit import refusal_response
from gateway.routes import keyless
from gateway.services import services_of

__all__ = ["GatewayMiddleware", "new_request_id", "request_id_of"]

_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
# Request ids: a random prefix per process and a counter; unique across workers, and far
# cheaper than a uuid4 (one urandom call) per request.
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(1)
# A client that hung up while its request was read (nginx's code: there is no one to answer).
_CLIENT_GONE = 499
# The routes whose answers carry X-Cache: fetch, the lists, the search, task actions.
_TASK_ROUTES = frozenset(
    f"{mode}/mj/task/{suffix}"
    for mode in MODES
    for suffix in (
        "{task_id}/fetch",
        "list-by-condition",
        "list-by-ids",
        "query",
        "list",
        "queue",
        "{task_id}/{action}",
    )
)
_NO_BODY_METHODS = frozenset({"GET", "HEAD"})

error_log = structlog.get_logger("mjgate.errors")


class GatewayMiddleware:
    """Request id, authentication, rate limit, the cached-fetch fast path, metrics and the
    access line, in one pure ASGI layer. Services come from the lifespan state."""

    def __init__(
        self, app: ASGIApp, public_paths: frozenset[str], routes: Sequence[BaseRoute]
    ) -> None:
        self.app = app
        self.public_paths = public_paths
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        info = RequestInfo(request_id=request_id_of(scope))
        attach(scope, info)
        if scope["path"] in self.public_paths:
            # Health, readiness and metrics: no key, no limit, no access-log noise.
            await self._app(scope, receive, _with_headers(send, scope, info, ()))
            return
        started = time.perf_counter()
        status = 500
        try:
            status = await self._serve(scope, receive, send, info)
        finally:
            elapsed = time.perf_counter() - started
            route = info.route or getattr(scope.get("route"), "path", "unmatched")
            observe_request(route, scope["method"], status, info.cache, elapsed)
            log_access(
                {
                    "request_id": info.request_id,
                    "client": info.client,
                    "method": scope["method"],
                    "route": route,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 3),
                    "cache": info.cache,
                    "cache_tier": info.tier,
                    "upstreams": info.upstreams,
                    "upstream_ms": round(info.upstream_ms, 3),
                }
            )

    async def _serve(self, scope: Scope, receive: Receive, send: Send, info: RequestInfo) -> int:
        """Answer the request; return its status."""
        services = services_of(scope)
        try:
            client = services.registry.authenticate(scope["headers"])
        except GatewayError as exc:  # ambiguous credentials
            refusal = error_response(exc.status, exc.description, info.request_id)
            return await self._refuse(scope, receive, send, info, refusal, ())
        if client is None and services.images is not None and services.images.presigned(scope):
            client = services.images.signed_caller  # its route checks the signature
        if client is None and keyless(scope):
            # Its route checks a credential of its own (an upstream's push URL, a stream
            # token) and names the caller; no caller's limit applies before that.
            status = _Status()
            await self._app(scope, receive, _with_headers(send, scope, info, (), status), status)
            return status.code
        if client is None:
            refusal = missing_key_response(scope["headers"], info.request_id)
            return await self._refuse(scope, receive, send, info, refusal, ())
        set_caller(scope, client)
        info.client = client.name
        # Decide the fast path before spending a token, so nothing is charged twice.
        target = fetch_target(scope)
        fast = None if target is None else cached_fetch(services, client, target[1])
        decision = await services.limiter.admit(client, scope["path"])
        limit_headers = decision.headers()
        if not decision.allowed:
            refusal = refusal_response(client, decision, info.request_id)
            return await self._refuse(scope, receive, send, info, refusal, limit_headers)
        if target is not None:
            info.route = FETCH_ROUTES[target[0]]
            if fast is None:
                info.headers = scope["headers"]
                return await direct_fetch(services, client, target, info, send, limit_headers)
            L1_HIT.inc()
            info.cache, info.tier = fast.cache, fast.tier
            head = body_headers(fast.body, fast.content_type)
            return await send_answer(send, 200, fast.body, head, info, limit_headers)
        status = _Status()
        await self._app(
            scope, receive, _with_headers(send, scope, info, limit_headers, status), status
        )
        return status.code

    async def _refuse(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        info: RequestInfo,
        response: Response,
        extra: list[tuple[bytes, bytes]] | tuple[()],
    ) -> int:
        """Send a refusal made here, before routing; return its status."""
        info.route = self._route_of(scope)
        await response(scope, receive, _with_headers(send, scope, info, extra))
        return response.status_code

    def _route_of(self, scope: Scope) -> str:
        """The template of the route the router would pick (a full match first, else the first
        partial one, as Starlette does), or "unmatched"."""
        partial = None
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return str(getattr(route, "path", "unmatched"))
            if match is Match.PARTIAL and partial is None:
                partial = route
        return str(getattr(partial, "path", "unmatched"))

    async def _app(
        self, scope: Scope, receive: Receive, send: Send, status: _Status | None = None
    ) -> None:
        """The app, with a last net for bugs: one JSON 500 carrying the request id, one logged
        (and redacted) traceback, and nothing for the server to print raw to stderr.

        A body must arrive within ``server.body_timeout_s`` (else 408). Every line the app logs
        carries the request id and client through contextvars; the fast path logs only the
        access line and binds nothing (each request is its own task, with its own context)."""
        info = request_info(scope)
        info.headers = scope["headers"]
        structlog.contextvars.bind_contextvars(request_id=info.request_id, client=info.client)
        if scope["method"] not in _NO_BODY_METHODS:
            receive = body_deadline(receive, services_of(scope).config.server.body_timeout_s)
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        # Only what the app answers is counted in flight: an L1 hit or a refusal is sent
        # without giving the loop to anyone else, so no scrape could ever see it in flight.
        counted = status is not None
        if counted:
            INFLIGHT.inc()
        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            if status is not None and not started:
                status.code = _CLIENT_GONE
        except Exception:
            error_log.exception("unhandled_error")
            if not started:
                response = error_response(
                    500, "internal gateway error", request_info(scope).request_id
                )
                await response(scope, receive, send)
        finally:
            if counted:
                INFLIGHT.dec()


class _Status:
    __slots__ = ("code",)

    def __init__(self) -> None:
        self.code = 500


def _with_headers(
    send: Send,
    scope: Scope,
    info: RequestInfo,
    extra: list[tuple[bytes, bytes]] | tuple[()],
    status: _Status | None = None,
) -> Send:
    """``send`` adding the request id, the cache headers (on answers about tasks) and
    ``extra`` to the answer."""

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            code = message["status"]
            if status is not None:
                status.code = code
            if not _about_tasks(scope, code):
                info.cache = "-"
            message["headers"] = [*message.get("headers", ()), *gateway_headers(info), *extra]
        await send(message)

    return wrapped


def _about_tasks(scope: Scope, status: int) -> bool:
    """An answer about tasks: a task route's answer that says something about them."""
    on_task_route = getattr(scope.get("route"), "path", None) in _TASK_ROUTES
    return on_task_route and says_about_tasks(status)


def new_request_id() -> str:
    """A request id unique across workers: this process's random prefix and a counter."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def request_id_of(scope: Scope) -> str:
    """The caller's ``X-Request-Id`` when well-formed, else a new one."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            if _REQUEST_ID.fullmatch(value):
                given: str = value.decode("ascii")
                return given
            break
    return new_request_id()
