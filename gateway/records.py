"""Records, time indexes and counters, the structures the ledger and quotas keep in the store:
the Redis Lua scripts and their in-process twin for the embedded store.

A record is a hash of strings (Redis ``HSET``), an index a sorted set of members by score
(``ZADD``), a counter an integer (``INCR``). The scripts run where one step must not
interleave with another worker's: a record made final exactly once, and a quota unit taken
from every counter or from none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["ADVANCE_LUA", "FINAL", "RESERVE_LUA", "UNRESERVE_LUA", "MemoryRecords"]

# Update a record that exists and is not final; return it whole when this call makes it
# final. KEYS[1]: the record. ARGV[1]: "1" to make it final; then field, value pairs.
ADVANCE_LUA = """
if redis.call('exists', KEYS[1]) == 0 or redis.call('hexists', KEYS[1], 'final') == 1 then
  return false
end
for i = 2, #ARGV, 2 do
  redis.call('hset', KEYS[1], ARGV[i], ARGV[i + 1])
end
if ARGV[1] ~= '1' then
  return false
end
redis.call('hset', KEYS[1], 'final', '1')
return redis.call('hgetall', KEYS[1])
"""

# Take one unit from every counter, or from none. KEYS: the counters; ARGV: a limit and a
# TTL in ms per counter. 0 when taken, else the 1-based index of the first one at its limit.
RESERVE_LUA = """
for i, key in ipairs(KEYS) do
  if tonumber(redis.call('get', key) or '0') >= tonumber(ARGV[2 * i - 1]) then
    return i
  end
end
for i, key in ipairs(KEYS) do
  redis.call('incr', key)
  redis.call('pexpire', key, ARGV[2 * i])
end
return 0
"""

# Give one unit back to every counter that has one (never below zero, TTL kept).
UNRESERVE_LUA = """
for _, key in ipairs(KEYS) do
  if tonumber(redis.call('get', key) or '0') > 0 then
    redis.call('decr', key)
  end
end
return 0
"""

FINAL = "final"
_SWEEP_EVERY = 1024


class MemoryRecords:
    """The in-process twin of the scripts and structures above. Times are ``now`` in
    seconds of one monotonic clock; an expired entry is gone on its next read, and every
    ``_SWEEP_EVERY`` writes a sweep drops the ones nobody reads again."""

    def __init__(self) -> None:
        self._hashes: dict[str, tuple[float, dict[str, str]]] = {}
        self._indexes: dict[str, tuple[float, dict[str, float]]] = {}
        self._counters: dict[str, tuple[float, int]] = {}
        self._writes = 0

    def _live_hash(self, key: str, now: float) -> dict[str, str] | None:
        entry = self._hashes.get(key)
        if entry is None or entry[0] <= now:
            self._hashes.pop(key, None)
            return None
        return entry[1]

    def _live_index(self, key: str, now: float) -> dict[str, float]:
        entry = self._indexes.get(key)
        if entry is None or entry[0] <= now:
            self._indexes.pop(key, None)
            return {}
        return entry[1]

    def _live_counter(self, key: str, now: float) -> int:
        entry = self._counters.get(key)
        if entry is None or entry[0] <= now:
            self._counters.pop(key, None)
            return 0
        return entry[1]

    def _wrote(self, now: float) -> None:
        self._writes += 1
        if self._writes % _SWEEP_EVERY:
            return
        for table in (self._hashes, self._indexes, self._counters):
            for key in [k for k, (expires, _) in table.items() if expires <= now]:
                del table[key]

    def write(self, key: str, fields: Mapping[str, str], ttl_s: float, now: float) -> None:
        if ttl_s <= 0:
            self._hashes.pop(key, None)
            return
        record = self._live_hash(key, now) or {}
        record.update(fields)
        self._hashes[key] = (now + ttl_s, record)
        self._wrote(now)

    def read(self, key: str, now: float) -> dict[str, str]:
        return dict(self._live_hash(key, now) or {})

    def advance(
        self, key: str, fields: Mapping[str, str], final: bool, now: float
    ) -> dict[str, str] | None:
        record = self._live_hash(key, now)
        if record is None or FINAL in record:
            return None
        record.update(fields)
        if not final:
            return None
        record[FINAL] = "1"
        return dict(record)

    def add_counts(self, key: str, counts: Mapping[str, int], ttl_s: float, now: float) -> None:
        record = self._live_hash(key, now) or {}
        for field, amount in counts.items():
            record[field] = str(int(record.get(field, "0")) + amount)
        self._hashes[key] = (now + ttl_s, record)
        self._wrote(now)

    def index_add(
        self, key: str, member: str, score: float, ttl_s: float, keep_from: float, now: float
    ) -> None:
        index = self._live_index(key, now)
        index[member] = score
        for old in [m for m, s in index.items() if s < keep_from]:
            del index[old]
        self._indexes[key] = (now + ttl_s, index)
        self._wrote(now)

    def index_remove(self, key: str, member: str, now: float) -> None:
        self._live_index(key, now).pop(member, None)

    def index_range(
        self, key: str, high: float, low: float, limit: int, now: float
    ) -> list[tuple[str, float]]:
        """Members scored ``low..high`` (both included), highest score first and, within one
        score, highest member first: the order of Redis ``ZREVRANGEBYSCORE``."""
        index = self._live_index(key, now)
        found = [(m, s) for m, s in index.items() if low <= s <= high]
        found.sort(key=lambda pair: (pair[1], pair[0]), reverse=True)
        return found[:limit]

    def index_count(self, key: str, low: float, high: float, now: float) -> int:
        return sum(1 for s in self._live_index(key, now).values() if low <= s <= high)

    def reserve(
        self, keys: Sequence[str], limits: Sequence[int], ttls_s: Sequence[float], now: float
    ) -> int:
        for index, (key, limit) in enumerate(zip(keys, limits, strict=True), start=1):
            if self._live_counter(key, now) >= limit:
                return index
        for key, ttl_s in zip(keys, ttls_s, strict=True):
            self._counters[key] = (now + ttl_s, self._live_counter(key, now) + 1)
        self._wrote(now)
        return 0

    def unreserve(self, keys: Sequence[str], now: float) -> None:
        for key in keys:
            used = self._live_counter(key, now)
            if used > 0:
                self._counters[key] = (self._counters[key][0], used - 1)
