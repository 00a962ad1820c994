"""The shared store: owners, cached task bodies and limits live here.

``MemoryStore`` is the embedded default (one process, nothing to install); ``RedisStore`` is
shared by every worker and replica. Both speak the same small async protocol of byte values
with millisecond TTLs. A store failure raises ``StoreError``; callers decide whether that is a
cache miss or a refusal, so a slow store never stalls a request for long.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.buckets import OUTBOUND_LUA, TAKE_LUA, Grant, MemoryBucket, MemoryOutbound
from gateway.config import RedisConfig
from gateway.errors import StoreError
from gateway.metrics import STORE_ERRORS

__all__ = ["KeySpace", "MemoryStore", "RedisStore", "Store", "open_store"]


_FAIL_FAST_S = 1.0


class Store(Protocol):
    """What the gateway needs from a key-value store."""

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]: ...

    async def set_many(self, items: Mapping[str, bytes], ttl_ms: int) -> None: ...

    async def delete(self, keys: Sequence[str]) -> None: ...

    async def take_tokens(
        self, key: str, rate: float, burst: int, want: int, refund: int
    ) -> Grant: ...

    async def acquire_outbound(
        self, bucket_key: str, slots_key: str, rate: float, holder: str, limit: int, ttl_ms: int
    ) -> int:
        """Take a rate token and an in-flight slot; 0 when taken, else ms to wait."""
        ...

    async def release_slot(self, key: str, holder: str) -> None: ...

    async def ping(self) -> None: ...

    async def open(self) -> None:
        """Called once in the lifespan, before the first request."""
        ...

    async def close(self) -> None: ...


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


class MemoryStore:
    """An in-process store bounded to ``max_keys`` entries, oldest write evicted first."""

    def __init__(self, max_keys: int = 1_000_000) -> None:
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._max_keys = max_keys
        self._buckets: dict[str, MemoryBucket] = {}
        self._outbound: dict[str, MemoryOutbound] = {}

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

    async def acquire_outbound(
        self, bucket_key: str, slots_key: str, rate: float, holder: str, limit: int, ttl_ms: int
    ) -> int:
        caps = self._outbound.get(slots_key)
        if caps is None:
            caps = self._outbound[slots_key] = MemoryOutbound()
        return caps.acquire(time.monotonic() * 1000, rate, holder, limit, ttl_ms)

    async def release_slot(self, key: str, holder: str) -> None:
        caps = self._outbound.get(key)
        if caps is not None:
            caps.holders.pop(holder, None)

    async def ping(self) -> None:
        return None

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        self._data.clear()


class RedisStore:
    """Redis through a bounded blocking pool, short timeouts and no retries.

    A retry on a slow Redis multiplies the load that made it slow; one short attempt that
    fails fast turns into a cache miss upstream of here instead.
    """

    def __init__(self, config: RedisConfig) -> None:
        self._cluster = config.cluster
        self._redis = _client(config)
        self._failing_until = 0.0
        # Script objects run EVALSHA and load the script again after a SCRIPT FLUSH.
        self._take = self._redis.register_script(TAKE_LUA)
        self._outbound = self._redis.register_script(OUTBOUND_LUA)

    @contextlib.contextmanager
    def _guard(self, operation: str, probe: bool = False) -> Iterator[None]:
        """Turn Redis failures into StoreError, counted by operation.

        After a timeout or a lost connection every call fails at once for a moment: a frozen
        Redis would otherwise cost each request a full socket timeout per store call. A
        ``probe`` (the readiness ping) always tries, and its success ends the moment.
        """
        if not probe and time.monotonic() < self._failing_until:
            STORE_ERRORS.labels(operation).inc()
            raise StoreError(f"redis {operation} skipped: the store failed a moment ago")
        try:
            yield
        except (RedisError, OSError) as exc:  # a bug elsewhere is not a store outage
            STORE_ERRORS.labels(operation).inc()
            if not isinstance(exc, RedisError) or isinstance(
                exc, RedisTimeoutError | RedisConnectionError
            ):
                self._failing_until = time.monotonic() + _FAIL_FAST_S
            raise StoreError(f"redis {operation} failed: {type(exc).__name__}") from exc
        if probe:
            self._failing_until = 0.0

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
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

    async def delete(self, keys: Sequence[str]) -> None:
        if not keys:
            return
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

    async def acquire_outbound(
        self, bucket_key: str, slots_key: str, rate: float, holder: str, limit: int, ttl_ms: int
    ) -> int:
        with self._guard("outbound"):
            args: list[str | float] = [rate, holder, limit, ttl_ms]
            return int(await self._outbound(keys=[bucket_key, slots_key], args=args))

    async def release_slot(self, key: str, holder: str) -> None:
        with self._guard("release_slot"):
            await self._redis.zrem(key, holder)

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
        await self._redis.aclose()


def _client(config: RedisConfig) -> Any:
    """A redis-py asyncio client for a single server, a Sentinel-watched master or a
    Cluster: short timeouts, no retries, bounded connections."""
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
            config.service_name, password=parts.password, db=db, retry=Retry(NoBackoff(), 0)
        )
    if config.cluster:
        return RedisCluster.from_url(
            url, max_connections=config.max_connections, retry=Retry(NoBackoff(), 0), **timeouts
        )
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=config.max_connections, timeout=config.pool_timeout_s, **timeouts
    )
    return redis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))


def _as_bytes(value: bytes | str | None) -> bytes | None:
    # The client never decodes responses; this only narrows redis-py's union type.
    return value.encode() if isinstance(value, str) else value


def open_store(config: RedisConfig) -> Store:
    """The store the config asks for: Redis when ``redis.url`` is set, else in-process memory."""
    if config.enabled:
        return RedisStore(config)
    return MemoryStore()
