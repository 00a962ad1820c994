"""The Store protocol: the same behavior from MemoryStore and RedisStore, and a Redis that is
gone failing fast with StoreError."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import httpx
import pytest
import redis
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from gateway.config import RedisConfig, Secret
from gateway.configfile import config_from_dict
from gateway.errors import StoreError
from gateway.store import KeySpace, MemoryStore, RedisStore, Store, open_store
from tests.support import RedisProcess, SimProcess, caller, config_data, running_gateway


async def get(store: Store, key: str) -> bytes | None:
    (value,) = await store.mget([key])
    return value


async def put(store: Store, key: str, value: bytes, ttl_ms: int) -> None:
    await store.set_many({key: value}, ttl_ms)


@pytest.fixture
def prefix() -> str:
    """Keys unique to the test, so tests sharing the session's Redis never see each other."""
    return f"t{uuid.uuid4().hex[:12]}"


# --- behavior shared by both stores ----------------------------------------------------------


async def test_get_of_a_missing_key_is_none(store: Store, prefix: str) -> None:
    assert await get(store, f"{prefix}:nothing") is None


async def test_set_then_get_returns_the_exact_bytes(store: Store, prefix: str) -> None:
    value = b'{"id":"1"}\x00\xff\xfe not utf-8 \r\n'
    await put(store, f"{prefix}:a", value, 10_000)
    assert await get(store, f"{prefix}:a") == value


async def test_set_overwrites(store: Store, prefix: str) -> None:
    await put(store, f"{prefix}:a", b"one", 10_000)
    await put(store, f"{prefix}:a", b"two", 10_000)
    assert await get(store, f"{prefix}:a") == b"two"


async def test_ttl_is_in_milliseconds(store: Store, prefix: str) -> None:
    await put(store, f"{prefix}:short", b"x", 150)
    await put(store, f"{prefix}:long", b"y", 10_000)
    assert await get(store, f"{prefix}:short") == b"x"
    await asyncio.sleep(0.3)
    assert await get(store, f"{prefix}:short") is None
    assert await get(store, f"{prefix}:long") == b"y"


async def test_overwrite_sets_a_new_ttl(store: Store, prefix: str) -> None:
    await put(store, f"{prefix}:a", b"old", 80)
    await put(store, f"{prefix}:a", b"new", 10_000)
    await asyncio.sleep(0.2)
    assert await get(store, f"{prefix}:a") == b"new"


@pytest.mark.parametrize("ttl_ms", [0, -1, -10_000])
async def test_set_with_ttl_not_above_zero_deletes(store: Store, prefix: str, ttl_ms: int) -> None:
    await put(store, f"{prefix}:a", b"x", 10_000)
    await put(store, f"{prefix}:a", b"y", ttl_ms)
    assert await get(store, f"{prefix}:a") is None


async def test_mget_answers_in_the_order_asked_with_none_for_missing(
    store: Store, prefix: str
) -> None:
    await put(store, f"{prefix}:a", b"A", 10_000)
    await put(store, f"{prefix}:c", b"C", 10_000)
    keys = [f"{prefix}:c", f"{prefix}:missing", f"{prefix}:a", f"{prefix}:c"]
    assert await store.mget(keys) == [b"C", None, b"A", b"C"]


async def test_mget_of_nothing(store: Store) -> None:
    assert await store.mget([]) == []


async def test_mget_leaves_out_expired_values(store: Store, prefix: str) -> None:
    await put(store, f"{prefix}:a", b"A", 60)
    await put(store, f"{prefix}:b", b"B", 10_000)
    await asyncio.sleep(0.15)
    assert await store.mget([f"{prefix}:a", f"{prefix}:b"]) == [None, b"B"]


async def test_set_many_writes_every_item_with_the_ttl(store: Store, prefix: str) -> None:
    items = {f"{prefix}:{n}": f"value-{n}".encode() for n in range(5)}
    await store.set_many(items, 150)
    assert await store.mget(list(items)) == list(items.values())
    await asyncio.sleep(0.3)
    assert await store.mget(list(items)) == [None] * 5


async def test_set_many_of_nothing(store: Store, prefix: str) -> None:
    await store.set_many({}, 10_000)
    assert await get(store, f"{prefix}:a") is None


async def test_set_many_with_ttl_not_above_zero_deletes_like_set(store: Store, prefix: str) -> None:
    """``set`` with ttl <= 0 deletes the key on both stores; ``set_many`` is the same write for
    several keys and must not behave differently (the stores must be interchangeable)."""
    await store.set_many({f"{prefix}:a": b"x", f"{prefix}:b": b"y"}, 10_000)
    await store.set_many({f"{prefix}:a": b"new"}, 0)
    assert await get(store, f"{prefix}:a") is None
    assert await get(store, f"{prefix}:b") == b"y"


async def test_delete_removes_the_keys_given(store: Store, prefix: str) -> None:
    await store.set_many({f"{prefix}:{n}": b"v" for n in "abc"}, 10_000)
    await store.delete([f"{prefix}:a", f"{prefix}:c", f"{prefix}:never-set"])
    assert await store.mget([f"{prefix}:a", f"{prefix}:b", f"{prefix}:c"]) == [None, b"v", None]


async def test_delete_of_nothing(store: Store, prefix: str) -> None:
    await put(store, f"{prefix}:a", b"v", 10_000)
    await store.delete([])
    assert await get(store, f"{prefix}:a") == b"v"


async def test_ping(store: Store) -> None:
    await store.ping()


async def test_concurrent_use(store: Store, prefix: str) -> None:
    await asyncio.gather(*(put(store, f"{prefix}:{n}", str(n).encode(), 10_000) for n in range(50)))
    values = await asyncio.gather(*(get(store, f"{prefix}:{n}") for n in range(50)))
    assert values == [str(n).encode() for n in range(50)]


# --- MemoryStore ---------------------------------------------------------------------------


async def test_writes_queued_together_keep_each_ttl_and_if_absent(
    store: Store, prefix: str
) -> None:
    """Writes behind the request path, queued in one batch: each keeps its own TTL, and an
    ``if_absent`` write leaves a value already there alone."""
    await put(store, f"{prefix}:held", b"old", 10_000)
    store.write_later({f"{prefix}:short": b"s", f"{prefix}:long": b"l"}, 150)
    store.write_later({f"{prefix}:long": b"L"}, 10_000)
    store.write_later({f"{prefix}:held": b"new", f"{prefix}:fresh": b"f"}, 10_000, True)
    await store.flush()
    keys = [f"{prefix}:{name}" for name in ("short", "long", "held", "fresh")]
    assert await store.mget(keys) == [b"s", b"L", b"old", b"f"]
    await asyncio.sleep(0.3)
    assert await store.mget(keys) == [None, b"L", b"old", b"f"]


async def test_memory_store_keeps_at_most_max_keys_oldest_write_evicted_first() -> None:
    store = MemoryStore(max_keys=3)
    for key in "abc":
        await put(store, key, key.encode(), 10_000)
    await put(store, "a", b"a2", 10_000)  # rewritten: now the newest
    await put(store, "d", b"d", 10_000)
    assert await store.mget(["a", "b", "c", "d"]) == [b"a2", None, b"c", b"d"]
    await store.set_many({"e": b"e", "f": b"f"}, 10_000)
    assert await store.mget(["a", "c", "d", "e", "f"]) == [None, None, b"d", b"e", b"f"]


async def test_memory_store_close_forgets_everything() -> None:
    store = MemoryStore()
    await put(store, "a", b"x", 10_000)
    await store.close()
    assert await get(store, "a") is None


# --- RedisStore against a Redis that is gone ------------------------------------------------


async def assert_fails_fast(action: str, store: RedisStore) -> None:
    started = time.monotonic()
    with pytest.raises(StoreError):
        if action == "get":
            await get(store, "k")
        elif action == "mget":
            await store.mget(["k", "j"])
        elif action == "set":
            await put(store, "k", b"v", 10_000)
        elif action == "set_many":
            await store.set_many({"k": b"v"}, 10_000)
        elif action == "delete":
            await store.delete(["k"])
        else:
            await store.ping()
    assert time.monotonic() - started < 1.0


ACTIONS = ["get", "mget", "set", "set_many", "delete", "ping"]


@pytest.mark.parametrize("action", ACTIONS)
async def test_redis_store_on_a_stopped_server_raises_store_error_quickly(
    own_redis: RedisProcess, action: str
) -> None:
    store = RedisStore(RedisConfig(url=Secret(own_redis.url)))
    try:
        await put(store, "k", b"v", 10_000)  # a pooled connection now exists
        assert await get(store, "k") == b"v"
        own_redis.stop()
        await assert_fails_fast(action, store)
    finally:
        await store.close()


async def test_redis_store_never_connected_to_a_stopped_server_fails_fast(
    own_redis: RedisProcess,
) -> None:
    own_redis.stop()
    store = RedisStore(RedisConfig(url=Secret(own_redis.url)))
    try:
        for action in ACTIONS:
            await assert_fails_fast(action, store)
    finally:
        await store.close()


async def test_redis_store_works_again_when_the_server_is_back(own_redis: RedisProcess) -> None:
    store = RedisStore(RedisConfig(url=Secret(own_redis.url)))
    try:
        await put(store, "k", b"v", 10_000)
        own_redis.stop()
        with pytest.raises(StoreError):
            await get(store, "k")
        own_redis.start()  # same port, empty data set
        # After a failure the store fails fast for a moment (no socket timeout per call
        # while Redis is away), then tries again on its own.
        deadline = time.monotonic() + 3
        while True:
            try:
                assert await get(store, "k") is None
                break
            except StoreError:
                assert time.monotonic() < deadline, "the store did not recover"
                await asyncio.sleep(0.1)
        await put(store, "k", b"w", 10_000)
        assert await get(store, "k") == b"w"
    finally:
        await store.close()


def mget_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats").get("cmdstat_mget", {"calls": 0})
    return int(stats["calls"])


@pytest.fixture
async def own_store(own_redis: RedisProcess) -> AsyncIterator[RedisStore]:
    """A RedisStore on the test's own redis-server."""
    store = RedisStore(RedisConfig(url=Secret(own_redis.url)))
    yield store
    await store.close()


async def test_concurrent_reads_of_one_worker_share_mget_round_trips(
    own_store: RedisStore, own_redis: RedisProcess
) -> None:
    """Fifty reads at once: each gets exactly its own keys' values, in its order, and they go
    out in a few MGETs (what queues while one is on the wire goes in the next), not fifty."""
    await own_store.set_many({f"k{n}": f"v{n}".encode() for n in range(100)}, 10_000)
    with redis.Redis.from_url(own_redis.url) as client:
        before = mget_calls(client)
        wanted = [[f"k{n}", f"k{n + 50}", "missing"] for n in range(50)]
        answers = await asyncio.gather(*(own_store.mget(keys) for keys in wanted))
        assert answers == [[f"v{n}".encode(), f"v{n + 50}".encode(), None] for n in range(50)]
        assert 1 <= mget_calls(client) - before <= 2


async def test_a_read_cancelled_while_queued_leaves_the_others_answered(
    own_store: RedisStore,
) -> None:
    await own_store.set_many({"a": b"1", "b": b"2"}, 10_000)
    first, cancelled, last = (asyncio.ensure_future(own_store.mget([k])) for k in "aab")
    await asyncio.sleep(0)
    cancelled.cancel()
    assert await first == [b"1"] and await last == [b"2"]
    assert cancelled.cancelled()


async def test_every_read_of_a_failed_batch_gets_the_store_error(
    own_store: RedisStore, own_redis: RedisProcess
) -> None:
    await put(own_store, "k", b"v", 10_000)
    own_redis.stop()
    results = await asyncio.gather(
        *(own_store.mget(["k", f"other{n}"]) for n in range(10)), return_exceptions=True
    )
    assert all(isinstance(result, StoreError) for result in results), results


async def test_store_error_does_not_show_the_redis_password(own_redis: RedisProcess) -> None:
    own_redis.stop()
    url = f"redis://:pw-secret-5521@127.0.0.1:{own_redis.port}/0"
    store = RedisStore(RedisConfig(url=Secret(url)))
    try:
        with pytest.raises(StoreError) as caught:
            await get(store, "k")
        assert "pw-secret-5521" not in str(caught.value)
        assert "pw-secret-5521" not in repr(caught.value)
    finally:
        await store.close()


# --- open_store and KeySpace -----------------------------------------------------------------


async def test_open_store_without_url_is_the_memory_store() -> None:
    store = open_store(RedisConfig(url=Secret("")))
    assert isinstance(store, MemoryStore)
    await store.close()


async def test_open_store_with_url_is_redis(redis_server: RedisProcess, prefix: str) -> None:
    store = open_store(RedisConfig(url=Secret(redis_server.url)))
    try:
        assert isinstance(store, RedisStore)
        await put(store, f"{prefix}:a", b"shared", 10_000)
        # A second store on the same URL sees the write: the data lives in the server.
        other = open_store(RedisConfig(url=Secret(redis_server.url)))
        assert await get(other, f"{prefix}:a") == b"shared"
        await other.close()
    finally:
        await store.close()


def test_owner_keys_are_prefixed_and_hash_tagged_by_task_id() -> None:
    keys = KeySpace("team-a")
    assert keys.owner("1712345678901234") == "team-a:{1712345678901234}:owner"
    assert keys.owner("a") != KeySpace("team-b").owner("a")


# --- Redis killed and restarted under load -----------------------------------------------------


class Load:
    """Callers hammering the gateway from threads (every request touches the store), until
    stopped; counts answers by status."""

    def __init__(self, url: str, threads: int = 6) -> None:
        self.url = url
        self.statuses: Counter[int] = Counter()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, headers=caller("alice"), timeout=10) as http:
            while not self._stop.is_set():
                answer = http.get(f"/mj/task/{uuid.uuid4().int % 10**16:016d}/fetch")
                self.statuses[answer.status_code] += 1

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)


def burst(url: str, key: str, count: int) -> Counter[int]:
    """``count`` requests at once with this caller key; their statuses."""

    async def run() -> list[int]:
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as http:
            answers = await asyncio.gather(
                *(http.get(f"/mj/task/{n:016d}/fetch") for n in range(count))
            )
        return [a.status_code for a in answers]

    return Counter(asyncio.run(run()))


def test_limits_are_exact_within_a_second_of_redis_returning_under_load(
    own_redis: RedisProcess, session_sims: list[SimProcess]
) -> None:
    """Redis is killed under load and started again. From a quarter second after its return
    on, a burst of 10 against a burst limit of 5 admits exactly 5 (each burst from a caller
    of its own). A store-wide "skip" window, reopened by every stray connection error, kept
    the limits open for seconds, and ``on_store_error: allow`` admitted everything meanwhile."""
    data = config_data(session_sims[:1], own_redis.url)
    keys = [f"burst-caller-{n}-key-0123456789" for n in range(4)]
    data["clients"] += [
        {"name": f"burst{n}", "key": key, "rate_limit": {"rps": 0.001, "burst": 5}}
        for n, key in enumerate(keys)
    ]
    data["rate_limit"]["on_store_error"] = "allow"
    config = config_from_dict(data, env={})
    outcomes: list[tuple[float, Counter[int]]] = []
    with running_gateway(config) as gateway, Load(gateway.url) as load:
        time.sleep(0.5)
        assert own_redis.proc is not None
        own_redis.proc.kill()
        own_redis.proc.wait(5)
        own_redis.proc = None
        time.sleep(1.5)
        own_redis.start()  # same port, empty data set
        back = time.monotonic()
        for n, key in enumerate(keys):
            time.sleep(max(0.0, back + 0.25 * (n + 1) - time.monotonic()))
            outcomes.append((time.monotonic() - back, burst(gateway.url, key, 10)))
    for after, statuses in outcomes:
        assert statuses[429] == 5, f"{statuses} {after:.2f} s after Redis returned"
    assert load.statuses[500] == 0, load.statuses


def store_errors(operation: str) -> float:
    value = REGISTRY.get_sample_value("mjgate_store_errors_total", {"operation": operation})
    return value or 0.0


async def test_every_redis_error_is_counted_and_logged_without_a_line_each(
    own_redis: RedisProcess,
) -> None:
    store = RedisStore(RedisConfig(url=Secret(own_redis.url)))
    try:
        own_redis.stop()
        before = store_errors("mget")
        with capture_logs() as logs:
            for _ in range(50):
                with pytest.raises(StoreError):
                    await store.mget(["k"])
            own_redis.start()
            assert await store.mget(["k"]) == [None]
            assert await store.mget(["k"]) == [None]
        assert store_errors("mget") - before == 50
        failed = [e for e in logs if e["event"] == "redis_error"]
        back = [e for e in logs if e["event"] == "redis_back"]
        assert [(e["operation"], e["errors"]) for e in failed] == [("mget", 1)]
        assert [e["unlogged_errors"] for e in back] == [{"mget": 49}]  # every error told of
    finally:
        await store.close()


async def test_a_stale_pooled_connection_after_a_restart_is_replaced_not_failed(
    own_redis: RedisProcess,
) -> None:
    store = RedisStore(RedisConfig(url=Secret(own_redis.url), max_connections=8))
    try:
        # Eight pooled connections, all to the server about to be replaced.
        await asyncio.gather(*(store.take_tokens(f"b{n}", 1, 5, 1, 0) for n in range(8)))
        own_redis.stop()
        own_redis.start()
        before = store_errors("take_tokens")
        grants = await asyncio.gather(*(store.take_tokens(f"b{n}", 1, 5, 1, 0) for n in range(8)))
        assert [g.granted for g in grants] == [1] * 8
        assert store_errors("take_tokens") == before
    finally:
        await store.close()
