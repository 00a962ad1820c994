"""``/healthz``, ``/readyz`` and ``/metrics``: no caller key, no access-log line."""

from __future__ import annotations

import asyncio
import hmac
import os
from collections.abc import Awaitable, Callable

import orjson
import structlog
from starlette.requests import Request
from starlette.responses import Response

from gateway.context import request_info
from gateway.errors import StoreError, error_response
from gateway.metrics import CIRCUIT_VALUES, exposition, fleet_circuit_values
from gateway.routes.common import services
from gateway.services import Services

__all__ = ["healthz", "metrics_endpoint", "readyz"]

log = structlog.get_logger("mjgate.health")

_CIRCUIT_NAMES = {value: name for name, value in CIRCUIT_VALUES.items()}


async def healthz(request: Request) -> Response:
    """The process answers."""
    return Response(b'{"status":"ok"}', media_type="application/json")


async def readyz(request: Request) -> Response:
    """Ready while the store answers; upstream circuits are reported, not required.

    Each circuit is the worst any worker of this host sees (under gunicorn, read from the
    multiprocess metrics directory): one open circuit in any worker reads "open", whichever
    worker answers. ``worker`` names the process that answered."""
    svc = services(request)
    circuits = _circuits(svc)
    try:
        async with asyncio.timeout(max(svc.config.redis.socket_timeout_s, 0.1) * 2):
            await svc.store.ping()
    except (StoreError, TimeoutError) as exc:
        log.warning("store_error", operation="ping", error=str(exc) or "timeout")
        return _readiness(503, "not ready", "unreachable", circuits)
    return _readiness(200, "ready", "ok", circuits)


def _readiness(status: int, ready: str, store: str, circuits: dict[str, str]) -> Response:
    body = {"status": ready, "store": store, "upstreams": circuits, "worker": os.getpid()}
    return Response(orjson.dumps(body), status, media_type="application/json")


def _circuits(svc: Services) -> dict[str, str]:
    fleet = fleet_circuit_values()
    return {
        u.name: _CIRCUIT_NAMES[max(CIRCUIT_VALUES[u.breaker.state], fleet.get(u.name, 0))]
        for u in svc.pool.all
    }


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
