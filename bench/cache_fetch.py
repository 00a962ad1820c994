"""Cached terminal fetch: mjgate vs the Python ceiling vs the native ceiling.

One run, one machine, same wrk settings for every target, in rounds (each round runs every
target once, in alternating order; the per-round ratio cancels the machine's drift between
rounds, and the median of those ratios is the figure):

- ``mjgate``: ``python -m gateway serve`` configured like production (Redis, a real client
  key with a rate limit, metrics on, JSON access log at ``info`` written to a file), the task
  warmed so every request is an L1 hit;
- ``mjgate-quiet``: the same with ``logging.level: warning``, so no access line is written:
  the difference is what the log line costs;
- ``bare``: one Starlette route returning the same bytes from memory, same uvicorn settings;
- ``nginx``: nginx ``proxy_cache`` (one worker) in front of the same sim, warmed.

Target (issue 11): median per-round ratio mjgate / bare >= 0.6.
Needs: wrk, nginx, redis-server on PATH (apt-get install -y wrk nginx redis-server).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.common import (
    CLIENT_KEY,
    BenchError,
    CpuMeter,
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
    fetch_twice,
    gateway_config,
    machine_note,
    median,
    need,
    print_round,
    print_table,
    ratios,
    start_bench_server,
    start_gateway,
    start_nginx,
    start_redis,
    start_sim,
    wrk_note,
    wrk_runs,
)

__all__ = ["main", "run"]

NAME = "cache"
TARGET_VS_BARE = 0.6
TASK_ID = "1715000000000777"
TEMPLATE = Path(__file__).with_name("nginx.conf.template")


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    what: str


def start_baseline(procs: Processes, body: bytes) -> str:
    """The bare Starlette route (bench/baseline_app.py) on the server core."""
    body_file = procs.workdir / "body.json"
    body_file.write_bytes(body)
    path = f"/mj/task/{TASK_ID}/fetch"
    args = ["--body-file", str(body_file)]
    return start_bench_server(procs, "bare starlette app", "bench.baseline_app", args, path) + path


def start_cache_nginx(procs: Processes, sim: Sim) -> str:
    """nginx in the foreground, one worker, proxy_cache keyed on the URI, from a generated
    config in a temporary directory."""
    values = {"@SIM_PORT@": str(sim.port), "@CLIENT_KEY@": CLIENT_KEY, "@UPSTREAM_KEY@": sim.key}
    path = f"/mj/task/{TASK_ID}/fetch"
    origin, _ = start_nginx(procs, TEMPLATE.read_text(), values, path)
    return origin + path


def warm(target: Target, expected: bytes, cache_header: str | None) -> str:
    """Fetch twice; check the bytes and that the second answer came from cache."""
    response = fetch_twice(target.name, target.url, caller_headers(), expected, "the sim's")
    if cache_header is None:
        return "-"
    state = response.headers.get(cache_header, "?")
    tier = response.headers.get("x-cache-tier")
    if state != "HIT":
        raise BenchError(f"{target.name}: second fetch was not a cache hit ({state})")
    return f"{state}/{tier}" if tier else state


def run(args: argparse.Namespace) -> list[Verdict]:
    need("wrk", "nginx", "redis-server")
    print(f"== cached terminal fetch: GET /mj/task/{{id}}/fetch ({NAME})")
    print(machine_note())
    with Processes() as procs:
        redis_url = start_redis(procs)
        sim = start_sim(procs, "main")
        sim.seed({"id": TASK_ID, "status": "SUCCESS", "prompt": "a lighthouse at dusk"})
        direct = httpx.get(f"{sim.url}/mj/task/{TASK_ID}/fetch", headers=sim.auth_headers)
        body = direct.content
        if direct.status_code != 200 or not body:
            raise BenchError(f"the sim did not serve the seeded task ({direct.status_code})")

        loud = start_gateway(procs, "mjgate", gateway_config([sim], redis_url))
        quiet = start_gateway(
            procs, "mjgate-quiet", gateway_config([sim], redis_url, log_level="warning")
        )
        path = f"/mj/task/{TASK_ID}/fetch"
        targets = [
            Target("bare", start_baseline(procs, body), "Starlette route, bytes in memory"),
            Target("mjgate", loud.url + path, "L1 hit, JSON log line to a file"),
            Target("mjgate-quiet", quiet.url + path, "L1 hit, logging.level warning"),
            Target("nginx", start_cache_nginx(procs, sim), "proxy_cache, 1 worker"),
        ]
        served = {
            "bare": warm(targets[0], body, None),
            "mjgate": warm(targets[1], body, "x-cache"),
            "mjgate-quiet": warm(targets[2], body, "x-cache"),
            "nginx": warm(targets[3], body, "x-cache"),
        }
        print(f"task body: {len(body)} bytes; {loud.metrics_state()}")
        print(f"gateway log: stdout of the gateway process to a file ({loud.log.name})")
        print(wrk_note(args))
        upstream_before = sim.fetch_calls()
        lines_before = {"mjgate": loud.log_lines(), "mjgate-quiet": quiet.log_lines()}
        requests = {"mjgate": 0, "mjgate-quiet": 0}
        store_calls: dict[str, Counter[str]] = {"mjgate": Counter(), "mjgate-quiet": Counter()}
        redis_stats = RedisCounter(redis_url)
        results: dict[str, list[WrkResult]] = {t.name: [] for t in targets}
        calm = QuietWait(args.quiet_wait)
        meter = CpuMeter()
        for round_index in range(args.rounds):
            for target in alternating(targets, round_index):
                calm.wait()
                redis_stats.reset()
                runs = wrk_runs(target.url, caller_headers(), args)
                if target.name in requests:
                    requests[target.name] += sum(r.requests for r in runs)
                results[target.name].append(runs[-1])
                if target.name in store_calls:
                    store_calls[target.name].update(redis_stats.calls())
                if args.verbose:
                    print(f"--- {target.name}, round {round_index + 1}\n{runs[-1].output}")
            print_round(round_index, [t.name for t in targets], results, "bare")
        cpu = meter.summary()
        verdicts = report(targets, results, served)
        print(cpu)
        print(
            f"upstream fetches while the targets were under load: "
            f"{sim.fetch_calls() - upstream_before}"
        )
        lines = {"mjgate": loud.log_lines(), "mjgate-quiet": quiet.log_lines()}
        written = {name: lines[name] - lines_before[name] for name in lines}
        redis_stats.close()
        for name, calls in store_calls.items():
            total = max(requests[name], 1)
            detail = ", ".join(f"{c} {n / total:.3f}" for c, n in calls.most_common()) or "none"
            print(f"redis-server commands per request under load, {name}: {detail}")
        print("  (a Lua script's own commands are counted too; each EVALSHA is one round trip)")
        per_line = loud.log.stat().st_size / max(lines["mjgate"], 1)
        print(
            f"access log lines written under load: mjgate ~{written['mjgate']:,} for "
            f"{requests['mjgate']:,} requests ({per_line:.0f} bytes/line); "
            f"mjgate-quiet ~{written['mjgate-quiet']:,} for {requests['mjgate-quiet']:,} requests"
        )
        return verdicts


def report(
    targets: Sequence[Target],
    results: dict[str, list[WrkResult]],
    served: dict[str, str],
) -> list[Verdict]:
    rps = {name: median([r.rps for r in runs]) for name, runs in results.items()}
    rows = []
    for target in targets:
        runs = results[target.name]
        rows.append(
            [
                target.name,
                f"{rps[target.name]:,.0f}",
                f"{median([r.p50_ms for r in runs]):.2f}",
                f"{median([r.p99_ms for r in runs]):.2f}",
                f"{median(ratios(results, target.name, 'bare')):.2f}",
                f"{median(ratios(results, target.name, 'nginx')):.2f}",
                str(sum(r.bad_responses for r in runs)),
                served[target.name],
                " / ".join(f"{r.rps:,.0f}" for r in runs),
            ]
        )
    print()
    print_table(
        ["target", "req/s", "p50 ms", "p99 ms", "x bare", "x nginx", "errors", "cache", "rounds"],
        rows,
    )
    print("  req/s, p50, p99: medians over the rounds; x bare, x nginx: median per-round ratio")
    for target in targets:
        print(f"  {target.name}: {target.what}")
    per_round = ratios(results, "mjgate", "bare")
    ratio = median(per_round)
    gateway, quiet = rps["mjgate"], rps["mjgate-quiet"]
    print()
    print(
        f"mjgate / bare  = {ratio:.2f}  (median of per-round ratios "
        f"{', '.join(f'{r:.2f}' for r in per_round)}; target >= {TARGET_VS_BARE})\n"
        f"mjgate / nginx = {median(ratios(results, 'mjgate', 'nginx')):.2f}\n"
        f"logging cost: the access line takes mjgate from {quiet:,.0f} to {gateway:,.0f} req/s "
        f"(medians; {(1 - gateway / quiet) * 100:.0f}% of throughput, "
        f"{(1e6 / gateway - 1e6 / quiet):.0f} us of CPU per request)"
    )
    errors = sum(r.bad_responses for r in results["mjgate"])
    passed = ratio >= TARGET_VS_BARE and errors == 0
    measured = f"{ratio:.2f}x ({gateway:,.0f} vs {rps['bare']:,.0f} req/s, medians)"
    if errors:
        measured += f", {errors} failed requests"
    goal = f"mjgate >= {TARGET_VS_BARE}x bare route (median per-round ratio)"
    return [Verdict(NAME, goal, measured, passed)]


def parser() -> argparse.ArgumentParser:
    p = bench_parser(NAME, __doc__)
    add_wrk_options(p, connections=64, rounds=6)
    p.add_argument("--verbose", action="store_true", help="print every wrk output")
    add_quiet_wait(p)
    return p


main = bench_main(NAME, parser, run)


if __name__ == "__main__":
    sys.exit(main())
