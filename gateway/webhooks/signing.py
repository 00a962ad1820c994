"""Standard Webhooks signatures (https://www.standardwebhooks.com/).

A message is signed over ``{webhook-id}.{webhook-timestamp}.{body}`` with HMAC-SHA256, keyed
by the secret's bytes (the base64 after ``whsec_``); the ``webhook-signature`` header is
``v1,`` and the base64 digest. The ``standardwebhooks`` package verifies these (the tests use
it); the algorithm is a few lines, so the gateway carries no dependency for it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

__all__ = ["message_id", "signature", "webhook_headers"]

_PREFIX = "whsec_"


def message_id() -> str:
    """A fresh ``webhook-id``: one per message, the same on every retry of it."""
    return f"msg_{secrets.token_urlsafe(18)}"


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value for a body sent at ``timestamp`` (Unix seconds)."""
    key = base64.b64decode(secret.removeprefix(_PREFIX))
    signed = b"%s.%d.%s" % (msg_id.encode(), timestamp, body)
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def webhook_headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The headers of one delivery attempt; unsigned when the caller set no secret."""
    headers = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
    }
    if secret:
        headers["webhook-signature"] = signature(secret, msg_id, timestamp, body)
    return headers
