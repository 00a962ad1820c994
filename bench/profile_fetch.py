"""Where a fetch spends the gateway's CPU: py-spy on the gateway under wrk load.

``python -m bench profile`` starts redis-server, a sim and the gateway exactly as
``bench/cache_fetch.py`` does (JSON log to a file; ``--log-level warning`` for the quiet
variant), warms one finished task into L1, drives ``GET /mj/task/{id}/fetch`` with wrk, and
samples the gateway with ``py-spy record`` meanwhile. ``--scenario miss`` profiles the miss
path instead, set up as ``bench/miss_fetch.py`` does (running tasks round-robin,
``inflight_ttl_ms: 1``, the sim and redis-server on the load core). It prints:

- CPU by module: each sample charged to the innermost Python frame's file (a frame of
  ``asyncio/runners.py`` or ``uvicorn/_compat.py`` is C code below Python: uvloop's loop,
  httptools' parser, socket system calls);
- gateway call sites: the share of samples under each line of ``gateway/`` code on the stack
  (inclusive), which says what each step of the hot path costs;
- the top functions by self time.

py-spy pauses the process for each sample (whole stacks; ``--nonblocking`` does not, but
tears stacks): compare shares, not the req/s printed here.
Needs: wrk, redis-server, and py-spy (``.venv/bin/pip install py-spy``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import httpx

from bench.common import (
    LOAD_CORE,
    SERVER_CORE,
    BenchError,
    Gateway,
    Processes,
    QuietWait,
    bench_parser,
    caller_headers,
    gateway_config,
    install_signal_handlers,
    machine_note,
    need,
    pin_self_to_load_core,
    pinned_child,
    print_table,
    run_wrk,
    start_gateway,
    start_redis,
    start_sim,
)
from bench.miss_fetch import start_miss_setup

__all__ = ["Profile", "main", "read_profile"]

TASK_ID = "1715000000000777"
BELOW_PYTHON = ("asyncio/runners.py", "uvicorn/_compat.py", "uvicorn/server.py")


def _file(frame: str) -> str:
    """``func (path/file.py:12)`` -> ``path/file.py``."""
    inside = frame.rsplit("(", 1)[-1].rstrip(")")
    return inside.rsplit(":", 1)[0]


def _function(frame: str) -> str:
    return frame.rsplit(" (", 1)[0]


class Profile:
    """py-spy's raw (collapsed-stack) output, counted three ways."""

    def __init__(self, stacks: list[tuple[list[str], int]]) -> None:
        self.total = sum(count for _, count in stacks)
        self.by_module: Counter[str] = Counter()
        self.by_call_site: Counter[str] = Counter()
        self.by_function: Counter[str] = Counter()
        for frames, count in stacks:
            leaf = frames[-1]
            module = _file(leaf)
            if module.endswith(BELOW_PYTHON):
                module = "(uvloop, httptools, syscalls: C code under the event loop)"
            self.by_module[module] += count
            self.by_function[f"{_function(leaf)} ({_file(leaf)})"] += count
            for site in dict.fromkeys(f for f in frames if _file(f).startswith("gateway/")):
                self.by_call_site[site] += count

    def share(self, count: int) -> str:
        return f"{count * 100 / max(self.total, 1):.1f}%"


def read_profile(path: Path) -> Profile:
    stacks: list[tuple[list[str], int]] = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    if not stacks:
        raise BenchError(f"py-spy wrote no samples to {path}")
    return Profile(stacks)


def start_cached(procs: Processes, log_level: str) -> Gateway:
    """The gateway with one finished task in L1; its URL for that task's fetch."""
    redis_url = start_redis(procs)
    sim = start_sim(procs, "main")
    sim.seed({"id": TASK_ID, "status": "SUCCESS", "prompt": "a lighthouse at dusk"})
    gateway = start_gateway(procs, "mjgate", gateway_config([sim], redis_url, log_level=log_level))
    url = f"{gateway.url}/mj/task/{TASK_ID}/fetch"
    for _ in range(2):
        response = httpx.get(url, headers=caller_headers(), timeout=10)
    if response.headers.get("x-cache-tier") != "l1":
        raise BenchError(f"the task is not an L1 hit: {dict(response.headers)}")
    return gateway


def run(args: argparse.Namespace) -> Profile:
    need("wrk", "redis-server")
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise BenchError("py-spy is not installed: .venv/bin/pip install py-spy")
    what = "cached fetch" if args.scenario == "cache" else "miss path"
    print(f"== profile: {what}, logging.level {args.log_level}")
    print(machine_note())
    with Processes() as procs:
        script: Path | None = None
        if args.scenario == "miss":
            helpers = LOAD_CORE if args.helpers_core == "load" else SERVER_CORE
            setup = start_miss_setup(procs, args.tasks, helpers, args.log_level)
            gateway, script = setup.gateway, setup.script
            url = f"{gateway.url}/"
        else:
            gateway = start_cached(procs, args.log_level)
            url = f"{gateway.url}/mj/task/{TASK_ID}/fetch"
        connections = args.connections or (50 if args.scenario == "miss" else 64)
        run_wrk(url, headers=caller_headers(), duration_s=2, connections=connections, script=script)
        QuietWait(args.quiet_wait).wait()
        out = procs.workdir / "profile.txt"
        command = [spy, "record", "--pid", str(gateway.proc.pid), "--rate", str(args.rate)]
        command += ["--duration", f"{args.duration:g}", "--format", "raw", "-o", str(out)]
        if args.nonblocking:
            command.append("--nonblocking")
        sampler = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=pinned_child(LOAD_CORE),
        )
        try:
            load = run_wrk(
                url,
                headers=caller_headers(),
                duration_s=args.duration + 1,
                connections=connections,
                script=script,
            )
            _, errors = sampler.communicate(timeout=args.duration + 30)
        finally:
            if sampler.poll() is None:
                sampler.kill()
                sampler.wait()
        if sampler.returncode != 0:
            raise BenchError(f"py-spy failed: {errors.decode(errors='replace')[-500:]}")
        if args.save:
            shutil.copy(out, args.save)
            print(f"raw profile saved to {args.save} (flamegraph.pl or speedscope read it)")
        profile = read_profile(out)
    print(
        f"wrk under py-spy: {load.rps:,.0f} req/s, p50 {load.p50_ms:.2f} ms; "
        f"{profile.total:,} samples at {args.rate} Hz"
    )
    show(profile, args.top)
    return profile


def show(profile: Profile, top: int) -> None:
    print("\nCPU by module (self time, innermost Python frame):")
    print_table(
        ["module", "share"],
        [[m, profile.share(n)] for m, n in profile.by_module.most_common(top)],
    )
    print("\ngateway call sites (inclusive: samples with this line on the stack):")
    # Frames on every stack (the process's entry point down to uvicorn) say nothing.
    sites = [(s, n) for s, n in profile.by_call_site.most_common() if n < profile.total * 0.99]
    print_table(["call site", "share"], [[s, profile.share(n)] for s, n in sites[:top]])
    print("\nfunctions by self time:")
    print_table(
        ["function", "share"],
        [[f, profile.share(n)] for f, n in profile.by_function.most_common(top)],
    )


def parser() -> argparse.ArgumentParser:
    p = bench_parser("profile", __doc__)
    p.add_argument("--scenario", default="cache", choices=["cache", "miss"])
    p.add_argument("--log-level", default="info", choices=["info", "warning"])
    p.add_argument("--duration", type=float, default=10.0, help="seconds sampled")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument(
        "--connections", type=int, default=0, help="wrk connections (default: 64; miss: 50)"
    )
    p.add_argument("--tasks", type=int, default=300, help="miss: running tasks, round-robin")
    p.add_argument("--helpers-core", choices=["load", "server"], default="load", help="miss")
    p.add_argument("--top", type=int, default=25, help="rows per table")
    p.add_argument(
        "--nonblocking",
        action="store_true",
        help="sample without pausing the gateway (less overhead, but torn stacks)",
    )
    p.add_argument("--save", type=Path, help="keep py-spy's raw output in this file")
    p.add_argument("--quiet-wait", type=float, default=15.0, help="see python -m bench cache")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    install_signal_handlers()
    pin_self_to_load_core()
    try:
        run(args)
    except BenchError as exc:
        print(f"bench profile: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench profile: interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
