"""``/healthz``, ``/readyz`` and ``/metrics``: no caller key, no access-log line."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable

import orjson
import structlog
from starlette.requests import Request
from starlette.responses import Response

from gateway.context import request_info
from gateway.errors import StoreError, error_response
from gateway.metrics import exposition
from gateway.routes.common import services

__all__ = ["healthz", "metrics_endpoint", "readyz"]

log = structlog.get_logger("mjgate.health")


async def healthz(request: Request) -> Response:
    """The process answers."""
    return Response(b'{"status":"ok"}', media_type="application/json")


async def readyz(request: Request) -> Response:
    """Ready while the store answers; upstream circuits are reported, not required."""
    svc = services(request)
    circuits = {u.name: u.breaker.state for u in svc.pool.all}
    try:
        async with asyncio.timeout(max(svc.config.redis.socket_timeout_s, 0.1) * 2):
            await svc.store.ping()
    except (StoreError, TimeoutError) as exc:
        log.warning("store_error", operation="ping", error=str(exc) or "timeout")
        body = {"status": "not ready", "store": "unreachable", "upstreams": circuits}
        return Response(orjson.dumps(body), 503, media_type="application/json")
    body = {"status": "ready", "store": "ok", "upstreams": circuits}
    return Response(orjson.dumps(body), media_type="application/json")


def metrics_endpoint(token: str) -> Callable[[Request], Awaitable[Response]]:
    """``/metrics``, behind ``Authorization: Bearer <token>`` when a token is configured."""
    expected = token.encode()

    async def metrics(request: Request) -> Response:
        if token:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), expected):
                request_id = request_info(request.scope).request_id
                return error_response(401, "metrics need the configured bearer token", request_id)
        body, content_type = exposition()
        return Response(body, media_type=content_type)

    return metrics
