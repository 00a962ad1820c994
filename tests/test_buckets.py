"""Token buckets and outbound slot leases: the math on a fake clock, then the Lua scripts on Redis.

The in-memory twins take the time as an argument, so their numbers are exact. The Lua scripts
read Redis's own clock; they are compared with the twins fed the very timestamps the scripts
stored, and probed with waits chosen far from any rounding edge.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.buckets import LEASE_DIVISOR, Grant, MemoryBucket, MemorySlots
from gateway.config import RedisConfig, Secret
from gateway.store import KeySpace, MemoryStore, RedisStore, Store
from tests.support import RedisProcess

# -- MemoryBucket on a fake clock ----------------------------------------------------------


def test_a_full_bucket_grants_its_burst_at_once_then_refuses() -> None:
    bucket = MemoryBucket(burst=10, now=0.0)
    grants = [bucket.take(0.0, rate=5, burst=10, want=1, refund=0) for _ in range(12)]
    assert [g.granted for g in grants] == [1] * 10 + [0, 0]
    assert [g.tokens_left for g in grants[:10]] == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    assert grants[-1] == Grant(0, 0.0)


def test_steady_rate_after_the_burst_is_exact_on_a_fake_clock() -> None:
    """rps 4, burst 10, takers as fast as they like on a clock ticking every 1/64 s for 3 s:
    10 + 4 * 3 = 22 grants, each refill token taken on the tick it completes. Binary
    fractions keep the float sums exact."""
    rate, burst = 4.0, 10
    bucket = MemoryBucket(burst, now=0.0)
    granted_at: list[float] = []
    for tick in range(3 * 64 + 1):
        now = tick / 64
        while bucket.take(now, rate, burst, want=1, refund=0).granted:
            granted_at.append(now)
    assert len(granted_at) == burst + rate * 3
    assert granted_at[:burst] == [0.0] * burst
    # After the burst: exactly one every 1/rate seconds.
    assert granted_at[burst:] == [n / rate for n in range(1, 13)]


def test_time_never_fills_the_bucket_past_its_burst() -> None:
    bucket = MemoryBucket(burst=5, now=0.0)
    for _ in range(5):
        bucket.take(0.0, rate=1, burst=5, want=1, refund=0)
    grant = bucket.take(3600.0, rate=1, burst=5, want=1, refund=0)
    assert grant == Grant(1, 4.0)


def test_a_clock_that_steps_back_adds_no_tokens() -> None:
    bucket = MemoryBucket(burst=3, now=100.0)
    for _ in range(3):
        bucket.take(100.0, rate=1, burst=3, want=1, refund=0)
    assert bucket.take(50.0, rate=1, burst=3, want=1, refund=0).granted == 0


def test_leases_are_an_eighth_of_what_is_left_and_shrink_to_one_token() -> None:
    bucket = MemoryBucket(burst=64, now=0.0)
    grants = [bucket.take(0.0, rate=1, burst=64, want=64, refund=0).granted for _ in range(28)]
    assert LEASE_DIVISOR == 8
    assert grants == [8, 7, 6, 5, 4, 4, 3, 3, 3, 2, 2, 2, *[1] * 15, 0]
    assert sum(grants) == 64


def test_a_lease_never_exceeds_what_the_taker_wants() -> None:
    bucket = MemoryBucket(burst=64, now=0.0)
    assert bucket.take(0.0, rate=1, burst=64, want=3, refund=0) == Grant(3, 61.0)
    assert bucket.take(0.0, rate=1, burst=64, want=1, refund=0) == Grant(1, 60.0)


def test_a_refund_comes_back_but_never_past_the_burst() -> None:
    bucket = MemoryBucket(burst=16, now=0.0)
    assert bucket.take(0.0, rate=1, burst=16, want=16, refund=0) == Grant(2, 14.0)
    # The lease of 2 expired unspent: it returns, and the next lease is cut from 16 again.
    assert bucket.take(0.0, rate=1, burst=16, want=16, refund=2) == Grant(2, 14.0)
    # A refund on a bucket refilled meanwhile cannot push it past the burst.
    assert bucket.take(10.0, rate=1, burst=16, want=1, refund=2) == Grant(1, 15.0)


def test_a_token_is_granted_the_moment_one_is_there() -> None:
    """Near the limit the bucket judges exactly: refused at 0.75 tokens, granted at 1."""
    bucket = MemoryBucket(burst=1, now=0.0)
    assert bucket.take(0.0, rate=2, burst=1, want=8, refund=0).granted == 1
    refused = bucket.take(0.375, rate=2, burst=1, want=8, refund=0)
    assert refused == Grant(0, 0.75)
    assert refused.retry_after_s(2) == 0.125
    assert bucket.take(0.5, rate=2, burst=1, want=8, refund=0) == Grant(1, 0.0)


def test_retry_after_and_reset_after() -> None:
    assert Grant(0, 0.25).retry_after_s(0.5) == pytest.approx(1.5)
    assert Grant(0, 0.0).retry_after_s(4) == pytest.approx(0.25)
    assert Grant(1, 2.0).retry_after_s(1) == 0.0
    assert Grant(0, 0.25).reset_after_s(0.5, 4) == pytest.approx(7.5)
    assert Grant(3, 4.0).reset_after_s(0.5, 4) == 0.0


@settings(max_examples=300, deadline=None)
@given(
    rate=st.sampled_from([0.5, 1.0, 3.0, 10.0, 250.0]),
    burst=st.integers(min_value=1, max_value=200),
    steps=st.lists(
        st.tuples(
            st.floats(min_value=0.0, max_value=2.0),  # time until this take
            st.integers(min_value=1, max_value=64),  # tokens wanted
            st.floats(min_value=0.0, max_value=1.0),  # share of the lease left unspent
        ),
        max_size=60,
    ),
)
def test_the_bucket_never_hands_out_more_than_burst_plus_rate_times_elapsed(
    rate: float, burst: int, steps: list[tuple[float, int, float]]
) -> None:
    """Whatever the takers want and however much of their leases they give back, tokens
    granted minus tokens refunded stay within burst + rate * elapsed, and a taker is refused
    only when less than one token is there."""
    now = 0.0
    bucket = MemoryBucket(burst, now)
    granted = refunded = 0
    unspent = 0  # of the previous lease, refunded on the next take as CallerLimiter does
    for wait, want, leftover_share in steps:
        now += wait
        before = min(burst, bucket.tokens + max(0.0, now - bucket.ts) * rate + unspent)
        grant = bucket.take(now, rate, burst, want, unspent)
        refunded += unspent
        granted += grant.granted
        assert 0.0 <= grant.tokens_left <= burst
        assert (grant.granted == 0) == (before < 1)
        assert granted - refunded <= burst + rate * now + 1e-6
        unspent = math.floor(grant.granted * leftover_share)


# -- MemorySlots on a fake clock (milliseconds) ---------------------------------------------


def test_slot_leases_are_an_eighth_of_the_free_slots_and_shrink_to_one() -> None:
    slots = MemorySlots()
    assert slots.lease(0.0, "w1", 0, want=64, limit=100, ttl_ms=5000) == 12
    assert slots.lease(0.0, "w2", 0, want=64, limit=100, ttl_ms=5000) == 11
    assert slots.lease(0.0, "w1", 12, want=5, limit=100, ttl_ms=5000) == 5
    held = len(slots.held)
    while held < 100:
        granted = slots.lease(0.0, "w3", held, want=64, limit=100, ttl_ms=5000)
        assert granted == max(1, (100 - held) // LEASE_DIVISOR)
        held += granted
    assert slots.lease(0.0, "w3", held, want=64, limit=100, ttl_ms=5000) == 0
    assert len(slots.held) == 100


def test_slots_are_named_per_holder_and_free_when_released_or_expired() -> None:
    slots = MemorySlots()
    assert slots.lease(0.0, "a", 7, want=1, limit=2, ttl_ms=500) == 1
    assert slots.lease(1.0, "b", 0, want=1, limit=2, ttl_ms=500) == 1
    assert set(slots.held) == {"a:7", "b:0"}
    assert slots.lease(2.0, "c", 0, want=1, limit=2, ttl_ms=500) == 0
    del slots.held["a:7"]  # what MemoryStore.release_slots does
    assert slots.lease(3.0, "c", 0, want=1, limit=2, ttl_ms=500) == 1
    # "b" died without releasing: its slot frees itself ttl_ms after it was taken.
    assert slots.lease(500.0, "d", 0, want=1, limit=2, ttl_ms=500) == 0
    assert slots.lease(501.5, "d", 0, want=1, limit=2, ttl_ms=500) == 1


# -- the Lua scripts on a real Redis ------------------------------------------------------


@pytest.fixture
async def redis_store(redis_server: RedisProcess) -> AsyncIterator[RedisStore]:
    store = RedisStore(RedisConfig(url=Secret(redis_server.url)))
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def raw_redis(redis_server: RedisProcess) -> AsyncIterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


def fresh_keys() -> KeySpace:
    return KeySpace(f"t{uuid.uuid4().hex[:12]}")


async def stored_state(client: redis.Redis, key: str) -> tuple[float, float]:
    tokens, ts = await client.hmget(key, ["tokens", "ts"])
    assert tokens is not None and ts is not None, f"no bucket state at {key}"
    return float(tokens), float(ts)


# Wanted and refunded tokens, covering full leases, capped leases, refunds and refusals.
TAKES = [(64, 0)] * 6 + [(3, 0), (1, 0), (64, 5), (64, 0), (2, 1)] + [(64, 0)] * 30


async def test_take_lua_grants_exactly_what_the_twin_grants(
    redis_store: RedisStore, raw_redis: redis.Redis
) -> None:
    """The same takes, on a bucket whose refill is too slow to matter (one token in 30
    years), give the same grants and leave the same tokens in Redis as in memory."""
    key = fresh_keys().caller_bucket("alice", "all")
    rate, burst = 1e-9, 40
    twin: MemoryBucket | None = None
    lua: list[Grant] = []
    mem: list[Grant] = []
    for want, refund in TAKES:
        lua.append(await redis_store.take_tokens(key, rate, burst, want, refund))
        _, ts = await stored_state(raw_redis, key)
        if twin is None:
            twin = MemoryBucket(burst, ts)
        mem.append(twin.take(ts, rate, burst, want, refund))
    assert [g.granted for g in lua] == [g.granted for g in mem]
    for got, expected in zip(lua, mem, strict=True):
        assert got.tokens_left == pytest.approx(expected.tokens_left, abs=1e-6)
    assert [g.granted for g in lua][:6] == [5, 4, 3, 3, 3, 2]
    assert lua[-1].granted == 0
    assert sum(g.granted for g in lua) - sum(r for _, r in TAKES) == burst


async def test_take_lua_refills_at_rate_on_redis_time_like_the_twin(
    redis_store: RedisStore, raw_redis: redis.Redis
) -> None:
    """Real waits on Redis's clock. Before each take the twin is set to the state the script
    will read and given the timestamp the script stores, so both see the same elapsed time up
    to the 0.1 ms Redis keeps of it (rate 4: 0.0004 token). The waits land the bucket near
    x.5 tokens, so a wait may overshoot by 125 ms before an expected grant changes."""
    key = fresh_keys().caller_bucket("bob", "query")
    rate, burst = 4.0, 4
    # (seconds to wait before the take, tokens wanted, tokens expected)
    steps = [(0.0, 1, 1), (0.0, 1, 1), (0.0, 1, 1), (0.0, 1, 1), (0.0, 1, 0)]
    steps += [(0.375, 1, 1), (0.0, 1, 0), (0.5, 64, 1), (0.0, 64, 1), (0.0, 64, 0)]
    steps += [(1.0, 64, 1)]  # 4.5 tokens' worth of time: the bucket stops at its burst
    for wait, want, expected in steps:
        await asyncio.sleep(wait)
        before = await raw_redis.hmget(key, ["tokens", "ts"])
        got = await redis_store.take_tokens(key, rate, burst, want, 0)
        _, ts = await stored_state(raw_redis, key)
        twin = MemoryBucket(burst, ts)
        if before[0] is not None and before[1] is not None:
            twin.tokens, twin.ts = float(before[0]), float(before[1])
        mine = twin.take(ts, rate, burst, want, 0)
        assert got.granted == mine.granted == expected, (wait, want, got, mine)
        assert got.tokens_left == pytest.approx(mine.tokens_left, abs=0.005)
    assert got.tokens_left == pytest.approx(3.0)


async def test_bucket_keys_expire_once_a_full_bucket_would_be_refilled(
    redis_store: RedisStore, raw_redis: redis.Redis
) -> None:
    key = fresh_keys().caller_bucket("alice", "submit")
    await redis_store.take_tokens(key, 2.0, 10, 1, 0)
    # burst / rate seconds to refill, plus a second: after that the key would read as full.
    assert 5000 < await raw_redis.pttl(key) <= 6000


async def test_scripts_still_run_after_a_script_flush(
    redis_store: RedisStore, raw_redis: redis.Redis
) -> None:
    """EVALSHA fails with NOSCRIPT after SCRIPT FLUSH (or on a fresh replica); the store must
    load the script again instead of failing the request."""
    keys = fresh_keys()
    bucket = keys.caller_bucket("alice", "all")

    async def lease(upstream: str) -> int:
        return await redis_store.lease_slots(keys.upstream_slots(upstream), "h1", 0, 1, 5, 5000)

    assert (await redis_store.take_tokens(bucket, 1.0, 5, 1, 0)).granted == 1
    assert await lease("u") == 1
    await raw_redis.script_flush()
    assert (await redis_store.take_tokens(bucket, 1.0, 5, 1, 0)).granted == 1
    await raw_redis.script_flush()
    assert await lease("v") == 1


def hash_tag(key: str) -> str:
    start = key.index("{")
    return key[start + 1 : key.index("}", start)]


def test_keys_of_one_script_call_share_a_cluster_slot() -> None:
    keys = KeySpace("mjgate")
    assert hash_tag(keys.upstream_bucket("main")) == hash_tag(keys.upstream_slots("main"))
    assert hash_tag(keys.upstream_bucket("main")) != hash_tag(keys.upstream_bucket("relay"))
    assert hash_tag(keys.caller_bucket("alice", "submit")) != hash_tag(
        keys.caller_bucket("alice", "query")
    )


@pytest.fixture(params=["memory", "redis"])
async def any_store(
    request: pytest.FixtureRequest, redis_server: RedisProcess
) -> AsyncIterator[Store]:
    store: Store
    if request.param == "memory":
        store = MemoryStore()
    else:
        store = RedisStore(RedisConfig(url=Secret(redis_server.url)))
    try:
        yield store
    finally:
        await store.close()


async def test_slot_leases_bound_slots_until_released_or_expired(any_store: Store) -> None:
    """SLOTS_LEASE_LUA and its twin: 2 slots. Real time, so expiry is checked with waits far
    from the edge."""
    key = fresh_keys().upstream_slots("u")

    async def lease(holder: str, first: int = 0, ttl_ms: int = 5000) -> int:
        return await any_store.lease_slots(key, holder, first, 8, 2, ttl_ms)

    assert await lease("a") == 1  # an eighth of 2 free, at least one
    assert await lease("b", ttl_ms=400) == 1
    assert await lease("c") == 0
    await any_store.release_slots(key, ["a:0"])
    assert await lease("c") == 1
    assert await lease("d") == 0
    # "b" never releases: its slot frees itself 400 ms after it was taken.
    await asyncio.sleep(0.45)
    assert await lease("d", first=3) == 1
    await any_store.release_slots(key, ["c:0", "d:3"])
    assert await lease("e") == 1
