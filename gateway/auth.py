"""Caller authentication: who is asking, from the key they present.

A caller may present its key as ``Authorization: Bearer KEY`` (any case of ``Bearer``),
``Authorization: KEY`` or ``mj-api-secret: KEY``. ``Authorization`` wins unless it is empty or
the ``midjourney-proxy`` placeholder that some clients always send. Keys are compared by
SHA-256 digest, so the config may hold only digests.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import structlog
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.config import ClientConfig, Config
from gateway.errors import error_response
from gateway.middleware import request_info

__all__ = [
    "ANONYMOUS",
    "AuthMiddleware",
    "ClientRegistry",
    "caller",
    "caller_or_none",
    "extract_key",
]

ANONYMOUS = ClientConfig(name="anonymous", key_sha256="")
_PLACEHOLDER = "midjourney-proxy"
_SCOPE_KEY = "mjgate.client"


def extract_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The caller's key from raw ASGI headers, or None when none was presented."""
    authorization = secret = ""
    for name, value in headers:
        if name == b"authorization":
            authorization = value.decode("latin-1").strip()
        elif name == b"mj-api-secret":
            secret = value.decode("latin-1").strip()
    scheme, _, rest = authorization.partition(" ")
    if scheme.lower() == "bearer":
        authorization = rest.strip()
    if authorization and authorization != _PLACEHOLDER:
        return authorization
    return secret or None


class ClientRegistry:
    """Looks callers up by the digest of their key."""

    def __init__(self, config: Config) -> None:
        self._by_digest = {c.key_sha256: c for c in config.clients}
        self._allow_anonymous = config.allow_anonymous

    def authenticate(self, headers: Iterable[tuple[bytes, bytes]]) -> ClientConfig | None:
        key = extract_key(headers)
        if key is None:
            return ANONYMOUS if self._allow_anonymous else None
        # A dict lookup by digest leaks nothing useful through timing: the caller controls
        # the key, not the digest it is compared by.
        return self._by_digest.get(hashlib.sha256(key.encode()).hexdigest())


def caller(scope: Scope) -> ClientConfig:
    client: ClientConfig = scope[_SCOPE_KEY]
    return client


def caller_or_none(scope: Scope) -> ClientConfig | None:
    """The authenticated caller, or None on a public path."""
    client: ClientConfig | None = scope.get(_SCOPE_KEY)
    return client


class AuthMiddleware:
    """Refuses requests without a known key (401 JSON) before any routing or upstream call."""

    def __init__(
        self, app: ASGIApp, registry: ClientRegistry, public_paths: frozenset[str]
    ) -> None:
        self.app = app
        self.registry = registry
        self.public_paths = public_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.public_paths:
            await self.app(scope, receive, send)
            return
        client = self.registry.authenticate(scope["headers"])
        info = request_info(scope)
        if client is None:
            missing = extract_key(scope["headers"]) is None
            description = (
                "missing API key: send it as 'mj-api-secret: KEY' or 'Authorization: Bearer KEY'"
                if missing
                else "unknown API key"
            )
            response = error_response(401, description, info.request_id)
            await response(scope, receive, send)
            return
        scope[_SCOPE_KEY] = client
        info.client = client.name
        structlog.contextvars.bind_contextvars(client=client.name)
        await self.app(scope, receive, send)
