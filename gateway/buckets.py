"""Token buckets and outbound leases, as Redis Lua scripts and their in-memory twins.

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
    "SLOTS_LEASE_LUA",
    "TAKE_LUA",
    "Grant",
    "MemoryBucket",
    "MemorySlots",
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

# Outbound in-flight slots, leased in blocks. KEYS[1] is a sorted set of held slots scored by
# their expiry (a worker that dies frees its slots then). ARGV holder, first, want, limit,
# ttl_ms: up to ``want`` slots named holder:first, holder:first+1, ...; an eighth of the free
# ones (at least one while any is free). Returns how many were leased.
SLOTS_LEASE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local first, want = tonumber(ARGV[2]), tonumber(ARGV[3])
local limit, ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local free = limit - redis.call('ZCARD', KEYS[1])
if free <= 0 then
  return 0
end
local n = math.min(want, math.max(1, math.floor(free / 8)))
for i = 0, n - 1 do
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1] .. ':' .. (first + i))
end
redis.call('PEXPIRE', KEYS[1], ttl + 1000)
return n
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


class MemorySlots:
    """The in-process twin of ``SLOTS_LEASE_LUA`` (times in milliseconds)."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held: dict[str, float] = {}

    def lease(
        self, now_ms: float, holder: str, first: int, want: int, limit: int, ttl_ms: int
    ) -> int:
        self.held = {slot: t for slot, t in self.held.items() if t > now_ms}
        free = limit - len(self.held)
        if free <= 0:
            return 0
        granted = min(want, max(1, free // LEASE_DIVISOR))
        for seq in range(first, first + granted):
            self.held[f"{holder}:{seq}"] = now_ms + ttl_ms
        return granted
