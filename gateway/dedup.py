"""Duplicate submits: the same submit from the same caller is sent upstream once.

Two submits are the same when a caller sends the same route and the same JSON (compared in
canonical form) within ``submit.dedup_window_s``, or when it sends the same
``Idempotency-Key`` header within 24 hours (the IETF idempotency-key draft, as in Stripe's
API). The first claims the key in the store and runs; a duplicate gets the first one's answer
again (waiting for it while it runs), marked ``X-Mjgate-Deduplicated: true``, and nothing
reaches an upstream. That is what makes a timed-out submit safe for a client to retry: the
retry gets the 504 again instead of buying the image twice. An answer that surely sent
nothing (a quota refusal, every upstream refusing before any work) is not kept, so a retry
may go through. The same ``Idempotency-Key`` with a different request is a 422.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from starlette.responses import Response

from gateway.errors import GatewayError, StoreError, UpstreamError, UpstreamFailures, error_response
from gateway.metrics import DEDUPLICATED
from gateway.store import KeySpace, Store

__all__ = ["DEDUPLICATED_HEADER", "Dedup", "DedupKey", "Run"]

log = structlog.get_logger("mjgate.dedup")

DEDUPLICATED_HEADER = "x-mjgate-deduplicated"
IDEMPOTENCY_TTL_S = 24 * 3600
_IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")
_POLL_FIRST_S = 0.02
_POLL_MAX_S = 0.25

# The submit itself: its answer, and whether to keep it for duplicates.
Run = Callable[[], Awaitable[tuple[Response, bool]]]


@dataclass(frozen=True, slots=True)
class DedupKey:
    """Where one submit's answer is kept, the digest of the request, and for how long."""

    key: str
    request: str
    ttl_ms: int
    idempotency: bool


@dataclass(frozen=True, slots=True)
class _Stored:
    request: str
    done: bool
    status: int = 0
    content_type: str = ""
    body: bytes = b""


class Dedup:
    """Claims submits in the store and replays their answers to duplicates."""

    def __init__(self, store: Store, keys: KeySpace, window_s: float, lease_s: float) -> None:
        self.store = store
        self.keys = keys
        self.window_ms = int(window_s * 1000)
        # A claim outlives the longest a submit can take, then lapses so a crashed worker's
        # claim does not block the key for good.
        self.lease_ms = int(lease_s * 1000)

    def key_for(
        self, client: str, path: str, data: dict[str, Any], idempotency_key: str | None
    ) -> DedupKey | None:
        """The dedup key of a submit; None when neither the window nor a header asks for one.
        Raises GatewayError (400) for a malformed ``Idempotency-Key``."""
        canonical = orjson.dumps(data, option=orjson.OPT_SORT_KEYS)
        request = hashlib.sha256(path.encode() + b"\n" + canonical).hexdigest()
        if idempotency_key is not None:
            if not _IDEMPOTENCY_KEY.fullmatch(idempotency_key):
                raise GatewayError(400, "Idempotency-Key must be 1-255 printable ASCII characters")
            digest = hashlib.sha256(idempotency_key.encode()).hexdigest()
            key = self.keys.dedup(client, f"k:{digest}")
            return DedupKey(key, request, IDEMPOTENCY_TTL_S * 1000, True)
        if self.window_ms <= 0:
            return None
        return DedupKey(self.keys.dedup(client, f"b:{request}"), request, self.window_ms, False)

    async def once(self, key: DedupKey, run: Run, request_id: str) -> Response:
        """``run`` for the first of a key's submits; the first one's answer for the others."""
        pending = orjson.dumps({"request": key.request, "done": False})
        deadline = time.monotonic() + self.lease_ms / 1000 + 1
        poll_s = _POLL_FIRST_S
        while True:
            try:
                if await self.store.set_if_absent(key.key, pending, self.lease_ms):
                    return await self._first(key, run, request_id)
                stored = await self._read(key.key)
            except StoreError as exc:
                # Without the store there is no telling duplicates apart: serve as if none.
                log.warning("store_error", purpose="dedup", error=str(exc))
                return (await run())[0]
            if stored is None:
                continue  # the first let go of its claim: try to claim it again
            if stored.request != key.request:
                raise GatewayError(
                    422, "this Idempotency-Key was used with a different request: use a new key"
                )
            if stored.done:
                DEDUPLICATED.inc()
                headers = {"content-type": stored.content_type, DEDUPLICATED_HEADER: "true"}
                return Response(stored.body, stored.status, headers=headers)
            if time.monotonic() > deadline:
                raise GatewayError(503, "an identical submit is still running: retry later")
            await asyncio.sleep(poll_s)
            poll_s = min(poll_s * 1.5, _POLL_MAX_S)

    async def _first(self, key: DedupKey, run: Run, request_id: str) -> Response:
        try:
            response, keep = await run()
        except GatewayError as exc:
            if _may_have_sent(exc):
                if isinstance(exc, UpstreamError):
                    exc = UpstreamFailures([exc])
                answer = error_response(exc.status, exc.description, request_id, exc.headers)
                await self._keep(key, answer)
            else:
                await self._forget(key)
            raise
        except Exception:
            await self._forget(key)
            raise
        await (self._keep(key, response) if keep else self._forget(key))
        return response

    async def _read(self, key: str) -> _Stored | None:
        (value,) = await self.store.mget([key])
        if value is None:
            return None
        head, _, body = value.partition(b"\n")
        meta = orjson.loads(head)
        if not meta["done"]:
            return _Stored(meta["request"], False)
        return _Stored(meta["request"], True, meta["status"], meta["content_type"], body)

    async def _keep(self, key: DedupKey, response: Response) -> None:
        meta = {
            "request": key.request,
            "done": True,
            "status": response.status_code,
            "content_type": response.headers.get("content-type", "application/json"),
        }
        try:
            await self.store.set_many(
                {key.key: orjson.dumps(meta) + b"\n" + response.body}, key.ttl_ms
            )
        except StoreError as exc:
            log.warning("store_error", purpose="dedup", error=str(exc))

    async def _forget(self, key: DedupKey) -> None:
        try:
            await self.store.delete([key.key])
        except StoreError as exc:
            log.warning("store_error", purpose="dedup", error=str(exc))


def _may_have_sent(exc: GatewayError) -> bool:
    """Could the work behind this error exist upstream? Only an upstream's failure after the
    request left says so; mjgate's own refusals come before anything is sent."""
    if isinstance(exc, UpstreamFailures):
        return any(error.sent for error in exc.errors)
    return isinstance(exc, UpstreamError) and exc.sent
