"""Store round trips and upstream calls of each request class, counted where they happen: on a
real redis-server (``INFO commandstats`` deltas) and at the sims, through the real app.

README "Performance" states these counts. Lease scripts show up by the commands they run
inside: ``HMGET`` once per token lease (``TAKE_LUA``: callers' limits and outbound rate),
``ZCARD`` once per in-flight slot lease. A miss's own path is checked with Redis refusing
writes for a moment (``CLIENT PAUSE ... WRITE``): only a read may be on it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import redis

from gateway.store import KeySpace
from tests.support import RedisProcess, SimProcess, caller, make_config, running_gateway

FETCH = "GET /mj/task/{id}/fetch"
# Other parts' background loops (webhook deliveries, task events) run commands of their own
# meanwhile, so only the commands of the request classes are counted: MGET (the lookups'
# read), SET (cache and owner writes), HMGET and ZCARD (one per lease).


class Commands:
    """Commands Redis ran between ``start`` and ``delta``, by name."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.before: dict[str, int] = {}

    def snapshot(self) -> dict[str, int]:
        info: dict[str, Any] = self.client.info("commandstats")
        return {name.removeprefix("cmdstat_"): int(row["calls"]) for name, row in info.items()}

    def start(self) -> None:
        self.before = self.snapshot()

    def delta(self) -> dict[str, int]:
        after = self.snapshot()
        changed = {k: v - self.before.get(k, 0) for k, v in after.items()}
        return {k: v for k, v in changed.items() if v and k != "info"}


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:16]}"


def fetch(http: httpx.Client, task_id: str) -> httpx.Response:
    response = http.get(f"/mj/task/{task_id}/fetch")
    assert response.status_code == 200, response.text
    return response


def settle(commands: Commands, seconds: float = 0.3) -> None:
    """Let write-behind batches land before counting starts."""
    time.sleep(seconds)
    commands.start()


@contextmanager
def gateway_client(config: Any) -> Iterator[httpx.Client]:
    with (
        running_gateway(config) as gateway,
        httpx.Client(base_url=gateway.url, headers=caller(), timeout=10) as http,
    ):
        yield http


def test_an_l1_hit_costs_no_store_round_trip_and_no_upstream_call(
    sims: list[SimProcess], redis_server: RedisProcess
) -> None:
    java = sims[0]
    task_id = java.seed(id=new_id("done"), status="SUCCESS")["id"]
    commands = Commands(redis_server.url)
    with gateway_client(make_config(sims, redis_server.url)) as http:
        fetch(http, task_id)
        settle(commands)
        asked = java.count(FETCH)
        for _ in range(64):
            assert fetch(http, task_id).headers["x-cache-tier"] == "l1"
        delta = commands.delta()
    assert java.count(FETCH) == asked
    assert not delta.get("mget") and not delta.get("set") and not delta.get("zcard"), delta
    # Only the caller's rate-limit lease: one round trip per up to 64 requests.
    assert delta.get("hmget", 0) <= 2, delta


def test_a_store_hit_costs_one_read_and_no_upstream_call(
    sims: list[SimProcess], redis_server: RedisProcess
) -> None:
    """One gateway caches finished tasks; another, on the same Redis, reads each with one
    MGET and writes nothing."""
    java = sims[0]
    ids = [java.seed(id=new_id("done"), status="SUCCESS")["id"] for _ in range(10)]
    config = make_config(sims, redis_server.url)
    commands = Commands(redis_server.url)
    with gateway_client(config) as first, gateway_client(config) as second:
        for task_id in ids:
            fetch(first, task_id)
        fetch(second, ids[0])  # its caller-limit lease
        settle(commands)
        asked = java.count(FETCH)
        for task_id in ids[1:]:
            assert fetch(second, task_id).headers["x-cache-tier"] == "store"
        delta = commands.delta()
    assert java.count(FETCH) == asked
    assert delta.get("mget") == len(ids) - 1, delta
    assert not delta.get("set"), delta
    # Outbound leases start beside the read in case it misses: one token lease and one
    # slot lease per upstream at most, while the worker holds none.
    assert delta.get("hmget", 0) <= len(sims) and delta.get("zcard", 0) <= len(sims), delta


def test_a_miss_reads_once_and_writes_behind(
    sims: list[SimProcess], redis_server: RedisProcess
) -> None:
    """Polls of running tasks whose owner is known, each a miss (``inflight_ttl_ms: 1``): one
    MGET each, one upstream call each, the fresh answer written off the path (one SET each,
    in write-behind batches), and outbound leases far fewer than requests."""
    java = sims[0]
    ids = [java.seed(id=new_id("run"), status="IN_PROGRESS")["id"] for _ in range(40)]
    upstream = java.upstream_config(max_rps=100_000)
    config = make_config(
        [java], redis_server.url, cache={"inflight_ttl_ms": 1}, upstreams=[upstream]
    )
    commands = Commands(redis_server.url)
    with gateway_client(config) as http:
        for task_id in ids:
            fetch(http, task_id)  # learns each owner
        settle(commands)
        asked = java.count(FETCH)
        for task_id in ids:
            assert fetch(http, task_id).headers["x-cache"] == "MISS"
        time.sleep(0.3)
        delta = commands.delta()
    assert java.count(FETCH) - asked == len(ids)
    assert delta.get("mget") == len(ids), delta
    assert delta.get("set") == len(ids), delta
    leases = delta.get("hmget", 0) + delta.get("zcard", 0)
    assert leases <= len(ids) // 4, delta


def test_nothing_but_a_read_is_on_a_miss_path(
    sims: list[SimProcess], own_redis: RedisProcess
) -> None:
    """With Redis holding every write back for a second, misses still answer at once: their
    own path only reads. (The writes held back time out and are dropped: a cache's loss.)"""
    java = sims[0]
    ids = [java.seed(id=new_id("run"), status="IN_PROGRESS")["id"] for _ in range(6)]
    upstream = java.upstream_config(max_rps=100_000)
    config = make_config([java], own_redis.url, cache={"inflight_ttl_ms": 1}, upstreams=[upstream])
    raw = redis.Redis.from_url(own_redis.url)
    with gateway_client(config) as http:
        for task_id in ids:
            fetch(http, task_id)  # owners learned, leases taken
        raw.client_pause(1000, all=False)  # writes only
        try:
            for task_id in ids[:3]:
                began = time.monotonic()
                assert fetch(http, task_id).headers["x-cache"] == "MISS"
                assert time.monotonic() - began < 0.2
        finally:
            raw.client_unpause()


def test_a_list_reads_once_and_asks_each_upstream_once(
    sims: list[SimProcess], redis_server: RedisProcess
) -> None:
    """30 running tasks over three upstreams, owners known, each answer stale
    (``inflight_ttl_ms: 1``): one MGET, one list call per upstream, 30 answers written
    behind."""
    ids = [sims[n % 3].seed(id=new_id("run"), status="IN_PROGRESS")["id"] for n in range(30)]
    config = make_config(sims, redis_server.url, cache={"inflight_ttl_ms": 1})
    commands = Commands(redis_server.url)
    with gateway_client(config) as http:
        assert len(http.post("/mj/task/list-by-condition", json={"ids": ids}).json()) == 30
        settle(commands)
        before = [int(s.stats()["total"]) for s in sims]
        assert len(http.post("/mj/task/list-by-condition", json={"ids": ids}).json()) == 30
        time.sleep(0.3)
        delta = commands.delta()
        after = [int(s.stats()["total"]) for s in sims]
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1]
    assert delta.get("mget") == 1, delta
    assert delta.get("set") == 30, delta  # in write-behind pipelines


def test_an_all_cached_list_costs_no_store_round_trip(
    sims: list[SimProcess], redis_server: RedisProcess
) -> None:
    ids = [sims[n % 3].seed(id=new_id("done"), status="SUCCESS")["id"] for n in range(30)]
    commands = Commands(redis_server.url)
    with gateway_client(make_config(sims, redis_server.url)) as http:
        assert len(http.post("/mj/task/list-by-condition", json={"ids": ids}).json()) == 30
        settle(commands)
        before = [int(s.stats()["total"]) for s in sims]
        response = http.post("/mj/task/list-by-condition", json={"ids": ids})
        assert response.headers["x-cache"] == "HIT" and len(response.json()) == 30
        delta = commands.delta()
        assert [int(s.stats()["total"]) for s in sims] == before
    assert not delta.get("mget") and not delta.get("set") and not delta.get("zcard"), delta


def test_a_submit_writes_its_owner_on_the_path_and_calls_one_upstream(
    sims: list[SimProcess], redis_server: RedisProcess
) -> None:
    """The owner and submitter of an accepted submit are written before the answer (a poll on
    another worker must find the submitter); one upstream call."""
    java = sims[0]
    config = make_config([java], redis_server.url)
    raw = redis.Redis.from_url(redis_server.url)
    keys = KeySpace(config.redis.key_prefix)
    with gateway_client(config) as http:
        before = java.count("POST /mj/submit/imagine")
        response = http.post("/mj/submit/imagine", json={"prompt": "a cat"})
        assert response.status_code == 200, response.text
        task_id = response.json()["result"]
        assert raw.get(keys.owner(task_id)) == f"{java.name}|alice|".encode()
    assert java.count("POST /mj/submit/imagine") == before + 1
