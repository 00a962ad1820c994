"""Upstream amplification: N callers polling M running tasks at R Hz each.

The sim holds M tasks seeded ``IN_PROGRESS`` (they never finish). Every caller polls every
task R times a second through the gateway (``GET /mj/task/{id}/fetch``, one poller per
(caller, task) pair, random phase), so callers send N x M x R requests a second. The sim
counts the fetches that reach it (``/_sim/stats``).

Target (issue 3): at most one upstream call per running task per ``inflight_ttl_ms``,
whatever N and R: upstream fetches/s <= M / (inflight_ttl_ms / 1000). Tolerance: one extra
call per task per measured window (a poll that straddles the window's edges), i.e. the
bound plus M / duration calls/s. Two (N, R) combinations are run to show the bound does not
move with the caller rate.

The load generator is asyncio + httpx (with the aiohttp transport) in this process, pinned
to the load core. Needs: redis-server on PATH (apt-get install -y redis-server).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx
from httpx_aiohttp import AiohttpTransport

from bench.common import (
    CpuMeter,
    Gateway,
    Processes,
    QuietWait,
    Sim,
    Verdict,
    add_quiet_wait,
    bench_main,
    bench_parser,
    caller_headers,
    gateway_config,
    machine_note,
    need,
    percentile,
    print_table,
    start_gateway,
    start_redis,
    start_sim,
)

__all__ = ["main", "run"]

NAME = "amplification"


@dataclass
class Tally:
    """What the callers saw inside the measured window."""

    started: float
    window_start: float
    window_end: float
    sent: int = 0
    late: int = 0  # polls skipped because the previous one had not come back in time
    latencies_ms: list[float] = field(default_factory=list)
    cache: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)

    def record(self, finished: float, latency_ms: float, outcome: str, ok: bool) -> None:
        if not self.window_start <= finished < self.window_end:
            return
        if ok:
            self.latencies_ms.append(latency_ms)
            self.cache[outcome] += 1
        else:
            self.failures[outcome] += 1


@dataclass(frozen=True)
class ComboResult:
    callers: int
    hz: float
    tasks: int
    duration_s: float
    caller_rate: float
    intended_rate: float
    upstream_calls: int
    upstream_rate: float
    max_in_one_second: int
    bound_rate: float
    allowed_calls: float
    tally: Tally


async def poller(
    client: httpx.AsyncClient, url: str, period: float, phase: float, tally: Tally
) -> None:
    """Poll one task every ``period`` seconds until the window closes; a poll that would
    start before the previous one returned is skipped (a dashboard does not stack them)."""
    next_at = tally.started + phase
    while next_at < tally.window_end:
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        began = time.perf_counter()
        try:
            response = await client.get(url)
        except httpx.HTTPError as exc:
            tally.record(time.perf_counter(), 0.0, type(exc).__name__, ok=False)
        else:
            finished = time.perf_counter()
            ok = response.status_code == 200
            outcome = response.headers.get("x-cache", "?") if ok else str(response.status_code)
            tally.record(finished, (finished - began) * 1000, outcome, ok)
        if tally.window_start <= began < tally.window_end:
            tally.sent += 1
        next_at += period
        now = time.perf_counter()
        while next_at < now:
            next_at += period
            if tally.window_start <= next_at < tally.window_end:
                tally.late += 1


async def drive(
    gateway: Gateway,
    sim: Sim,
    task_ids: Sequence[str],
    callers: int,
    hz: float,
    warmup_s: float,
    duration_s: float,
    inflight_ttl_s: float,
) -> ComboResult:
    period = 1.0 / hz
    now = time.perf_counter()
    tally = Tally(started=now, window_start=now + warmup_s, window_end=now + warmup_s + duration_s)
    pollers = callers * len(task_ids)
    limits = httpx.Limits(max_connections=pollers, max_keepalive_connections=pollers)
    transport = AiohttpTransport(limits=limits, trust_env=False)
    rng = random.Random(1)
    async with (
        httpx.AsyncClient(
            transport=transport, headers=caller_headers(), timeout=10, trust_env=False
        ) as client,
        httpx.AsyncClient(timeout=10, trust_env=False) as control,
    ):
        jobs = [
            asyncio.create_task(
                poller(
                    client,
                    f"{gateway.url}/mj/task/{task_id}/fetch",
                    period,
                    rng.uniform(0, period),
                    tally,
                )
            )
            for _ in range(callers)
            for task_id in task_ids
        ]
        try:
            await asyncio.sleep(max(0.0, tally.window_start - time.perf_counter()))
            before = (await control.get(f"{sim.url}/_sim/stats")).json()
            wall_start = time.time()
            await asyncio.sleep(max(0.0, tally.window_end - time.perf_counter()))
            after = (await control.get(f"{sim.url}/_sim/stats")).json()
            wall_end = time.time()
            await asyncio.gather(*jobs)
        finally:
            for job in jobs:
                job.cancel()
    key = "GET /mj/task/{id}/fetch"
    calls = int(after["requests"].get(key, 0)) - int(before["requests"].get(key, 0))
    # The busiest whole second inside the window.
    seconds = {int(s): n for s, n in after["per_second"].items()}
    busiest = max((n for s, n in seconds.items() if wall_start <= s <= wall_end - 1), default=0)
    tasks = len(task_ids)
    bound = tasks / inflight_ttl_s
    return ComboResult(
        callers=callers,
        hz=hz,
        tasks=tasks,
        duration_s=duration_s,
        caller_rate=sum(tally.cache.values()) / duration_s,
        intended_rate=callers * tasks * hz,
        upstream_calls=calls,
        upstream_rate=calls / duration_s,
        max_in_one_second=busiest,
        bound_rate=bound,
        allowed_calls=bound * duration_s + tasks,
        tally=tally,
    )


def parse_combos(text: str) -> list[tuple[int, float]]:
    """``50x5,10x1`` -> [(50 callers, 5 Hz), (10 callers, 1 Hz)]."""
    combos = []
    for part in text.split(","):
        callers, _, hz = part.strip().partition("x")
        try:
            combos.append((int(callers), float(hz)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not CALLERSxHZ: {part!r}") from None
        if combos[-1][0] < 1 or combos[-1][1] <= 0:
            raise argparse.ArgumentTypeError(f"callers and Hz must be positive: {part!r}")
    return combos


def run(args: argparse.Namespace) -> list[Verdict]:
    need("redis-server")
    ttl_s = args.inflight_ttl_ms / 1000
    print(f"== upstream amplification: callers polling running tasks ({NAME})")
    print(machine_note())
    with Processes() as procs:
        redis_url = start_redis(procs)
        sim = start_sim(procs, "main")
        config = gateway_config([sim], redis_url, cache={"inflight_ttl_ms": args.inflight_ttl_ms})
        gateway = start_gateway(procs, "mjgate", config)
        print(
            f"M={args.tasks} running tasks, inflight_ttl_ms={args.inflight_ttl_ms}, "
            f"{args.warmup:g} s warm-up then {args.duration:g} s measured per combination; "
            f"bound = M / inflight_ttl_s = {args.tasks / ttl_s:.2f} upstream fetches/s, "
            f"tolerance +1 call per task per window (+{args.tasks / args.duration:.2f}/s)"
        )
        results: list[ComboResult] = []
        cpu: list[str] = []
        quiet = QuietWait(args.quiet_wait)
        for index, (callers, hz) in enumerate(args.combos):
            task_ids = [f"17150000{index:02d}{n:06d}" for n in range(args.tasks)]
            for task_id in task_ids:
                sim.seed({"id": task_id, "status": "IN_PROGRESS", "prompt": "still drawing"})
            quiet.wait()
            combo = drive(gateway, sim, task_ids, callers, hz, args.warmup, args.duration, ttl_s)
            meter = CpuMeter()
            results.append(asyncio.run(combo))
            cpu.append(f"N={callers} R={hz:g}Hz: {meter.summary()}")
        verdicts = report(results)
        print("\n".join(cpu))
        return verdicts


def report(results: Sequence[ComboResult]) -> list[Verdict]:
    rows = []
    verdicts = []
    for r in results:
        t = r.tally
        lat = t.latencies_ms or [0.0]
        cache = ", ".join(f"{k} {v}" for k, v in sorted(t.cache.items()))
        rows.append(
            [
                f"N={r.callers} R={r.hz:g}Hz",
                f"{r.intended_rate:,.0f}",
                f"{r.caller_rate:,.1f}",
                f"{r.upstream_calls}",
                f"{r.upstream_rate:.2f}",
                f"{r.max_in_one_second}",
                f"{r.bound_rate:.2f}",
                f"{r.upstream_rate / r.bound_rate:.2f}",
                f"{r.caller_rate / max(r.upstream_rate, 1e-9):,.0f}",
                f"{percentile(lat, 0.5):.1f}/{percentile(lat, 0.99):.1f}",
                str(sum(t.failures.values()) + t.late),
                cache,
            ]
        )
        passed = r.upstream_calls <= r.allowed_calls and not t.failures
        measured = (
            f"N={r.callers} R={r.hz:g}Hz: {r.upstream_rate:.2f} upstream fetches/s "
            f"({r.upstream_calls} calls in {r.duration_s:g} s, allowed {r.allowed_calls:.0f}) "
            f"for {r.caller_rate:,.0f} caller req/s"
        )
        if t.failures:
            measured += f"; failed requests: {dict(t.failures)}"
        verdicts.append(
            Verdict(
                NAME,
                f"upstream fetches/s <= M/inflight_ttl_s = {r.bound_rate:.2f}",
                measured,
                passed,
            )
        )
    print()
    print_table(
        [
            "combination",
            "want req/s",
            "caller req/s",
            "upstream",
            "upstream/s",
            "max 1s",
            "bound/s",
            "x bound",
            "amplif.",
            "p50/p99 ms",
            "late/err",
            "X-Cache",
        ],
        rows,
    )
    print(
        "  want req/s = N x M x R; upstream = sim fetches in the window; max 1s = busiest whole "
        "second;\n  amplif. = caller requests per upstream fetch; late = polls skipped because "
        "the previous one\n  was still out (the load generator falling behind)"
    )
    return verdicts


def parser() -> argparse.ArgumentParser:
    p = bench_parser(NAME, __doc__)
    p.add_argument("--tasks", type=int, default=5, help="M: running tasks (default: 5)")
    p.add_argument(
        "--combos",
        type=parse_combos,
        default=parse_combos("50x5,10x1"),
        help="(N callers)x(R Hz) pairs, comma-separated (default: 50x5,10x1)",
    )
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per combo")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    p.add_argument("--inflight-ttl-ms", type=int, default=1000, help="gateway cache setting")
    add_quiet_wait(p)
    return p


main = bench_main(NAME, parser, run)


if __name__ == "__main__":
    sys.exit(main())
