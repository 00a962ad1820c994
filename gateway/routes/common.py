"""Small helpers every route family shares."""

from __future__ import annotations

import structlog
from starlette.requests import Request
from starlette.responses import Response

from gateway.auth import caller
from gateway.errors import GatewayError, UpstreamError, UpstreamFailures, error_response
from gateway.services import Services, services_of
from gateway.upstreams import Upstream, UpstreamResponse

__all__ = ["allowed", "error_answer", "forward", "services"]

log = structlog.get_logger("mjgate.app")


def services(request: Request) -> Services:
    """The app's services, from the lifespan state."""
    return services_of(request.scope)


def allowed(request: Request) -> tuple[Upstream, ...]:
    """The upstreams this request's caller may reach."""
    return services(request).pool.allowed(caller(request.scope).upstreams)


def forward(response: UpstreamResponse) -> Response:
    """The upstream's answer as it came: same status, same bytes."""
    return Response(
        response.content,
        status_code=response.status,
        headers={"content-type": response.content_type},
    )


def error_answer(exc: GatewayError, request_id: str) -> Response:
    """mjgate's JSON error for ``exc``; each upstream failure behind it is logged."""
    if isinstance(exc, UpstreamError):
        exc = UpstreamFailures([exc])
    if isinstance(exc, UpstreamFailures):
        for error in exc.errors:
            log.warning(
                "upstream_error", upstream=error.upstream, kind=error.kind, error=str(error)
            )
    return error_response(exc.status, exc.description, request_id, exc.headers)
