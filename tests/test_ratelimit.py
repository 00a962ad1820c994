"""Per-caller rate limits through the real app: exact admission over time, the RateLimit-*
headers and 429 answers, route classes, two gunicorn workers sharing one Redis, a Redis that
goes away, and ``mjgate gen-key``.

Counting tolerance. Callers fire back to back for a bounded window; ``elapsed`` runs from
before the first request was sent to after the last answer came back, so the gateway's own
window lies inside it. A token bucket may admit at most ``burst + rps * elapsed``: that bound
is checked with no slack at all (leases and workers must never let more through). It admits
at least one fewer than the whole tokens of that budget: the token accruing while the window
opens (connection set-up) and closes (the last answer's trip back) may go unspent. Requests
follow each other a millisecond or so apart, so any other whole token is taken within
milliseconds of appearing.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.config import hash_key
from gateway.configfile import load_config
from tests.gunicorn_support import (
    ROOT,
    config_data,
    gateway_process,
    hammer,
    metric,
    worker_cpu_ticks,
    worker_pids,
)
from tests.support import (
    CALLER_KEYS,
    RedisProcess,
    SimProcess,
    caller,
    make_config,
    running_gateway,
    wait_until,
)

RATELIMIT_HEADERS = ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset")
Request = Callable[[httpx.AsyncClient, int], Coroutine[Any, Any, httpx.Response]]


def seed_done(sim: SimProcess) -> str:
    task_id = f"rl{uuid.uuid4().hex[:16]}"
    sim.seed(id=task_id, status="SUCCESS")
    return task_id


def fetching(task_id: str) -> Request:
    async def request(client: httpx.AsyncClient, n: int) -> httpx.Response:
        return await client.get(f"/mj/task/{task_id}/fetch")

    return request


def assert_admitted_exactly(admitted: int, rps: float, burst: int, elapsed: float) -> None:
    budget = burst + rps * elapsed
    assert admitted <= budget, f"admitted {admitted}, more than the budget {budget:.2f}"
    assert admitted >= math.floor(budget) - 1, f"admitted {admitted} of a budget {budget:.2f}"


def warm_cache(url: str, task_id: str) -> None:
    """Fetch once as bob (his own bucket), so alice's fetches are cache hits."""
    response = httpx.get(f"{url}/mj/task/{task_id}/fetch", headers=caller("bob"), timeout=10)
    assert response.status_code == 200, response.text


def assert_limited(response: httpx.Response, retry_after: int | None = None) -> dict[str, Any]:
    """A 429 in the gateway's error shape, with the headers a client needs to back off."""
    assert response.status_code == 429, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert set(body) == {"code", "description", "result", "request_id"}
    assert isinstance(body["code"], int)
    assert body["request_id"] == response.headers["x-request-id"]
    raw = response.headers["retry-after"]
    assert re.fullmatch(r"[1-9][0-9]*", raw), f"Retry-After must be whole seconds: {raw!r}"
    if retry_after is not None:
        assert int(raw) == retry_after
    for name in RATELIMIT_HEADERS:
        assert re.fullmatch(r"[0-9]+", response.headers[name]), name
    assert response.headers["ratelimit-remaining"] == "0"
    return body


# -- admission over time -------------------------------------------------------------------


async def test_burst_then_steady_rate_is_admitted_exactly(
    sims: list[SimProcess], store_url: str
) -> None:
    """rps 5, burst 10, eight callers back to back for 3 s: 10 + 5 * 3 = 25 admitted (see
    the module docstring for the tolerance), every other request 429."""
    rps, burst = 5, 10
    task_id = seed_done(sims[0])
    config = make_config(sims, store_url, rate_limit={"default": {"rps": rps, "burst": burst}})
    with running_gateway(config) as gateway:
        warm_cache(gateway.url, task_id)
        result = await hammer(gateway.url, caller(), 3.0, 8, fetching(task_id))
    assert set(result.statuses) == {200, 429}
    assert_admitted_exactly(result.count(200), rps, burst, result.elapsed_s)
    assert result.count(429) > 100


async def test_concurrent_leases_neither_add_nor_lose_tokens(
    sims: list[SimProcess], store_url: str
) -> None:
    """rps 10, burst 40: a worker takes leases of up to 5 tokens while the bucket is full.
    Eight concurrent callers in one worker must still get exactly 40 + 10 * 3 in 3 s: a
    lease may not hand out more, and a lease taken by one request must not be dropped by
    another request's lease taken at the same time."""
    rps, burst = 10, 40
    task_id = seed_done(sims[0])
    config = make_config(sims, store_url, rate_limit={"default": {"rps": rps, "burst": burst}})
    with running_gateway(config) as gateway:
        warm_cache(gateway.url, task_id)
        result = await hammer(gateway.url, caller(), 3.0, 8, fetching(task_id))
    assert set(result.statuses) == {200, 429}
    assert_admitted_exactly(result.count(200), rps, burst, result.elapsed_s)


async def test_two_gunicorn_workers_on_one_redis_share_the_limit(
    sims: list[SimProcess], redis_server: RedisProcess, tmp_path: Path
) -> None:
    """Two workers, one Redis, sixteen callers for 3 s: together they admit what one process
    admits (rps 5, burst 10: 25), not twice that. Every request opens a new connection, so
    both workers take turns accepting; that both served is checked by each one's CPU time
    growing by a good share of the busier one's."""
    rps, burst = 5, 10
    task_id = seed_done(sims[0])
    config = config_data(
        sims, redis_server.url, rate_limit={"default": {"rps": rps, "burst": burst}}
    )
    with gateway_process(tmp_path, config, workers=2) as gateway:
        pids = worker_pids(gateway.proc.pid)
        assert len(pids) == 2
        warm_cache(gateway.url, task_id)
        before = {pid: worker_cpu_ticks(pid) for pid in pids}
        result = await hammer(gateway.url, caller(), 3.0, 16, fetching(task_id), keepalive=False)
        used = {pid: worker_cpu_ticks(pid) - before[pid] for pid in pids}
    assert set(result.statuses) == {200, 429}
    assert_admitted_exactly(result.count(200), rps, burst, result.elapsed_s)
    assert result.count(429) > 200
    # An idle worker spends well under a tick a second; a serving one many.
    assert min(used.values()) >= max(5, max(used.values()) // 5), used


# -- headers and 429 answers ---------------------------------------------------------------


async def test_ratelimit_headers_are_on_every_authenticated_answer(
    sims: list[SimProcess], store_url: str
) -> None:
    """rps 0.5, burst 5: 200, 404 (unknown task), 400 (bad id), 404 (unknown route) and a
    submit each spend one token and say so; then 429. Reset is when the bucket is full
    again: 2 s per spent token."""
    task_id = seed_done(sims[0])
    config = make_config(sims, store_url, rate_limit={"default": {"rps": 0.5, "burst": 5}})
    calls: list[tuple[str, str, Any, int]] = [
        ("GET", f"/mj/task/{task_id}/fetch", None, 200),
        ("GET", "/mj/task/1700000000000123/fetch", None, 404),
        ("GET", f"/mj/task/{'x' * 65}/fetch", None, 400),
        ("GET", "/mj/no/such/route", None, 404),
        ("POST", "/mj/submit/imagine", {"prompt": "a red fox"}, 200),
    ]
    with running_gateway(config) as gateway, httpx.Client(timeout=10) as http:
        for spent, (method, path, body, status) in enumerate(calls, start=1):
            response = http.request(
                method, gateway.url + path, json=body, headers=caller("alice", "mj-api-secret")
            )
            assert response.status_code == status, (path, response.text)
            assert response.headers["ratelimit-limit"] == "5", path
            assert response.headers["ratelimit-remaining"] == str(5 - spent), path
            assert response.headers["ratelimit-reset"] == str(2 * spent), path
            assert "retry-after" not in response.headers
        request_id = f"req-{uuid.uuid4().hex}"
        limited = http.get(
            f"{gateway.url}/mj/task/{task_id}/fetch",
            headers={**caller("alice", "raw"), "X-Request-Id": request_id},
        )
    body = assert_limited(limited, retry_after=2)
    assert body["request_id"] == request_id
    assert limited.headers["ratelimit-limit"] == "5"
    assert limited.headers["ratelimit-reset"] == "10"
    assert "2 s" in body["description"]


async def test_retry_after_is_rounded_up_to_whole_seconds(sims: list[SimProcess]) -> None:
    """rps 0.4: the next token is 2.5 s away, so Retry-After says 3, and so does the text."""
    task_id = seed_done(sims[0])
    config = make_config(sims, rate_limit={"default": {"rps": 0.4, "burst": 1}})
    with running_gateway(config) as gateway, httpx.Client(timeout=10) as http:
        url = f"{gateway.url}/mj/task/{task_id}/fetch"
        counted = metric(gateway.url, "mjgate_rate_limited_total", client="alice")
        assert http.get(url, headers=caller()).status_code == 200
        body = assert_limited(http.get(url, headers=caller()), retry_after=3)
        assert metric(gateway.url, "mjgate_rate_limited_total", client="alice") == counted + 1
    assert re.search(r"\b3 s\b", body["description"]), body
    assert "alice" in body["description"]


async def test_health_routes_are_never_limited_and_carry_no_ratelimit_headers(
    sims: list[SimProcess], store_url: str
) -> None:
    config = make_config(sims, store_url, rate_limit={"default": {"rps": 0.01, "burst": 1}})
    with running_gateway(config) as gateway, httpx.Client(timeout=10) as http:
        assert http.get(f"{gateway.url}/mj/task/list", headers=caller()).status_code == 200
        assert_limited(http.get(f"{gateway.url}/mj/task/list", headers=caller()))
        for _ in range(15):
            for path in ("/healthz", "/readyz", "/metrics"):
                for headers in (caller(), {}):
                    response = http.get(gateway.url + path, headers=headers)
                    assert response.status_code == 200, (path, response.text)
                    assert not any(h.startswith("ratelimit-") for h in response.headers), path
                    assert "retry-after" not in response.headers


# -- route classes and per-client limits ---------------------------------------------------


async def test_polling_and_submits_spend_separate_budgets(
    sims: list[SimProcess], store_url: str
) -> None:
    """Default limit with classes: submits burst 2, everything else (polling) burst 4. bob
    polls his budget away and can still submit; carol submits hers away and can still poll.
    alice's own limit has no classes: all her routes share one bucket of 3."""
    task_id = seed_done(sims[0])
    slow = 0.01  # one token in 100 s: nothing refills during the test
    default = {
        "rps": slow,
        "burst": 50,
        "submit": {"rps": slow, "burst": 2},
        "query": {"rps": slow, "burst": 4},
    }
    carol_key = "carol-key-0123456789"
    clients = [
        {"name": "alice", "key": CALLER_KEYS["alice"], "rate_limit": {"rps": slow, "burst": 3}},
        {"name": "bob", "key": CALLER_KEYS["bob"], "upstreams": [sims[0].name]},
        {"name": "carol", "key": carol_key},
    ]
    config = make_config(sims, store_url, clients=clients, rate_limit={"default": default})
    as_carol = {"Authorization": f"Bearer {carol_key}"}
    fetch, submit = f"/mj/task/{task_id}/fetch", "/mj/submit/imagine"
    prompt = {"prompt": "a lighthouse at dusk"}

    with running_gateway(config) as gateway, httpx.Client(timeout=10) as http:

        def poll(headers: dict[str, str]) -> httpx.Response:
            return http.get(gateway.url + fetch, headers=headers)

        def post(headers: dict[str, str]) -> httpx.Response:
            return http.post(gateway.url + submit, json=prompt, headers=headers)

        # bob: polling first.
        polls = [poll(caller("bob")) for _ in range(4)]
        assert [r.status_code for r in polls] == [200] * 4
        assert {r.headers["ratelimit-limit"] for r in polls} == {"4"}
        assert_limited(poll(caller("bob")))
        submits = [post(caller("bob")) for _ in range(2)]
        assert [r.status_code for r in submits] == [200, 200], submits[-1].text
        assert [r.headers["ratelimit-remaining"] for r in submits] == ["1", "0"]
        assert {r.headers["ratelimit-limit"] for r in submits} == {"2"}
        assert_limited(post(caller("bob")))
        assert_limited(poll(caller("bob")))

        # carol: submits first.
        assert [post(as_carol).status_code for _ in range(2)] == [200, 200]
        assert_limited(post(as_carol))
        polls = [poll(as_carol) for _ in range(4)]
        assert [r.status_code for r in polls] == [200] * 4
        assert [r.headers["ratelimit-remaining"] for r in polls] == ["3", "2", "1", "0"]
        assert_limited(poll(as_carol))

        # alice: her own limit, one bucket for every route.
        mixed = [poll(caller()), post(caller()), poll(caller())]
        assert [r.status_code for r in mixed] == [200, 200, 200]
        assert {r.headers["ratelimit-limit"] for r in mixed} == {"3"}
        assert_limited(post(caller()))
        assert_limited(poll(caller()))


# -- the store goes away ---------------------------------------------------------------------


def own_redis() -> RedisProcess:
    redis = RedisProcess()
    redis.start()
    return redis


def rate_limit_store_errors(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        line
        for line in lines
        if line.get("event") == "store_error" and line.get("purpose") == "rate_limit"
    ]


async def test_redis_down_with_allow_admits_and_warns_once_per_outage(
    sims: list[SimProcess], tmp_path: Path
) -> None:
    """``mjgate serve`` on a Redis that stops: with ``on_store_error: allow`` every request
    is admitted (far past the burst of 2), and the outage is logged once, not per request.
    Redis back, then down again: a second outage, a second warning."""
    redis = own_redis()
    task_id = seed_done(sims[0])
    limits = {"default": {"rps": 0.01, "burst": 2}, "on_store_error": "allow"}
    config = config_data(sims, redis.url, rate_limit=limits)
    try:
        with gateway_process(tmp_path, config) as gateway, httpx.Client(timeout=10) as http:
            url = f"{gateway.url}/mj/task/{task_id}/fetch"
            assert http.get(url, headers=caller()).status_code == 200
            redis.stop()
            answers = [http.get(url, headers=caller()) for _ in range(30)]
            assert [r.status_code for r in answers] == [200] * 30
            assert all("ratelimit-limit" in r.headers for r in answers)
            first_outage = rate_limit_store_errors(gateway.log_lines())

            redis.start()  # same port, empty: a fresh bucket

            def back() -> bool:
                assert http.get(url, headers=caller()).status_code in (200, 429)
                return bool(gateway.events("rate_limit_store_back"))

            # The store may keep failing fast for a moment after an outage: bounded wait.
            wait_until(back, timeout_s=5, what="the limiter to use Redis again")
            redis.stop()
            answers = [http.get(url, headers=caller()) for _ in range(10)]
            assert [r.status_code for r in answers] == [200] * 10
            time.sleep(0.2)  # let the last lines reach the file
            lines = gateway.log_lines()
            # Counted too: one failed store call per request while Redis was away.
            failed = metric(gateway.url, "mjgate_store_errors_total", operation="take_tokens")
            assert failed >= 40
    finally:
        redis.stop()
    assert len(first_outage) == 1, first_outage
    assert first_outage[0]["level"] == "warning"
    assert first_outage[0]["allowing"] is True
    assert len(rate_limit_store_errors(lines)) == 2
    assert any(line.get("event") == "rate_limit_store_back" for line in lines)


async def test_redis_down_with_deny_answers_429_until_it_is_back(
    sims: list[SimProcess],
) -> None:
    """Burst 7: leases of one token, so no token taken before the outage is left to spend."""
    redis = own_redis()
    task_id = seed_done(sims[0])
    limits = {"default": {"rps": 100, "burst": 7}, "on_store_error": "deny"}
    config = make_config(sims, redis.url, rate_limit=limits)
    try:
        with running_gateway(config) as gateway, httpx.Client(timeout=10) as http:
            url = f"{gateway.url}/mj/task/{task_id}/fetch"
            assert http.get(url, headers=caller()).status_code == 200
            redis.stop()
            for _ in range(5):
                body = assert_limited(http.get(url, headers=caller()), retry_after=1)
                assert "unavailable" in body["description"], body
                assert "retry" in body["description"], body
            redis.start()
            wait_until(
                lambda: http.get(url, headers=caller()).status_code == 200,
                timeout_s=5,
                what="requests admitted again",
            )
    finally:
        redis.stop()


# -- gen-key -------------------------------------------------------------------------------


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
        check=False,
    )


def test_gen_key_prints_a_key_and_a_snippet_that_authenticates_it(
    sims: list[SimProcess], tmp_path: Path
) -> None:
    made = run_cli("gen-key", "dana.ci-bot")
    assert made.returncode == 0, made.stderr
    keys = re.findall(r"^#\s+(\S{32,})$", made.stdout, flags=re.MULTILINE)
    assert len(keys) == 1, made.stdout
    key = keys[0]
    digests = re.findall(r"key_sha256:\s*([0-9a-f]{64})\s*$", made.stdout, flags=re.MULTILINE)
    assert digests == [hash_key(key)]
    hashed = run_cli("hash-key", stdin=key + "\n")
    assert hashed.returncode == 0, hashed.stderr
    assert hashed.stdout.strip() == digests[0]
    # The key itself appears only in the comment meant for the person, never as config.
    snippet = yaml.safe_load(made.stdout)
    assert snippet == [{"name": "dana.ci-bot", "key_sha256": digests[0]}]
    assert key not in yaml.safe_dump(snippet)

    # Pasted under clients: in a config, it lets exactly that key in.
    base = config_data(sims)
    del base["clients"]
    path = tmp_path / "with-dana.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False) + "clients:\n" + made.stdout)
    config = load_config(path)
    task_id = seed_done(sims[0])
    with running_gateway(config) as gateway, httpx.Client(timeout=10) as http:
        url = f"{gateway.url}/mj/task/{task_id}/fetch"
        assert http.get(url, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert http.get(url, headers={"mj-api-secret": key}).status_code == 200
        assert http.get(url, headers={"mj-api-secret": key[:-1]}).status_code == 401
        assert http.get(url, headers=caller()).status_code == 401  # alice is not in this file

    again = run_cli("gen-key", "dana.ci-bot")
    assert again.returncode == 0
    assert key not in again.stdout, "every key must be new"


@pytest.mark.parametrize("name", ["", "has space", "x" * 65, "semi;colon"])
def test_gen_key_refuses_a_name_the_config_would_refuse(name: str) -> None:
    made = run_cli("gen-key", name)
    assert made.returncode == 2
    assert made.stdout == ""
    assert "name" in made.stderr
