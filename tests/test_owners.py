"""The owner map: task id -> upstream, in the shared store and a process-local LRU, where a
store failure is "unknown" on read and never an error on write."""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as redis
from structlog.testing import capture_logs

from gateway.config import RedisConfig, Secret
from gateway.owners import Owner, OwnerMap
from gateway.store import KeySpace, RedisStore, Store
from tests.support import RedisProcess

TTL_S = 3600


@pytest.fixture
def keys() -> KeySpace:
    return KeySpace(f"t{uuid.uuid4().hex[:12]}")


def task_id() -> str:
    return f"17{uuid.uuid4().int % 10**14:014d}"


async def test_record_then_get(store: Store, keys: KeySpace) -> None:
    owners = OwnerMap(store, keys, TTL_S, 100)
    first, second = task_id(), task_id()
    await owners.record(first, "java")
    await owners.record(second, "relay")
    assert await owners.get(first) == "java"
    assert await owners.get(second) == "relay"
    assert await owners.get(task_id()) is None


async def test_get_many_answers_only_known_ids(store: Store, keys: KeySpace) -> None:
    owners = OwnerMap(store, keys, TTL_S, 100)
    a, b, c = task_id(), task_id(), task_id()
    await owners.record_many({a: "java", c: "csharp"})
    assert await owners.get_many([a, b, c]) == {a: "java", c: "csharp"}
    assert await owners.get_many([]) == {}


async def test_owners_are_shared_through_the_store(store: Store, keys: KeySpace) -> None:
    """Another worker (its own OwnerMap and local LRU, the same store) sees recorded owners."""
    writer = OwnerMap(store, keys, TTL_S, 100)
    reader = OwnerMap(store, keys, TTL_S, 100)
    a, b = task_id(), task_id()
    await writer.record(a, "java")
    await writer.record_many({b: "relay"})
    assert await reader.get_many([a, b]) == {a: "java", b: "relay"}
    assert await store.mget([keys.owner(a)]) == [b"java"]


async def test_key_prefixes_keep_deployments_apart(store: Store) -> None:
    a = task_id()
    await OwnerMap(store, KeySpace(f"a{uuid.uuid4().hex[:8]}"), TTL_S, 100).record(a, "java")
    other = OwnerMap(store, KeySpace(f"b{uuid.uuid4().hex[:8]}"), TTL_S, 100)
    assert await other.get(a) is None


async def test_owner_is_stored_with_its_ttl(redis_server: RedisProcess, keys: KeySpace) -> None:
    store = RedisStore(RedisConfig(url=Secret(redis_server.url)))
    raw = redis.Redis.from_url(redis_server.url)
    try:
        a = task_id()
        await OwnerMap(store, keys, TTL_S, 100).record(a, "java")
        await store.flush()  # lookups' owner writes leave the request path
        ttl_ms = await raw.pttl(keys.owner(a))
        assert TTL_S * 1000 - 5_000 < ttl_ms <= TTL_S * 1000
    finally:
        await raw.aclose()
        await store.close()


async def test_local_copy_answers_without_the_store(own_redis: RedisProcess) -> None:
    store = RedisStore(RedisConfig(url=Secret(own_redis.url)))
    try:
        owners = OwnerMap(store, KeySpace("t"), TTL_S, 100)
        a, b = task_id(), task_id()
        await owners.record(a, "java")
        await owners.record_many({b: "relay"})
        own_redis.stop()
        assert await owners.get(a) == "java"
        assert await owners.get_many([a, b]) == {a: "java", b: "relay"}
    finally:
        await store.close()


async def test_owner_read_from_the_store_is_kept_locally(own_redis: RedisProcess) -> None:
    store = RedisStore(RedisConfig(url=Secret(own_redis.url)))
    try:
        a = task_id()
        await OwnerMap(store, KeySpace("t"), TTL_S, 100).record(a, "csharp")
        reader = OwnerMap(store, KeySpace("t"), TTL_S, 100)
        assert await reader.get(a) == "csharp"  # from the store
        own_redis.stop()
        assert await reader.get(a) == "csharp"  # from the local copy
    finally:
        await store.close()


async def test_local_copy_is_bounded(own_redis: RedisProcess) -> None:
    store = RedisStore(RedisConfig(url=Secret(own_redis.url)))
    try:
        owners = OwnerMap(store, KeySpace("t"), TTL_S, 2)
        a, b, c = task_id(), task_id(), task_id()
        for each in (a, b, c):
            await owners.record(each, "java")
        own_redis.stop()
        assert await owners.get_many([a, b, c]) == {b: "java", c: "java"}
    finally:
        await store.close()


async def test_store_failure_on_read_is_unknown_not_an_error(own_redis: RedisProcess) -> None:
    own_redis.stop()
    store = RedisStore(RedisConfig(url=Secret(own_redis.url)))
    try:
        owners = OwnerMap(store, KeySpace("t"), TTL_S, 100)
        with capture_logs() as logs:
            assert await owners.get(task_id()) is None
            assert await owners.get_many([task_id(), task_id()]) == {}
        assert any(e["event"] == "store_error" and e["purpose"] == "owner_read" for e in logs), logs
    finally:
        await store.close()


async def test_store_failure_on_write_is_logged_and_the_local_copy_kept(
    own_redis: RedisProcess,
) -> None:
    own_redis.stop()
    store = RedisStore(RedisConfig(url=Secret(own_redis.url)))
    try:
        owners = OwnerMap(store, KeySpace("t"), TTL_S, 100)
        a, b = task_id(), task_id()
        with capture_logs() as logs:
            await owners.record(a, "java")
            await owners.record_many({b: "relay"})
            await store.flush()  # lookups' owner writes leave the request path
        # Both went out in one write-behind batch, which failed once, logged by the store.
        writes = [e for e in logs if e["event"] == "redis_error"]
        assert [e["operation"] for e in writes] == ["write_later"]
        assert all(e["log_level"] == "warning" for e in writes)
        assert await owners.get_many([a, b]) == {a: "java", b: "relay"}
    finally:
        await store.close()


# -- the submitter kept with the owner (visibility) ------------------------------------------


async def test_a_submitter_is_kept_with_its_owner(store: Store, keys: KeySpace) -> None:
    owners = OwnerMap(store, keys, TTL_S, 100)
    a = task_id()
    await owners.record_submit(a, Owner("java", "alice", "red"))
    assert await store.mget([keys.owner(a)]) == [b"java|alice|red"]
    assert owners.local_owner(a) == Owner("java", "alice", "red")
    assert owners.local(a) == "java" and await owners.get(a) == "java"
    reader = OwnerMap(store, keys, TTL_S, 100)
    assert reader.remember(a, "java|alice|red") == "java"
    assert reader.local_owner(a) == Owner("java", "alice", "red")


async def test_an_owner_found_by_a_lookup_never_hides_a_submitter(
    store: Store, keys: KeySpace
) -> None:
    """A lookup on one worker may find a task while another records its submit: whichever
    comes first, the submitter stays, and a worker that learned the owner without it reads
    the store again when a submitter is needed."""
    submitting = OwnerMap(store, keys, TTL_S, 100)
    looking = OwnerMap(store, keys, TTL_S, 100)
    first, second = task_id(), task_id()
    await submitting.record_submit(first, Owner("java", "alice", ""))
    await looking.record(first, "java")  # too late: the store keeps the submitter
    await looking.record(second, "relay")
    await submitting.record_submit(second, Owner("relay", "bob", "red"))
    assert await store.mget([keys.owner(first), keys.owner(second)]) == [
        b"java|alice|",
        b"relay|bob|red",
    ]
    assert looking.local_owner(second) == Owner("relay")  # learned before the submit
    found = await looking.owners([first, second], need_submitter=True)
    assert found == {first: Owner("java", "alice", ""), second: Owner("relay", "bob", "red")}
    assert looking.local_owner(second) == Owner("relay", "bob", "red")
