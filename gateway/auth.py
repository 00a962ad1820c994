"""Caller authentication: who is asking, from the key they present.

A caller may present its key as ``Authorization: Bearer KEY`` (any case of ``Bearer``),
``Authorization: KEY`` or ``mj-api-secret: KEY``. ``Authorization`` wins unless it is empty or
the ``midjourney-proxy`` placeholder that some clients always send. Either header given twice
is refused (400): which of the two keys counts would be a guess. Keys are compared by SHA-256
digest, so the config may hold only digests.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from starlette.responses import Response
from starlette.types import Scope

from gateway.config import ClientConfig, Config
from gateway.errors import GatewayError, error_response

__all__ = [
    "ANONYMOUS",
    "ClientRegistry",
    "caller",
    "extract_key",
    "missing_key_response",
    "set_caller",
]

ANONYMOUS = ClientConfig(name="anonymous", key_sha256="")
_PLACEHOLDER = "midjourney-proxy"
_KNOWN_KEYS = 10_000
_SCOPE_KEY = "mjgate.client"


def extract_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The caller's key from raw ASGI headers, or None when none was presented.

    Raises ``GatewayError`` (400) when ``Authorization`` or ``mj-api-secret`` comes twice."""
    authorization: str | None = None
    secret: str | None = None
    for name, value in headers:
        if name == b"authorization":
            if authorization is not None:
                raise _ambiguous("Authorization")
            authorization = value.decode("latin-1").strip()
        elif name == b"mj-api-secret":
            if secret is not None:
                raise _ambiguous("mj-api-secret")
            secret = value.decode("latin-1").strip()
    scheme, _, rest = (authorization or "").partition(" ")
    if scheme.lower() == "bearer":
        authorization = rest.strip()
    if authorization and authorization != _PLACEHOLDER:
        return authorization
    return secret or None


def _ambiguous(header: str) -> GatewayError:
    return GatewayError(400, f"the {header} header is given twice: send one key, once")


class ClientRegistry:
    """Looks callers up by the digest of their key (any of a client's keys)."""

    def __init__(self, config: Config) -> None:
        self._by_digest = {d: c for c in config.clients for d in c.key_sha256s}
        self._allow_anonymous = config.allow_anonymous
        # Keys already seen to be valid, so the digest is computed once per key, not per
        # request. Only known keys are kept: a caller spraying random keys cannot grow it.
        self._known: dict[str, ClientConfig] = {}

    def authenticate(self, headers: Iterable[tuple[bytes, bytes]]) -> ClientConfig | None:
        """The client whose key is presented; None for an unknown or missing key (unless
        anonymous callers are allowed). Raises ``GatewayError`` (400) as ``extract_key``."""
        key = extract_key(headers)
        if key is None:
            return ANONYMOUS if self._allow_anonymous else None
        client = self._known.get(key)
        if client is None:
            # A dict lookup by digest leaks nothing useful through timing: the caller
            # controls the key, not the digest it is compared by.
            client = self._by_digest.get(hashlib.sha256(key.encode()).hexdigest())
            if client is not None and len(self._known) < _KNOWN_KEYS:
                self._known[key] = client
        return client


def caller(scope: Scope) -> ClientConfig:
    client: ClientConfig = scope[_SCOPE_KEY]
    return client


def set_caller(scope: Scope, client: ClientConfig) -> None:
    scope[_SCOPE_KEY] = client


def missing_key_response(headers: Iterable[tuple[bytes, bytes]], request_id: str) -> Response:
    """The 401 for a request without a known key, saying which of the two it lacked."""
    if extract_key(headers) is None:
        description = (
            "missing API key: send it as 'mj-api-secret: KEY' or 'Authorization: Bearer KEY'"
        )
    else:
        description = "unknown API key"
    return error_response(401, description, request_id)
