"""The watcher: many callers polling many running tasks, with the watcher on and off.

Two sims each hold about half of T running tasks, submitted through the gateway (so the
ledger knows them) and then frozen ``IN_PROGRESS`` in their sim (they never finish). N
callers each poll their share of the tasks at R Hz (``GET /mj/task/{id}/fetch``, random
phase). The sims count what reaches them (``/_sim/stats``): list calls and per-task fetches.

Target (issue 13): with the watcher on, each upstream sees at most
``ceil(tasks on it / fanout.batch_size)`` list calls per ``watcher.interval_s`` and zero
per-task fetches, whatever N and R. Tolerance: one extra cycle per measured window (a cycle
straddling its edges). With the watcher off, the same load costs a fetch per task per
``cache.inflight_ttl_ms``, shown side by side.

Needs: redis-server on PATH (apt-get install -y redis-server).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
from httpx_aiohttp import AiohttpTransport

from bench.amplification import Tally, poller
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
    positive_int,
    print_table,
    start_gateway,
    start_redis,
    start_sim,
)

__all__ = ["main", "run"]

NAME = "watcher"
LIST_KEY = "POST /mj/task/list-by-condition"
FETCH_KEY = "GET /mj/task/{id}/fetch"


@dataclass(frozen=True)
class Result:
    watcher: bool
    duration_s: float
    caller_rate: float
    list_calls: dict[str, int]
    fetches: dict[str, int]
    tally: Tally


def submit_tasks(gateway: Gateway, sims: Sequence[Sim], count: int) -> dict[str, list[str]]:
    """``count`` submits through the gateway, each task then frozen IN_PROGRESS in the sim
    that took it; the ids by sim."""
    by_sim: dict[str, list[str]] = {sim.name: [] for sim in sims}
    with httpx.Client(base_url=gateway.url, headers=caller_headers(), timeout=10) as client:
        for n in range(count):
            answer = client.post("/mj/submit/imagine", json={"prompt": f"watched task {n}"})
            task_id = str(answer.json()["result"])
            for sim in sims:
                if httpx.get(f"{sim.url}/_sim/tasks/{task_id}", timeout=10).status_code == 200:
                    sim.seed({"id": task_id, "status": "IN_PROGRESS", "prompt": f"task {n}"})
                    by_sim[sim.name].append(task_id)
                    break
    return by_sim


def counted(sims: Sequence[Sim], key: str) -> dict[str, int]:
    return {sim.name: int(sim.stats()["requests"].get(key, 0)) for sim in sims}


async def drive(
    gateway: Gateway,
    sims: Sequence[Sim],
    task_ids: Sequence[str],
    callers: int,
    hz: float,
    warmup_s: float,
    duration_s: float,
    watcher: bool,
) -> Result:
    """Each caller polls its share of the tasks at ``hz``; the sims' counts over the window."""
    period = 1.0 / hz
    now = time.perf_counter()
    tally = Tally(started=now, window_start=now + warmup_s, window_end=now + warmup_s + duration_s)
    shares = [task_ids[i::callers] for i in range(callers)]
    pollers = sum(len(share) for share in shares)
    limits = httpx.Limits(max_connections=callers, max_keepalive_connections=callers)
    rng = random.Random(1)
    async with httpx.AsyncClient(
        transport=AiohttpTransport(limits=limits, trust_env=False),
        headers=caller_headers(),
        timeout=10,
        trust_env=False,
    ) as client:
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
            for share in shares
            for task_id in share
        ]
        try:
            await asyncio.sleep(max(0.0, tally.window_start - time.perf_counter()))
            lists, fetches = counted(sims, LIST_KEY), counted(sims, FETCH_KEY)
            await asyncio.sleep(max(0.0, tally.window_end - time.perf_counter()))
            lists_after, fetches_after = counted(sims, LIST_KEY), counted(sims, FETCH_KEY)
            await asyncio.gather(*jobs)
        finally:
            for job in jobs:
                job.cancel()
    assert pollers == len(task_ids)
    return Result(
        watcher=watcher,
        duration_s=duration_s,
        caller_rate=sum(tally.cache.values()) / duration_s,
        list_calls={name: lists_after[name] - lists[name] for name in lists},
        fetches={name: fetches_after[name] - fetches[name] for name in fetches},
        tally=tally,
    )


def run(args: argparse.Namespace) -> list[Verdict]:
    need("redis-server")
    print(f"== the watcher: {args.callers} callers polling {args.tasks} running tasks ({NAME})")
    print(machine_note())
    results: list[Result] = []
    cpu: list[str] = []
    quiet = QuietWait(args.quiet_wait)
    with Processes() as procs:
        redis_url = start_redis(procs)
        sims = [start_sim(procs, "java-a"), start_sim(procs, "java-b")]
        base = gateway_config(sims, redis_url, log_level="warning")
        base["fanout"]["batch_size"] = args.batch_size
        by_sim: dict[str, list[str]] = {}
        for watcher in (True, False):
            config = {**base, "watcher": {"enabled": watcher, "interval_s": args.interval}}
            gateway = start_gateway(procs, f"mjgate-watcher-{'on' if watcher else 'off'}", config)
            if not by_sim:
                by_sim = submit_tasks(gateway, sims, args.tasks)
                spread = ", ".join(f"{name}: {len(ids)}" for name, ids in by_sim.items())
                print(
                    f"T={args.tasks} tasks ({spread}),"
                    f" N={args.callers} callers at R={args.hz:g} Hz, batch_size={args.batch_size},"
                    f" interval_s={args.interval:g}; {args.warmup:g} s warm-up, "
                    f"{args.duration:g} s measured"
                )
            task_ids = [task_id for ids in by_sim.values() for task_id in ids]
            quiet.wait()
            meter = CpuMeter()
            result = asyncio.run(
                drive(
                    gateway,
                    sims,
                    task_ids,
                    args.callers,
                    args.hz,
                    args.warmup,
                    args.duration,
                    watcher,
                )
            )
            results.append(result)
            cpu.append(f"watcher {'on' if watcher else 'off'}: {meter.summary()}")
            procs.stop(gateway.proc)
        verdicts = report(results, by_sim, args)
        print("\n".join(cpu))
        return verdicts


def report(
    results: Sequence[Result], by_sim: dict[str, list[str]], args: argparse.Namespace
) -> list[Verdict]:
    cycles = args.duration / args.interval
    rows = []
    for r in results:
        lat = r.tally.latencies_ms or [0.0]
        cache = ", ".join(f"{k} {v}" for k, v in sorted(r.tally.cache.items()))
        for name, ids in by_sim.items():
            rows.append(
                [
                    f"watcher {'on' if r.watcher else 'off'}",
                    name,
                    str(len(ids)),
                    f"{r.caller_rate:,.0f}",
                    f"{r.list_calls[name] / cycles:.2f}",
                    str(math.ceil(len(ids) / args.batch_size)),
                    f"{r.fetches[name] / r.duration_s:.1f}",
                    f"{percentile(lat, 0.5):.1f}/{percentile(lat, 0.99):.1f}",
                    str(sum(r.tally.failures.values()) + r.tally.late),
                    cache,
                ]
            )
    print()
    print_table(
        [
            "mode",
            "upstream",
            "tasks",
            "caller req/s",
            "list calls/interval",
            "bound",
            "fetches/s",
            "p50/p99 ms",
            "late/err",
            "X-Cache",
        ],
        rows,
    )
    print(
        "  list calls/interval = the sim's list calls in the window / (window / interval_s);"
        "\n  bound = ceil(tasks on that upstream / batch_size); fetches/s = per-task fetches"
    )
    on = next(r for r in results if r.watcher)
    verdicts = []
    for name, ids in by_sim.items():
        allowed = math.ceil(len(ids) / args.batch_size) * (math.floor(cycles) + 1)
        passed = on.list_calls[name] <= allowed and on.fetches[name] == 0 and not on.tally.failures
        measured = (
            f"{name}: {on.list_calls[name]} list calls in {args.duration:g} s (allowed "
            f"{allowed}), {on.fetches[name]} fetches, for {on.caller_rate:,.0f} caller req/s"
        )
        target = f"list calls <= ceil({len(ids)}/{args.batch_size}) per interval, 0 fetches"
        verdicts.append(Verdict(NAME, target, measured, passed))
    return verdicts


def parser() -> argparse.ArgumentParser:
    p = bench_parser(NAME, __doc__)
    p.add_argument("--tasks", type=positive_int, default=200, help="T: running tasks (200)")
    p.add_argument("--callers", type=positive_int, default=100, help="N: callers (100)")
    p.add_argument("--hz", type=float, default=2.0, help="R: polls per task per second (2)")
    p.add_argument("--batch-size", type=positive_int, default=100, help="fanout.batch_size")
    p.add_argument("--interval", type=float, default=2.0, help="watcher.interval_s (2)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per mode")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    add_quiet_wait(p)
    return p


main = bench_main(NAME, parser, run)


if __name__ == "__main__":
    sys.exit(main())
