"""CORS for browser clients, from ``server.cors.allow_origins``.

Starlette's ``CORSMiddleware``, placed outside the gateway's own layer: a preflight (an
``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) is answered without a key,
and every other answer, refusals included, carries the CORS headers a browser needs to let
the page read it. Keys travel in headers, never in cookies, so credentials stay off.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from gateway.config import CorsConfig
from gateway.errors import error_response
from gateway.middleware.front import new_request_id

__all__ = ["ALLOWED_HEADERS", "EXPOSED_HEADERS", "GatewayCors", "cors_middleware"]

ALLOWED_HEADERS = (
    "mj-api-secret",
    "Authorization",
    "Content-Type",
    "X-Request-Id",
    "Last-Event-ID",  # fetch-based SSE clients resume with it
)
# Every header the gateway itself may add to an answer.
EXPOSED_HEADERS = (
    "X-Request-Id",
    "X-Cache",
    "X-Cache-Tier",
    "X-Gateway-Partial",
    "RateLimit-Limit",
    "RateLimit-Remaining",
    "RateLimit-Reset",
    "Retry-After",
)


class GatewayCors(CORSMiddleware):
    """``CORSMiddleware`` whose refused preflights are mjgate's JSON errors."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 200:
            return response
        request_id = new_request_id()
        description = bytes(response.body).decode()  # "Disallowed CORS origin, headers"
        refusal = error_response(response.status_code, description, request_id)
        refusal.headers["x-request-id"] = request_id
        refusal.headers["vary"] = response.headers["vary"]
        return refusal


def cors_middleware(config: CorsConfig) -> list[Middleware]:
    """The CORS layer for the configured origins; none at all when no origin is allowed."""
    if not config.allow_origins:
        return []
    return [
        Middleware(
            GatewayCors,
            allow_origins=config.allow_origins,
            allow_methods=("GET", "POST"),
            allow_headers=ALLOWED_HEADERS,
            expose_headers=EXPOSED_HEADERS,
        )
    ]
