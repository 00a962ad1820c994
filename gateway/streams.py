"""Leases, logs and queues: Redis Lua scripts and the in-memory twins of streams.

A log is a Redis Stream of ``(mark, data)`` entries that appends only when the mark changes,
so that many observers of one task write one entry per change. A queue is a Redis Stream read
through one consumer group: an entry read and never acknowledged (its reader died) is
claimed again by another reader. Entry ids are Redis's ``milliseconds-sequence``, in order.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence

__all__ = [
    "APPEND_LUA",
    "LEASE_LUA",
    "QUEUE_GROUP",
    "RELEASE_DUE_LUA",
    "UNLEASE_LUA",
    "MemoryLog",
    "MemoryQueue",
    "id_order",
    "next_id",
]


def id_order(entry_id: str) -> tuple[int, int]:
    """An entry id as a pair that sorts in the order of the ids."""
    millis, _, seq = entry_id.partition("-")
    return int(millis), int(seq or 0)


def next_id(last: str) -> str:
    """A stream-style id ``ms-seq`` after ``last``, as Redis makes them."""
    now = int(time.time() * 1000)
    millis, seq = id_order(last) if last else (0, -1)
    return f"{now}-0" if now > millis else f"{millis}-{seq + 1}"


class MemoryLog:
    """The entries of one log and when it expires (``time.monotonic()``)."""

    __slots__ = ("entries", "expires_at")

    def __init__(self) -> None:
        self.entries: list[tuple[str, bytes, int, bytes]] = []  # id, mark, order, data
        self.expires_at = 0.0


class MemoryQueue:
    """A stream with one consumer group: unread entries, and entries read but not acked."""

    def __init__(self) -> None:
        self.entries: OrderedDict[str, bytes] = OrderedDict()
        self.read_at: dict[str, float] = {}  # read, not acked: when it was read
        self.last = ""

    def add(self, data: bytes) -> None:
        self.last = next_id(self.last)
        self.entries[self.last] = data

    def read(self, count: int, now: float) -> list[tuple[str, bytes]]:
        unread = [(i, d) for i, d in self.entries.items() if i not in self.read_at][:count]
        self.read_at.update((i, now) for i, _ in unread)
        return unread

    def reclaim(self, idle_s: float, count: int, now: float) -> list[tuple[str, bytes]]:
        stale = [i for i, at in self.read_at.items() if at <= now - idle_s][:count]
        self.read_at.update((i, now) for i in stale)
        return [(i, self.entries[i]) for i in stale]

    def ack(self, entry_ids: Sequence[str]) -> None:
        for entry_id in entry_ids:
            self.entries.pop(entry_id, None)
            self.read_at.pop(entry_id, None)


QUEUE_GROUP = "mjgate"
# KEYS[1] lease; ARGV holder, ttl ms.
LEASE_LUA = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
UNLEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS[1] log; ARGV mark, order, data, maxlen, ttl ms. Appends unless the last entry has the
# same mark or a higher order; returns the new id and the last entry's mark.
APPEND_LUA = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
local mark = ''
if last then
  local fields = last[2]
  for i = 1, #fields, 2 do
    if fields[i] == 'm' then mark = fields[i + 1] end
    if fields[i] == 'o' and tonumber(fields[i + 1]) > tonumber(ARGV[2]) then return false end
  end
  if mark == ARGV[1] then return false end
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*',
  'm', ARGV[1], 'o', ARGV[2], 'd', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return {id, mark}
"""
# KEYS[1] schedule (sorted set), KEYS[2] queue (stream); ARGV now, count.
RELEASE_DUE_LUA = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(due) do
  redis.call('ZREM', KEYS[1], member)
  redis.call('XADD', KEYS[2], '*', 'd', member)
end
return #due
"""
