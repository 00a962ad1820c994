"""The watcher: one refresher per fleet (a lease in the store), batched list calls per
upstream, answers written into the task cache so callers' polls never reach an upstream, and
tasks dropped once final, unknown upstream-side or stuck.

Real sims (which count their list calls), real redis-server, the real app, and gunicorn for
the takeover after a SIGKILL.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_aiohttp import AiohttpTransport

from gateway.configfile import config_from_dict
from tests.gunicorn_support import gateway_process
from tests.support import (
    RedisProcess,
    SimProcess,
    caller,
    config_data,
    running_gateway,
    wait_until,
)

LIST = "POST /mj/task/list-by-condition"
FETCH = "GET /mj/task/{id}/fetch"


@pytest.fixture
def two(sims: list[SimProcess]) -> Iterator[list[SimProcess]]:
    """The Java and C# sims, their tasks never failing (each test sets how long they run)."""
    pair = sims[:2]
    yield pair
    for sim in pair:
        sim.faults(task_seconds=8.0, failure_rate=0.1)


def set_task_seconds(sims: list[SimProcess], seconds: float) -> None:
    for sim in sims:
        sim.faults(task_seconds=seconds, failure_rate=0)


def submit(base_url: str) -> str:
    answer = httpx.post(
        f"{base_url}/mj/submit/imagine",
        json={"prompt": f"a quiet harbour {uuid.uuid4().hex}"},
        headers=caller(),
    )
    assert answer.status_code == 200, answer.text
    task_id: str = answer.json()["result"]
    return task_id


def counts(sim: SimProcess) -> tuple[int, int]:
    """(list calls, fetches) the sim has seen since its last reset."""
    requests = sim.stats()["requests"]
    return requests.get(LIST, 0), requests.get(FETCH, 0)


async def poll(base_url: str, task_ids: list[str], callers: int, seconds: float) -> list[str]:
    """``callers`` pollers, each fetching a random task ten times a second; the X-Cache of
    every answer."""
    seen: list[str] = []
    transport = AiohttpTransport(limits=httpx.Limits(max_connections=callers))
    async with httpx.AsyncClient(base_url=base_url, headers=caller(), transport=transport) as c:
        stop_at = time.monotonic() + seconds

        async def one() -> None:
            while time.monotonic() < stop_at:
                answer = await c.get(f"/mj/task/{random.choice(task_ids)}/fetch")
                assert answer.status_code == 200, answer.text
                seen.append(answer.headers["x-cache"])
                await asyncio.sleep(0.1)

        await asyncio.gather(*(one() for _ in range(callers)))
    return seen


def test_many_callers_cost_only_the_watchers_batched_list_calls(
    two: list[SimProcess], redis_server: RedisProcess
) -> None:
    set_task_seconds(two, 60)
    interval, batch, tasks = 0.5, 4, 14
    data = config_data(two, redis_server.url, watcher={"interval_s": interval})
    data["fanout"]["batch_size"] = batch
    with running_gateway(config_from_dict(data, env={})) as gateway:
        ids = [submit(gateway.url) for _ in range(tasks)]
        per_upstream = {sim.name: sim.stats()["submits"] for sim in two}
        assert sum(per_upstream.values()) == tasks
        # Every task refreshed once, then the count starts.
        time.sleep(interval * 2)
        for sim in two:
            sim.control("POST", "reset", {})
        window = 3.0
        started = time.monotonic()
        answers = asyncio.run(poll(gateway.url, ids, callers=40, seconds=window))
        elapsed = time.monotonic() - started
    assert len(answers) >= 40 * window  # at least a poll per caller per second
    assert set(answers) == {"COALESCED"}  # a running task's answer, from the store
    for sim in two:
        list_calls, fetches = counts(sim)
        assert fetches == 0, sim.name
        cycles = math.floor(elapsed / interval) + 2
        assert 0 < list_calls <= math.ceil(per_upstream[sim.name] / batch) * cycles, sim.name


def test_a_task_that_finishes_is_a_hit_on_the_first_poll_after_it_finishes(
    two: list[SimProcess],
) -> None:
    java = two[0]
    set_task_seconds([java], 1.5)
    config = config_from_dict(config_data([java], "", watcher={"interval_s": 0.2}), env={})
    with running_gateway(config) as gateway:
        task_id = submit(gateway.url)
        seen: list[tuple[str, str]] = []
        with httpx.Client(base_url=gateway.url, headers=caller()) as client:
            while not seen or seen[-1][0] != "SUCCESS":
                answer = client.get(f"/mj/task/{task_id}/fetch")
                seen.append((answer.json()["status"], answer.headers["x-cache"]))
                time.sleep(0.05)
    first_success = next(cache for status, cache in seen if status == "SUCCESS")
    assert first_success == "HIT"
    statuses = [status for status, _ in seen]
    assert "IN_PROGRESS" in statuses  # it was polled while it ran
    # Only a poll before the watcher's first refresh may have reached the upstream.
    assert counts(java)[1] <= 1


def watch_stops(sim: SimProcess, within_s: float) -> None:
    """The sim's list calls stop growing within ``within_s``."""

    def quiet() -> bool:
        before = counts(sim)[0]
        time.sleep(0.8)
        return counts(sim)[0] == before

    wait_until(quiet, within_s, "the watcher to stop polling")


def test_watching_stops_when_final_unknown_upstream_side_or_stuck(
    two: list[SimProcess],
) -> None:
    java = two[0]
    watcher = {"interval_s": 0.2}
    set_task_seconds([java], 0.6)
    with running_gateway(config_from_dict(config_data([java], "", watcher=watcher), env={})) as gw:
        submit(gw.url)
        wait_until(lambda: counts(java)[0] >= 2, 5, "polls")
        watch_stops(java, 5)  # final

    set_task_seconds([java], 60)
    with running_gateway(config_from_dict(config_data([java], "", watcher=watcher), env={})) as gw:
        submit(gw.url)
        wait_until(lambda: counts(java)[0] >= 2, 5, "polls")
        java.control("POST", "reset", {"tasks": True})  # the upstream forgets it
        watch_stops(java, 5)  # unknown
        assert 0 < counts(java)[0] <= 4

    data = config_data([java], "", watcher=watcher, ledger={"stuck_after_s": 1.5})
    with running_gateway(config_from_dict(data, env={})) as gw:
        submit(gw.url)
        wait_until(lambda: counts(java)[0] >= 2, 5, "polls")
        watch_stops(java, 5)  # stuck


def leaders(process: Any) -> list[int]:
    return [line["pid"] for line in process.events("watcher_lease", held=True)]


def test_the_lease_moves_to_another_worker_when_the_leader_is_killed(
    two: list[SimProcess], redis_server: RedisProcess, tmp_path: Path
) -> None:
    java = two[0]
    set_task_seconds([java], 60)
    data = config_data([java], redis_server.url, watcher={"interval_s": 0.3})
    data["logging"] = {"level": "info", "format": "json"}
    with gateway_process(tmp_path, data, workers=2) as gateway:
        wait_until(lambda: leaders(gateway), 10, "a leader")
        submit(gateway.url)
        wait_until(lambda: counts(java)[0] >= 3, 5, "polls")
        # One watcher in the fleet: one list call per interval, not one per worker.
        java.control("POST", "reset", {})
        time.sleep(2)
        assert 3 <= counts(java)[0] <= 2 / 0.3 + 2
        (leader,) = leaders(gateway)
        os.kill(leader, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: len(leaders(gateway)) == 2, 10, "a new leader")
        taken_over_s = time.monotonic() - killed
        (successor,) = [pid for pid in leaders(gateway) if pid != leader]
        assert successor != leader
        assert taken_over_s < 6
        before = counts(java)[0]
        wait_until(lambda: counts(java)[0] >= before + 3, 5, "polls by the new leader")


async def test_a_lease_is_held_by_one_holder_until_it_lapses(store: Any) -> None:
    key = f"t{uuid.uuid4().hex}:{{lease}}"
    assert await store.acquire_lease(key, "a", 200)
    assert not await store.acquire_lease(key, "b", 200)
    assert await store.acquire_lease(key, "a", 200)  # renewed
    await store.release_lease(key, "b")  # not b's to give up
    assert not await store.acquire_lease(key, "b", 200)
    await asyncio.sleep(0.3)
    assert await store.acquire_lease(key, "b", 200)  # a stopped renewing
    await store.release_lease(key, "b")
    assert await store.acquire_lease(key, "a", 200)
