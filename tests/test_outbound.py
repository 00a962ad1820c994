"""What reaches each upstream: the outbound caps (``max_rps``, ``max_concurrency``) under a
hundred callers, shared by two gateways on one Redis, kept per worker while the store is
down; and caller scoping (``clients[].upstreams``) for lookups, lists, submits and follow-ups.

The sims count what they receive (``/_sim/stats``: requests per wall-clock second, requests
in flight), so the caps are checked where they matter: at the provider.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import pytest

from gateway.config import Config
from tests.gunicorn_support import Hammered, hammer
from tests.support import (
    GatewayThread,
    RedisProcess,
    SimProcess,
    caller,
    make_config,
    running_gateway,
)


@contextmanager
def gateways(config: Config, count: int) -> Iterator[list[GatewayThread]]:
    """``count`` gateways on one config: on a Redis store they share every limit, as two
    replicas would."""
    with ExitStack() as stack:
        yield [stack.enter_context(running_gateway(config)) for _ in range(count)]


def unknown_id() -> str:
    return f"nope{uuid.uuid4().hex[:20]}"


async def lookup_unknown(client: httpx.AsyncClient, n: int) -> httpx.Response:
    """A lookup that no cache can answer: a new id every time, asked of the upstream."""
    return await client.get(f"/mj/task/{unknown_id()}/fetch")


async def hammer_all(
    urls: list[str], callers: int, duration_s: float, keep_errors: bool = True
) -> Hammered:
    """``callers`` concurrent callers split over the gateways, for ``duration_s``."""
    share = callers // len(urls)
    parts = await asyncio.gather(
        *(
            hammer(
                url,
                caller(),
                duration_s,
                share,
                lookup_unknown,
                keep=lambda r: keep_errors and r.status_code >= 500,
            )
            for url in urls
        )
    )
    total = Hammered()
    for part in parts:
        total.statuses.update(part.statuses)
        total.responses += part.responses
        total.elapsed_s = max(total.elapsed_s, part.elapsed_s)
    return total


def assert_saturated(response: httpx.Response, upstream: str) -> None:
    assert response.status_code == 503, response.text
    body = response.json()
    assert set(body) == {"code", "description", "result", "request_id"}
    assert body["request_id"] == response.headers["x-request-id"]
    assert upstream in body["description"] and "saturated" in body["description"], body


# -- max_rps ---------------------------------------------------------------------------------


async def test_max_rps_holds_while_100_callers_hammer_lookups(
    sims: list[SimProcess], store_url: str
) -> None:
    """One upstream with max_rps 10; 100 callers look up distinct unknown ids for 3 s (on
    Redis, through two gateways sharing the caps). The sim never sees more than 10 requests
    in a wall-clock second, give or take one: the gateway spaces requests 100 ms apart when
    it admits them, and the time each takes to reach the sim varies by a few ms, so two
    admitted 100 ms apart may land 99 ms apart and put an 11th into a second. Requests that
    waited their queue_timeout_s (1 s) get 503 naming the upstream as saturated."""
    sim = sims[0]
    max_rps = 10
    upstream = sim.upstream_config(max_rps=max_rps, queue_timeout_s=1.0, max_concurrency=64)
    config = make_config([sim], store_url, upstreams=[upstream])
    with gateways(config, 2 if store_url else 1) as running:
        result = await hammer_all([g.url for g in running], 100, 3.0)
    stats = sim.stats()
    per_second = stats["per_second"]
    assert per_second, "the sim saw nothing"
    assert max(per_second.values()) <= max_rps + 1, per_second
    # Not starved either: about max_rps a second got through while callers waited.
    sent = stats["requests"].get("GET /mj/task/{id}/fetch", 0)
    assert sent <= max_rps * result.elapsed_s + 1
    assert sent >= max_rps * (result.elapsed_s - 1.5), (sent, result.elapsed_s)
    assert result.count(404) == sent
    assert set(result.statuses) == {404, 503}, result.statuses
    assert result.count(503) > 100
    for response in result.responses[:20]:
        assert_saturated(response, sim.name)


# -- max_concurrency -----------------------------------------------------------------------


async def test_max_concurrency_holds(sims: list[SimProcess], store_url: str) -> None:
    """A sim answering after 200 ms, max_concurrency 3, 30 concurrent callers (on Redis,
    through two gateways, each of whose HTTP pools alone would allow 3): the sim never has
    more than 3 requests in flight, has 3 most of the time, and every caller is answered."""
    sim = sims[0]
    sim.faults(latency_ms=200)
    upstream = sim.upstream_config(max_rps=1000, max_concurrency=3, queue_timeout_s=10)
    config = make_config([sim], store_url, upstreams=[upstream])
    with gateways(config, 2 if store_url else 1) as running:

        async def one(url: str) -> int:
            async with httpx.AsyncClient(base_url=url, headers=caller(), timeout=30) as client:
                return (await lookup_unknown(client, 0)).status_code

        urls = [g.url for g in running]
        loop = asyncio.get_running_loop()
        started = loop.time()
        statuses = await asyncio.gather(*(one(urls[n % len(urls)]) for n in range(30)))
        elapsed = loop.time() - started
    stats = sim.stats()
    assert statuses == [404] * 30
    assert stats["max_inflight"] <= 3, stats["max_inflight"]
    assert stats["max_inflight"] == 3, "the cap should be used, not undercut"
    assert stats["requests"]["GET /mj/task/{id}/fetch"] == 30
    # 30 requests of 200 ms, 3 at a time, take at least 2 s; far less idle time than that.
    assert 2.0 <= elapsed < 4.5, elapsed


# -- the store goes away -------------------------------------------------------------------


async def test_caps_fall_back_to_each_worker_while_the_store_is_down(
    sims: list[SimProcess],
) -> None:
    """With Redis stopped each worker keeps the same caps by itself: one gateway, max_rps 5,
    60 callers for 2.5 s, and the sim still sees at most 5 (+1, see above) a second."""
    redis = RedisProcess()
    redis.start()
    sim = sims[0]
    upstream = sim.upstream_config(max_rps=5, queue_timeout_s=0.5, max_concurrency=64)
    config = make_config([sim], redis.url, upstreams=[upstream])
    try:
        with running_gateway(config) as gateway:
            redis.stop()
            result = await hammer_all([gateway.url], 60, 2.5)
    finally:
        redis.stop()
    per_second = sim.stats()["per_second"]
    assert per_second and max(per_second.values()) <= 6, per_second
    assert set(result.statuses) == {404, 503}, result.statuses
    for response in result.responses[:10]:
        assert_saturated(response, sim.name)


# -- caller scoping ------------------------------------------------------------------------


def request_count(sim: SimProcess) -> int:
    return int(sim.stats()["total"])


def assert_not_found(response: httpx.Response) -> None:
    assert response.status_code == 404, response.text
    body = response.json()
    assert body["code"] == 3 and "not found" in body["description"], body


async def test_scoping_hides_another_upstreams_tasks(
    sims: list[SimProcess], store_url: str
) -> None:
    """bob may use only the first upstream. A task owned by the second is not found for
    him, before and after alice has put it in every cache tier; lists drop it; his submits
    all go to his upstream; follow-ups on the other upstream's task are not found and never
    reach it."""
    mine, other = sims[0], sims[1]
    own_id, other_id = f"own{uuid.uuid4().hex[:12]}", f"oth{uuid.uuid4().hex[:12]}"
    mine.seed(id=own_id, status="SUCCESS")
    other.seed(id=other_id, status="SUCCESS")
    running_id = f"run{uuid.uuid4().hex[:12]}"
    other.seed(id=running_id, status="IN_PROGRESS")
    config = make_config(sims, store_url)
    bob = caller("bob")
    with running_gateway(config) as gateway, httpx.Client(timeout=10) as http:
        url = gateway.url

        def bob_fetch(task_id: str) -> httpx.Response:
            return http.get(f"{url}/mj/task/{task_id}/fetch", headers=bob)

        # Before anyone knows the owner: bob's lookup asks only his upstream.
        assert_not_found(bob_fetch(other_id))
        assert [request_count(s) for s in sims[1:]] == [0, 0]

        # alice finds both tasks: owners recorded, bodies in L1 and the store.
        for task_id in (other_id, running_id):
            response = http.get(f"{url}/mj/task/{task_id}/fetch", headers=caller())
            assert response.status_code == 200
        seen_by_other = request_count(other)

        assert_not_found(bob_fetch(other_id))
        assert_not_found(bob_fetch(running_id))
        assert bob_fetch(own_id).status_code == 200

        for path in ("/mj/task/list-by-condition", "/mj/task/list-by-ids"):
            listed = http.post(
                url + path, json={"ids": [other_id, own_id, running_id]}, headers=bob
            )
            assert listed.status_code == 200, listed.text
            assert [t["id"] for t in listed.json()] == [own_id]
            assert "x-gateway-partial" not in listed.headers
        recent = http.get(f"{url}/mj/task/list", headers=bob)
        assert recent.status_code == 200
        recent_ids = {t["id"] for t in recent.json()}
        assert own_id in recent_ids and other_id not in recent_ids

        follow_ups: list[tuple[str, str, dict[str, Any] | None]] = [
            ("POST", "/mj/submit/action", {"taskId": other_id, "customId": "MJ::JOB::x"}),
            ("POST", "/mj/submit/change", {"taskId": other_id, "action": "UPSCALE", "index": 1}),
            ("POST", "/mj/submit/simple-change", {"content": f"{other_id} U1"}),
            ("POST", "/mj/submit/modal", {"taskId": running_id, "prompt": "x"}),
            ("GET", f"/mj/task/{other_id}/image-seed", None),
            ("POST", f"/mj/task/{running_id}/cancel", None),
        ]
        for method, path, body in follow_ups:
            response = http.request(method, url + path, json=body, headers=bob)
            assert_not_found(response)
        assert request_count(other) == seen_by_other, "a follow-up reached bob's forbidden upstream"
        # The running task was not cancelled behind alice's back.
        response = http.get(f"{url}/mj/task/{running_id}/fetch", headers=caller())
        assert response.json()["status"] == "IN_PROGRESS"

        submits = [
            http.post(f"{url}/mj/submit/imagine", json={"prompt": f"fox {n}"}, headers=bob)
            for n in range(8)
        ]
        assert all(r.status_code == 200 and r.json()["code"] in (1, 22) for r in submits)
        assert [s.stats()["submits"] for s in sims] == [8, 0, 0]
        # And bob's own follow-ups still work.
        response = http.get(f"{url}/mj/task/{own_id}/image-seed", headers=bob)
        assert response.status_code == 200 and response.json()["code"] == 1


@pytest.mark.parametrize("path", ["/mj/task/list", "/mj/task/queue"])
async def test_scoped_merges_ask_only_the_callers_upstreams(
    sims: list[SimProcess], path: str
) -> None:
    config = make_config(sims)
    with running_gateway(config) as gateway, httpx.Client(timeout=10) as http:
        response = http.get(gateway.url + path, headers=caller("bob"))
    assert response.status_code == 200, response.text
    assert [request_count(s) for s in sims[1:]] == [0, 0]
    assert request_count(sims[0]) == 1
