"""Per-caller rate limits, shared exactly by every worker and replica through the store.

Each worker spends small leases of tokens taken from the caller's shared bucket
(``gateway.buckets``), so most requests are judged without a store round trip, and a caller
near its limit is judged by the shared bucket one token at a time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import structlog
from starlette.responses import Response

from gateway.buckets import Grant
from gateway.config import Bucket, ClientConfig, RateLimitConfig
from gateway.errors import StoreError, error_response
from gateway.metrics import RATE_LIMITED
from gateway.store import KeySpace, Store

__all__ = ["CallerLimiter", "Decision", "refusal_response", "route_class"]

log = structlog.get_logger("mjgate.ratelimit")

MAX_LEASE = 256
LEASE_TTL_S = 1.0


# Not frozen: a frozen dataclass's __init__ costs a microsecond more, on every request.
@dataclass(slots=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_s: int
    retry_after_s: int = 0
    rps: float = 0.0
    store_down: bool = False

    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = [
            (b"ratelimit-limit", str(self.limit).encode()),
            (b"ratelimit-remaining", str(self.remaining).encode()),
            (b"ratelimit-reset", str(self.reset_s).encode()),
        ]
        if not self.allowed:
            headers.append((b"retry-after", str(self.retry_after_s).encode()))
        return headers


class _Lease:
    __slots__ = ("expires_at", "shared_left", "tokens")

    def __init__(self, tokens: int, shared_left: float, expires_at: float) -> None:
        self.tokens = tokens
        self.shared_left = shared_left
        self.expires_at = expires_at


def route_class(path: str) -> str:
    """``submit`` for work-creating routes, ``query`` for everything else."""
    return "submit" if "/submit/" in path or "/insight-face/" in path else "query"


class CallerLimiter:
    """Decides whether a caller may make one more request now."""

    def __init__(self, store: Store, keys: KeySpace, config: RateLimitConfig) -> None:
        self.store = store
        self.keys = keys
        self.config = config
        self._leases: dict[str, _Lease] = {}
        self._buckets: dict[tuple[str, str], tuple[str, Bucket]] = {}
        self._store_down = False

    async def admit(self, client: ClientConfig, path: str) -> Decision:
        """Whether this caller may make one more request to ``path`` now."""
        route = (client.name, route_class(path))
        bucket = self._buckets.get(route)
        if bucket is None:
            limits = client.rate_limit or self.config.default
            name, size = limits.for_class(route[1])
            bucket = self._buckets[route] = (self.keys.caller_bucket(client.name, name), size)
        return await self._check(*bucket)

    async def _check(self, key: str, bucket: Bucket) -> Decision:
        now = time.monotonic()
        lease = self._leases.get(key)
        if lease is not None and lease.tokens > 0 and lease.expires_at > now:
            lease.tokens -= 1
            return self._decision(True, bucket, lease.shared_left + lease.tokens)
        # An expired lease's unspent tokens go back to the shared bucket.
        refund = lease.tokens if lease is not None else 0
        self._leases.pop(key, None)
        try:
            grant = await self.store.take_tokens(key, bucket.rps, bucket.burst, MAX_LEASE, refund)
        except StoreError as exc:
            return self._on_store_error(bucket, exc)
        if self._store_down:
            self._store_down = False
            log.info("rate_limit_store_back")
        if grant.granted == 0:
            return self._refusal(bucket, grant)
        spare = grant.granted - 1
        live = self._leases.get(key)
        if live is not None and live.expires_at > now:
            # A concurrent request got a lease during our await: pool the tokens, lose none.
            live.tokens += spare
            live.shared_left = grant.tokens_left
        else:
            self._leases[key] = _Lease(spare, grant.tokens_left, now + LEASE_TTL_S)
        return self._decision(True, bucket, grant.tokens_left + spare)

    def _decision(self, allowed: bool, bucket: Bucket, left: float) -> Decision:
        reset = math.ceil(max(0.0, bucket.burst - left) / bucket.rps)
        return Decision(allowed, bucket.burst, max(0, math.floor(left)), reset, rps=bucket.rps)

    def _refusal(self, bucket: Bucket, grant: Grant) -> Decision:
        decision = self._decision(False, bucket, grant.tokens_left)
        retry = max(1, math.ceil(grant.retry_after_s(bucket.rps)))
        return Decision(False, decision.limit, 0, decision.reset_s, retry, bucket.rps)

    def _on_store_error(self, bucket: Bucket, exc: StoreError) -> Decision:
        allow = self.config.on_store_error == "allow"
        if not self._store_down:
            # Once per outage, not once per request: an outage under load would flood logs.
            self._store_down = True
            log.warning("store_error", purpose="rate_limit", error=str(exc), allowing=allow)
        if allow:
            return Decision(True, bucket.burst, bucket.burst, 0, rps=bucket.rps)
        return Decision(False, bucket.burst, 0, 1, 1, bucket.rps, store_down=True)


def refusal_response(client: ClientConfig, decision: Decision, request_id: str) -> Response:
    """The 429 JSON for a caller over its limit (or refused while the store is down)."""
    RATE_LIMITED.labels(client.name).inc()
    if decision.store_down:
        description = "rate limiter unavailable and configured to deny; retry shortly"
    else:
        description = (
            f"rate limit exceeded for client {client.name}: {decision.rps:g} requests/s, "
            f"bursts of {decision.limit}; retry in {decision.retry_after_s} s"
        )
    return error_response(429, description, request_id)
