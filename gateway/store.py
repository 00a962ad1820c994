"""The shared store: owners, cached task bodies and limits live here.

``MemoryStore`` is the embedded default (one process, nothing to install); ``RedisStore`` is
shared by every worker and replica. Both speak the same small async protocol of byte values
with millisecond TTLs. A store failure raises ``StoreError``; callers decide whether that is a
cache miss or a refusal, so a slow store never stalls a request for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

import redis.asyncio as redis
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.buckets import (
    SLOTS_LEASE_LUA,
    TAKE_LUA,
    Grant,
    MemoryBucket,
    MemorySlots,
)
from gateway.config import RedisConfig
from gateway.errors import StoreError
from gateway.metrics import STORE_ERRORS
from gateway.records import ADVANCE_LUA, RESERVE_LUA, UNRESERVE_LUA, MemoryRecords
from gateway.streams import (
    APPEND_LUA,
    LEASE_LUA,
    QUEUE_GROUP,
    RELEASE_DUE_LUA,
    UNLEASE_LUA,
    MemoryLog,
    MemoryQueue,
    id_order,
    next_id,
)

__all__ = ["KeySpace", "MemoryStore", "RedisStore", "Store", "open_store"]


log = structlog.get_logger("mjgate.store")

# After a timeout, how long every call fails at once instead of waiting out a socket timeout.
_FAIL_FAST_S = 1.0
# At most one log line per operation this often while a store fails; each line counts the
# errors it stands for, and the line saying the store is back counts the rest.
_LOG_EVERY_S = 1.0
# How long closing waits for queued writes.
_CLOSE_FLUSH_S = 5.0
# One more try, on a new connection, for a command whose pooled connection turned out closed
# (Redis restarted): that costs nothing, unlike a retry on a slow Redis.
_RETRY = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))


class Store(Protocol):
    """What the gateway needs from a key-value store."""

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]: ...

    async def set_many(self, items: Mapping[str, bytes], ttl_ms: int) -> None: ...

    async def delete(self, keys: Sequence[str]) -> None: ...

    async def take_tokens(
        self, key: str, rate: float, burst: int, want: int, refund: int
    ) -> Grant: ...

    def write_later(self, items: Mapping[str, bytes], ttl_ms: int, if_absent: bool = False) -> None:
        """Set these keys off the request path (with ``if_absent``, only where a key holds no
        value): writes queued meanwhile go out together in one round trip. A failure is
        counted and logged like any other; nobody waits for it."""
        ...

    async def flush(self) -> None:
        """Wait until every write queued so far by ``write_later`` is done (or failed)."""
        ...

    async def lease_slots(
        self, key: str, holder: str, first: int, want: int, limit: int, ttl_ms: int
    ) -> int:
        """Lease up to ``want`` in-flight slots named ``holder:first``, ``holder:first+1``...
        out of ``limit``, each expiring after ``ttl_ms``; how many were leased."""
        ...

    async def release_slots(self, key: str, slots: Sequence[str]) -> None: ...

    # -- the ledger's records, indexes and counters, and quotas (see gateway.records) ----------

    async def set_if_absent(self, key: str, value: bytes, ttl_ms: int) -> bool:
        """Set ``key`` unless it holds a value; True when this call set it."""
        ...

    async def set_many_if_absent(self, items: Mapping[str, bytes], ttl_ms: int) -> None: ...

    async def write_record(self, key: str, fields: Mapping[str, str], ttl_ms: int) -> None:
        """Set fields of a record (a hash of strings) and its time to live."""
        ...

    async def read_records(self, keys: Sequence[str]) -> list[dict[str, str]]:
        """Each record whole; an empty dict for a record that does not exist."""
        ...

    async def advance_record(
        self, key: str, fields: Mapping[str, str], final: bool
    ) -> dict[str, str] | None:
        """Set fields of an existing record that is not final yet; when ``final``, also mark
        it final and return it whole (None otherwise): one caller in the fleet gets it."""
        ...

    async def add_counts(self, key: str, counts: Mapping[str, int], ttl_ms: int) -> None:
        """Add to integer fields of a record (created if absent) and set its time to live."""
        ...

    async def index_add(
        self, entries: Sequence[tuple[str, str, float]], ttl_ms: int, keep_from: float
    ) -> None:
        """Add ``(index, member, score)`` entries; drop members scored below ``keep_from``
        from those indexes and set their time to live."""
        ...

    async def index_remove(self, key: str, member: str) -> None: ...

    async def index_range(
        self, key: str, high: float, low: float, limit: int
    ) -> list[tuple[str, float]]:
        """Up to ``limit`` members scored ``low..high`` (inclusive), highest score first."""
        ...

    async def index_count(self, keys: Sequence[str], low: float, high: float) -> list[int]: ...

    async def reserve(
        self, keys: Sequence[str], limits: Sequence[int], ttls_ms: Sequence[int]
    ) -> int:
        """Count one unit on every counter if each is under its limit, else on none: 0 when
        counted, else the 1-based position of the first counter at its limit."""
        ...

    async def unreserve(self, keys: Sequence[str]) -> None:
        """Give back one unit to each counter (never below zero)."""
        ...

    async def ping(self) -> None: ...

    async def open(self) -> None:
        """Called once in the lifespan, before the first request."""
        ...

    async def close(self) -> None: ...

    # Leases, pub/sub, logs and queues: the watcher's leadership, live task events and the
    # webhook delivery queue.

    async def acquire_lease(self, key: str, holder: str, ttl_ms: int) -> bool:
        """Take the lease at ``key`` for ``holder``, or renew it when ``holder`` has it;
        False while someone else holds it."""
        ...

    async def release_lease(self, key: str, holder: str) -> None:
        """Give the lease up, if ``holder`` still has it."""
        ...

    async def publish(self, channel: str, message: bytes) -> None: ...

    def subscribe(self, channel: str) -> AsyncGenerator[bytes, None]:
        """Messages published on ``channel`` from now on, until the iterator is closed. A
        message published while the subscription was broken is lost: a subscriber re-reads
        what it needs after a StoreError."""
        ...

    async def log_append(
        self, key: str, mark: bytes, order: int, data: bytes, maxlen: int, ttl_ms: int
    ) -> tuple[str, bytes] | None:
        """Append ``data`` to the log at ``key`` unless its last entry has the same ``mark``
        or a higher ``order`` (a stale observation). Returns the new entry's id (ids grow) and
        the mark of the entry before it (empty for the first), or None when nothing was
        appended. The log keeps about its last ``maxlen`` entries and lives ``ttl_ms`` after
        the last append."""
        ...

    async def log_after(self, key: str, after: str, count: int) -> list[tuple[str, bytes]]:
        """Up to ``count`` entries after the id ``after`` (all when empty), oldest first."""
        ...

    async def log_last(self, key: str) -> tuple[str, bytes] | None: ...

    async def queue_add(self, queue: str, data: bytes) -> None: ...

    async def queue_read(self, queue: str, consumer: str, count: int) -> list[tuple[str, bytes]]:
        """Up to ``count`` entries no consumer has read yet, now read by ``consumer``."""
        ...

    async def queue_reclaim(
        self, queue: str, consumer: str, idle_ms: int, count: int
    ) -> list[tuple[str, bytes]]:
        """Entries read at least ``idle_ms`` ago and never acknowledged (their reader died),
        now read by ``consumer``."""
        ...

    async def queue_ack(self, queue: str, entry_ids: Sequence[str]) -> None:
        """Done with these entries: they leave the queue."""
        ...

    async def queue_length(self, queue: str) -> int: ...

    async def schedule(self, key: str, members: Mapping[str, float]) -> None:
        """Add members to the sorted set at ``key`` (or move them) with these scores."""
        ...

    async def unschedule(self, key: str, members: Sequence[str]) -> None: ...

    async def scheduled(self, key: str, count: int) -> list[tuple[str, float]]:
        """The first ``count`` members by score, with their scores."""
        ...

    async def schedule_size(self, key: str) -> int: ...

    async def release_due(self, key: str, queue: str, now: float, count: int) -> int:
        """Move up to ``count`` members scored at most ``now`` from the sorted set at ``key``
        onto ``queue``, atomically; how many moved."""
        ...


class KeySpace:
    """Builds store keys. The task id is the hash tag, so one task's keys share a cluster slot."""

    __slots__ = ("_prefix",)

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix

    def owner(self, task_id: str) -> str:
        return f"{self._prefix}:{{{task_id}}}:owner"

    def not_found(self, task_id: str) -> str:
        return f"{self._prefix}:{{{task_id}}}:nf"

    def task(self, upstream: str, task_id: str) -> str:
        return f"{self._prefix}:{{{task_id}}}:task:{upstream}"

    def caller_bucket(self, client: str, route_class: str) -> str:
        return f"{self._prefix}:{{rl:{client}:{route_class}}}"

    def upstream_bucket(self, upstream: str) -> str:
        return f"{self._prefix}:{{out:{upstream}}}:rps"

    def upstream_slots(self, upstream: str) -> str:
        return f"{self._prefix}:{{out:{upstream}}}:slots"

    def lease(self, name: str) -> str:
        return f"{self._prefix}:{{lease:{name}}}"

    def channel(self, name: str) -> str:
        return f"{self._prefix}:chan:{name}"

    def task_events(self, task_id: str) -> str:
        return f"{self._prefix}:{{{task_id}}}:events"

    def task_hook(self, task_id: str) -> str:
        return f"{self._prefix}:{{{task_id}}}:hook"

    def push_submitting(self, upstream: str) -> str:
        return f"{self._prefix}:{{push:{upstream}}}:submitting"

    def webhooks(self, part: str) -> str:
        """The webhook queue's keys share one hash tag: its scripts touch several at once."""
        return f"{self._prefix}:{{webhooks}}:{part}"

    def ledger_task(self, upstream: str, task_id: str) -> str:
        return f"{self._prefix}:{{{task_id}}}:ledger:{upstream}"

    def ledger_index(self, kind: str, name: str = "") -> str:
        """A time index of the ledger: ``all``, or by ``client``, ``team`` or ``open`` upstream."""
        return f"{self._prefix}:{{ledger:{kind}:{name}}}"

    def usage_day(self, day: str) -> str:
        return f"{self._prefix}:{{usage}}:{day}"

    def quota(self, client: str, period: str) -> str:
        """One client's counters share a slot, so one script reserves from all of them."""
        return f"{self._prefix}:{{quota:{client}}}:{period}"

    def dedup(self, client: str, digest: str) -> str:
        return f"{self._prefix}:{{dedup:{client}}}:{digest}"


class MemoryStore:
    """An in-process store bounded to ``max_keys`` entries, oldest write evicted first."""

    def __init__(self, max_keys: int = 1_000_000) -> None:
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._max_keys = max_keys
        self._buckets: dict[str, MemoryBucket] = {}
        self._slots: dict[str, MemorySlots] = {}
        self._leases: dict[str, tuple[str, float]] = {}
        self._channels: dict[str, set[asyncio.Queue[bytes]]] = {}
        self._logs: OrderedDict[str, MemoryLog] = OrderedDict()
        self._queues: dict[str, MemoryQueue] = {}
        self._schedules: dict[str, dict[str, float]] = {}
        self._records = MemoryRecords()

    def _get(self, key: str) -> bytes | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            del self._data[key]
            return None
        return entry[1]

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        return [self._get(key) for key in keys]

    def _set(self, key: str, value: bytes, ttl_ms: int) -> None:
        if ttl_ms <= 0:
            self._data.pop(key, None)
            return
        self._data[key] = (time.monotonic() + ttl_ms / 1000, value)
        self._data.move_to_end(key)
        while len(self._data) > self._max_keys:
            self._data.popitem(last=False)

    async def set_many(self, items: Mapping[str, bytes], ttl_ms: int) -> None:
        for key, value in items.items():
            self._set(key, value, ttl_ms)

    async def delete(self, keys: Sequence[str]) -> None:
        for key in keys:
            self._data.pop(key, None)

    async def take_tokens(self, key: str, rate: float, burst: int, want: int, refund: int) -> Grant:
        now = time.monotonic()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = MemoryBucket(burst, now)
        return bucket.take(now, rate, burst, want, refund)

    def write_later(self, items: Mapping[str, bytes], ttl_ms: int, if_absent: bool = False) -> None:
        for key, value in items.items():
            if not if_absent or self._get(key) is None:
                self._set(key, value, ttl_ms)

    async def flush(self) -> None:
        return None

    async def lease_slots(
        self, key: str, holder: str, first: int, want: int, limit: int, ttl_ms: int
    ) -> int:
        slots = self._slots.get(key)
        if slots is None:
            slots = self._slots[key] = MemorySlots()
        return slots.lease(time.monotonic() * 1000, holder, first, want, limit, ttl_ms)

    async def release_slots(self, key: str, slots: Sequence[str]) -> None:
        held = self._slots.get(key)
        if held is not None:
            for slot in slots:
                held.held.pop(slot, None)

    async def set_if_absent(self, key: str, value: bytes, ttl_ms: int) -> bool:
        if self._get(key) is not None:
            return False
        self._set(key, value, ttl_ms)
        return True

    async def set_many_if_absent(self, items: Mapping[str, bytes], ttl_ms: int) -> None:
        for key, value in items.items():
            await self.set_if_absent(key, value, ttl_ms)

    async def write_record(self, key: str, fields: Mapping[str, str], ttl_ms: int) -> None:
        self._records.write(key, fields, ttl_ms / 1000, time.monotonic())

    async def read_records(self, keys: Sequence[str]) -> list[dict[str, str]]:
        now = time.monotonic()
        return [self._records.read(key, now) for key in keys]

    async def advance_record(
        self, key: str, fields: Mapping[str, str], final: bool
    ) -> dict[str, str] | None:
        return self._records.advance(key, fields, final, time.monotonic())

    async def add_counts(self, key: str, counts: Mapping[str, int], ttl_ms: int) -> None:
        self._records.add_counts(key, counts, ttl_ms / 1000, time.monotonic())

    async def index_add(
        self, entries: Sequence[tuple[str, str, float]], ttl_ms: int, keep_from: float
    ) -> None:
        now = time.monotonic()
        for key, member, score in entries:
            self._records.index_add(key, member, score, ttl_ms / 1000, keep_from, now)

    async def index_remove(self, key: str, member: str) -> None:
        self._records.index_remove(key, member, time.monotonic())

    async def index_range(
        self, key: str, high: float, low: float, limit: int
    ) -> list[tuple[str, float]]:
        return self._records.index_range(key, high, low, limit, time.monotonic())

    async def index_count(self, keys: Sequence[str], low: float, high: float) -> list[int]:
        now = time.monotonic()
        return [self._records.index_count(key, low, high, now) for key in keys]

    async def reserve(
        self, keys: Sequence[str], limits: Sequence[int], ttls_ms: Sequence[int]
    ) -> int:
        ttls_s = [ttl / 1000 for ttl in ttls_ms]
        return self._records.reserve(keys, limits, ttls_s, time.monotonic())

    async def unreserve(self, keys: Sequence[str]) -> None:
        self._records.unreserve(keys, time.monotonic())

    async def ping(self) -> None:
        return None

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        self._data.clear()

    async def acquire_lease(self, key: str, holder: str, ttl_ms: int) -> bool:
        now = time.monotonic()
        current = self._leases.get(key)
        if current is not None and current[0] != holder and current[1] > now:
            return False
        self._leases[key] = (holder, now + ttl_ms / 1000)
        return True

    async def release_lease(self, key: str, holder: str) -> None:
        if self._leases.get(key, ("", 0.0))[0] == holder:
            del self._leases[key]

    async def publish(self, channel: str, message: bytes) -> None:
        for queue in self._channels.get(channel, ()):
            queue.put_nowait(message)

    async def subscribe(self, channel: str) -> AsyncGenerator[bytes, None]:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._channels.setdefault(channel, set()).add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._channels[channel].discard(queue)

    async def log_append(
        self, key: str, mark: bytes, order: int, data: bytes, maxlen: int, ttl_ms: int
    ) -> tuple[str, bytes] | None:
        now = time.monotonic()
        while self._logs and next(iter(self._logs.values())).expires_at <= now:
            self._logs.popitem(last=False)
        log = self._logs.get(key)
        if log is None or log.expires_at <= now:
            log = self._logs[key] = MemoryLog()
        last = log.entries[-1] if log.entries else ("", b"", -1, b"")
        if last[1] == mark or last[2] > order:
            return None
        entry_id = next_id(last[0])
        log.entries.append((entry_id, mark, order, data))
        del log.entries[:-maxlen]
        log.expires_at = now + ttl_ms / 1000
        self._logs.move_to_end(key)
        return entry_id, last[1]

    def _log(self, key: str) -> list[tuple[str, bytes, int, bytes]]:
        log = self._logs.get(key)
        return log.entries if log is not None and log.expires_at > time.monotonic() else []

    async def log_after(self, key: str, after: str, count: int) -> list[tuple[str, bytes]]:
        start = id_order(after) if after else (-1, -1)
        later = [(i, data) for i, _, _, data in self._log(key) if id_order(i) > start]
        return later[:count]

    async def log_last(self, key: str) -> tuple[str, bytes] | None:
        entries = self._log(key)
        return (entries[-1][0], entries[-1][3]) if entries else None

    def _queue(self, queue: str) -> MemoryQueue:
        found = self._queues.get(queue)
        if found is None:
            found = self._queues[queue] = MemoryQueue()
        return found

    async def queue_add(self, queue: str, data: bytes) -> None:
        self._queue(queue).add(data)

    async def queue_read(self, queue: str, consumer: str, count: int) -> list[tuple[str, bytes]]:
        return self._queue(queue).read(count, time.monotonic())

    async def queue_reclaim(
        self, queue: str, consumer: str, idle_ms: int, count: int
    ) -> list[tuple[str, bytes]]:
        return self._queue(queue).reclaim(idle_ms / 1000, count, time.monotonic())

    async def queue_ack(self, queue: str, entry_ids: Sequence[str]) -> None:
        self._queue(queue).ack(entry_ids)

    async def queue_length(self, queue: str) -> int:
        return len(self._queue(queue).entries)

    async def schedule(self, key: str, members: Mapping[str, float]) -> None:
        self._schedules.setdefault(key, {}).update(members)

    async def unschedule(self, key: str, members: Sequence[str]) -> None:
        scores = self._schedules.get(key, {})
        for member in members:
            scores.pop(member, None)

    async def scheduled(self, key: str, count: int) -> list[tuple[str, float]]:
        scores = self._schedules.get(key, {})
        return sorted(scores.items(), key=lambda item: (item[1], item[0]))[:count]

    async def schedule_size(self, key: str) -> int:
        return len(self._schedules.get(key, {}))

    async def release_due(self, key: str, queue: str, now: float, count: int) -> int:
        due = [m for m, score in await self.scheduled(key, count) if score <= now]
        await self.unschedule(key, due)
        for member in due:
            self._queue(queue).add(member.encode())
        return len(due)


# A write-behind batch in one EVALSHA: as a pipeline of SETs it cost redis-py a pack and a
# parse per command, most of the batch's CPU. KEYS[i] gets ARGV[3i-2] for ARGV[3i-1] ms,
# only where it holds no value when ARGV[3i] is 1.
SET_MANY_LUA = """
for i, key in ipairs(KEYS) do
  local value, ttl = ARGV[3 * i - 2], ARGV[3 * i - 1]
  if ARGV[3 * i] == '1' then
    redis.call('SET', key, value, 'PX', ttl, 'NX')
  else
    redis.call('SET', key, value, 'PX', ttl)
  end
end
return #KEYS
"""


class RedisStore:
    """Redis through a bounded blocking pool, short timeouts and no retries.

    A retry on a slow Redis multiplies the load that made it slow; one short attempt that
    fails fast turns into a cache miss upstream of here instead.
    """

    def __init__(self, config: RedisConfig) -> None:
        self._cluster = config.cluster
        self._redis = _client(config)
        self._failing_until = 0.0
        self._errors = _ErrorLog()
        # Script objects run EVALSHA and load the script again after a SCRIPT FLUSH.
        self._take = self._redis.register_script(TAKE_LUA)
        self._slots_lease = self._redis.register_script(SLOTS_LEASE_LUA)
        self._lease = self._redis.register_script(LEASE_LUA)
        self._unlease = self._redis.register_script(UNLEASE_LUA)
        self._append = self._redis.register_script(APPEND_LUA)
        self._release = self._redis.register_script(RELEASE_DUE_LUA)
        self._groups: set[str] = set()
        self._advance = self._redis.register_script(ADVANCE_LUA)
        self._reserve = self._redis.register_script(RESERVE_LUA)
        self._unreserve = self._redis.register_script(UNRESERVE_LUA)
        self._set_many = self._redis.register_script(SET_MANY_LUA)
        self._queued: list[tuple[Mapping[str, bytes], int, bool]] = []
        self._writer: asyncio.Task[None] | None = None
        self._reads: list[tuple[Sequence[str], asyncio.Future[list[bytes | None]]]] = []
        self._reader: asyncio.Task[None] | None = None
        # Queued writes not yet acknowledged, (value, if_absent) by key: this worker reads
        # its own writes at once, as it would have before they left the request path.
        self._unwritten: dict[str, tuple[bytes, bool]] = {}

    @contextlib.contextmanager
    def _guard(self, operation: str, probe: bool = False) -> Iterator[None]:
        """Turn Redis failures into StoreError, counted and logged by operation.

        After a timeout every call fails at once for a moment: a frozen Redis would otherwise
        cost each request a full socket timeout per store call. A refused or broken connection
        costs nothing to find out, so it never holds back the other calls: each connection
        recovers on its own, and limits are exact again as soon as Redis answers. A ``probe``
        (the readiness ping) always tries, and its success ends the moment.
        """
        if not probe and time.monotonic() < self._failing_until:
            self._errors.note(operation, "skipped after a timeout")
            raise StoreError(f"redis {operation} skipped: the store timed out a moment ago")
        try:
            yield
        except (RedisError, OSError) as exc:  # a bug elsewhere is not a store outage
            self._errors.note(operation, type(exc).__name__)
            if isinstance(exc, RedisTimeoutError | TimeoutError):
                self._failing_until = time.monotonic() + _FAIL_FAST_S
            raise StoreError(f"redis {operation} failed: {type(exc).__name__}") from exc
        if probe:
            self._failing_until = 0.0
        if self._errors.unlogged:
            self._errors.back()

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values of these keys, read together with what other requests of this worker
        ask for meanwhile: the reads queued while one MGET is on the wire go out as the
        next one (each request still waits for exactly one round trip, and under load
        redis-py's per-command cost, the largest share of a miss's store cost, is paid
        once per batch instead of once per request)."""
        if not keys:
            return []
        # This worker's writes still queued or on the wire, taken now: Redis may run the
        # read before such a write and still answer it after the write is acknowledged.
        unwritten = [self._unwritten.get(key) for key in keys] if self._unwritten else None
        future: asyncio.Future[list[bytes | None]] = asyncio.get_running_loop().create_future()
        self._reads.append((keys, future))
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_queued())
        found = await future
        for index, pending in enumerate(unwritten or ()):
            if pending is not None and (not pending[1] or found[index] is None):
                found[index] = pending[0]
        return found

    async def _read_queued(self) -> None:
        batch: list[tuple[Sequence[str], asyncio.Future[list[bytes | None]]]] = []
        try:
            while self._reads:
                batch, self._reads = self._reads, []
                try:
                    values = await self._mget([key for wanted, _ in batch for key in wanted])
                except Exception as exc:  # each request raises it, as if it had read alone
                    _settle(batch, exc)
                    continue
                start = 0
                for wanted, future in batch:
                    if not future.done():  # its request may have been cancelled
                        future.set_result(values[start : start + len(wanted)])
                    start += len(wanted)
        except BaseException:  # cancelled (shutdown): nobody may wait forever
            _settle([*batch, *self._reads], None)
            self._reads = []
            raise
        finally:
            self._reader = None

    async def _mget(self, keys: Sequence[str]) -> list[bytes | None]:
        with self._guard("mget"):
            if self._cluster:
                # Keys of different tasks live in different slots: one MGET per slot.
                values = await self._redis.mget_nonatomic(keys)
            else:
                values = await self._redis.mget(keys)
        return [_as_bytes(v) for v in values]

    async def set_many(self, items: Mapping[str, bytes], ttl_ms: int) -> None:
        if not items:
            return
        if ttl_ms <= 0:
            await self.delete(list(items))
            return
        with self._guard("set_many"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, value in items.items():
                    pipe.set(key, value, px=ttl_ms)
                await pipe.execute()

    def write_later(self, items: Mapping[str, bytes], ttl_ms: int, if_absent: bool = False) -> None:
        if not items or ttl_ms <= 0:
            return
        self._queued.append((items, ttl_ms, if_absent))
        for key, value in items.items():
            self._unwritten[key] = (value, if_absent)
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_queued())

    async def _write_queued(self) -> None:
        """Write what was queued, batch after batch, until nothing is left: what requests
        queue while one batch is on the wire goes out together in the next."""
        try:
            while self._queued:
                batch, self._queued = self._queued, []
                with contextlib.suppress(StoreError), self._guard("write_later"):
                    await self._write_batch(batch)
                for items, _, if_absent in batch:
                    for key, value in items.items():
                        if self._unwritten.get(key) == (value, if_absent):
                            del self._unwritten[key]
        finally:
            self._writer = None

    async def _write_batch(self, batch: Sequence[tuple[Mapping[str, bytes], int, bool]]) -> None:
        if self._cluster:  # keys of different tasks live in different slots
            async with self._redis.pipeline(transaction=False) as pipe:
                for items, ttl_ms, if_absent in batch:
                    for key, value in items.items():
                        pipe.set(key, value, px=ttl_ms, nx=if_absent)
                await pipe.execute()
            return
        keys: list[str] = []
        args: list[bytes | int] = []
        for items, ttl_ms, if_absent in batch:
            for key, value in items.items():
                keys.append(key)
                args += [value, ttl_ms, int(if_absent)]
        await self._set_many(keys=keys, args=args)

    async def flush(self) -> None:
        while self._writer is not None:
            await asyncio.shield(self._writer)

    async def delete(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        await self.flush()  # so that no write queued earlier lands after the delete
        # One DEL per key: keys of different tasks live in different cluster slots.
        with self._guard("delete"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.delete(key)
                await pipe.execute()

    async def take_tokens(self, key: str, rate: float, burst: int, want: int, refund: int) -> Grant:
        with self._guard("take_tokens"):
            granted, left = await self._take(keys=[key], args=[rate, burst, want, refund])
        return Grant(int(granted), float(left))

    async def lease_slots(
        self, key: str, holder: str, first: int, want: int, limit: int, ttl_ms: int
    ) -> int:
        with self._guard("outbound"):
            args: list[str | int] = [holder, first, want, limit, ttl_ms]
            return int(await self._slots_lease(keys=[key], args=args))

    async def release_slots(self, key: str, slots: Sequence[str]) -> None:
        if slots:
            with self._guard("release_slot"):
                await self._redis.zrem(key, *slots)

    async def set_if_absent(self, key: str, value: bytes, ttl_ms: int) -> bool:
        with self._guard("set_if_absent"):
            return bool(await self._redis.set(key, value, px=ttl_ms, nx=True))

    async def set_many_if_absent(self, items: Mapping[str, bytes], ttl_ms: int) -> None:
        if not items:
            return
        with self._guard("set_many_if_absent"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, value in items.items():
                    pipe.set(key, value, px=ttl_ms, nx=True)
                await pipe.execute()

    async def write_record(self, key: str, fields: Mapping[str, str], ttl_ms: int) -> None:
        with self._guard("write_record"):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hset(key, mapping=dict(fields))
                pipe.pexpire(key, ttl_ms)
                await pipe.execute()

    async def read_records(self, keys: Sequence[str]) -> list[dict[str, str]]:
        if not keys:
            return []
        with self._guard("read_records"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hgetall(key)
                rows = await pipe.execute()
        return [{k.decode(): v.decode() for k, v in row.items()} for row in rows]

    async def advance_record(
        self, key: str, fields: Mapping[str, str], final: bool
    ) -> dict[str, str] | None:
        args = ["1" if final else "0", *(item for pair in fields.items() for item in pair)]
        with self._guard("advance_record"):
            flat = await self._advance(keys=[key], args=args)
        if not flat:
            return None
        values = [v.decode() for v in flat]
        return dict(zip(values[::2], values[1::2], strict=True))

    async def add_counts(self, key: str, counts: Mapping[str, int], ttl_ms: int) -> None:
        with self._guard("add_counts"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for field, amount in counts.items():
                    pipe.hincrby(key, field, amount)
                pipe.pexpire(key, ttl_ms)
                await pipe.execute()

    async def index_add(
        self, entries: Sequence[tuple[str, str, float]], ttl_ms: int, keep_from: float
    ) -> None:
        with self._guard("index_add"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, member, score in entries:
                    pipe.zadd(key, {member: score})
                for key in dict.fromkeys(key for key, _, _ in entries):
                    pipe.zremrangebyscore(key, "-inf", f"({keep_from}")
                    pipe.pexpire(key, ttl_ms)
                await pipe.execute()

    async def index_remove(self, key: str, member: str) -> None:
        with self._guard("index_remove"):
            await self._redis.zrem(key, member)

    async def index_range(
        self, key: str, high: float, low: float, limit: int
    ) -> list[tuple[str, float]]:
        with self._guard("index_range"):
            rows = await self._redis.zrevrangebyscore(
                key, high, low, start=0, num=limit, withscores=True
            )
        return [(member.decode(), float(score)) for member, score in rows]

    async def index_count(self, keys: Sequence[str], low: float, high: float) -> list[int]:
        if not keys:
            return []
        with self._guard("index_count"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.zcount(key, low, high)
                return [int(n) for n in await pipe.execute()]

    async def reserve(
        self, keys: Sequence[str], limits: Sequence[int], ttls_ms: Sequence[int]
    ) -> int:
        args = [item for pair in zip(limits, ttls_ms, strict=True) for item in pair]
        with self._guard("reserve"):
            return int(await self._reserve(keys=list(keys), args=args))

    async def unreserve(self, keys: Sequence[str]) -> None:
        with self._guard("unreserve"):
            await self._unreserve(keys=list(keys))

    async def ping(self) -> None:
        with self._guard("ping", probe=True):
            await self._redis.ping()

    async def open(self) -> None:
        """Learn a Cluster's slot map before the first requests. A RedisCluster client left
        to initialize on first use under concurrent requests gets MOVED answers, and every
        fifth MOVED makes it close all its connections under the other requests' feet."""
        if self._cluster:
            with contextlib.suppress(StoreError), self._guard("open", probe=True):
                await self._redis.initialize()

    async def close(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CLOSE_FLUSH_S):
                await self.flush()
        await self._redis.aclose()

    async def acquire_lease(self, key: str, holder: str, ttl_ms: int) -> bool:
        with self._guard("lease"):
            return bool(await self._lease(keys=[key], args=[holder, ttl_ms]))

    async def release_lease(self, key: str, holder: str) -> None:
        with self._guard("lease"):
            await self._unlease(keys=[key], args=[holder])

    async def publish(self, channel: str, message: bytes) -> None:
        with self._guard("publish"):
            await self._redis.publish(channel, message)

    async def subscribe(self, channel: str) -> AsyncGenerator[bytes, None]:
        # A connection of its own for as long as the subscription lasts; reads wait up to a
        # second instead of the socket timeout, since silence is normal here.
        # Not under ``_guard``: a quiet second here says nothing about the store's health.
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if message is not None and message["type"] == "message":
                    yield _as_bytes(message["data"]) or b""
        except (RedisError, OSError) as exc:
            STORE_ERRORS.labels("subscribe").inc()
            raise StoreError(f"redis subscribe failed: {type(exc).__name__}") from exc
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()

    async def log_append(
        self, key: str, mark: bytes, order: int, data: bytes, maxlen: int, ttl_ms: int
    ) -> tuple[str, bytes] | None:
        with self._guard("log_append"):
            args = [mark, order, data, maxlen, ttl_ms]
            appended = await self._append(keys=[key], args=args)
        return (_text(appended[0]), appended[1]) if appended else None

    async def log_after(self, key: str, after: str, count: int) -> list[tuple[str, bytes]]:
        with self._guard("log_read"):
            entries = await self._redis.xrange(key, f"({after}" if after else "-", "+", count)
        return _entries(entries)

    async def log_last(self, key: str) -> tuple[str, bytes] | None:
        with self._guard("log_read"):
            entries = _entries(await self._redis.xrevrange(key, "+", "-", 1))
        return entries[0] if entries else None

    async def queue_add(self, queue: str, data: bytes) -> None:
        with self._guard("queue"):
            await self._redis.xadd(queue, {"d": data})

    async def _ensure_group(self, queue: str) -> None:
        if queue in self._groups:
            return
        try:
            await self._redis.xgroup_create(queue, QUEUE_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add(queue)

    async def queue_read(self, queue: str, consumer: str, count: int) -> list[tuple[str, bytes]]:
        with self._guard("queue"):
            await self._ensure_group(queue)
            try:
                found = await self._redis.xreadgroup(QUEUE_GROUP, consumer, {queue: ">"}, count)
            except ResponseError as exc:
                self._groups.discard(queue)  # NOGROUP: the store lost it (a restart, a flush)
                raise StoreError(f"redis queue read failed: {exc}") from exc
        return _entries(found[0][1]) if found else []

    async def queue_reclaim(
        self, queue: str, consumer: str, idle_ms: int, count: int
    ) -> list[tuple[str, bytes]]:
        with self._guard("queue"):
            await self._ensure_group(queue)
            claimed = await self._redis.xautoclaim(
                queue, QUEUE_GROUP, consumer, idle_ms, "0-0", count
            )
        return _entries(claimed[1])

    async def queue_ack(self, queue: str, entry_ids: Sequence[str]) -> None:
        if not entry_ids:
            return
        with self._guard("queue"):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xack(queue, QUEUE_GROUP, *entry_ids)
                pipe.xdel(queue, *entry_ids)
                await pipe.execute()

    async def queue_length(self, queue: str) -> int:
        with self._guard("queue"):
            return int(await self._redis.xlen(queue))

    async def schedule(self, key: str, members: Mapping[str, float]) -> None:
        if members:
            with self._guard("schedule"):
                await self._redis.zadd(key, dict(members))

    async def unschedule(self, key: str, members: Sequence[str]) -> None:
        if members:
            with self._guard("schedule"):
                await self._redis.zrem(key, *members)

    async def scheduled(self, key: str, count: int) -> list[tuple[str, float]]:
        with self._guard("schedule"):
            found = await self._redis.zrange(key, 0, count - 1, withscores=True)
        return [(_text(member), float(score)) for member, score in found]

    async def schedule_size(self, key: str) -> int:
        with self._guard("schedule"):
            return int(await self._redis.zcard(key))

    async def release_due(self, key: str, queue: str, now: float, count: int) -> int:
        with self._guard("schedule"):
            return int(await self._release(keys=[key, queue], args=[now, count]))


class _ErrorLog:
    """Every Redis error counted in ``mjgate_store_errors`` and logged (``redis_error``, by
    the metric's operation name) without a line per error: an outage under load fails
    thousands of calls a second. Callers may log what they did about it (``store_error``,
    with ``purpose``): ``operation`` in logs always is the metric's label."""

    def __init__(self) -> None:
        self.unlogged: dict[str, int] = {}
        self._logged_at: dict[str, float] = {}

    def note(self, operation: str, error: str) -> None:
        STORE_ERRORS.labels(operation).inc()
        self.unlogged[operation] = self.unlogged.get(operation, 0) + 1
        now = time.monotonic()
        if now - self._logged_at.get(operation, -_LOG_EVERY_S) >= _LOG_EVERY_S:
            self._logged_at[operation] = now
            count = self.unlogged.pop(operation)
            log.warning("redis_error", operation=operation, error=error, errors=count)

    def back(self) -> None:
        """The store answered: account for the errors no line has told of yet."""
        unlogged, self.unlogged = self.unlogged, {}
        log.info("redis_back", unlogged_errors=unlogged)


def _client(config: RedisConfig) -> Any:
    """A redis-py asyncio client for a single server, a Sentinel-watched master or a
    Cluster: short timeouts, bounded connections, and no retry but the one on a new
    connection when a pooled one turns out closed."""
    url = config.url.reveal()
    timeouts = {
        "socket_timeout": config.socket_timeout_s,
        "socket_connect_timeout": config.socket_timeout_s,
    }
    if config.sentinels:
        parts = urlsplit(url)
        db = int(parts.path.strip("/") or 0) if url else 0
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(config.sentinels), sentinel_kwargs=timeouts, **timeouts
        )
        return sentinel.master_for(
            config.service_name, password=parts.password, db=db, retry=_RETRY
        )
    if config.cluster:
        return RedisCluster.from_url(
            url, max_connections=config.max_connections, retry=_RETRY, **timeouts
        )
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=config.max_connections,
        timeout=config.pool_timeout_s,
        retry=_RETRY,
        **timeouts,
    )
    return redis.Redis(connection_pool=pool, retry=_RETRY)


def _settle(
    reads: Sequence[tuple[Sequence[str], asyncio.Future[list[bytes | None]]]],
    exc: Exception | None,
) -> None:
    """Fail the queued reads not answered yet with ``exc`` (None: cancel them)."""
    for _, future in reads:
        if future.done():
            continue
        if exc is None:
            future.cancel()
        else:
            future.set_exception(exc)


def _as_bytes(value: bytes | str | None) -> bytes | None:
    # The client never decodes responses; this only narrows redis-py's union type.
    return value.encode() if isinstance(value, str) else value


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _entries(raw: Any) -> list[tuple[str, bytes]]:
    """Stream entries ``[(id, {field: value})]`` as ``(id, the "d" field)``; entries deleted
    while pending come back without fields and are skipped."""
    return [(_text(i), fields[b"d"]) for i, fields in raw if fields and b"d" in fields]


def open_store(config: RedisConfig) -> Store:
    """The store the config asks for: Redis when ``redis.url`` is set, else in-process memory."""
    if config.enabled:
        return RedisStore(config)
    return MemoryStore()
