"""The ASGI application: ``create_app(config)`` wires middleware, routes and services."""

from __future__ import annotations

import asyncio
import gc
import hmac
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import orjson
import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.auth import ClientRegistry
from gateway.config import Config
from gateway.configfile import load_config
from gateway.errors import GatewayError, error_response
from gateway.handlers import Handlers
from gateway.logs import configure_logging, flush_logs_every
from gateway.lookup import UpstreamFailures
from gateway.metrics import exposition
from gateway.middleware import GatewayMiddleware, request_info
from gateway.store import StoreError

__all__ = ["create_app", "factory", "secrets_of"]

log = structlog.get_logger("mjgate.app")

LOG_FLUSH_S = 0.2


def create_app(config: Config) -> Starlette:
    """Build the gateway. Clients and pools are created in the lifespan, not here, so the app
    may be built before a fork (gunicorn ``preload_app``)."""
    handlers = Handlers(config)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await handlers.start()
        flusher = asyncio.create_task(flush_logs_every(LOG_FLUSH_S))
        # Everything built so far lives as long as the process: keep it out of the
        # collector's way, so collections scan only what requests allocate.
        gc.freeze()
        log.info("started", upstreams=[u.name for u in config.upstreams])
        try:
            yield
        finally:
            await handlers.aclose()
            flusher.cancel()
            await asyncio.gather(flusher, return_exceptions=True)

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    async def readyz(request: Request) -> Response:
        """Ready while the store answers; upstream circuits are reported, not required."""
        circuits = {u.name: u.breaker.state for u in handlers.pool.all}
        try:
            async with asyncio.timeout(max(config.redis.socket_timeout_s, 0.1) * 2):
                await handlers.store.ping()
        except (StoreError, TimeoutError) as exc:
            log.warning("store_error", operation="ping", error=str(exc) or "timeout")
            body = {"status": "not ready", "store": "unreachable", "upstreams": circuits}
            return Response(orjson.dumps(body), 503, media_type="application/json")
        body = {"status": "ready", "store": "ok", "upstreams": circuits}
        return Response(orjson.dumps(body), media_type="application/json")

    quiet = frozenset({"/healthz", "/readyz", config.metrics.path})
    routes = [Route("/healthz", healthz), Route("/readyz", readyz)]
    if config.metrics.enabled:
        token = config.metrics.token.reveal()
        routes.append(Route(config.metrics.path, _metrics_endpoint(token)))
    app = Starlette(
        # The task routes first: the cached fetch is the request the team makes most.
        routes=[*handlers.routes(), *routes],
        middleware=[
            Middleware(
                GatewayMiddleware,
                registry=ClientRegistry(config),
                limiter=lambda: handlers.limiter,
                fast_path=lambda: handlers.cached_fetch,
                public_paths=quiet,
            ),
        ],
        exception_handlers={
            GatewayError: _gateway_error,
            UpstreamFailures: _upstream_failures,
            HTTPException: _http_exception,
        },
        lifespan=lifespan,
    )
    return app


def _metrics_endpoint(token: str) -> Callable[[Request], Awaitable[Response]]:
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


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return error_response(
        exc.status, exc.description, request_info(request.scope).request_id, exc.headers
    )


async def _upstream_failures(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, UpstreamFailures)
    for error in exc.errors:
        log.warning("upstream_error", upstream=error.upstream, kind=error.kind, error=str(error))
    status = 504 if exc.timed_out else 503 if exc.held_back else 502
    return error_response(status, str(exc), request_info(request.scope).request_id)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        description = f"no such route: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        description = f"method {request.method} is not allowed on {request.url.path}"
    else:
        description = str(exc.detail)
    return error_response(exc.status_code, description, request_info(request.scope).request_id)


def secrets_of(config: Config) -> list[str]:
    """Every secret value in the config, for the log redactor."""
    secrets = [u.key.reveal() for u in config.upstreams] + [config.metrics.token.reveal()]
    redis_url = config.redis.url.reveal()
    if "@" in redis_url:
        secrets.append(redis_url.split("@", 1)[0].rsplit(":", 1)[-1])
    return secrets


def factory() -> Starlette:
    """The app for gunicorn or uvicorn ``--factory``: config from ``MJGATE_CONFIG``."""
    config = load_config(os.environ.get("MJGATE_CONFIG", "config.yaml"))
    configure_logging(config.logging, secrets_of(config))
    return create_app(config)
