"""The task cache (``gateway/cache.py``): TTL rules and L1 bounds as units, then the cache's
promises end to end through the real app over HTTP, real ``mjgate sim`` upstreams that count
what they serve, and a real redis-server."""

from __future__ import annotations

import asyncio
import random
import signal
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import orjson
import pytest
import redis
from prometheus_client import REGISTRY

from gateway.cache import TaskCache, image_expiry, terminal_ttl_s
from gateway.config import CacheConfig, Config
from gateway.errors import StoreError
from gateway.owners import OwnerMap
from gateway.store import KeySpace, MemoryStore, Store
from tests.support import (
    GatewayThread,
    RedisProcess,
    SimProcess,
    caller,
    make_config,
    running_gateway,
)

FETCH = "GET /mj/task/{id}/fetch"
LIST_BY_CONDITION = "POST /mj/task/list-by-condition"
LIST_BY_IDS = "POST /mj/task/list-by-ids"
NO_LIMITS = {"default": {"rps": 100_000, "burst": 100_000}}


# -- helpers -----------------------------------------------------------------------------------


def new_id() -> str:
    """A fresh id shaped like the real ones (epoch milliseconds + random digits)."""
    return f"{int(time.time() * 1000)}{random.randrange(1000):03d}{random.randrange(10)}"


def signed_url(expires: int) -> str:
    """A Discord CDN style signed image URL whose hex ``ex=`` is ``expires``."""
    return (
        f"https://cdn.discordapp.com/attachments/1/2/x.png?ex={expires:08x}"
        f"&is={expires - 86400:08x}&hm={'ab' * 32}&"
    )


def gateway_config(
    sims: list[SimProcess],
    redis_url: str = "",
    *,
    cache: Mapping[str, Any] | None = None,
    fanout: Mapping[str, Any] | None = None,
    **sections: Any,
) -> Config:
    """``make_config`` with caller and outbound limits out of the way of these tests."""
    return make_config(
        sims,
        redis_url,
        upstreams=[s.upstream_config(max_rps=10_000, max_concurrency=128) for s in sims],
        rate_limit=NO_LIMITS,
        cache=dict(cache or {}),
        fanout={"deadline_s": 3, **(fanout or {})},
        **sections,
    )


def client_for(gateway: GatewayThread, name: str = "alice") -> httpx.Client:
    return httpx.Client(base_url=gateway.url, headers=caller(name), timeout=10)


def fetch(client: httpx.Client, task_id: str) -> httpx.Response:
    return client.get(f"/mj/task/{task_id}/fetch")


def cache_of(response: httpx.Response) -> tuple[str, str | None]:
    return response.headers["x-cache"], response.headers.get("x-cache-tier")


def counts(sims: Sequence[SimProcess], route: str = FETCH) -> dict[str, int]:
    return {s.name: s.count(route) for s in sims}


def list_calls(sims: Sequence[SimProcess]) -> dict[str, int]:
    return {s.name: s.count(LIST_BY_CONDITION) + s.count(LIST_BY_IDS) for s in sims}


def ids_of(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [task["id"] for task in response.json()]


def task_key(config: Config, upstream: str, task_id: str) -> str:
    return KeySpace(config.redis.key_prefix).task(upstream, task_id)


# -- units: image expiry and TTL ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://cdn.discordapp.com/a/1/2/x.png?ex=6650a1b2&is=664f5032&hm=ff&", 0x6650A1B2),
        ("https://cdn.discordapp.com/a/1/2/x.png?is=664f5032&ex=6650A1B2", 0x6650A1B2),
        ("https://cdn.discordapp.com/a/1/2/x.png?ex=ff", 0xFF),
        ("https://cdn.discordapp.com/a/1/2/x.png", None),
        ("https://example.com/x.png?index=12&apex=99", None),
        ("https://cdn.discordapp.com/a/1/2/x.png?ex=not-hex&is=1", None),
        ("", None),
    ],
)
def test_image_expiry_reads_the_hex_ex_parameter(url: str, expected: int | None) -> None:
    assert image_expiry({"imageUrl": url}) == expected


@pytest.mark.parametrize("value", [None, 12, ["https://x/?ex=ff"]])
def test_image_expiry_ignores_a_missing_or_non_string_url(value: Any) -> None:
    assert image_expiry({"imageUrl": value}) is None
    assert image_expiry({}) is None


def test_terminal_ttl_is_the_configured_ttl_without_an_image() -> None:
    config = CacheConfig(terminal_ttl_s=600, image_expiry_margin_s=300)
    assert terminal_ttl_s({"status": "FAILURE", "imageUrl": ""}, config, 1_000_000.0) == 600


def test_terminal_ttl_is_capped_by_image_expiry_minus_margin() -> None:
    config = CacheConfig(terminal_ttl_s=600, image_expiry_margin_s=30)
    now = 1_700_000_000.0
    near = {"imageUrl": signed_url(int(now) + 100)}
    far = {"imageUrl": signed_url(int(now) + 10_000)}
    assert terminal_ttl_s(near, config, now) == pytest.approx(70)
    assert terminal_ttl_s(far, config, now) == 600


def test_terminal_ttl_is_not_positive_for_an_image_expiring_within_the_margin() -> None:
    config = CacheConfig(terminal_ttl_s=600, image_expiry_margin_s=30)
    now = 1_700_000_000.0
    assert terminal_ttl_s({"imageUrl": signed_url(int(now) + 10)}, config, now) <= 0
    assert terminal_ttl_s({"imageUrl": signed_url(int(now) - 10)}, config, now) <= 0


# -- units: the two tiers on the embedded store ------------------------------------------------


def task_cache(store: Any = None, **settings: int) -> TaskCache:
    store = store if store is not None else MemoryStore()
    keys = KeySpace("unit")
    return TaskCache(store, keys, CacheConfig(**settings), OwnerMap(store, keys, 3600, 1000))


def finished(task_id: str, pad: int = 0, **fields: Any) -> tuple[str, dict[str, Any], bytes]:
    task = {"id": task_id, "status": "SUCCESS", "imageUrl": "", "pad": "x" * pad, **fields}
    return ("java", task, orjson.dumps(task))


async def test_a_finished_task_that_cannot_be_cached_is_counted_finished_once() -> None:
    """Its image link has expired, so every fetch brings it from upstream again: the
    finished-tasks counter must not grow with each of them."""
    cache = task_cache()
    expired = finished(new_id(), imageUrl=signed_url(int(time.time()) - 60))

    def count() -> float:
        value = REGISTRY.get_sample_value(
            "mjgate_tasks_finished_total", {"upstream": "java", "status": "SUCCESS"}
        )
        return value or 0.0

    before = count()
    for _ in range(3):
        await cache.put_tasks([expired])
    assert count() == before + 1
    assert cache.local("java", expired[1]["id"]) is None  # and it was never cached


async def test_l1_is_bounded_by_entries_and_evicts_the_least_recently_used() -> None:
    cache = task_cache(l1_max_entries=3)
    await cache.put_tasks([finished("t0"), finished("t1"), finished("t2")])
    assert cache.local("java", "t0") is not None  # t0 is now the most recently used
    await cache.put_tasks([finished("t3")])
    assert len(cache.l1) == 3
    assert cache.local("java", "t1") is None
    assert all(cache.local("java", t) is not None for t in ("t0", "t2", "t3"))


async def test_l1_is_bounded_by_bytes() -> None:
    size = len(finished("t0", pad=100)[2])
    cache = task_cache(l1_max_bytes=3 * size + size // 2)
    await cache.put_tasks([finished(f"t{i}", pad=100) for i in range(4)])
    assert len(cache.l1) == 3
    assert cache.local("java", "t0") is None
    assert cache.l1.weight <= cache.l1.max_weight


async def test_a_body_larger_than_l1_is_kept_in_the_store_only() -> None:
    cache = task_cache(l1_max_bytes=50)
    answer = finished("big", pad=200)
    await cache.put_tasks([answer])
    assert cache.local("java", "big") is None
    view = (await cache.read(["big"], ["java"]))["big"]
    assert view.task is not None and view.task.body == answer[2] and view.task.terminal
    assert cache.local("java", "big") is None


async def test_a_body_above_max_value_bytes_is_kept_in_neither_tier(store: Store) -> None:
    size = len(finished("fits", pad=1000)[2])
    cache = task_cache(store, max_value_bytes=size)
    cache.keys = KeySpace(f"unit-{uuid.uuid4().hex[:8]}")
    await cache.put_tasks([finished("fits", pad=1000), finished("huge", pad=1001)])
    assert cache.local("java", "fits") is not None
    assert cache.local("java", "huge") is None
    views = await cache.read(["fits", "huge"], ["java"])
    assert views["fits"].task is not None
    assert views["huge"].task is None
    assert await store.mget([cache.keys.task("java", "huge")]) == [None]


async def test_l1_max_entries_zero_turns_l1_off() -> None:
    cache = task_cache(l1_max_entries=0)
    await cache.put_tasks([finished("t0")])
    assert len(cache.l1) == 0
    assert (await cache.read(["t0"], ["java"]))["t0"].task is not None


async def test_a_store_hit_fills_l1_for_at_most_l1_ttl() -> None:
    store = MemoryStore()
    writer, reader = task_cache(store, l1_ttl_s=1), task_cache(store, l1_ttl_s=1)
    answer = finished("t0")
    await writer.put_tasks([answer])
    assert reader.local("java", "t0") is None
    view = (await reader.read(["t0"], ["java"]))["t0"]
    assert view.task is not None and view.task.body == answer[2]
    entry = reader.local("java", "t0")
    assert entry is not None and entry.body == answer[2]
    await asyncio.sleep(1.1)
    assert reader.local("java", "t0") is None


async def test_a_read_takes_only_the_owners_body() -> None:
    cache = task_cache()
    await cache.owners.record("t0", "csharp")
    await cache.put_tasks([finished("t0")])  # a same-id task on java, another upstream
    assert (await cache.read(["t0"], ["java", "csharp"]))["t0"].task is None
    assert (await cache.read(["t0"], ["java", "csharp"]))["t0"].owner == "csharp"


async def test_a_running_task_is_kept_inflight_ttl_ms() -> None:
    cache = task_cache(inflight_ttl_ms=200)
    task = {"id": "r0", "status": "IN_PROGRESS", "progress": "40%"}
    await cache.put_tasks([("java", task, orjson.dumps(task))])
    entry = cache.local("java", "r0")
    assert entry is not None and not entry.terminal
    assert (await cache.read(["r0"], ["java"]))["r0"].task is not None
    await asyncio.sleep(0.3)
    assert cache.local("java", "r0") is None
    assert (await cache.read(["r0"], ["java"]))["r0"].task is None


async def test_a_body_whose_image_expired_is_not_cached_in_either_tier() -> None:
    cache = task_cache()
    await cache.put_tasks([finished("old", imageUrl=signed_url(int(time.time()) - 60))])
    assert cache.local("java", "old") is None
    assert (await cache.read(["old"], ["java"]))["old"].task is None


async def test_invalidate_drops_both_tiers_and_the_not_found_mark() -> None:
    store = MemoryStore()
    cache = task_cache(store)
    await cache.put_tasks([finished("t0")])
    await cache.put_not_found({"t1": ["java"]})
    await cache.invalidate(["t0", "t1"], ["java", "csharp"])
    assert cache.local("java", "t0") is None
    views = await cache.read(["t0", "t1"], ["java", "csharp"])
    assert views["t0"].task is None
    assert views["t1"].not_found_on == frozenset()


class BrokenStore(MemoryStore):
    """A store whose every call fails the way an unreachable Redis does."""

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        raise StoreError("redis MGET failed: ConnectionError")

    async def set_many(self, items: Mapping[str, bytes], ttl_ms: int) -> None:
        raise StoreError("redis pipeline SET failed: ConnectionError")

    async def delete(self, keys: Sequence[str]) -> None:
        raise StoreError("redis DEL failed: ConnectionError")


async def test_store_failures_are_cache_misses_not_errors() -> None:
    cache = task_cache(BrokenStore())
    await cache.put_tasks([finished("t0")])
    assert cache.local("java", "t0") is not None  # L1 still works
    assert await cache.read(["t0"], ["java"]) == {}
    await cache.put_not_found({"t1": ["java"]})
    await cache.invalidate(["t0"], ["java"])
    assert cache.local("java", "t0") is None


# -- a terminal task is fetched once ------------------------------------------------------------


def test_a_task_too_large_to_cache_is_served_from_upstream_every_time(
    sims: list[SimProcess], redis_server: RedisProcess, redis_client: redis.Redis
) -> None:
    java = sims[0]
    task_id = new_id()
    java.seed(id=task_id, status="SUCCESS", prompt="x" * 200_000)
    config = gateway_config(sims, redis_server.url, cache={"max_value_bytes": 100_000})
    with running_gateway(config) as gateway, client_for(gateway) as c:
        for _ in range(3):
            answer = fetch(c, task_id)
            assert answer.status_code == 200
            assert len(answer.json()["prompt"]) == 200_000
            assert cache_of(answer) == ("MISS", "upstream")
    assert java.count(FETCH) == 3
    assert redis_client.exists(task_key(config, "java", task_id)) == 0


def test_terminal_task_is_fetched_from_upstream_once_then_from_l1(
    sims: list[SimProcess], store_url: str
) -> None:
    java = sims[0]
    task_id = new_id()
    seeded = java.seed(id=task_id, status="SUCCESS")
    with running_gateway(gateway_config(sims, store_url)) as gateway, client_for(gateway) as c:
        first = fetch(c, task_id)
        assert first.status_code == 200
        assert cache_of(first) == ("MISS", "upstream")
        assert first.json() == seeded
        for _ in range(5):
            again = fetch(c, task_id)
            assert cache_of(again) == ("HIT", "l1")
            assert again.content == first.content
    # The owner was unknown, so the first lookup asked every upstream at once (those still
    # waiting when java answered were cancelled, possibly before sending); never again.
    seen = counts(sims)
    assert seen["java"] == 1
    assert seen["csharp"] <= 1 and seen["relay"] <= 1


def test_failure_and_cancel_are_terminal_too(sims: list[SimProcess]) -> None:
    java = sims[0]
    ids = {status: new_id() for status in ("FAILURE", "CANCEL")}
    for status, task_id in ids.items():
        java.seed(id=task_id, status=status)
    with running_gateway(gateway_config(sims)) as gateway, client_for(gateway, "bob") as c:
        for task_id in ids.values():
            assert cache_of(fetch(c, task_id)) == ("MISS", "upstream")
            assert cache_of(fetch(c, task_id)) == ("HIT", "l1")
    assert java.count(FETCH) == 2


def test_second_gateway_on_the_same_redis_answers_from_the_store(
    sims: list[SimProcess], redis_server: RedisProcess
) -> None:
    java = sims[0]
    task_id = new_id()
    java.seed(id=task_id, status="SUCCESS")
    config = gateway_config(sims, redis_server.url)
    with running_gateway(config) as one, running_gateway(config) as two:
        with client_for(one) as c1:
            body = fetch(c1, task_id).content
        before = counts(sims)
        with client_for(two) as c2:
            from_store = fetch(c2, task_id)
            assert from_store.status_code == 200
            assert cache_of(from_store) == ("HIT", "store")
            assert from_store.content == body
            # A store hit fills the second gateway's L1.
            assert cache_of(fetch(c2, task_id)) == ("HIT", "l1")
        assert counts(sims) == before  # zero upstream calls from the second gateway


def test_restart_answers_from_redis_but_the_memory_store_starts_cold(
    sims: list[SimProcess], store_url: str
) -> None:
    java = sims[0]
    task_id = new_id()
    java.seed(id=task_id, status="SUCCESS")
    config = gateway_config(sims, store_url)  # one config: same store and key prefix
    with running_gateway(config) as gateway, client_for(gateway) as c:
        body = fetch(c, task_id).content
    before = java.count(FETCH)
    with running_gateway(config) as gateway, client_for(gateway) as c:
        after_restart = fetch(c, task_id)
        assert after_restart.content == body
        if store_url:
            assert cache_of(after_restart) == ("HIT", "store")
            assert java.count(FETCH) == before
        else:
            # The embedded store lives and dies with the process: a restart starts cold.
            assert cache_of(after_restart) == ("MISS", "upstream")
            assert java.count(FETCH) == before + 1


def test_terminal_ttl_in_redis_is_terminal_ttl_s_without_an_image(
    sims: list[SimProcess], redis_server: RedisProcess, redis_client: redis.Redis
) -> None:
    java = sims[0]
    task_id = new_id()
    # An image expiring in a day: the shorter terminal_ttl_s wins.
    java.seed(id=task_id, status="SUCCESS", imageUrl=signed_url(int(time.time()) + 86400))
    config = gateway_config(sims, redis_server.url, cache={"terminal_ttl_s": 60})
    with running_gateway(config) as gateway, client_for(gateway) as c:
        assert cache_of(fetch(c, task_id)) == ("MISS", "upstream")
    pttl = redis_client.pttl(task_key(config, "java", task_id))
    assert 55_000 < pttl <= 60_000


# -- running tasks: single flight and in-flight reuse ------------------------------------------


async def poll_together(url: str, task_id: str, callers: int) -> list[httpx.Response]:
    """``callers`` concurrent fetches of one id, released at the same instant."""
    limits = httpx.Limits(max_connections=callers, max_keepalive_connections=callers)
    async with httpx.AsyncClient(
        base_url=url, headers=caller(), timeout=10, limits=limits
    ) as client:
        # Open every connection first so that the polls really do arrive together.
        await asyncio.gather(*(client.get("/healthz") for _ in range(callers)))
        start = asyncio.Event()

        async def poll() -> httpx.Response:
            await start.wait()
            return await client.get(f"/mj/task/{task_id}/fetch")

        polls = [asyncio.create_task(poll()) for _ in range(callers)]
        await asyncio.sleep(0)
        start.set()
        return list(await asyncio.gather(*polls))


def cache_mix(answers: list[httpx.Response]) -> Counter[str]:
    return Counter(a.headers["x-cache"] for a in answers)


def tier_mix(answers: list[httpx.Response]) -> Counter[tuple[str, str | None]]:
    return Counter(cache_of(a) for a in answers)


async def test_fifty_concurrent_polls_of_a_running_task_cost_one_upstream_call(
    sims: list[SimProcess], store_url: str
) -> None:
    java = sims[0]
    task_id = new_id()
    java.seed(id=task_id, status="IN_PROGRESS", progress="30%")
    for sim in sims:
        sim.faults(latency_ms=100)  # the upstream calls would overlap without single flight
    # inflight_ttl_ms also covers the time it takes all 50 polls to arrive on a busy machine.
    config = gateway_config(sims, store_url, cache={"inflight_ttl_ms": 1000})
    with running_gateway(config) as gateway:
        answers = await poll_together(gateway.url, task_id, 50)
        assert {a.status_code for a in answers} == {200}
        assert {a.json()["status"] for a in answers} == {"IN_PROGRESS"}
        assert cache_mix(answers) == {"MISS": 1, "COALESCED": 49}, tier_mix(answers)
        # Owner unknown: one lookup round asked each upstream once, and only once.
        assert counts(sims) == {"java": 1, "csharp": 1, "relay": 1}

        await asyncio.sleep(1.1)  # past inflight_ttl_ms: the next poll asks again
        answers = await poll_together(gateway.url, task_id, 50)
        assert cache_mix(answers) == {"MISS": 1, "COALESCED": 49}, tier_mix(answers)
        # Owner known now: one call, to the owner only.
        assert counts(sims) == {"java": 2, "csharp": 1, "relay": 1}


def test_two_gateways_on_redis_share_a_running_answer_within_inflight_ttl(
    sims: list[SimProcess], redis_server: RedisProcess
) -> None:
    java = sims[0]
    task_id = new_id()
    java.seed(id=task_id, status="IN_PROGRESS", progress="30%")
    config = gateway_config(sims, redis_server.url, cache={"inflight_ttl_ms": 1500})
    with (
        running_gateway(config) as one,
        running_gateway(config) as two,
        client_for(one) as c1,
        client_for(two) as c2,
    ):
        assert cache_of(fetch(c1, task_id)) == ("MISS", "upstream")
        asked = java.count(FETCH)
        shared = fetch(c2, task_id)
        assert shared.status_code == 200 and shared.json()["status"] == "IN_PROGRESS"
        assert cache_of(shared) == ("COALESCED", "store")
        assert java.count(FETCH) == asked
        time.sleep(1.6)  # past inflight_ttl_ms everywhere
        assert cache_of(fetch(c2, task_id)) == ("MISS", "upstream")
        assert java.count(FETCH) == asked + 1


def test_a_running_answer_read_from_the_store_is_not_reused_past_inflight_ttl(
    sims: list[SimProcess], redis_server: RedisProcess
) -> None:
    """Gateway two reads gateway one's running answer late in its ``inflight_ttl_ms``; it may
    reuse it only for what is left of that time, not for a fresh ``inflight_ttl_ms``."""
    java = sims[0]
    task_id = new_id()
    java.seed(id=task_id, status="IN_PROGRESS", progress="30%")
    config = gateway_config(sims, redis_server.url, cache={"inflight_ttl_ms": 1000})
    with (
        running_gateway(config) as one,
        running_gateway(config) as two,
        client_for(one, "bob") as c1,
        client_for(two, "bob") as c2,
    ):
        asked = time.monotonic()
        assert cache_of(fetch(c1, task_id)) == ("MISS", "upstream")
        time.sleep(0.7)
        assert cache_of(fetch(c2, task_id)) == ("COALESCED", "store")
        java.seed(id=task_id, status="SUCCESS")  # the task moves on upstream
        time.sleep(max(0.0, asked + 1.15 - time.monotonic()))
        late = fetch(c2, task_id)
        assert late.json()["status"] == "SUCCESS", (
            f"gateway two reused a running answer {time.monotonic() - asked:.2f} s old "
            f"(inflight_ttl_ms is 1000) from {cache_of(late)}"
        )


def test_a_task_that_finishes_is_then_cached(sims: list[SimProcess], store_url: str) -> None:
    java = sims[0]
    task_id = new_id()
    java.seed(id=task_id, playing=True, task_seconds=1.0, outcome="SUCCESS", prompt="a fox")
    config = gateway_config(sims, store_url, cache={"inflight_ttl_ms": 100})
    with running_gateway(config) as gateway, client_for(gateway, "bob") as c:
        seen: list[str] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            answer = fetch(c, task_id)
            assert answer.status_code == 200
            seen.append(answer.json()["status"])
            if seen[-1] == "SUCCESS":
                break
            time.sleep(0.12)
        assert seen[-1] == "SUCCESS"
        assert len(set(seen)) > 1  # it was polled while still running
        asked = java.count(FETCH)
        time.sleep(0.2)  # past inflight_ttl_ms: a running answer would be asked again
        for _ in range(3):
            again = fetch(c, task_id)
            assert again.json()["status"] == "SUCCESS"
            assert cache_of(again) == ("HIT", "l1")
        assert java.count(FETCH) == asked


# -- the image-expiry cap ----------------------------------------------------------------------


def test_body_with_a_near_image_expiry_gets_a_short_ttl_and_is_refetched_after(
    sims: list[SimProcess], redis_server: RedisProcess, redis_client: redis.Redis
) -> None:
    java = sims[0]
    task_id = new_id()
    expires = int(time.time()) + 3
    java.seed(id=task_id, status="SUCCESS", imageUrl=signed_url(expires))
    margin = 1
    config = gateway_config(sims, redis_server.url, cache={"image_expiry_margin_s": margin})
    with running_gateway(config) as gateway, client_for(gateway, "bob") as c:
        before = time.time()
        assert cache_of(fetch(c, task_id)) == ("MISS", "upstream")
        pttl = redis_client.pttl(task_key(config, "java", task_id))
        cap_ms = (expires - margin - before) * 1000
        assert 500 < pttl <= cap_ms
        assert cache_of(fetch(c, task_id)) == ("HIT", "l1")
        assert java.count(FETCH) == 1
        time.sleep(max(0.0, expires - margin - time.time()) + 0.1)
        # Past expiry - margin: asked again, and no longer cached at all.
        assert cache_of(fetch(c, task_id)) == ("MISS", "upstream")
        assert cache_of(fetch(c, task_id)) == ("MISS", "upstream")
        assert java.count(FETCH) == 3
        assert redis_client.exists(task_key(config, "java", task_id)) == 0


def test_body_whose_image_already_expired_is_never_cached(
    sims: list[SimProcess], redis_server: RedisProcess, redis_client: redis.Redis
) -> None:
    java = sims[0]
    task_id = new_id()
    java.seed(id=task_id, status="SUCCESS", imageUrl=signed_url(int(time.time()) - 60))
    config = gateway_config(sims, redis_server.url)
    with running_gateway(config) as gateway, client_for(gateway, "bob") as c:
        for _ in range(3):
            answer = fetch(c, task_id)
            assert answer.status_code == 200
            assert cache_of(answer) == ("MISS", "upstream")
    assert java.count(FETCH) == 3
    assert redis_client.exists(task_key(config, "java", task_id)) == 0


def test_a_store_hit_does_not_outlive_the_image_expiry_cap(
    sims: list[SimProcess], redis_server: RedisProcess
) -> None:
    """A body read from the store must stop being served at ``image expiry - margin`` too.

    Gateway one caches a body whose image expires in ~3 s (store TTL ~2 s with a 1 s margin).
    Gateway two reads it from the store into its L1. Once ``expiry - margin`` has passed,
    gateway two must ask upstream again instead of serving the body from L1 for the rest of
    ``l1_ttl_s`` (30 s here), by which time the image link may be dead.
    """
    java = sims[0]
    task_id = new_id()
    expires = int(time.time()) + 3
    java.seed(id=task_id, status="SUCCESS", imageUrl=signed_url(expires))
    margin = 1
    cache = {"image_expiry_margin_s": margin, "l1_ttl_s": 30}
    config = gateway_config(sims, redis_server.url, cache=cache)
    with (
        running_gateway(config) as one,
        running_gateway(config) as two,
        client_for(one, "bob") as c1,
        client_for(two, "bob") as c2,
    ):
        assert cache_of(fetch(c1, task_id)) == ("MISS", "upstream")
        assert cache_of(fetch(c2, task_id)) == ("HIT", "store")
        time.sleep(max(0.0, expires - margin - time.time()) + 0.2)
        late = fetch(c2, task_id)
        assert cache_of(late) == ("MISS", "upstream"), (
            "gateway two served a body from L1 past its image expiry cap"
        )


# -- not found ---------------------------------------------------------------------------------


def test_not_found_is_remembered_at_most_not_found_ttl(
    sims: list[SimProcess], store_url: str
) -> None:
    task_id = new_id()
    config = gateway_config(sims, store_url, cache={"not_found_ttl_ms": 600})
    with running_gateway(config) as gateway, client_for(gateway) as c:
        first = fetch(c, task_id)
        assert first.status_code == 404
        assert first.json()["code"] == 3
        remembered = fetch(c, task_id)
        assert remembered.status_code == 404
        assert cache_of(remembered)[0] == "HIT"
        assert counts(sims) == {"java": 1, "csharp": 1, "relay": 1}  # one upstream round

        time.sleep(0.7)
        assert fetch(c, task_id).status_code == 404
        assert counts(sims) == {"java": 2, "csharp": 2, "relay": 2}  # asked again

        sims[1].seed(id=task_id, status="SUCCESS")  # e.g. a just-submitted task shows up
        time.sleep(0.7)
        found = fetch(c, task_id)
        assert found.status_code == 200
        assert found.json()["id"] == task_id
        assert cache_of(found) == ("MISS", "upstream")


# -- invalidation ------------------------------------------------------------------------------


def test_image_seed_through_the_gateway_invalidates_the_cached_task(
    sims: list[SimProcess], store_url: str
) -> None:
    java = sims[0]
    task_id = new_id()
    java.seed(id=task_id, status="SUCCESS")
    with running_gateway(gateway_config(sims, store_url)) as gateway, client_for(gateway) as c:
        assert cache_of(fetch(c, task_id)) == ("MISS", "upstream")
        cached = fetch(c, task_id)
        assert cache_of(cached) == ("HIT", "l1")
        assert "seed" not in cached.json()

        seed = c.get(f"/mj/task/{task_id}/image-seed")
        assert seed.status_code == 200
        assert seed.json()["code"] == 1
        assert java.count("GET /mj/task/{id}/image-seed") == 1

        fresh = fetch(c, task_id)
        assert cache_of(fresh) == ("MISS", "upstream")
        assert fresh.json()["seed"] == seed.json()["result"]
        assert cache_of(fetch(c, task_id)) == ("HIT", "l1")
    assert java.count(FETCH) == 2


def test_cancel_through_the_gateway_invalidates_the_cached_answer(
    sims: list[SimProcess], store_url: str
) -> None:
    java = sims[0]
    task_id = new_id()
    java.seed(id=task_id, status="IN_PROGRESS", progress="50%")
    # A long in-flight TTL: without invalidation the running answer would outlive the cancel.
    config = gateway_config(sims, store_url, cache={"inflight_ttl_ms": 30_000})
    with running_gateway(config) as gateway, client_for(gateway) as c:
        assert fetch(c, task_id).json()["status"] == "IN_PROGRESS"
        assert cache_of(fetch(c, task_id)) == ("COALESCED", "l1")

        cancel = c.post(f"/mj/task/{task_id}/cancel")
        assert cancel.status_code == 200
        assert cancel.json()["code"] == 1
        assert java.count("POST /mj/task/{id}/cancel") == 1

        after = fetch(c, task_id)
        assert after.json()["status"] == "CANCEL"
        assert cache_of(after) == ("MISS", "upstream")
        assert cache_of(fetch(c, task_id)) == ("HIT", "l1")  # CANCEL is terminal


def test_invalidation_on_one_gateway_reaches_another_within_l1_ttl(
    sims: list[SimProcess], redis_server: RedisProcess
) -> None:
    """How the bound works: gateway one's image-seed deletes the task's keys from Redis (and its
    own L1). Gateway two's L1 copy was filled from the store with an expiry of ``l1_ttl_s``;
    until then it may still serve the old body, after it re-reads the store, finds no entry
    (or gateway one's fresh body) and so never serves the old body again. The stale window is
    therefore at most ``l1_ttl_s`` after gateway two filled its L1, and so after the
    invalidation too."""
    java = sims[0]
    task_id = new_id()
    java.seed(id=task_id, status="SUCCESS")
    l1_ttl_s = 1
    config = gateway_config(sims, redis_server.url, cache={"l1_ttl_s": l1_ttl_s})
    with (
        running_gateway(config) as one,
        running_gateway(config) as two,
        client_for(one) as c1,
        client_for(two) as c2,
    ):
        old = fetch(c1, task_id).content
        filled = time.monotonic()
        assert cache_of(fetch(c2, task_id)) == ("HIT", "store")

        seed = c1.get(f"/mj/task/{task_id}/image-seed").json()["result"]
        invalidated = time.monotonic()
        assert fetch(c1, task_id).json()["seed"] == seed  # at once on gateway one

        stale = fetch(c2, task_id)
        if time.monotonic() - filled < l1_ttl_s * 0.8:
            # Within l1_ttl_s, gateway two may (and here does) still serve the old body.
            assert stale.content == old
            assert cache_of(stale) == ("HIT", "l1")
        while fetch(c2, task_id).content == old:
            assert time.monotonic() - filled < l1_ttl_s + 0.5, "old body past l1_ttl_s"
            time.sleep(0.05)
        assert time.monotonic() - invalidated <= l1_ttl_s + 0.5
        assert fetch(c2, task_id).json()["seed"] == seed


# -- list merge --------------------------------------------------------------------------------


def test_list_merge_keeps_the_callers_order_without_duplicates_or_unknown_ids(
    sims: list[SimProcess], store_url: str
) -> None:
    java, csharp, relay = sims
    a, b, c_, d, unknown = (new_id() for _ in range(5))
    java.seed(id=a, status="SUCCESS")
    java.seed(id=b, status="FAILURE")
    csharp.seed(id=c_, status="SUCCESS")
    relay.seed(id=d, status="CANCEL")
    with running_gateway(gateway_config(sims, store_url)) as gateway, client_for(gateway) as c:
        answer = c.post("/mj/task/list-by-ids", json={"ids": [d, unknown, a, c_, a, b, d]})
        assert ids_of(answer) == [d, a, c_, b]
        assert answer.headers["x-cache"] == "MISS"
        assert "x-gateway-partial" not in answer.headers
        # Each upstream got one request, with its own list path.
        assert list_calls(sims) == {"java": 1, "csharp": 1, "relay": 1}
        assert csharp.count(LIST_BY_CONDITION) == 1 and relay.count(LIST_BY_IDS) == 1

        # All cached now: answered with no upstream call at all, in the new order asked.
        again = c.post("/mj/task/list-by-condition", json={"ids": [b, c_, d, a, b]})
        assert ids_of(again) == [b, c_, d, a]
        assert again.headers["x-cache"] == "HIT"
        assert list_calls(sims) == {"java": 1, "csharp": 1, "relay": 1}
        assert counts(sims) == {"java": 0, "csharp": 0, "relay": 0}
        # The list recorded owners and cached bodies: a fetch is an L1 hit.
        assert cache_of(fetch(c, c_)) == ("HIT", "l1")


def test_list_serves_cached_ids_and_asks_upstream_only_for_the_rest(
    sims: list[SimProcess], store_url: str
) -> None:
    java = sims[0]
    cached, fresh = new_id(), new_id()
    java.seed(id=cached, status="SUCCESS")
    java.seed(id=fresh, status="SUCCESS")
    # One id per list request: the number of list calls is the number of ids asked upstream.
    config = gateway_config(sims, store_url, fanout={"batch_size": 1})
    with running_gateway(config) as gateway, client_for(gateway, "bob") as c:
        fetch(c, cached)
        answer = c.post("/mj/task/list-by-ids", json={"ids": [fresh, cached]})
        assert ids_of(answer) == [fresh, cached]
        assert answer.headers["x-cache"] == "MISS"
        assert java.count(LIST_BY_CONDITION) == 1


def test_list_asks_a_known_owner_only(sims: list[SimProcess]) -> None:
    csharp = sims[1]
    running = new_id()
    csharp.seed(id=running, status="IN_PROGRESS")  # running: not served from cache later
    config = gateway_config(sims, cache={"inflight_ttl_ms": 100})
    with running_gateway(config) as gateway, client_for(gateway) as c:
        assert fetch(c, running).status_code == 200  # the owner becomes known
        time.sleep(0.2)
        before = list_calls(sims)
        answer = c.post("/mj/task/list-by-ids", json={"ids": [running]})
        assert ids_of(answer) == [running]
        after = list_calls(sims)
        assert {n: after[n] - before[n] for n in after} == {"java": 0, "csharp": 1, "relay": 0}


def test_list_is_chunked_above_the_batch_size(sims: list[SimProcess]) -> None:
    java = sims[0]
    ids = [new_id() for _ in range(5)]
    for task_id in ids:
        java.seed(id=task_id, status="SUCCESS")
    config = gateway_config(sims, fanout={"batch_size": 2})
    with running_gateway(config) as gateway, client_for(gateway, "bob") as c:
        answer = c.post("/mj/task/list-by-ids", json={"ids": ids[::-1]})
        assert ids_of(answer) == ids[::-1]
    assert java.count(LIST_BY_CONDITION) == 3  # 2 + 2 + 1


def test_list_names_an_erroring_upstream_in_x_gateway_partial(
    sims: list[SimProcess], store_url: str
) -> None:
    java, csharp, relay = sims
    a, b = new_id(), new_id()
    java.seed(id=a, status="SUCCESS")
    csharp.seed(id=b, status="SUCCESS")
    relay.faults(error_rate=1)
    with running_gateway(gateway_config(sims, store_url)) as gateway, client_for(gateway) as c:
        answer = c.post("/mj/task/list-by-ids", json={"ids": [b, a]})
        assert ids_of(answer) == [b, a]
        assert answer.headers["x-gateway-partial"] == "relay"
        assert answer.headers["x-cache"] == "PARTIAL"


def test_list_names_an_upstream_slower_than_the_deadline(sims: list[SimProcess]) -> None:
    java, csharp, relay = sims
    a, b = new_id(), new_id()
    java.seed(id=a, status="SUCCESS")
    csharp.seed(id=b, status="SUCCESS")
    relay.faults(latency_ms=2000)
    deadline_s = 0.5
    config = gateway_config(sims, fanout={"deadline_s": deadline_s})
    with running_gateway(config) as gateway, client_for(gateway) as c:
        started = time.monotonic()
        answer = c.post("/mj/task/list-by-ids", json={"ids": [a, b]})
        elapsed = time.monotonic() - started
        assert ids_of(answer) == [a, b]
        assert answer.headers["x-gateway-partial"] == "relay"
        assert elapsed < deadline_s + 0.4


def test_list_with_every_upstream_erroring_is_502(sims: list[SimProcess]) -> None:
    for sim in sims:
        sim.faults(error_rate=1)
    with running_gateway(gateway_config(sims)) as gateway, client_for(gateway) as c:
        answer = c.post("/mj/task/list-by-ids", json={"ids": [new_id()]})
        assert answer.status_code == 502
        assert answer.headers["content-type"].startswith("application/json")
        body = answer.json()
        assert body["code"] == 9
        assert all(name in body["description"] for name in ("java", "csharp", "relay"))
        assert body["request_id"] == answer.headers["x-request-id"]


def test_list_with_every_upstream_past_the_deadline_is_504(sims: list[SimProcess]) -> None:
    for sim in sims:
        sim.faults(latency_ms=2000)
    deadline_s = 0.5
    config = gateway_config(sims, fanout={"deadline_s": deadline_s})
    with running_gateway(config) as gateway, client_for(gateway) as c:
        started = time.monotonic()
        answer = c.post("/mj/task/list-by-ids", json={"ids": [new_id()]})
        assert time.monotonic() - started < deadline_s + 0.4
        assert answer.status_code == 504
        assert answer.json()["code"] == 9


# -- a store outage ----------------------------------------------------------------------------


def timed(call: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


@pytest.mark.parametrize("outage", ["stopped", "frozen"])
def test_a_store_outage_turns_into_cache_misses_not_errors_or_stalls(
    sims: list[SimProcess], own_redis: RedisProcess, outage: str
) -> None:
    java, csharp, _ = sims
    cached, later, other, running = (new_id() for _ in range(4))
    java.seed(id=cached, status="SUCCESS")
    java.seed(id=later, status="SUCCESS")
    csharp.seed(id=other, status="SUCCESS")
    csharp.seed(id=running, status="IN_PROGRESS")
    config = gateway_config(sims, own_redis.url)
    with running_gateway(config) as gateway, client_for(gateway) as c:
        assert cache_of(fetch(c, cached)) == ("MISS", "upstream")
        assert c.get("/readyz").status_code == 200

        assert own_redis.proc is not None
        if outage == "stopped":
            own_redis.stop()
        else:
            own_redis.proc.send_signal(signal.SIGSTOP)  # alive, but never answers

        calls: list[tuple[str, Any]] = [
            ("fetch of a task in L1", lambda: fetch(c, cached)),
            ("fetch of an uncached task", lambda: fetch(c, later)),
            ("fetch of another upstream's task", lambda: fetch(c, other)),
            ("fetch of a running task", lambda: fetch(c, running)),
            ("fetch of an unknown id", lambda: fetch(c, new_id())),
            ("list", lambda: c.post("/mj/task/list-by-ids", json={"ids": [other, later, cached]})),
        ]
        answers: list[httpx.Response] = []
        for what, call in calls:
            response, elapsed = timed(call)
            assert response.status_code < 500, f"{what}: {response.text}"
            assert elapsed < 1.0, f"{what} took {elapsed:.2f} s with the store {outage}"
            answers.append(response)
        assert [r.json()["id"] for r in answers[:4]] == [cached, later, other, running]
        assert answers[4].status_code == 404
        assert ids_of(answers[5]) == [other, later, cached]
        assert cache_of(answers[0]) == ("HIT", "l1")  # L1 needs no store
        assert cache_of(answers[1]) == ("MISS", "upstream")

        ready, elapsed = timed(lambda: c.get("/readyz"))
        assert ready.status_code == 503
        assert elapsed < 1.0

        if outage == "stopped":
            own_redis.start()  # same port: the gateway reconnects on its own
            assert c.get("/readyz").status_code == 200
            assert fetch(c, other).status_code == 200
