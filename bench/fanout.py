"""Fan-out merge: ``POST /mj/task/list-by-ids`` across three sims with 100 / 200 / 300 ms
latency.

Each sim holds its own finished tasks. Every round asks the gateway for a fresh list of ids
spread over the three sims (nothing of it is cached, and the gateway does not know their
owners, so each sim gets one request with the whole list), then asks the slowest sim
directly for the same ids. Then a list of ids that are all cached is asked for repeatedly.

Targets (issue 3): median uncached-list latency within 10 ms of the slowest sim's (measured
directly, same run); a list of only cached ids answered in 2 ms at the median (p50).
Latencies are measured by the client in this process (httpx, keep-alive, load core); the
gateway's own view (``duration_ms`` of its access-log line) is printed next to them.
Needs: redis-server on PATH (apt-get install -y redis-server).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from bench.common import (
    BenchError,
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
    median,
    need,
    percentile,
    print_table,
    start_gateway,
    start_redis,
    start_sim,
)

__all__ = ["main", "run"]

NAME = "fanout"
LATENCIES_MS = (100, 200, 300)
TARGET_UNCACHED_MS = 10.0
TARGET_CACHED_MS = 2.0


@dataclass(frozen=True)
class Series:
    name: str
    client_ms: list[float]
    gateway_ms: list[float]  # from the gateway's access log; empty for direct calls

    def row(self, reference: float | None) -> list[str]:
        c = self.client_ms
        g = self.gateway_ms
        gap = f"{median(c) - reference:+.2f}" if reference is not None else "-"
        return [
            self.name,
            str(len(c)),
            f"{median(c):.2f}",
            f"{percentile(c, 0.9):.2f}",
            f"{min(c):.2f}",
            f"{max(c):.2f}",
            f"{median(g):.2f}" if g else "-",
            gap,
        ]


def seed(sims: Sequence[Sim], rounds: int, per_sim: int) -> list[list[str]]:
    """Finished tasks in every sim; returns the id list of each round (ids interleaved over
    the sims, so no sim's ids come first)."""
    lists: list[list[str]] = [[] for _ in range(rounds)]
    with httpx.Client(timeout=10) as client:
        for round_index, ids in enumerate(lists):
            for n in range(per_sim):
                for sim_index, sim in enumerate(sims):
                    task_id = f"{1716000000000 + round_index * 1000 + n}{sim_index}"
                    body = {"id": task_id, "status": "SUCCESS", "prompt": f"task {task_id}"}
                    client.post(f"{sim.url}/_sim/tasks", json=body).raise_for_status()
                    ids.append(task_id)
    return lists


def timed_post(
    client: httpx.Client, url: str, ids: list[str], headers: dict[str, str]
) -> tuple[float, httpx.Response]:
    began = time.perf_counter()
    response = client.post(url, json={"ids": ids}, headers=headers)
    elapsed = (time.perf_counter() - began) * 1000
    return elapsed, response


def durations(gateway: Gateway, request_ids: set[str]) -> list[float]:
    """``duration_ms`` of the gateway's access-log lines for these request ids."""
    found: list[float] = []
    with gateway.log.open("rb") as handle:
        for line in handle:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("request_id") in request_ids and "duration_ms" in event:
                found.append(float(event["duration_ms"]))
    return found


def run(args: argparse.Namespace) -> list[Verdict]:
    need("redis-server")
    print(f"== fan-out: list-by-ids across sims at {'/'.join(map(str, LATENCIES_MS))} ms ({NAME})")
    print(machine_note())
    with Processes() as procs:
        redis_url = start_redis(procs)
        sims = [start_sim(procs, f"sim{ms}", latency_ms=ms) for ms in LATENCIES_MS]
        gateway = start_gateway(procs, "mjgate", gateway_config(sims, redis_url))
        slowest = sims[-1]
        lists = seed(sims, args.rounds + 1, args.ids_per_sim)
        url = f"{gateway.url}/mj/task/list-by-ids"
        direct_url = f"{slowest.url}/mj/task/list-by-condition"
        expect = args.ids_per_sim * len(sims)
        print(
            f"{args.rounds} rounds of {expect} fresh ids ({args.ids_per_sim} per sim); "
            f"then {args.cached_rounds} lists of {expect} cached ids"
        )
        uncached_ms: list[float] = []
        direct_ms: list[float] = []
        uncached_ids: set[str] = set()
        quiet = QuietWait(args.quiet_wait)
        quiet.wait()
        meter = CpuMeter()
        with httpx.Client(timeout=30, trust_env=False) as client:
            # One throw-away round opens the keep-alive connections on every hop.
            timed_post(client, url, lists[-1], caller_headers())
            timed_post(client, direct_url, lists[-1], slowest.auth_headers)
            for round_index in range(args.rounds):
                ids = lists[round_index]
                request_id = uuid.uuid4().hex
                headers = {**caller_headers(), "x-request-id": request_id}
                direct_first = round_index % 2 == 1
                if direct_first:
                    direct_ms.append(timed_post(client, direct_url, ids, slowest.auth_headers)[0])
                elapsed, response = timed_post(client, url, ids, headers)
                if not direct_first:
                    direct_ms.append(timed_post(client, direct_url, ids, slowest.auth_headers)[0])
                check(response, ids, "MISS")
                uncached_ms.append(elapsed)
                uncached_ids.add(request_id)
            cached = lists[0]
            timed_post(client, url, cached, caller_headers())
            cached_ms: list[float] = []
            cached_ids: set[str] = set()
            for _ in range(args.cached_rounds):
                request_id = uuid.uuid4().hex
                headers = {**caller_headers(), "x-request-id": request_id}
                elapsed, response = timed_post(client, url, cached, headers)
                check(response, cached, "HIT")
                cached_ms.append(elapsed)
                cached_ids.add(request_id)
        cpu = meter.summary()
        # The gateway's stdout is block-buffered: stopping it flushes its log lines.
        procs.stop(gateway.proc)
        series = [
            Series(f"slowest sim alone ({LATENCIES_MS[-1]} ms)", direct_ms, []),
            Series("mjgate, uncached ids", uncached_ms, durations(gateway, uncached_ids)),
            Series("mjgate, cached ids", cached_ms, durations(gateway, cached_ids)),
        ]
    verdicts = report(series)
    print(cpu)
    return verdicts


def check(response: httpx.Response, ids: list[str], cache: str) -> None:
    if response.status_code != 200:
        raise BenchError(f"list-by-ids answered {response.status_code}: {response.text[:200]}")
    got = [task["id"] for task in response.json()]
    if got != ids:
        raise BenchError(f"list-by-ids answered {len(got)} of {len(ids)} ids, or out of order")
    state = response.headers.get("x-cache")
    if state != cache or response.headers.get("x-gateway-partial"):
        partial = response.headers.get("x-gateway-partial")
        raise BenchError(f"list-by-ids answered X-Cache {state} (partial: {partial}), not {cache}")


def report(series: Sequence[Series]) -> list[Verdict]:
    direct, uncached, cached = series
    reference = median(direct.client_ms)
    print()
    print_table(
        ["client-measured ms", "n", "median", "p90", "min", "max", "gw median", "vs slowest"],
        [direct.row(None), uncached.row(reference), cached.row(None)],
    )
    print("  gw median: duration_ms of the gateway's own access-log lines")
    gap = median(uncached.client_ms) - reference
    cached_p50 = median(cached.client_ms)
    return [
        Verdict(
            NAME,
            f"uncached list within {TARGET_UNCACHED_MS:g} ms of the slowest sim (medians)",
            f"{gap:+.2f} ms ({median(uncached.client_ms):.2f} vs {reference:.2f} ms)",
            gap <= TARGET_UNCACHED_MS,
        ),
        Verdict(
            NAME,
            f"cached list p50 within {TARGET_CACHED_MS:g} ms",
            f"{cached_p50:.2f} ms (gateway's own view {median(cached.gateway_ms):.2f} ms)"
            if cached.gateway_ms
            else f"{cached_p50:.2f} ms",
            cached_p50 <= TARGET_CACHED_MS,
        ),
    ]


def parser() -> argparse.ArgumentParser:
    p = bench_parser(NAME, __doc__)
    p.add_argument("--rounds", type=int, default=20, help="uncached rounds (default: 20)")
    p.add_argument("--ids-per-sim", type=int, default=10, help="ids per sim per list")
    p.add_argument("--cached-rounds", type=int, default=200, help="cached-list requests")
    add_quiet_wait(p)
    return p


main = bench_main(NAME, parser, run)


if __name__ == "__main__":
    sys.exit(main())
