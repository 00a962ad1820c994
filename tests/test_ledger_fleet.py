"""Visibility and quotas across a fleet: gunicorn with two workers on one Redis, every
request on a fresh connection so that both workers answer. A task is hidden from a caller
on every worker (from L1 too), and a quota is never passed by even one submit."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis

from tests.gunicorn_support import GatewayProcess, gateway_process
from tests.ledger_support import KEYS, clients, config_dict, faults, finished, submit
from tests.sims_extra import fresh, submits
from tests.support import RedisProcess, SimProcess

pytestmark = pytest.mark.timeout(120)

QUOTA = 20


@dataclass(frozen=True)
class Fleet:
    gateway: GatewayProcess
    redis_url: str
    key_prefix: str

    @property
    def url(self) -> str:
        return self.gateway.url

    def reset_quotas(self) -> None:
        """Give every caller its whole quota back (a new day, as far as the fleet knows)."""
        with redis.Redis.from_url(self.redis_url) as store:
            keys = list(store.scan_iter(f"{self.key_prefix}:{{quota:*"))
            if keys:
                store.delete(*keys)


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory,
    session_sims: list[SimProcess],
    redis_server: RedisProcess,
) -> Iterator[Fleet]:
    callers = clients(carol={"quota": {"submits_per_day": QUOTA}})
    data = config_dict(session_sims[:1], redis_server.url, callers=callers)
    with gateway_process(tmp_path_factory.mktemp("fleet"), data, workers=2) as gateway:
        yield Fleet(gateway, redis_server.url, data["redis"]["key_prefix"])


@pytest.fixture
def sim(session_sims: list[SimProcess]) -> SimProcess:
    return fresh(session_sims[:1])[0]


async def _burst(url: str, requests: list[tuple[str, str, str, Any]]) -> list[httpx.Response]:
    """``(caller, method, path, json)`` requests at once, each on its own connection."""
    limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as http:
        return list(
            await asyncio.gather(
                *(
                    http.request(method, path, json=body, headers={"mj-api-secret": KEYS[who]})
                    for who, method, path, body in requests
                )
            )
        )


def _workers(answers: list[httpx.Response]) -> set[str]:
    """The processes that answered: a request id starts with its process's own prefix."""
    return {answer.headers["x-request-id"][:16] for answer in answers}


def test_a_hidden_task_stays_hidden_on_every_worker(fleet: Fleet, sim: SimProcess) -> None:
    with (
        faults(sim, task_seconds=0.2, failure_rate=0),
        httpx.Client(base_url=fleet.url, headers={"mj-api-secret": KEYS["bob"]}) as bob,
    ):
        task_id = submit(bob, "bob's, for his team")
        assert finished(bob, task_id)["status"] == "SUCCESS"
    fetch = f"/mj/task/{task_id}/fetch"
    requests: list[tuple[str, str, str, Any]] = [
        (who, "GET", fetch, None) for who in ("alice", "bob", "carol") for _ in range(12)
    ]
    requests += [("bob", "POST", "/mj/task/list-by-ids", {"ids": [task_id]})] * 4
    requests += [("carol", "POST", "/mj/task/list-by-ids", {"ids": [task_id]})] * 4
    workers: set[str] = set()
    # From the second round on, answers come from the workers' L1. The kernel spreads the
    # connections, so rounds go on (a few at most) until both workers have answered.
    for round_number in range(6):
        answers = asyncio.run(_burst(fleet.url, requests))
        seen = Counter(
            (who, answer.status_code, answer.headers.get("x-cache-tier"))
            for (who, *_), answer in zip(requests, answers, strict=True)
            if answer.request.url.path == fetch
        )
        statuses = {(who, status) for who, status, _ in seen}
        # alice sees her own tasks only, even where every worker holds this one in L1.
        assert statuses == {("alice", 404), ("bob", 200), ("carol", 200)}, seen
        listed = [a.json() for (w, m, *_), a in zip(requests, answers, strict=True) if m == "POST"]
        assert all([t["id"] for t in rows] == [task_id] for rows in listed), listed
        workers |= _workers(answers)
        if round_number >= 1 and len(workers) == 2:
            break
    assert len(workers) == 2
    assert seen[("bob", 200, "l1")] > 0 and seen[("alice", 404, "upstream")] == 12


def test_a_quota_is_exact_under_fifty_concurrent_submits(fleet: Fleet, sim: SimProcess) -> None:
    requests = [
        ("carol", "POST", "/mj/submit/imagine", {"prompt": f"burst {n}"}) for n in range(50)
    ]
    # The kernel spreads the connections over the workers, but may hand one worker a whole
    # burst; then the quota is reset and the burst sent again (a few rounds at most), since
    # a burst one worker answered alone proves nothing about the fleet.
    bursts = 0
    while bursts < 5:
        bursts += 1
        fleet.reset_quotas()
        before = submits(sim)
        answers = asyncio.run(_burst(fleet.url, requests))
        statuses = Counter(answer.status_code for answer in answers)
        others = [a.text for a in answers if a.status_code not in (200, 429)]
        assert statuses == {200: QUOTA, 429: 50 - QUOTA}, (statuses, others[:3])
        assert {a.json()["code"] for a in answers if a.status_code == 200} <= {1, 22}
        refused = [a.json()["quota"] for a in answers if a.status_code == 429]
        assert {(q["name"], q["limit"]) for q in refused} == {("submits_per_day", QUOTA)}
        assert submits(sim) - before == QUOTA
        if len(_workers(answers)) == 2:
            break
    assert len(_workers(answers)) == 2
    with httpx.Client(base_url=fleet.url, headers={"mj-api-secret": KEYS["ops"]}) as ops:
        rows = ops.get("/admin/usage", params={"client": "carol"}).json()["rows"]
    assert [row["submitted"] for row in rows] == [QUOTA * bursts]
