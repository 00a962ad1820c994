"""The gateway under a real gunicorn, started exactly as deployed: ``gunicorn -c
deploy/gunicorn.conf.py`` with ``MJGATE_CONFIG`` (whose ``server`` section says where to
listen), ``WEB_CONCURRENCY=2`` and a ``PROMETHEUS_MULTIPROC_DIR``, a real Redis and real sims.

Which worker answered a request is read from prometheus-client's per-process files in the
metrics directory (``counter_<pid>.db``): each worker counts the requests it answered there,
and ``/metrics`` sums the files. Every load generator here opens a new connection per request,
so the kernel hands requests to whichever worker accepts first.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from gateway.configfile import config_from_dict
from gateway.master import bind_address
from tests.gunicorn_support import stop_process
from tests.redis_topologies import listen_port
from tests.support import (
    CALLER_KEYS,
    RedisProcess,
    SimProcess,
    caller,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = Path(sys.executable).parent / "gunicorn"
FETCH_ROUTE = "/mj/task/{task_id}/fetch"
LIMITED_KEY = "limited-key-0123456789"
BURST = 10

pytestmark = pytest.mark.timeout(90)


# -- a gunicorn master with its workers ------------------------------------------------------


@dataclass
class Gunicorn:
    proc: subprocess.Popen[bytes]
    url: str
    metrics_dir: Path
    stderr_path: Path
    workers: int
    config_path: Path

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def booted_pids(self) -> list[int]:
        """Worker pids in boot order, from gunicorn's "Booting worker with pid" lines."""
        return [int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", self.stderr)]

    def count(self, text: str) -> int:
        return self.stderr.count(text)

    def wait_started(self, workers: int, timeout_s: float = 30) -> None:
        """Until ``workers`` lifespans have completed start-up (uvicorn logs each)."""

        def started() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited:\n{self.stderr[-3000:]}")
            return self.count("Application startup complete.") >= workers

        wait_until(started, timeout_s=timeout_s, what=f"{workers} gunicorn workers")

    def served_by_pid(self) -> dict[int, Counter[tuple[str, str, str]]]:
        """Requests each worker answered so far, by (route, status, cache), from its own
        prometheus-client file: the per-process numbers that ``/metrics`` adds up."""
        served: dict[int, Counter[tuple[str, str, str]]] = {}
        for path in self.metrics_dir.glob("counter_*.db"):
            pid = int(path.stem.split("_", 1)[1])
            counts: Counter[tuple[str, str, str]] = Counter()
            metrics = MultiProcessCollector.merge([str(path)], accumulate=False)  # type: ignore[no-untyped-call]
            for metric in metrics:
                for sample in metric.samples:
                    if sample.name == "mjgate_requests_total":
                        labels = sample.labels
                        key = (labels["route"], labels["status"], labels["cache"])
                        counts[key] += int(sample.value)
            served[pid] = counts
        return served

    def stop(self) -> None:
        stop_process(self.proc, timeout_s=40)


def gunicorn_env(config_path: Path, **extra: str) -> dict[str, str]:
    """This environment without the gateway's variables, then ``MJGATE_CONFIG`` and ``extra``."""
    drop = ("REDIS_URL", "MJGATE_CONFIG", "MJGATE_BIND", "WEB_CONCURRENCY")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "MJGATE_CONFIG": str(config_path), **extra}


def with_server(config: dict[str, Any]) -> dict[str, Any]:
    """The config listening on a free loopback port, unless it says where itself."""
    return {"server": {"host": "127.0.0.1", "port": listen_port()}, **config}


def write_config(path: Path, config: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(config, sort_keys=False))


@contextmanager
def gunicorn(
    tmp_path: Path,
    config: dict[str, Any],
    workers: int = 2,
    env: dict[str, str] | None = None,
    args: Sequence[str] = (),
) -> Iterator[Gunicorn]:
    """``gunicorn -c deploy/gunicorn.conf.py`` as the image runs it, listening where the
    config's ``server`` section says (a free loopback port when the test sets none), or
    where ``MJGATE_BIND`` in ``env`` or ``--bind`` in ``args`` says instead."""
    config = with_server(config)
    name = uuid.uuid4().hex[:8]
    config_path = tmp_path / f"mjgate-{name}.yaml"
    write_config(config_path, config)
    metrics_dir = tmp_path / f"metrics-{name}"
    env = gunicorn_env(
        config_path,
        WEB_CONCURRENCY=str(workers),
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
        **(env or {}),
    )
    if "--bind" in args:
        address = args[args.index("--bind") + 1]
    else:
        address = env.get("MJGATE_BIND") or f"{config['server']['host']}:{config['server']['port']}"
    stderr_path = tmp_path / f"gunicorn-{name}.err"
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen(
            [str(GUNICORN), "-c", "deploy/gunicorn.conf.py", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,  # the gateway's JSON lines: not needed here
            stderr=err,
        )
    server = Gunicorn(proc, f"http://{address}", metrics_dir, stderr_path, workers, config_path)
    try:
        server.wait_started(workers)
        yield server
    finally:
        server.stop()


def config_data(sims: list[SimProcess], redis_url: str, **sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "redis": {"url": redis_url, "key_prefix": f"g{uuid.uuid4().hex[:12]}"},
        "upstreams": [s.upstream_config(max_rps=10_000, max_concurrency=256) for s in sims],
        "clients": [
            {"name": "alice", "key": CALLER_KEYS["alice"]},
            {"name": "bob", "key": CALLER_KEYS["bob"], "upstreams": [sims[0].name]},
            {
                "name": "limited",
                "key": LIMITED_KEY,
                "rate_limit": {"rps": 0.001, "burst": BURST},
            },
        ],
        "fanout": {"deadline_s": 3},
        "rate_limit": {"default": {"rps": 100_000, "burst": 100_000}},
        "logging": {"level": "warning", "format": "json"},
    }
    data.update(sections)
    return data


def new_id() -> str:
    return f"{int(time.time() * 1000)}{uuid.uuid4().int % 10_000:04d}"


def fresh_connections(url: str, headers: dict[str, str], **kwargs: Any) -> httpx.AsyncClient:
    """A client that opens a new connection for every request."""
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
    return httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=20, **kwargs)


async def send_many(
    url: str, headers: dict[str, str], paths: list[str], concurrency: int = 8
) -> list[httpx.Response]:
    """GET each path over its own new connection, ``concurrency`` at a time."""
    gate = asyncio.Semaphore(concurrency)
    async with fresh_connections(url, headers) as client:

        async def one(path: str) -> httpx.Response:
            async with gate:
                return await client.get(path)

        return list(await asyncio.gather(*(one(path) for path in paths)))


def scrape_requests(url: str) -> Counter[tuple[str, str, str]]:
    """``mjgate_requests_total`` by (route, status, cache), from one ``/metrics`` scrape."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    counts: Counter[tuple[str, str, str]] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "mjgate_requests_total":
                labels = sample.labels
                counts[(labels["route"], labels["status"], labels["cache"])] += int(sample.value)
    return counts


def delta(
    after: dict[int, Counter[tuple[str, str, str]]],
    before: dict[int, Counter[tuple[str, str, str]]],
) -> dict[int, int]:
    """Requests each worker answered between two readings."""
    return {
        pid: sum(counts.values()) - sum(before.get(pid, Counter()).values())
        for pid, counts in after.items()
    }


def settled(
    server: Gunicorn, before: dict[int, Counter[tuple[str, str, str]]], total: int
) -> dict[int, int]:
    """Per-worker deltas once ``total`` requests are counted: a worker counts a request just
    after its answer went out, so the count may trail the last answer by a moment."""
    result: dict[int, int] = {}

    def counted() -> bool:
        nonlocal result
        result = delta(server.served_by_pid(), before)
        return sum(result.values()) >= total

    wait_until(counted, timeout_s=5, what=f"{total} requests counted")
    return result


# -- two workers on one Redis -----------------------------------------------------------------


@pytest.fixture(scope="module")
def two_workers(
    tmp_path_factory: pytest.TempPathFactory,
    session_sims: list[SimProcess],
    redis_server: RedisProcess,
) -> Iterator[Gunicorn]:
    tmp_path = tmp_path_factory.mktemp("gunicorn")
    with gunicorn(tmp_path, config_data(session_sims, redis_server.url)) as server:
        yield server


def test_gunicorn_runs_the_configured_worker_class_and_worker_count(
    two_workers: Gunicorn,
) -> None:
    assert len(two_workers.booted_pids()) == 2
    assert "gateway.worker.MjgateWorker" in two_workers.stderr
    ready = httpx.get(f"{two_workers.url}/readyz", timeout=5)
    assert ready.status_code == 200
    assert ready.json()["store"] == "ok"


def test_requests_spread_over_both_workers_and_one_scrape_sums_them(
    two_workers: Gunicorn, sims: list[SimProcess]
) -> None:
    task_id = new_id()
    sims[0].seed(id=task_id, status="SUCCESS")
    before_scrape = scrape_requests(two_workers.url)
    before = two_workers.served_by_pid()

    responses = asyncio.run(
        send_many(two_workers.url, caller(), [f"/mj/task/{task_id}/fetch"] * 60)
    )
    assert [r.status_code for r in responses] == [200] * 60

    per_worker = settled(two_workers, before, 60)
    assert set(per_worker) >= set(two_workers.booted_pids())
    busy = [pid for pid, n in per_worker.items() if n > 0]
    assert len(busy) == 2, f"one worker answered everything: {per_worker}"
    assert sum(per_worker.values()) == 60
    # One scrape, answered by one worker, counts what both answered.
    after_scrape = scrape_requests(two_workers.url)
    scraped = sum(after_scrape.values()) - sum(before_scrape.values())
    assert scraped == 60, (scraped, per_worker)
    assert all(n < 60 for n in per_worker.values())


def test_a_task_cached_through_one_worker_is_a_hit_on_the_other(
    two_workers: Gunicorn, sims: list[SimProcess]
) -> None:
    """The first fetch fills the answering worker's L1 and Redis. A HIT from tier ``store``
    can only come from a worker without the L1 entry: the other one."""
    task_id = new_id()
    sims[0].seed(id=task_id, status="SUCCESS")
    before = two_workers.served_by_pid()
    with httpx.Client(base_url=two_workers.url, headers=caller(), timeout=10) as client:
        first = client.get(f"/mj/task/{task_id}/fetch")
    assert (first.status_code, first.headers["x-cache"]) == (200, "MISS")
    first_pid = next(pid for pid, n in settled(two_workers, before, 1).items() if n)
    upstream_calls = sum(int(sim.stats()["total"]) for sim in sims)

    tiers: Counter[str] = Counter()
    for _ in range(20):
        responses = asyncio.run(
            send_many(two_workers.url, caller(), [f"/mj/task/{task_id}/fetch"] * 8)
        )
        for response in responses:
            assert response.status_code == 200
            # Concurrent misses of one worker's L1 share one store read: COALESCED.
            assert response.headers["x-cache"] in ("HIT", "COALESCED")
            assert response.content == first.content
            tiers[response.headers["x-cache-tier"]] += 1
        if tiers["store"]:
            break
    assert tiers["store"] >= 1, tiers  # the other worker read Redis, then its own L1
    assert set(tiers) <= {"l1", "store"}, tiers
    assert sum(int(sim.stats()["total"]) for sim in sims) == upstream_calls

    served = settled(two_workers, before, 1 + sum(tiers.values()))
    others = [pid for pid, n in served.items() if n and pid != first_pid]
    assert others, served


def test_an_owner_learned_by_one_worker_routes_the_other(
    two_workers: Gunicorn, sims: list[SimProcess]
) -> None:
    """A submit records the owner in Redis; fetches over new connections land on both
    workers, and no upstream but the owner is ever asked about the task."""
    before = two_workers.served_by_pid()
    with httpx.Client(base_url=two_workers.url, headers=caller(), timeout=10) as client:
        submitted = client.post("/mj/submit/imagine", json={"prompt": "a fox in the snow"})
    assert submitted.status_code == 200
    assert submitted.json()["code"] == 1
    task_id = submitted.json()["result"]
    submitter = next(pid for pid, n in settled(two_workers, before, 1).items() if n)
    owner = next(sim for sim in sims if sim.stats()["submits"])
    others_before = {sim.name: int(sim.stats()["total"]) for sim in sims if sim is not owner}

    other = next(pid for pid in two_workers.booted_pids() if pid != submitter)
    between = two_workers.served_by_pid()
    sent = 0
    caches: list[str] = []
    for _ in range(10):
        responses = asyncio.run(
            send_many(two_workers.url, caller(), [f"/mj/task/{task_id}/fetch"] * 8)
        )
        sent += len(responses)
        caches += [f"{r.headers.get('x-cache')}/{r.headers.get('x-cache-tier')}" for r in responses]
        assert all(r.status_code == 200 for r in responses)
        assert all(r.json()["id"] == task_id for r in responses)
        if settled(two_workers, between, sent).get(other, 0):
            break
    served = settled(two_workers, between, sent)
    assert served.get(other, 0) > 0, f"the worker that did not submit never answered: {served}"
    assert {sim.name: int(sim.stats()["total"]) for sim in sims if sim is not owner} == (
        others_before
    )
    assert owner.count("GET /mj/task/{id}/fetch") >= 1, (owner.stats()["requests"], caches)


def test_a_caller_limit_admits_exactly_burst_over_both_workers(
    two_workers: Gunicorn, sims: list[SimProcess]
) -> None:
    """Requests go on until each worker has answered at least ``BURST`` of them, so that
    per-worker buckets would have admitted ``2 * BURST``; the shared bucket admits ``BURST``."""
    task_id = new_id()
    sims[0].seed(id=task_id, status="SUCCESS")
    headers = {"Authorization": f"Bearer {LIMITED_KEY}"}
    before = two_workers.served_by_pid()
    statuses: Counter[int] = Counter()
    for _ in range(20):
        responses = asyncio.run(
            send_many(two_workers.url, headers, [f"/mj/task/{task_id}/fetch"] * BURST)
        )
        statuses.update(r.status_code for r in responses)
        served = settled(two_workers, before, statuses.total())
        if len(served) >= 2 and all(n >= BURST for n in served.values()):
            break
    assert len(served) >= 2 and all(n >= BURST for n in served.values()), served
    assert set(statuses) == {200, 429}
    assert statuses[200] == BURST, (statuses, served)


# -- shutdown and reload under load -----------------------------------------------------------


@dataclass
class Outcome:
    stream: str
    started: float
    ended: float
    kind: str  # ok | refused | reset | broken
    detail: str = ""


@dataclass
class LoadRun:
    outcomes: list[Outcome] = field(default_factory=list)
    signalled_at: float = 0.0

    def kinds(self, before_signal: bool) -> Counter[str]:
        return Counter(
            o.kind for o in self.outcomes if (o.started < self.signalled_at) == before_signal
        )

    def in_flight_at_signal(self, stream: str) -> int:
        return sum(
            1
            for o in self.outcomes
            if o.stream == stream and o.started < self.signalled_at < o.ended
        )

    def describe(self) -> str:
        failures = [o for o in self.outcomes if o.kind != "ok"][:5]
        streams = sorted({o.stream for o in self.outcomes})
        slowest = {
            name: round(
                max((o.ended - o.started for o in self.outcomes if o.stream == name), default=0)
                * 1000
            )
            for name in streams
        }
        return (
            f"sent before the signal: {dict(self.kinds(True))}; "
            f"after: {dict(self.kinds(False))}; "
            f"in flight at the signal: { ({n: self.in_flight_at_signal(n) for n in streams}) }; "
            f"slowest answer (ms): {slowest}; first failures: {failures}"
        )


Check = Callable[[bytes], bool]
Request = Callable[[int], tuple[str, str, bytes | None, Check]]


@dataclass
class Stream:
    """``callers`` callers sending ``request(n)`` back to back."""

    name: str
    request: Request
    callers: int


async def run_load(
    url: str,
    streams: list[Stream],
    *,
    signal_after_s: float,
    send_signal: Callable[[], None],
    keep_sending_s: float,
    max_requests: int = 20_000,
) -> LoadRun:
    """Every caller sends requests back to back, each over a new connection; after
    ``signal_after_s`` the signal goes out; callers keep sending for ``keep_sending_s`` more
    (at most ``max_requests`` in all). Every request is classified: ``ok`` (a complete 200
    whose body passed the check), ``refused`` (no connection), ``reset`` (connected, then
    closed before any byte of an answer), ``broken`` (anything else: another status, a body
    that fails the check, an answer cut off)."""
    run = LoadRun()
    stop_at = time.monotonic() + signal_after_s + keep_sending_s
    numbers = iter(range(max_requests))

    async with fresh_connections(url, caller()) as client:

        async def one(stream: Stream, n: int) -> Outcome:
            method, path, body, check = stream.request(n)
            began = time.monotonic()

            def outcome(kind: str, detail: str = "") -> Outcome:
                return Outcome(stream.name, began, time.monotonic(), kind, detail)

            try:
                async with client.stream(method, path, content=body) as response:
                    try:
                        content = await response.aread()
                    except httpx.HTTPError as exc:
                        return outcome("broken", f"answer cut off: {exc!r}")
            except httpx.ConnectError as exc:
                return outcome("refused", repr(exc))
            except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
                return outcome("reset", repr(exc))
            except httpx.HTTPError as exc:
                return outcome("broken", repr(exc))
            if response.status_code != 200:
                return outcome("broken", f"{response.status_code}: {content[:200]!r}")
            if not check(content):
                return outcome("broken", f"bad body: {content[:200]!r}")
            return outcome("ok")

        async def caller_loop(stream: Stream) -> None:
            while time.monotonic() < stop_at:
                n = next(numbers, None)
                if n is None:
                    return
                result = await one(stream, n)
                run.outcomes.append(result)
                if result.kind != "ok":
                    await asyncio.sleep(0.05)  # a closed listener refuses at once: no spin

        async def signaller() -> None:
            await asyncio.sleep(signal_after_s)
            run.signalled_at = time.monotonic()
            send_signal()

        callers = [caller_loop(stream) for stream in streams for _ in range(stream.callers)]
        await asyncio.gather(signaller(), *callers)
    return run


@dataclass
class Workload:
    java_ids: list[str]
    relay_ids: list[str]
    cached_id: str
    cached_body: bytes = b""

    def streams(self) -> list[Stream]:
        return [
            Stream("upstream", self.slow_request, callers=16),
            Stream("cached", self.cached_request, callers=8),
        ]

    def slow_request(self, n: int) -> tuple[str, str, bytes | None, Check]:
        """Alternately a fetch of one running task and a list over tasks of both upstreams
        (a fan-out to two upstreams under one deadline). Running tasks are never cached and
        ``inflight_ttl_ms: 0`` makes every request wait ~300 ms for its upstream."""
        if n % 2 == 0:
            task_id = self.java_ids[n % len(self.java_ids)]

            def check_task(body: bytes) -> bool:
                task = orjson.loads(body)
                return bool(task["id"] == task_id and task["status"] == "IN_PROGRESS")

            return "GET", f"/mj/task/{task_id}/fetch", None, check_task
        ids = [self.java_ids[n % len(self.java_ids)], self.relay_ids[n % len(self.relay_ids)]]

        def check_list(body: bytes) -> bool:
            return [task["id"] for task in orjson.loads(body)] == ids

        return "POST", "/mj/task/list-by-condition", orjson.dumps({"ids": ids}), check_list

    def cached_request(self, n: int) -> tuple[str, str, bytes | None, Check]:
        """A cached terminal task: answered in a millisecond, so new connections arrive
        at a high rate, as they do in front of a busy gateway."""
        return "GET", f"/mj/task/{self.cached_id}/fetch", None, self.cached_body.__eq__

    def warm(self, url: str) -> None:
        """One lookup per id: owners known, the terminal task cached."""
        with httpx.Client(base_url=url, headers=caller(), timeout=20) as client:
            ids = self.java_ids + self.relay_ids
            for start in range(0, len(ids), 16):
                listed = client.post("/mj/task/list-by-ids", json={"ids": ids[start : start + 16]})
                assert listed.status_code == 200
            self.cached_body = client.get(f"/mj/task/{self.cached_id}/fetch").content


@pytest.fixture
def workload(sims: list[SimProcess]) -> Iterator[Workload]:
    """Running tasks on the java and relay sims, each answering after ~300 ms, and one
    finished task."""
    java, relay = sims[0], sims[2]
    load = Workload(
        java_ids=[new_id() + f"{i:02d}" for i in range(32)],
        relay_ids=[new_id() + f"{i:02d}" for i in range(32, 64)],
        cached_id=new_id() + "99",
    )
    for task_id in load.java_ids:
        java.seed(id=task_id, status="IN_PROGRESS")
    for task_id in load.relay_ids:
        relay.seed(id=task_id, status="IN_PROGRESS")
    java.seed(id=load.cached_id, status="SUCCESS")
    java.faults(latency_ms=300)
    relay.faults(latency_ms=300)
    yield load
    java.faults(latency_ms=0)
    relay.faults(latency_ms=0)


def test_sigterm_under_load_finishes_every_request_already_sent(
    tmp_path: Path, sims: list[SimProcess], redis_server: RedisProcess, workload: Workload
) -> None:
    config = config_data(sims, redis_server.url, cache={"inflight_ttl_ms": 0})
    with gunicorn(tmp_path, config) as server:
        workload.warm(server.url)
        run = asyncio.run(
            run_load(
                server.url,
                workload.streams(),
                signal_after_s=1.2,
                send_signal=lambda: server.proc.send_signal(signal.SIGTERM),
                keep_sending_s=1.0,
            )
        )
        exit_code = server.proc.wait(timeout=40)
        stderr = server.stderr
    print(run.describe())
    before, after = run.kinds(True), run.kinds(False)
    # Every request sent before SIGTERM got a complete, correct 200, among them those that
    # were waiting on their upstreams (fetches and fan-outs) when the signal came.
    assert set(before) == {"ok"}, run.describe()
    assert run.in_flight_at_signal("upstream") >= 8, run.describe()
    # After it the listening socket closes: a request is answered in full, or finds no
    # listener (refused). None is reset without an answer, cut off or answered wrongly.
    assert not after["broken"], run.describe()
    assert not after["reset"], run.describe()
    assert after["refused"] >= 1, run.describe()
    assert exit_code == 0
    # Both workers ran their lifespan shutdown: upstream clients and the store pool closed.
    assert stderr.count("Application shutdown complete.") == 2, stderr[-3000:]


def test_a_rolling_reload_under_load_loses_no_request(
    tmp_path: Path, sims: list[SimProcess], redis_server: RedisProcess, workload: Workload
) -> None:
    """SIGHUP: the master keeps the listening socket, starts two new workers and stops the
    old ones gracefully. The socket never closes, so no request may fail in any way."""
    config = config_data(sims, redis_server.url, cache={"inflight_ttl_ms": 0})
    with gunicorn(tmp_path, config) as server:
        workload.warm(server.url)
        old_pids = server.booted_pids()
        run = asyncio.run(
            run_load(
                server.url,
                workload.streams(),
                signal_after_s=1.0,
                send_signal=lambda: server.proc.send_signal(signal.SIGHUP),
                keep_sending_s=3.5,
            )
        )
        server.wait_started(4)
        new_pids = [pid for pid in server.booted_pids() if pid not in old_pids]
        wait_until(
            lambda: server.count("Application shutdown complete.") >= 2,
            timeout_s=40,
            what="the old workers to finish",
        )
        served = server.served_by_pid()
    print(run.describe())
    assert len(new_pids) == 2
    assert set(run.kinds(True)) == {"ok"}, run.describe()
    assert set(run.kinds(False)) == {"ok"}, run.describe()
    assert run.in_flight_at_signal("upstream") >= 8, run.describe()
    # The new workers took the traffic over.
    assert all(sum(served.get(pid, Counter()).values()) > 0 for pid in new_pids), served


# -- where it listens, config errors, reloads ------------------------------------------------


def test_gunicorn_listens_only_where_the_config_says(two_workers: Gunicorn) -> None:
    """``server.host`` and ``server.port`` decide (gunicorn used to listen on 0.0.0.0:8080
    whatever they said): on 127.0.0.1 only, so another loopback address is refused."""
    address = two_workers.url.removeprefix("http://")
    assert f"Listening at: http://{address} " in two_workers.stderr
    assert "MJGATE_BIND or --bind" not in two_workers.stderr
    assert httpx.get(f"{two_workers.url}/healthz", timeout=5).status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.2:{address.rsplit(':', 1)[1]}/healthz", timeout=5)


@pytest.mark.parametrize("how", ["MJGATE_BIND", "--bind"])
def test_mjgate_bind_or_bind_overrides_the_config_and_says_so(
    tmp_path: Path, sims: list[SimProcess], how: str
) -> None:
    config = with_server(config_data(sims, ""))
    configured = f"127.0.0.1:{config['server']['port']}"
    override = f"127.0.0.1:{listen_port()}"
    env = {"MJGATE_BIND": override} if how == "MJGATE_BIND" else {}
    args = ("--bind", override) if how == "--bind" else ()
    with gunicorn(tmp_path, config, workers=1, env=env, args=args) as server:
        assert server.url == f"http://{override}"
        assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://{configured}/healthz", timeout=5)
        warning = f"listening on {override} (MJGATE_BIND or --bind), not on {configured}"
        assert server.count(warning) == 1


def test_the_address_of_the_config_in_gunicorns_form(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MJGATE_BIND", raising=False)
    upstream = {"name": "main", "base_url": "http://127.0.0.1:9", "key": "upstream-key-0123"}
    document = {"upstreams": [upstream], "allow_anonymous": True}
    config = config_from_dict({**document, "server": {"host": "::1", "port": 28480}}, env={})
    assert bind_address(config) == "[::1]:28480"
    monkeypatch.setenv("MJGATE_BIND", "0.0.0.0:9000")
    assert bind_address(config) == "0.0.0.0:9000"


BROKEN_CONFIGS = {
    "invalid values": (
        "upstreams:\n  - {name: main, base_url: 'ftp://x', auth: nope, key: k-0123456789}\n"
        "clients: []\n",
        3,
    ),
    "invalid YAML": ("upstreams: [\n", 1),
    "no such file": (None, 1),
}


@pytest.mark.parametrize("broken", list(BROKEN_CONFIGS))
def test_a_config_error_stops_gunicorn_with_the_lines_mjgate_serve_prints(
    tmp_path: Path, broken: str
) -> None:
    """One line per problem and exit status 2, exactly as ``mjgate serve`` (it used to be a
    74-line traceback and status 3)."""
    text, problems = BROKEN_CONFIGS[broken]
    path = tmp_path / "broken.yaml"
    if text is not None:
        path.write_text(text)
    command = [str(GUNICORN), "-c", "deploy/gunicorn.conf.py"]
    under_gunicorn = subprocess.run(
        command, cwd=ROOT, env=gunicorn_env(path), capture_output=True, text=True, timeout=60
    )
    serve = [str(GUNICORN.parent / "mjgate"), "serve", "--config", str(path)]
    served = subprocess.run(serve, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert under_gunicorn.returncode == served.returncode == 2
    assert under_gunicorn.stderr == served.stderr
    lines = under_gunicorn.stderr.splitlines()
    assert lines[0] == f"mjgate: invalid config {path}:"
    assert len(lines) == 1 + problems, lines


ROTATED_KEY = "alice-rotated-key-7Hq2Zp"


@pytest.mark.parametrize("breakage", ["invalid values", "address in use"])
def test_a_reload_with_a_broken_config_keeps_the_running_workers(
    tmp_path: Path, sims: list[SimProcess], redis_server: RedisProcess, breakage: str
) -> None:
    """SIGHUP with a broken config used to stop the whole gateway ("Worker failed to
    boot", master gone, connections refused). Now the reload is refused, one line per
    problem, and the same workers keep serving; once fixed, a SIGHUP applies it."""
    task_id = new_id()
    sims[0].seed(id=task_id, status="SUCCESS")
    with gunicorn(tmp_path, config_data(sims, redis_server.url)) as server:
        config = yaml.safe_load(server.config_path.read_text())
        workers = server.booted_pids()
        with socket.create_server(("127.0.0.1", listen_port())) as held:
            if breakage == "address in use":
                busy = held.getsockname()[1]
                server_section = {"host": "127.0.0.1", "port": busy}
                write_config(server.config_path, {**config, "server": server_section})
                problems = 1
            else:
                broken = {**config, "upstreams": [{**config["upstreams"][0], "auth": "nope"}]}
                write_config(server.config_path, {**broken, "fanout": {"deadline_s": -1}})
                problems = 2
            server.proc.send_signal(signal.SIGHUP)
            refused = f"reload of {server.config_path} refused, the running config stays: "
            wait_until(lambda: server.count(refused) == problems, what="the refusal")
        fetch = f"{server.url}/mj/task/{task_id}/fetch"
        assert httpx.get(fetch, headers=caller("alice"), timeout=10).status_code == 200
        assert server.proc.poll() is None
        assert server.booted_pids() == workers
        assert "Application shutdown complete." not in server.stderr

        alice = {"name": "alice", "key": ROTATED_KEY}
        write_config(server.config_path, {**config, "clients": [alice]})
        server.proc.send_signal(signal.SIGHUP)
        server.wait_started(4)
        wait_until(
            lambda: server.count("Application shutdown complete.") == 2,
            timeout_s=40,
            what="the old workers to finish",
        )
        rotated = {"Authorization": f"Bearer {ROTATED_KEY}"}
        assert httpx.get(fetch, headers=rotated, timeout=10).status_code == 200
        assert httpx.get(fetch, headers=caller("alice"), timeout=10).status_code == 401
        assert server.count(refused) == problems
