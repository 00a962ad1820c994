"""The ASGI application: ``create_app(config)`` wires the front middleware, the route table
and a lifespan that opens the services and hands them to every request as lifespan state."""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response

from gateway.config import Config
from gateway.configfile import load_config
from gateway.context import request_info
from gateway.errors import GatewayError, error_response
from gateway.logs import configure_logging, flush_logs_every, secrets_of
from gateway.middleware import GatewayMiddleware, cors_middleware
from gateway.routes import public_paths, route_table
from gateway.routes.common import error_answer
from gateway.services import STATE_KEY, open_services

__all__ = ["GC_YOUNG_THRESHOLD", "create_app", "factory", "settle_heap"]

log = structlog.get_logger("mjgate.app")

LOG_FLUSH_S = 0.2
# CPython collects its young generation whenever the objects allocated and not yet freed
# pass this count (700 by default). Fifty requests in flight hold more than that between
# them, so the collector ran every few requests and cost a miss about 6% of its CPU
# (12 us of 190); above the working set of the requests in flight, it runs once in
# thousands of requests.
GC_YOUNG_THRESHOLD = 10_000


def create_app(config: Config) -> Starlette:
    """Build the gateway. Clients and pools are created in the lifespan, not here, so the app
    may be built before a fork (gunicorn ``preload_app``)."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, object]]:
        async with open_services(config) as services:
            flusher = asyncio.create_task(flush_logs_every(LOG_FLUSH_S))
            settle_heap()
            log.info("started", upstreams=[u.name for u in config.upstreams])
            try:
                yield {STATE_KEY: services}
            finally:
                flusher.cancel()
                await asyncio.gather(flusher, return_exceptions=True)

    routes = route_table(config)
    front = Middleware(GatewayMiddleware, public_paths=public_paths(config), routes=routes)
    return Starlette(
        routes=routes,
        # CORS outside: a preflight is answered before the key is asked for.
        middleware=[*cors_middleware(config.server.cors), front],
        exception_handlers={GatewayError: _gateway_error, HTTPException: _http_exception},
        lifespan=lifespan,
    )


def settle_heap() -> None:
    """Once the services are built: everything so far lives as long as the process, so it is
    left out of every later collection (``gc.freeze``), and the young generation is
    collected past ``GC_YOUNG_THRESHOLD`` objects."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return error_answer(exc, request_info(request.scope).request_id)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        description = f"no such route: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        description = f"method {request.method} is not allowed on {request.url.path}"
    else:
        description = str(exc.detail)
    return error_response(exc.status_code, description, request_info(request.scope).request_id)


def factory() -> Starlette:
    """The app for gunicorn or uvicorn ``--factory``: config from ``MJGATE_CONFIG``."""
    config = load_config(os.environ.get("MJGATE_CONFIG", "config.yaml"))
    configure_logging(config.logging, secrets_of(config))
    return create_app(config)
