"""Finding tasks across upstreams, through the HTTP API: not-found normalization, fan-out fetch,
the owner map (memory and Redis), owner-wins for ids that exist on two upstreams, list merge
order and de-duplication, per-caller upstream scoping, and partial failures.

Ids of tasks that are already terminal may be answered from a cache after their first lookup,
so counts are asserted only where the promise is about who is (not) asked.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from gateway.cache import TaskCache
from gateway.circuit import CircuitBreaker
from gateway.config import CacheConfig, FanoutConfig, RedisConfig, Secret, UpstreamConfig
from gateway.context import RequestInfo
from gateway.errors import UpstreamFailures
from gateway.lookup import TaskLookup
from gateway.outbound import OutboundCaps
from gateway.owners import OwnerMap
from gateway.store import KeySpace, MemoryStore, RedisStore, Store
from gateway.upstreams import Upstream
from tests.sims_extra import (
    FIRST,
    assert_error,
    client,
    config_for,
    count,
    dead_upstream,
    fresh,
    not_found_sim,
    raw_get,
    reset_stats,
    started,
    submits,
    total,
    unique_id,
)
from tests.support import RedisProcess, SimProcess, running_gateway

FETCH = "GET /mj/task/{id}/fetch"
BY_IDS = "POST /mj/task/list-by-ids"
BY_CONDITION = "POST /mj/task/list-by-condition"


@pytest.fixture
def sims(session_sims: list[SimProcess]) -> list[SimProcess]:
    """The conftest fixture of the same name, on a pooled control client (much faster)."""
    return fresh(session_sims)


@pytest.fixture(scope="module")
def not_found_sims() -> Iterator[dict[str, SimProcess]]:
    """Sims answering unknown ids with 200 ``null`` and with a 404."""
    with started([not_found_sim("null"), not_found_sim("404")]) as extra:
        yield {"null": extra[0], "404": extra[1]}


def all_upstreams(sims: list[SimProcess], **overrides: Any) -> list[dict[str, Any]]:
    return [s.upstream_config(**overrides) for s in sims]


def ids_of(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [task["id"] for task in response.json()]


def owned_by_relay(sims: list[SimProcess]) -> list[dict[str, Any]]:
    """All three sims; submits go to relay, the last one in config order."""
    return [s.upstream_config(weight=FIRST if s is sims[2] else 1) for s in sims]


def submit(http: httpx.Client, prompt: str) -> str:
    response = http.post("/mj/submit/imagine", json={"prompt": prompt})
    assert response.status_code == 200, response.text
    envelope = response.json()
    assert envelope["code"] in (1, 21, 22), envelope
    task_id: str = envelope["result"]
    return task_id


# -- not found -------------------------------------------------------------------------------

# What each flavor answers for an unknown id when asked directly.
RAW_NOT_FOUND = {
    "java": (200, b""),
    "csharp": (204, b""),
    "relay": (400, b"task_no_found"),
    "null": (200, b"null"),
    "404": (404, b""),
}


@pytest.mark.parametrize("flavor", list(RAW_NOT_FOUND))
def test_every_not_found_flavor_becomes_404(
    sims: list[SimProcess], not_found_sims: dict[str, SimProcess], flavor: str
) -> None:
    by_flavor = {"java": sims[0], "csharp": sims[1], "relay": sims[2], **not_found_sims}
    sim = by_flavor[flavor]
    fresh([sim])
    missing = unique_id()
    raw = raw_get(sim, f"/mj/task/{missing}/fetch")
    status, marker = RAW_NOT_FOUND[flavor]
    assert raw.status_code == status and marker in raw.content, (raw.status_code, raw.content)
    if flavor in ("java", "csharp"):
        assert raw.content == b""
    reset_stats([sim])

    with running_gateway(config_for([sim.upstream_config()])) as gw, client(gw) as http:
        fetched = http.get(f"/mj/task/{missing}/fetch")
        seed = http.get(f"/mj/task/{missing}/image-seed")
        cancel = http.post(f"/mj/task/{missing}/cancel")
        listed = http.post("/mj/task/list-by-ids", json={"ids": [missing]})
    for response in (fetched, seed, cancel):
        body = assert_error(response, 404)
        assert missing in body["description"]
    assert ids_of(listed) == []
    assert count(sim, FETCH) >= 1  # the upstream was asked and said "not here" its own way


def test_not_found_on_every_flavor_at_once_is_404(
    sims: list[SimProcess], not_found_sims: dict[str, SimProcess]
) -> None:
    everyone = [*sims, *not_found_sims.values()]
    fresh(list(not_found_sims.values()))
    missing = unique_id()
    with running_gateway(config_for(all_upstreams(everyone))) as gw, client(gw) as http:
        assert_error(http.get(f"/mj/task/{missing}/fetch"), 404)
    assert all(count(s, FETCH) == 1 for s in everyone)


# -- fan-out fetch and the owner map ---------------------------------------------------------


def test_fan_out_fetch_finds_the_task_and_records_its_owner(
    sims: list[SimProcess], store_url: str
) -> None:
    java, csharp, relay = sims
    task_id = unique_id()
    csharp.seed(id=task_id, prompt="only on csharp", status="SUCCESS")
    direct = raw_get(csharp, f"/mj/task/{task_id}/fetch")
    with running_gateway(config_for(all_upstreams(sims), store_url)) as gw, client(gw) as http:
        first = http.get(f"/mj/task/{task_id}/fetch")
        assert first.status_code == 200
        assert first.content == direct.content  # the upstream's bytes, as they came
        assert first.headers["content-type"].startswith("application/json")
        reset_stats(sims)
        again = http.get(f"/mj/task/{task_id}/fetch")
        assert again.status_code == 200 and again.json()["prompt"] == "only on csharp"
        assert total(java) == 0 and total(relay) == 0
        seed = http.get(f"/mj/task/{task_id}/image-seed")
        assert seed.status_code == 200 and seed.json()["code"] == 1
    assert count(csharp, "GET /mj/task/{id}/image-seed") == 1
    assert total(java) == 0 and total(relay) == 0


def test_first_found_wins_without_waiting_for_a_hanging_upstream(sims: list[SimProcess]) -> None:
    java, relay = sims[0], sims[2]
    task_id = unique_id()
    java.seed(id=task_id, prompt="quick")
    relay.faults(timeout_rate=1, hang_s=3)
    with running_gateway(config_for(all_upstreams(sims))) as gw, client(gw) as http:
        began = time.monotonic()
        response = http.get(f"/mj/task/{task_id}/fetch")
        elapsed = time.monotonic() - began
    assert response.status_code == 200 and response.json()["prompt"] == "quick"
    assert elapsed < 1.5


def test_fetch_not_found_is_only_sure_when_every_upstream_answered(
    sims: list[SimProcess],
) -> None:
    java, relay = sims[0], sims[2]
    present = unique_id()
    java.seed(id=present, prompt="here")
    relay.faults(error_rate=1)
    with running_gateway(config_for(all_upstreams(sims))) as gw, client(gw) as http:
        found = http.get(f"/mj/task/{present}/fetch")
        missing = http.get(f"/mj/task/{unique_id()}/fetch")
    assert found.status_code == 200 and found.json()["prompt"] == "here"
    # relay broke, so the task might be there: that is an upstream failure, not a 404.
    description = assert_error(missing, 502)["description"]
    assert "relay" in description and relay.key not in missing.text


def test_fetch_past_the_fan_out_deadline_is_504(sims: list[SimProcess]) -> None:
    for sim in sims:
        sim.faults(timeout_rate=1, hang_s=3)
    config = config_for(all_upstreams(sims), fanout={"deadline_s": 0.5})
    with running_gateway(config) as gw, client(gw) as http:
        began = time.monotonic()
        response = http.get(f"/mj/task/{unique_id()}/fetch")
        elapsed = time.monotonic() - began
    assert_error(response, 504)
    assert elapsed < 2


async def test_a_fan_out_past_its_deadline_blames_only_upstreams_that_had_not_answered(
    sims: list[SimProcess], own_redis: RedisProcess
) -> None:
    """One upstream says "not found" at once; the other is stuck in its outbound caps on a
    frozen store (2 s socket timeout) past the fan-out's deadline, so the fan-out's own
    safety timeout ends the wait. Only the stuck one missed the deadline."""
    java, csharp = sims[0], sims[1]
    keys = KeySpace("t-fanout-blame")
    memory = MemoryStore()
    frozen = RedisStore(RedisConfig(url=Secret(own_redis.url), socket_timeout_s=2))

    def upstream(sim: SimProcess, store: Store) -> Upstream:
        config = UpstreamConfig(sim.name, sim.url, Secret(sim.key), timeout_s=5)
        return Upstream(config, OutboundCaps(store, keys, config), CircuitBreaker(5, 30))

    answering, stuck = upstream(java, memory), upstream(csharp, frozen)
    owners = OwnerMap(memory, keys, 3600, 1000)
    lookup = TaskLookup(
        owners, TaskCache(memory, keys, CacheConfig(), owners), FanoutConfig(deadline_s=0.3)
    )
    assert own_redis.proc is not None
    own_redis.proc.send_signal(signal.SIGSTOP)
    began = time.monotonic()
    try:
        with pytest.raises(UpstreamFailures) as caught:
            await lookup.fetch("", unique_id(), [answering, stuck], RequestInfo(request_id="r"))
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)
        for closing in (answering, stuck, frozen):
            await closing.aclose() if isinstance(closing, Upstream) else await closing.close()
    assert time.monotonic() - began < 1.0
    assert count(java, FETCH) == 1  # java did answer, "not found"
    errors = caught.value.errors
    assert [(e.upstream, e.kind) for e in errors] == [("csharp", "timeout")]
    assert "missed the fan-out deadline" in errors[0].description


@pytest.mark.parametrize("recorded_by", ["submit", "fetch", "list"])
def test_owner_version_wins_for_an_id_on_two_upstreams(
    sims: list[SimProcess], store_url: str, recorded_by: str
) -> None:
    """The owner's copy is answered even when another upstream answers the same id faster."""
    java, relay = sims[0], sims[2]
    with running_gateway(config_for(owned_by_relay(sims), store_url)) as gw, client(gw) as http:
        if recorded_by == "submit":
            task_id = submit(http, "the owner's own")
        else:
            task_id = unique_id()
            relay.seed(id=task_id, prompt="the owner's own", status="IN_PROGRESS")
            first = (
                http.get(f"/mj/task/{task_id}/fetch")
                if recorded_by == "fetch"
                else http.post("/mj/task/list-by-ids", json={"ids": [task_id]})
            )
            assert first.status_code == 200, first.text
        # Now the same id shows up on java too, and java is the faster of the two.
        java.seed(id=task_id, prompt="an impostor", status="SUCCESS")
        relay.faults(latency_ms=150)
        reset_stats(sims)
        fetched = http.get(f"/mj/task/{task_id}/fetch")
        listed = http.post("/mj/task/list-by-condition", json={"ids": [task_id]})
    assert fetched.status_code == 200 and fetched.json()["prompt"] == "the owner's own"
    assert [t["prompt"] for t in listed.json()] == ["the owner's own"]
    assert total(java) == 0


def test_owner_is_shared_between_gateways_through_redis(
    sims: list[SimProcess], redis_server: RedisProcess
) -> None:
    java, relay = sims[0], sims[2]
    redis = {"url": redis_server.url, "key_prefix": f"shared{unique_id()}"}
    first = config_for(owned_by_relay(sims), redis=redis)
    second = config_for(all_upstreams(sims), redis=redis)
    with running_gateway(first) as gw_a, running_gateway(second) as gw_b:
        with client(gw_a) as http:
            task_id = submit(http, "made through gateway A")
        java.seed(id=task_id, prompt="an impostor")
        relay.faults(latency_ms=150)
        reset_stats(sims)
        with client(gw_b) as http:
            fetched = http.get(f"/mj/task/{task_id}/fetch")
    assert fetched.status_code == 200 and fetched.json()["prompt"] == "made through gateway A"
    assert total(java) == 0 and count(relay, FETCH) == 1


def test_same_id_on_two_upstreams_without_owner_is_answered_once_and_then_consistently(
    sims: list[SimProcess], store_url: str
) -> None:
    java, relay = sims[0], sims[2]
    task_id = unique_id()
    java.seed(id=task_id, prompt="java copy")
    relay.seed(id=task_id, prompt="relay copy")
    with running_gateway(config_for(all_upstreams(sims), store_url)) as gw, client(gw) as http:
        listed = http.post("/mj/task/list-by-ids", json={"ids": [task_id, task_id]})
        assert ids_of(listed) == [task_id]  # de-duplicated across upstreams
        chosen = listed.json()[0]["prompt"]
        # Slow the chosen one down: a fresh fan-out would now pick the other copy.
        (java if chosen == "java copy" else relay).faults(latency_ms=150)
        fetched = http.get(f"/mj/task/{task_id}/fetch")
    assert fetched.json()["prompt"] == chosen


# -- list merge ------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["list-by-ids", "list-by-condition"])
def test_list_merges_in_caller_order_without_duplicates_or_unknown_ids(
    sims: list[SimProcess], store_url: str, spelling: str
) -> None:
    java, csharp, relay = sims
    j1, j2, c1, r1, r2, unknown = (unique_id() for _ in range(6))
    for sim, task_id in ((java, j1), (java, j2), (csharp, c1), (relay, r1), (relay, r2)):
        sim.seed(id=task_id, prompt=f"{sim.name} {task_id}")
    asked = [r2, j1, unknown, c1, j1, r1, j2, c1]
    config = config_for(all_upstreams(sims), store_url)
    with running_gateway(config) as gw, client(gw) as http:
        response = http.post(f"/mj/task/{spelling}", json={"ids": asked})
        assert ids_of(response) == [r2, j1, c1, r1, j2]
        assert "x-gateway-partial" not in response.headers
        owners = {j1: java, j2: java, c1: csharp, r1: relay, r2: relay}
        for task in response.json():
            direct = raw_get(owners[task["id"]], f"/mj/task/{task['id']}/fetch")
            assert task == orjson.loads(direct.content)
        # Each upstream was asked with the path it serves, whatever the caller spelled.
        assert count(java, BY_CONDITION) == 1 and count(java, BY_IDS) == 0
        assert count(csharp, BY_CONDITION) == 1 and count(csharp, BY_IDS) == 0
        assert count(relay, BY_IDS) == 1 and count(relay, BY_CONDITION) == 0
        # The owners found by the list are remembered.
        reset_stats(sims)
        seed = http.get(f"/mj/task/{r1}/image-seed")
        assert seed.status_code == 200 and seed.json()["code"] == 1
    assert total(java) == 0 and total(csharp) == 0


def test_ids_with_a_known_owner_are_asked_of_the_owner_only(
    sims: list[SimProcess], store_url: str
) -> None:
    java, csharp, relay = sims
    with running_gateway(config_for(owned_by_relay(sims), store_url)) as gw, client(gw) as http:
        first, second = submit(http, "first"), submit(http, "second")
        reset_stats(sims)
        response = http.post("/mj/task/list-by-condition", json={"ids": [second, first]})
    assert ids_of(response) == [second, first]
    assert total(java) == 0 and total(csharp) == 0
    assert count(relay, BY_IDS) == 1


def test_caller_scoped_to_one_upstream_never_sees_the_others(
    sims: list[SimProcess], store_url: str
) -> None:
    java, csharp, relay = sims
    j1, c1, r1 = unique_id(), unique_id(), unique_id()
    java.seed(id=j1, prompt="java's")
    csharp.seed(id=c1, prompt="csharp's")
    relay.seed(id=r1, prompt="relay's")
    config = config_for(all_upstreams(sims), store_url)
    with running_gateway(config) as gw, client(gw, "bob") as bob, client(gw) as alice:
        assert_error(bob.get(f"/mj/task/{c1}/fetch"), 404)
        assert ids_of(bob.post("/mj/task/list-by-ids", json={"ids": [r1, j1, c1]})) == [j1]
        assert total(csharp) == 0 and total(relay) == 0
        # Once alice's lookups record csharp and relay as owners, bob still cannot reach them.
        assert alice.get(f"/mj/task/{c1}/fetch").status_code == 200
        assert ids_of(alice.post("/mj/task/list-by-ids", json={"ids": [r1]})) == [r1]
        reset_stats(sims)
        assert_error(bob.get(f"/mj/task/{c1}/fetch"), 404)
        assert ids_of(bob.post("/mj/task/list-by-condition", json={"ids": [c1, r1]})) == []
        assert_error(bob.get(f"/mj/task/{c1}/image-seed"), 404)
        assert_error(bob.post(f"/mj/task/{r1}/cancel"), 404)
        action = {"taskId": c1, "customId": "MJ::JOB::upsample::1::x"}
        assert_error(bob.post("/mj/submit/action", json=action), 404)
    assert total(csharp) == 0 and total(relay) == 0
    assert [submits(s) for s in sims] == [0, 0, 0]


@pytest.mark.parametrize("failure", ["error", "hang", "dead"])
def test_list_with_a_failing_upstream_is_partial(sims: list[SimProcess], failure: str) -> None:
    java, csharp, relay = sims
    j1, c1, r1 = unique_id(), unique_id(), unique_id()
    java.seed(id=j1)
    csharp.seed(id=c1)
    relay.seed(id=r1)
    upstreams = all_upstreams(sims)
    failed = "relay"
    if failure == "error":
        relay.faults(error_rate=1)
    elif failure == "hang":
        relay.faults(timeout_rate=1, hang_s=3)
    else:
        upstreams.append(dead_upstream("lost"))
        failed = "lost"
    config = config_for(upstreams, fanout={"deadline_s": 0.7})
    with running_gateway(config) as gw, client(gw) as http:
        began = time.monotonic()
        response = http.post("/mj/task/list-by-ids", json={"ids": [r1, c1, j1]})
        elapsed = time.monotonic() - began
    expected = [c1, j1] if failed == "relay" else [r1, c1, j1]
    assert ids_of(response) == expected
    assert response.headers.get("x-gateway-partial") == failed
    assert elapsed < 2


@pytest.mark.parametrize(("failure", "status"), [("error", 502), ("hang", 504)])
def test_list_with_every_upstream_failing_is_an_error(
    sims: list[SimProcess], failure: str, status: int
) -> None:
    for sim in sims:
        if failure == "error":
            sim.faults(error_rate=1)
        else:
            sim.faults(timeout_rate=1, hang_s=3)
    config = config_for(all_upstreams(sims), fanout={"deadline_s": 0.5})
    with running_gateway(config) as gw, client(gw) as http:
        response = http.post("/mj/task/list-by-ids", json={"ids": [unique_id(), unique_id()]})
    description = assert_error(response, status)["description"]
    for sim in sims:
        assert sim.name in description
        assert sim.key not in response.text
