"""Facts about one request, written by the front layer and the routes, read by every layer.

The front middleware creates a ``RequestInfo`` per request and keeps it in the ASGI scope;
routes and domain code add what they learn (cache result, upstreams called), and the access
log writes it out once the answer is sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.types import Scope

__all__ = ["RequestInfo", "attach", "request_info"]

_SCOPE_KEY = "mjgate.request"


@dataclass(slots=True)
class RequestInfo:
    """Facts about one request that handlers add to and the access log writes out."""

    request_id: str
    client: str = "-"
    cache: str = "MISS"
    tier: str = "-"
    route: str = ""
    # The caller's raw headers, for the few that may be passed on upstream.
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    upstreams: list[str] = field(default_factory=list)
    upstream_ms: float = 0.0


def attach(scope: Scope, info: RequestInfo) -> None:
    """Keep ``info`` in the request's scope, where ``request_info`` finds it."""
    scope[_SCOPE_KEY] = info


def request_info(scope: Scope) -> RequestInfo:
    """The facts of the request this scope belongs to."""
    info: RequestInfo = scope[_SCOPE_KEY]
    return info
