"""The gateway on Redis beyond one server: a real three-node Redis Cluster and a real master
watched by a real Sentinel, each running the cache and rate-limit behavior through two gateway
instances that share the store (two gateways stand for two workers or two replicas).

Every test runs once per topology. Each test uses its own key prefix, and each ends by
scanning every node: all keys the gateway wrote carry a ``{...}`` hash tag.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from redis.crc import key_slot

from gateway.config import Config
from gateway.store import KeySpace
from tests.redis_topologies import (
    ClusterProcesses,
    SentinelProcesses,
    Topology,
    find_binary,
    wait_gone,
)
from tests.support import (
    CALLER_KEYS,
    GatewayThread,
    SimProcess,
    caller,
    make_config,
    running_gateway,
)

FETCH = "GET /mj/task/{id}/fetch"
LIMITED_KEY = "limited-key-0123456789"
# A key's hash tag: the first "{" and the next "}" with something between (Redis's rule).
HASH_TAGGED = re.compile(r"^[^{]*\{[^}]+\}")

pytestmark = pytest.mark.timeout(90)


def _missing(tool: str) -> None:
    message = f"{tool} is not installed (make system-deps installs it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module", params=["cluster", "sentinel"])
def topology(request: pytest.FixtureRequest) -> Iterator[Topology]:
    needed = ("redis-server", "redis-cli") if request.param == "cluster" else ("redis-sentinel",)
    for tool in needed:
        if find_binary(tool) is None:
            _missing(tool)
    started: Topology = ClusterProcesses() if request.param == "cluster" else SentinelProcesses()
    started.start()
    yield started
    started.stop()


@pytest.fixture
def prefix(topology: Topology) -> Iterator[str]:
    """A key prefix of this test's own; afterwards every key under it must be hash-tagged."""
    name = f"topo{uuid.uuid4().hex[:10]}"
    yield name
    keys = topology.keys(name)
    untagged = [key for key in keys if not HASH_TAGGED.match(key)]
    assert not untagged, f"keys without a hash tag on {topology.name}: {untagged}"


def config_for(
    topology: Topology,
    prefix: str,
    sims: list[SimProcess],
    extra_clients: Sequence[dict[str, Any]] = (),
    **sections: Any,
) -> Config:
    """``make_config`` on this topology, with generous caller limits and callers alice (every
    upstream), bob (the first only) and ``extra_clients``."""
    clients = [
        {"name": "alice", "key": CALLER_KEYS["alice"]},
        {"name": "bob", "key": CALLER_KEYS["bob"], "upstreams": [sims[0].name]},
        *extra_clients,
    ]
    return make_config(
        sims,
        "",
        redis=topology.redis_section(prefix),
        rate_limit={"default": {"rps": 100_000, "burst": 100_000}},
        clients=clients,
        **sections,
    )


def store_errors() -> int:
    """Store operations that failed so far in this process (``mjgate_store_errors``)."""
    return sum(
        int(sample.value)
        for metric in REGISTRY.collect()
        if metric.name == "mjgate_store_errors"
        for sample in metric.samples
        if sample.name == "mjgate_store_errors_total"
    )


async def fetch_all(urls: list[str], paths: list[str], name: str = "alice") -> list[int]:
    """GET every path, all at once, spread over the gateways; the status codes in order."""
    clients = [httpx.AsyncClient(base_url=url, headers=caller(name), timeout=20) for url in urls]
    try:
        answers = await asyncio.gather(
            *(clients[i % len(clients)].get(path) for i, path in enumerate(paths))
        )
    finally:
        for client in clients:
            await client.aclose()
    return [answer.status_code for answer in answers]


def new_id() -> str:
    return f"{int(time.time() * 1000)}{random.randrange(10_000):04d}"


def total_requests(sims: list[SimProcess]) -> int:
    return sum(int(sim.stats()["total"]) for sim in sims)


class TwoGateways:
    """Two gateway instances on one config: what two workers or replicas look like."""

    def __init__(self, first: GatewayThread, second: GatewayThread) -> None:
        self.first = first
        self.second = second

    def warm(self) -> None:
        """One store call per gateway (the readiness probe) before a concurrent burst: the
        burst then measures the caps, not a new client's first moments (tested apart)."""
        for gateway in (self.first, self.second):
            assert httpx.get(f"{gateway.url}/readyz", timeout=5).status_code == 200

    def client(self, which: int, name: str = "alice") -> httpx.Client:
        gateway = self.first if which == 0 else self.second
        return httpx.Client(base_url=gateway.url, headers=caller(name), timeout=10)


StartPair = Callable[[Config], TwoGateways]


@pytest.fixture
def gateways_factory() -> Iterator[StartPair]:
    """``start(config)`` runs two gateways on ``config``; all stop after the test."""
    with ExitStack() as stack:

        def start(config: Config) -> TwoGateways:
            first = stack.enter_context(running_gateway(config))
            return TwoGateways(first, stack.enter_context(running_gateway(config)))

        yield start


def test_fresh_gateways_take_a_concurrent_first_burst_without_store_errors(
    topology: Topology, prefix: str, sims: list[SimProcess], gateways_factory: StartPair
) -> None:
    """A new worker's first requests arrive together (a deploy, a restart behind a busy
    balancer). Each one reads the cache and takes rate-limit tokens: none may fail on the
    store, or limits and caps fall back to per-worker values and the cache is skipped."""
    task_id = new_id()
    sims[0].seed(id=task_id, status="SUCCESS")
    pair: TwoGateways = gateways_factory(config_for(topology, prefix, sims))
    errors = store_errors()
    statuses = asyncio.run(
        fetch_all([pair.first.url, pair.second.url], [f"/mj/task/{task_id}/fetch"] * 64)
    )
    assert statuses == [200] * 64
    assert store_errors() == errors, "store operations failed under the first burst"


# -- cache -------------------------------------------------------------------------------------


def test_a_cached_terminal_task_is_served_to_another_gateway_without_upstream_calls(
    topology: Topology, prefix: str, sims: list[SimProcess], gateways_factory: StartPair
) -> None:
    java = sims[0]
    task_id = new_id()
    seeded = java.seed(id=task_id, status="SUCCESS")
    pair: TwoGateways = gateways_factory(config_for(topology, prefix, sims))
    with pair.client(0) as first, pair.client(1) as second:
        miss = first.get(f"/mj/task/{task_id}/fetch")
        assert miss.status_code == 200
        assert miss.headers["x-cache"] == "MISS"
        assert miss.json()["imageUrl"] == seeded["imageUrl"]
        assert topology.get(KeySpace(prefix).task(java.name, task_id)) is not None
        before = total_requests(sims)

        hit = second.get(f"/mj/task/{task_id}/fetch")
        assert hit.status_code == 200
        assert (hit.headers["x-cache"], hit.headers["x-cache-tier"]) == ("HIT", "store")
        assert hit.content == miss.content
        assert total_requests(sims) == before, "the second gateway asked an upstream"


def test_a_list_over_ids_in_different_slots_is_served_from_the_store(
    topology: Topology, prefix: str, sims: list[SimProcess], gateways_factory: StartPair
) -> None:
    java = sims[0]
    ids = [new_id() + str(i) for i in range(8)]
    for task_id in ids:
        java.seed(id=task_id, status="SUCCESS")
    keys = KeySpace(prefix)
    slots = {key_slot(keys.task(java.name, task_id).encode()) for task_id in ids}
    assert len(slots) > 1
    if isinstance(topology, ClusterProcesses):
        nodes = {topology.node_of_slot(slot) for slot in slots}
        assert len(nodes) > 1, "the ids all landed on one node; the test proves nothing"

    pair: TwoGateways = gateways_factory(config_for(topology, prefix, sims))
    with pair.client(0) as first, pair.client(1) as second:
        for task_id in ids:
            assert first.get(f"/mj/task/{task_id}/fetch").status_code == 200
        for sim in sims:
            sim.control("POST", "reset", {})  # counters only: the tasks stay

        asked = [ids[5], *ids[:5], ids[7], ids[6]]
        listed = second.post("/mj/task/list-by-condition", json={"ids": asked})
        assert listed.status_code == 200
        assert listed.headers["x-cache"] == "HIT"
        assert [task["id"] for task in listed.json()] == asked
        assert total_requests(sims) == 0, "cached ids went upstream"

        # With an unknown id among them, only that id is looked up (once per upstream).
        mixed = [ids[2], "no-such-task", ids[0]]
        listed = second.post("/mj/task/list-by-ids", json={"ids": mixed})
        assert listed.status_code == 200
        assert [task["id"] for task in listed.json()] == [ids[2], ids[0]]
        assert total_requests(sims) <= len(sims)
        assert not any(
            task_id in path for sim in sims for path in sim.stats()["paths"] for task_id in ids
        )


def test_image_seed_through_one_gateway_invalidates_the_shared_entry(
    topology: Topology, prefix: str, sims: list[SimProcess], gateways_factory: StartPair
) -> None:
    java = sims[0]
    task_id = new_id()
    java.seed(id=task_id, status="SUCCESS")
    task_key = KeySpace(prefix).task(java.name, task_id)
    pair: TwoGateways = gateways_factory(config_for(topology, prefix, sims))
    with pair.client(0) as first, pair.client(1) as second:
        assert first.get(f"/mj/task/{task_id}/fetch").headers["x-cache"] == "MISS"
        assert topology.get(task_key) is not None
        fetches = java.count(FETCH)

        # The second gateway never fetched it: the owner comes from the store.
        seed = second.get(f"/mj/task/{task_id}/image-seed")
        assert seed.status_code == 200, seed.text
        assert java.count("GET /mj/task/{id}/image-seed") == 1
        wait_gone(topology, task_key)

        again = second.get(f"/mj/task/{task_id}/fetch")
        assert again.status_code == 200
        assert again.headers["x-cache"] == "MISS"
        assert java.count(FETCH) == fetches + 1


# -- rate limits and outbound caps ----------------------------------------------------------


def test_the_caller_limit_admits_exactly_burst_across_gateways(
    topology: Topology, prefix: str, sims: list[SimProcess], gateways_factory: StartPair
) -> None:
    burst = 20
    limited = {"name": "limited", "key": LIMITED_KEY, "rate_limit": {"rps": 0.001, "burst": burst}}
    java = sims[0]
    task_id = new_id()
    java.seed(id=task_id, status="SUCCESS")
    pair: TwoGateways = gateways_factory(
        config_for(topology, prefix, sims, extra_clients=[limited])
    )
    headers = {"Authorization": f"Bearer {LIMITED_KEY}"}
    admitted = [0, 0]
    refused = [0, 0]
    with (
        httpx.Client(base_url=pair.first.url, headers=headers, timeout=10) as first,
        httpx.Client(base_url=pair.second.url, headers=headers, timeout=10) as second,
    ):
        for n in range(burst * 3):
            which = n % 2
            response = (first, second)[which].get(f"/mj/task/{task_id}/fetch")
            assert response.status_code in (200, 429), response.text
            if response.status_code == 200:
                admitted[which] += 1
            else:
                refused[which] += 1
                assert int(response.headers["retry-after"]) >= 1
            assert response.headers["ratelimit-limit"] == str(burst)
    assert sum(admitted) == burst, (admitted, refused)
    assert all(admitted) and all(refused), (admitted, refused)


def test_the_outbound_concurrency_cap_holds_across_gateways(
    topology: Topology, prefix: str, sims: list[SimProcess], gateways_factory: StartPair
) -> None:
    java = sims[0]
    cap = 2
    upstreams = [sims[0].upstream_config(max_concurrency=cap, queue_timeout_s=10)]
    upstreams += [s.upstream_config() for s in sims[1:]]
    pair: TwoGateways = gateways_factory(config_for(topology, prefix, sims, upstreams=upstreams))
    pair.warm()
    java.faults(latency_ms=200)
    ids = [new_id() + str(i) for i in range(10)]

    urls = [pair.first.url, pair.second.url]
    started = time.monotonic()
    statuses = asyncio.run(fetch_all(urls, [f"/mj/task/{i}/fetch" for i in ids], "bob"))
    elapsed = time.monotonic() - started
    assert statuses == [404] * len(ids)
    stats = java.stats()
    assert stats["requests"][FETCH] == len(ids)
    assert stats["max_inflight"] == cap
    # Ten 200 ms calls, two at a time: at least five rounds.
    assert elapsed >= len(ids) / cap * 0.2 * 0.9


def test_the_outbound_rate_cap_holds_across_gateways(
    topology: Topology, prefix: str, sims: list[SimProcess], gateways_factory: StartPair
) -> None:
    java = sims[0]
    rate = 8
    upstreams = [sims[0].upstream_config(max_rps=rate, max_concurrency=100, queue_timeout_s=10)]
    upstreams += [s.upstream_config() for s in sims[1:]]
    pair: TwoGateways = gateways_factory(config_for(topology, prefix, sims, upstreams=upstreams))
    pair.warm()
    ids = [new_id() + str(i) for i in range(12)]

    urls = [pair.first.url, pair.second.url]
    started = time.monotonic()
    statuses = asyncio.run(fetch_all(urls, [f"/mj/task/{i}/fetch" for i in ids], "bob"))
    elapsed = time.monotonic() - started
    assert statuses == [404] * len(ids)
    stats = java.stats()
    assert stats["requests"][FETCH] == len(ids)
    # Requests are spaced 1/rate apart by the shared bucket, whichever gateway sends them.
    assert elapsed >= (len(ids) - 1) / rate * 0.9
    assert max(stats["per_second"].values()) <= rate + 1


# -- keys ----------------------------------------------------------------------------------------


def test_every_kind_of_key_the_gateway_writes_is_hash_tagged(
    topology: Topology, prefix: str, sims: list[SimProcess], gateways_factory: StartPair
) -> None:
    """A workload that writes every kind of key: owner, cached task, not-found mark, caller
    bucket, outbound bucket and slots. The ``prefix`` fixture then checks every key's tag;
    here the multi-key pairs are checked to share a slot."""
    java = sims[0]
    done_id = new_id()
    java.seed(id=done_id, status="SUCCESS")
    pair: TwoGateways = gateways_factory(config_for(topology, prefix, sims))
    with pair.client(0) as first, pair.client(1, "bob") as second:
        submitted = first.post("/mj/submit/imagine", json={"prompt": "a lighthouse at dawn"})
        assert submitted.status_code == 200
        assert submitted.json()["code"] == 1
        assert first.get(f"/mj/task/{submitted.json()['result']}/fetch").status_code == 200
        assert second.get(f"/mj/task/{done_id}/fetch").status_code == 200
        assert second.get(f"/mj/task/{new_id()}/fetch").status_code == 404

    keys = topology.keys(prefix)
    kinds = {
        "owner": [k for k in keys if k.endswith(":owner")],
        "task": [k for k in keys if ":task:" in k],
        "not found": [k for k in keys if k.endswith(":nf")],
        "caller bucket": [k for k in keys if "{rl:" in k],
        "outbound": [k for k in keys if "{out:" in k],
    }
    assert all(kinds.values()), kinds
    tags: dict[str, set[int]] = {}
    for key in keys:
        match = HASH_TAGGED.match(key)
        assert match is not None, key
        tags.setdefault(match.group(0).split("{", 1)[1], set()).add(key_slot(key.encode()))
    assert all(len(slots) == 1 for slots in tags.values())
