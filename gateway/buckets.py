"""Token buckets and slot counters, as Redis Lua scripts and their in-memory twins.

A bucket holds up to ``burst`` tokens and gains ``rate`` tokens a second. A taker asks for a
lease of up to ``want`` tokens; it gets at most an eighth of what is left (at least one while
any is left), so a worker can spend a lease locally without a store round trip per request,
and as the bucket empties leases shrink to one token: a caller near its limit is judged
exactly. Unspent tokens of an expired lease come back as ``refund``. The bucket never hands out
more than ``burst + rate * elapsed``, whoever asks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "LEASE_DIVISOR",
    "OUTBOUND_LUA",
    "TAKE_LUA",
    "Grant",
    "MemoryBucket",
    "MemoryOutbound",
]

LEASE_DIVISOR = 8

# KEYS[1] bucket; ARGV rate, burst, want, refund. Redis's own clock keeps every worker and
# replica on one time line.
TAKE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local want, refund = tonumber(ARGV[3]), tonumber(ARGV[4])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate + refund)
local granted = 0
if tokens >= 1 then
  granted = math.min(want, math.max(1, math.floor(tokens / 8)), math.floor(tokens))
  tokens = tokens - granted
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {granted, tostring(tokens)}
"""

# Outbound caps in one round trip. KEYS[1] rate bucket (burst 1: requests spaced at least
# 1/rate apart, so no second ever sees more than `rate`), KEYS[2] in-flight slot set.
# ARGV rate, holder, limit, ttl_ms. Returns 0 when admitted, else milliseconds to wait.
# Holders that died without releasing their slot expire after ttl_ms.
OUTBOUND_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local rate, limit, ttl = tonumber(ARGV[1]), tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) >= limit then
  return 10
end
local next_at = tonumber(redis.call('GET', KEYS[1]) or '0')
if next_at > now then
  return math.ceil(next_at - now)
end
redis.call('SET', KEYS[1], tostring(now + 1000 / rate), 'PX', math.ceil(1000 / rate) + 1000)
redis.call('ZADD', KEYS[2], now + ttl, ARGV[2])
redis.call('PEXPIRE', KEYS[2], ttl + 1000)
return 0
"""


@dataclass(frozen=True, slots=True)
class Grant:
    """Tokens granted (0 = refused) and tokens left in the bucket afterwards."""

    granted: int
    tokens_left: float

    def retry_after_s(self, rate: float) -> float:
        """When the next token will be there, for a refused taker."""
        return max(0.0, (1 - self.tokens_left) / rate)

    def reset_after_s(self, rate: float, burst: int) -> float:
        """When the bucket will be full again."""
        return max(0.0, (burst - self.tokens_left) / rate)


class MemoryBucket:
    """The in-process twin of ``TAKE_LUA`` for the embedded store."""

    __slots__ = ("tokens", "ts")

    def __init__(self, burst: int, now: float) -> None:
        self.tokens = float(burst)
        self.ts = now

    def take(self, now: float, rate: float, burst: int, want: int, refund: int) -> Grant:
        self.tokens = min(burst, self.tokens + max(0.0, now - self.ts) * rate + refund)
        self.ts = now
        granted = 0
        if self.tokens >= 1:
            granted = min(want, max(1, int(self.tokens // LEASE_DIVISOR)), math.floor(self.tokens))
            self.tokens -= granted
        return Grant(granted, self.tokens)


class MemoryOutbound:
    """The in-process twin of ``OUTBOUND_LUA`` (times in milliseconds)."""

    __slots__ = ("holders", "next_at")

    def __init__(self) -> None:
        self.holders: dict[str, float] = {}
        self.next_at = 0.0

    def acquire(self, now_ms: float, rate: float, holder: str, limit: int, ttl_ms: int) -> int:
        self.holders = {h: t for h, t in self.holders.items() if t > now_ms}
        if len(self.holders) >= limit:
            return 10
        if self.next_at > now_ms:
            return math.ceil(self.next_at - now_ms)
        self.next_at = now_ms + 1000 / rate
        self.holders[holder] = now_ms + ttl_ms
        return 0
