"""The miss path: fetch of a running task, owner known, vs a bare proxy.

One run, one machine, same wrk settings for both targets:

- ``mjgate``: ``python -m gateway serve`` configured like production (Redis, a real client
  key with a rate limit, metrics on, JSON access log at ``info`` written to a file), with
  ``cache.inflight_ttl_ms: 1``, so a running task's cached copy is stale by the next request
  and every fetch goes upstream; every id was fetched once before, so its owner is known;
- ``bare-proxy``: ``bench/bare_proxy.py``, a Starlette route that checks the caller key and
  forwards with one pooled aiohttp session, same uvicorn settings (the Python ceiling).

Both fetch ``--tasks`` IN_PROGRESS tasks (default 300) round-robin (a wrk Lua script), from
one sim. The servers under test run on the first core; wrk, the sim and redis-server (the
helpers) on the second, so the first core's time is the proxy's alone. Each round runs both
targets in alternating order; the per-round ratio cancels the machine's drift between rounds.

Target (issue 11): median per-round ratio mjgate / bare-proxy >= 0.5.
Needs: wrk, redis-server on PATH (apt-get install -y wrk redis-server).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.common import (
    CLIENT_KEY,
    LOAD_CORE,
    SERVER_CORE,
    BenchError,
    CpuMeter,
    Gateway,
    Processes,
    QuietWait,
    RedisCounter,
    Sim,
    Verdict,
    WrkResult,
    add_quiet_wait,
    add_wrk_options,
    alternating,
    bench_main,
    bench_parser,
    caller_headers,
    gateway_config,
    machine_note,
    median,
    need,
    print_table,
    run_wrk,
    start_bench_server,
    start_gateway,
    start_redis,
    start_sim,
)

__all__ = ["MissSetup", "main", "run", "start_miss_setup"]

NAME = "miss"
TARGET_VS_PROXY = 0.5
FIRST_ID = 1715100000000000


@dataclass(frozen=True)
class MissSetup:
    """The gateway, the sim behind it and the running tasks, owners known to the gateway."""

    sim: Sim
    redis_url: str
    gateway: Gateway
    bodies: dict[str, bytes]  # task id -> the sim's bytes for it
    script: Path  # wrk Lua script: the ids round-robin


@dataclass
class Runs:
    """One target's measured runs, with the upstream fetches and store commands they cost."""

    name: str
    url: str
    results: list[WrkResult] = field(default_factory=list)
    upstream_calls: int = 0
    store_calls: Counter[str] = field(default_factory=Counter)

    @property
    def requests(self) -> int:
        return sum(r.requests for r in self.results)


def seed_running(sim: Sim, count: int) -> dict[str, bytes]:
    """``count`` tasks that stay IN_PROGRESS; the sim's bytes for each."""
    bodies: dict[str, bytes] = {}
    with httpx.Client(timeout=10) as client:
        for n in range(count):
            task_id = str(FIRST_ID + n)
            task = {"id": task_id, "status": "IN_PROGRESS", "prompt": f"still drawing {n}"}
            client.post(f"{sim.url}/_sim/tasks", json=task).raise_for_status()
            answer = client.get(f"{sim.url}/mj/task/{task_id}/fetch", headers=sim.auth_headers)
            if answer.status_code != 200:
                raise BenchError(f"the sim did not serve seeded task {task_id}")
            bodies[task_id] = answer.content
    return bodies


def write_round_robin(path: Path, task_ids: Sequence[str]) -> Path:
    """A wrk script whose ``request()`` walks the ids in order, over and over (``-t1``: one
    Lua state, so one shared cursor)."""
    paths = ", ".join(json.dumps(f"/mj/task/{t}/fetch") for t in task_ids)
    path.write_text(
        f"local paths = {{{paths}}}\n"
        "local n = 0\n"
        "request = function()\n"
        "  n = n % #paths + 1\n"
        '  return wrk.format("GET", paths[n])\n'
        "end\n"
    )
    return path


def warm(base_url: str, bodies: dict[str, bytes], what: str) -> Counter[str]:
    """Fetch every id once through a target; check the bytes; the ``X-Cache`` mix seen."""
    seen: Counter[str] = Counter()
    with httpx.Client(base_url=base_url, headers=caller_headers(), timeout=10) as client:
        for task_id, body in bodies.items():
            answer = client.get(f"/mj/task/{task_id}/fetch")
            if answer.status_code != 200 or answer.content != body:
                raise BenchError(
                    f"{what} answered {answer.status_code} for {task_id} with other bytes than "
                    f"the sim's ({len(answer.content)} vs {len(body)} bytes)"
                )
            seen[answer.headers.get("x-cache", "-")] += 1
    return seen


def start_miss_setup(
    procs: Processes, tasks: int, helpers_core: int | None, log_level: str = "info"
) -> MissSetup:
    """redis-server and a sim on ``helpers_core``, the gateway with ``inflight_ttl_ms: 1``,
    ``tasks`` running tasks fetched once through it (owners known), and the wrk script."""
    redis_url = start_redis(procs, helpers_core)
    sim = start_sim(procs, "main", core=helpers_core)
    bodies = seed_running(sim, tasks)
    cache = {"inflight_ttl_ms": 1}
    config = gateway_config([sim], redis_url, log_level=log_level, cache=cache)
    gateway = start_gateway(procs, "mjgate", config)
    warm(gateway.url, bodies, "mjgate")
    time.sleep(0.01)
    again = warm(gateway.url, dict(list(bodies.items())[:5]), "mjgate")
    if set(again) != {"MISS"}:
        raise BenchError(f"mjgate did not go upstream for a running task: X-Cache {dict(again)}")
    script = write_round_robin(procs.workdir / "round_robin.lua", list(bodies))
    return MissSetup(sim, redis_url, gateway, bodies, script)


def start_bare_proxy(procs: Processes, sim: Sim) -> str:
    """``bench/bare_proxy.py`` on the server core; its base URL."""
    args = ["--upstream", sim.url, "--upstream-key", sim.key, "--client-key", CLIENT_KEY]
    probe = f"/mj/task/{FIRST_ID}/fetch"
    return start_bench_server(
        procs, "bare proxy", "bench.bare_proxy", args, probe, headers=caller_headers()
    )


def run(args: argparse.Namespace) -> list[Verdict]:
    need("wrk", "redis-server")
    helpers_core = LOAD_CORE if args.helpers_core == "load" else SERVER_CORE
    print(f"== miss path: GET /mj/task/{{id}}/fetch of running tasks, owner known ({NAME})")
    print(machine_note())
    with Processes() as procs:
        setup = start_miss_setup(procs, args.tasks, helpers_core)
        proxy_url = start_bare_proxy(procs, setup.sim)
        warm(proxy_url, setup.bodies, "bare proxy")
        targets = [Runs("bare-proxy", proxy_url), Runs("mjgate", setup.gateway.url)]
        print(
            f"{args.tasks} IN_PROGRESS tasks round-robin, inflight_ttl_ms 1; sim and "
            f"redis-server on the {args.helpers_core} core; wrk -t1 -c{args.connections} "
            f"-d{args.duration:g}s --latency (after a {args.warmup:g} s warm-up run), "
            f"{args.rounds} rounds in alternating order"
        )
        redis_stats = RedisCounter(setup.redis_url)
        calm = QuietWait(args.quiet_wait)
        meter = CpuMeter()
        for round_index in range(args.rounds):
            for target in alternating(targets, round_index):
                calm.wait()
                measure(target, setup, args, redis_stats)
            print_round(round_index, targets)
        cpu = meter.summary()
        redis_stats.close()
        verdicts = report(targets)
        print(cpu)
        return verdicts


def measure(
    target: Runs, setup: MissSetup, args: argparse.Namespace, redis_stats: RedisCounter
) -> None:
    """A warm-up run, then one measured run, counting the upstream fetches and store
    commands the measured run caused."""
    url = target.url + "/"  # the script picks each request's path

    def load(duration: float) -> WrkResult:
        return run_wrk(
            url,
            headers=caller_headers(),
            duration_s=duration,
            connections=args.connections,
            script=setup.script,
        )

    if args.warmup > 0:
        load(args.warmup)
    fetches = setup.sim.fetch_calls()
    redis_stats.reset()
    target.results.append(load(args.duration))
    target.store_calls.update(redis_stats.calls())
    target.upstream_calls += setup.sim.fetch_calls() - fetches
    if args.verbose:
        print(f"--- {target.name}\n{target.results[-1].output}")


def print_round(round_index: int, targets: Sequence[Runs]) -> None:
    proxy, gateway = (t.results[-1] for t in targets)
    print(
        f"round {round_index + 1}: bare-proxy {proxy.rps:,.0f} req/s p50 {proxy.p50_ms:.2f} ms"
        f" | mjgate {gateway.rps:,.0f} req/s p50 {gateway.p50_ms:.2f} ms"
        f" | ratio {gateway.rps / proxy.rps:.2f}"
    )


def report(targets: Sequence[Runs]) -> list[Verdict]:
    proxy, gateway = targets
    ratios = [g.rps / p.rps for g, p in zip(gateway.results, proxy.results, strict=True)]
    rows = [
        [
            t.name,
            f"{median([r.rps for r in t.results]):,.0f}",
            f"{median([r.p50_ms for r in t.results]):.2f}",
            f"{median([r.p99_ms for r in t.results]):.2f}",
            str(sum(r.bad_responses for r in t.results)),
            f"{t.upstream_calls / max(t.requests, 1):.3f}",
            " / ".join(f"{r.rps:,.0f}" for r in t.results),
        ]
        for t in targets
    ]
    print()
    print_table(["target", "req/s", "p50 ms", "p99 ms", "errors", "upstream/req", "rounds"], rows)
    print("  req/s, p50, p99: medians over the rounds; upstream/req: sim fetches per request")
    ratio = median(ratios)
    print(
        f"\nmjgate / bare-proxy = {ratio:.2f} (median of per-round ratios "
        f"{', '.join(f'{r:.2f}' for r in ratios)}; target >= {TARGET_VS_PROXY})"
    )
    total = max(gateway.requests, 1)
    detail = ", ".join(f"{c} {n / total:.3f}" for c, n in gateway.store_calls.most_common())
    print(f"redis-server commands per request, mjgate: {detail or 'none'}")
    print("  (a Lua script's own commands are counted too; each EVALSHA is one round trip)")
    errors = sum(r.bad_responses for t in targets for r in t.results)
    measured = (
        f"{ratio:.2f}x ({median([r.rps for r in gateway.results]):,.0f} vs "
        f"{median([r.rps for r in proxy.results]):,.0f} req/s; p50 "
        f"{median([r.p50_ms for r in gateway.results]):.2f} vs "
        f"{median([r.p50_ms for r in proxy.results]):.2f} ms)"
    )
    if errors:
        measured += f", {errors} failed requests"
    goal = f"miss path >= {TARGET_VS_PROXY}x bare proxy (median per-round ratio)"
    return [Verdict(NAME, goal, measured, ratio >= TARGET_VS_PROXY and errors == 0)]


def parser() -> argparse.ArgumentParser:
    p = bench_parser(NAME, __doc__)
    p.add_argument("--tasks", type=int, default=300, help="running tasks, fetched round-robin")
    add_wrk_options(
        p, connections=50, rounds=6, rounds_help="rounds over both targets", threads=False
    )
    p.add_argument(
        "--helpers-core",
        choices=["load", "server"],
        default="load",
        help="core of the sim and redis-server (default: load, beside wrk)",
    )
    p.add_argument("--verbose", action="store_true", help="print every wrk output")
    add_quiet_wait(p)
    return p


main = bench_main(NAME, parser, run)


if __name__ == "__main__":
    sys.exit(main())
