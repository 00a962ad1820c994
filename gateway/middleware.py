"""Pure ASGI middleware: request ids and the one access-log line per request."""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import error_response
from gateway.metrics import INFLIGHT, observe_request

__all__ = ["RequestContextMiddleware", "RequestInfo", "request_info"]

_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
_SCOPE_KEY = "mjgate.request"

access_log = structlog.get_logger("mjgate.access")
error_log = structlog.get_logger("mjgate.errors")


@dataclass(slots=True)
class RequestInfo:
    """Facts about one request that handlers add to and the access log writes out."""

    request_id: str
    client: str = "-"
    cache: str = "MISS"
    tier: str = "-"
    upstreams: list[str] = field(default_factory=list)
    upstream_ms: float = 0.0


def request_info(scope: Scope) -> RequestInfo:
    info: RequestInfo = scope[_SCOPE_KEY]
    return info


class RequestContextMiddleware:
    """Accepts a well-formed ``X-Request-Id`` or makes one, echoes it, binds it into every log
    line of the request, and writes the access-log line when the answer is sent."""

    def __init__(self, app: ASGIApp, quiet_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.quiet_paths = quiet_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_request_id(scope) or uuid.uuid4().hex
        info = RequestInfo(request_id=request_id)
        scope[_SCOPE_KEY] = info
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        status = 500
        started_response = False
        raw_id = request_id.encode()

        async def send_with_id(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                started_response = True
                status = message["status"]
                headers = [*message.get("headers", ()), (b"x-request-id", raw_id)]
                headers.append((b"x-cache", info.cache.encode()))
                if info.tier != "-":
                    headers.append((b"x-cache-tier", info.tier.encode()))
                message["headers"] = headers
            await send(message)

        async def app_or_500() -> None:
            # The last net for a bug: one JSON 500 with the request id, one logged traceback
            # (redacted like every line), and nothing for the server to print raw to stderr.
            try:
                await self.app(scope, receive, send_with_id)
            except Exception:
                error_log.exception("unhandled_error")
                if not started_response:
                    response = error_response(500, "internal gateway error", request_id)
                    await response(scope, receive, send_with_id)

        if scope["path"] in self.quiet_paths:
            await app_or_500()
            return
        INFLIGHT.inc()
        try:
            await app_or_500()
        finally:
            INFLIGHT.dec()
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", "unmatched")
            observe_request(route, scope["method"], status, info.cache, elapsed)
            access_log.info(
                "request",
                client=info.client,
                method=scope["method"],
                route=route,
                status=status,
                duration_ms=round(elapsed * 1000, 3),
                cache=info.cache,
                cache_tier=info.tier,
                upstreams=info.upstreams,
                upstream_ms=round(info.upstream_ms, 3),
            )


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            return value.decode("ascii") if _REQUEST_ID.fullmatch(value) else None
    return None
