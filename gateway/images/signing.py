"""Signed image URLs: ``/mj/image/{task_id}[/{n}]?exp=UNIX&sig=HMAC``.

A signed URL works without a key, so an ``<img src>`` in a browser can show a task's image
without exposing the caller's key. The signature is an HMAC-SHA256 over the task id, the
image index and the expiry, keyed by a key derived from ``server.secret_key`` (so a signature
made for another purpose with the same secret never passes here).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from urllib.parse import parse_qs, urlsplit

from gateway.config import ClientConfig, RateLimit

__all__ = ["SIGNED_URL_CALLER", "UrlSigner", "image_path", "signed_expiry", "signed_url_caller"]

SIGNED_URL_CALLER = "signed-url"  # its name in logs, metrics and the ledger
_PURPOSE = b"mjgate image url v1"
_MAX_EXP_DIGITS = 12


def image_path(task_id: str, n: int | None) -> str:
    """The gateway path of a task's image (``n``: one of several, from 0)."""
    return f"/mj/image/{task_id}" if n is None else f"/mj/image/{task_id}/{n}"


class UrlSigner:
    """Makes and checks signed image URLs."""

    def __init__(self, secret: str, ttl_s: int, public_url: str) -> None:
        self._key = hmac.new(secret.encode(), _PURPOSE, hashlib.sha256).digest()
        self.ttl_s = ttl_s
        self.public_url = public_url
        # Expiries are rounded up to this step, so every answer within one step carries the
        # same URL and a browser downloads the image once.
        self._step = max(ttl_s // 8, 1)

    def url(self, task_id: str, n: int | None, now: float) -> str:
        """The full signed URL, valid at least ``ttl_s`` from ``now``."""
        exp = self.expiry(now)
        signature = self._sign(task_id, n, exp)
        return f"{self.public_url}{image_path(task_id, n)}?exp={exp}&sig={signature}"

    def expiry(self, now: float) -> int:
        return -(-int(now + self.ttl_s) // self._step) * self._step

    def check(self, task_id: str, n: int | None, exp: str, sig: str, now: float) -> str | None:
        """None when the signature is valid and unexpired; else what is wrong with it."""
        if not (exp.isascii() and exp.isdigit()) or len(exp) > _MAX_EXP_DIGITS:
            return "malformed signed URL"
        if not hmac.compare_digest(self._sign(task_id, n, int(exp)), sig):
            return "invalid signature"
        if int(exp) <= now:
            return "signed URL expired"
        return None

    def _sign(self, task_id: str, n: int | None, exp: int) -> str:
        message = f"{task_id}/{'' if n is None else n}/{exp}".encode()
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def signed_expiry(url: str) -> int | None:
    """The ``exp`` of a signed image URL, None for any other URL."""
    parts = urlsplit(url)
    if "/mj/image/" not in parts.path:
        return None
    values = parse_qs(parts.query).get("exp", [])
    return int(values[0]) if len(values) == 1 and values[0].isdigit() else None


def signed_url_caller(limit: RateLimit) -> ClientConfig:
    """The caller of every request that presents a signed URL instead of a key: one bucket
    (``images.signed_rate_limit``) for them all."""
    return ClientConfig(name=SIGNED_URL_CALLER, key_sha256="", rate_limit=limit)
