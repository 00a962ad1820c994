"""Small helpers every route family shares."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from gateway.auth import caller
from gateway.services import Services, services_of
from gateway.upstreams import Upstream, UpstreamResponse

__all__ = ["allowed", "forward", "services"]


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
