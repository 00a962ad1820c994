"""Faults under a steady mixed load, for longer than the tests run them (not in ``all``).

The gateway runs as deployed: gunicorn with two workers, Redis, three sims and a garbage
upstream (``tests.garbage_upstream``). A mixed load of fetches, lists and submits over
thousands of seeded ids (``tests.load.MixedLoad``, a new connection per request) runs
throughout; each fault is injected after ``--before`` seconds, lasts ``--during`` seconds,
and the load goes on ``--after`` seconds more. Faults: Redis killed and restarted, Redis
frozen (SIGSTOP) and resumed, one sim hanging, the garbage upstream answering each kind of
garbage (HTML with 200, truncated JSON, another task's id, a 50 MB body, a gzip bomb, a slow
drip, an invalid status, oversized headers, a closed connection; then all in turn), and a
gunicorn worker SIGKILLed.

Per fault: answers, answers lost (of which cut: in flight on the killed worker), errors by
kind (everything not ``ok``: 502/503/504 are the gateway's clean JSON errors, ``partial`` a
list naming an upstream that did not answer), the worst latency of a request sent during
the fault, the time from the fault's end to the last answer that was not good, and the
workers' resident memory before and after. Targets: no answer lost, every error a clean
502/503/504 (or a partial list), recovered within 5 s, no submit received twice, and
resident memory after a fault at most 50 MB above before it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bench.common import (
    Verdict,
    bench_main,
    bench_parser,
    caller_headers,
    machine_note,
    print_table,
)
from bench.fleet import Fleet, fleet, seed_tasks
from tests.garbage_upstream import BROKEN
from tests.load import HEADER, Figures, MixedLoad, figures

__all__ = ["main", "parser", "run"]

NAME = "faults"
CLEAN = {"ok", "partial", "502", "503", "504"}
RECOVER_S = 5.0
RSS_GROWTH_MB = 50.0
GARBAGE = (*BROKEN, "mixed")


@dataclass(frozen=True)
class Fault:
    name: str
    inject: Callable[[Fleet], Any]
    clear: Callable[[Fleet], Any]
    kills_worker: bool = False


def _freeze(running: Fleet, sig: signal.Signals) -> None:
    assert running.redis.proc is not None
    os.kill(running.redis.proc.pid, sig)


def _hang(running: Fleet, rate: float) -> None:
    running.sims[1].control("POST", "faults", {"timeout_rate": rate, "hang_s": 10})


def _junk(mode: str) -> Callable[[Fleet], None]:
    def apply(running: Fleet) -> None:
        assert running.junk is not None
        running.junk.set_mode(mode)

    return apply


FAULTS = [
    Fault("redis killed", lambda f: f.redis.kill(), lambda f: f.redis.start()),
    Fault(
        "redis frozen",
        lambda f: _freeze(f, signal.SIGSTOP),
        lambda f: _freeze(f, signal.SIGCONT),
    ),
    Fault("sim hangs", lambda f: _hang(f, 1.0), lambda f: _hang(f, 0.0)),
    *(Fault(f"garbage: {mode}", _junk(mode), _junk("off")) for mode in GARBAGE),
    Fault(
        "worker SIGKILL",
        lambda f: os.kill(f.workers()[0], signal.SIGKILL),
        lambda f: None,
        kills_worker=True,
    ),
]


def one_fault(
    running: Fleet, ids: Sequence[str], fault: Fault, args: argparse.Namespace
) -> Figures:
    before_rss = sum(running.rss().values())
    submits_before = running.submits_received()
    load = MixedLoad(
        running.url,
        caller_headers(),
        ids,
        missing=[f"404{n:010d}" for n in range(20)],
        callers=args.callers,
        pause_s=args.pause,
        prompt_prefix=f"faults-{fault.name}",
    )
    with load:
        time.sleep(args.before)
        fault_at = time.monotonic()
        fault.inject(running)
        time.sleep(args.during)
        cleared_at = time.monotonic()
        fault.clear(running)
        time.sleep(args.after)
    result = figures(
        fault.name, load.answers, fault_at, cleared_at, fault_at if fault.kills_worker else None
    )
    result.rss_before_mb, result.rss_after_mb = before_rss, sum(running.rss().values())
    received = running.submits_received() - submits_before
    if received > len(load.submitted):
        result.notes.append(f"{received} submits received for {len(load.submitted)} sent")
    return result


def verdicts(results: Sequence[Figures]) -> list[Verdict]:
    out = []
    for r in results:
        unclean = {k: n for k, n in r.errors.items() if k not in CLEAN and "lost" not in k}
        growth = r.rss_after_mb - r.rss_before_mb
        checks = [
            ("no answer lost", f"{r.lost - r.cut} lost", r.lost == r.cut),
            ("every error clean", str(unclean) if unclean else "all clean", not unclean),
            (f"recovered in {RECOVER_S:g} s", f"{r.recover_s:.2f} s", r.recover_s <= RECOVER_S),
            (f"RSS growth <= {RSS_GROWTH_MB:g} MB", f"{growth:+.0f} MB", growth <= RSS_GROWTH_MB),
            ("no submit received twice", "; ".join(r.notes) or "none", not r.notes),
        ]
        out += [Verdict(NAME, f"{r.name}: {target}", seen, ok) for target, seen, ok in checks]
    return out


def run(args: argparse.Namespace) -> list[Verdict]:
    timing = f"{args.before:g} s of load, the fault for {args.during:g} s, {args.after:g} s more"
    print(f"== faults under load ({NAME}): {timing}")
    print(machine_note())
    chosen = [f for f in FAULTS if not args.only or any(o in f.name for o in args.only)]
    results: list[Figures] = []
    with fleet(with_junk=True) as running:
        ids = seed_tasks(running.sims, args.ids_per_sim)
        print(f"{len(ids)} seeded ids over {len(running.sims)} sims; workers {running.workers()}")
        for fault in chosen:
            results.append(one_fault(running, ids, fault, args))
            print(" | ".join(results[-1].row()), flush=True)
    print()
    print_table(HEADER, [r.row() for r in results])
    return verdicts(results)


def parser() -> argparse.ArgumentParser:
    p = bench_parser(NAME, __doc__)
    p.add_argument("--before", type=float, default=3.0, help="seconds of load before a fault")
    p.add_argument("--during", type=float, default=10.0, help="seconds a fault lasts")
    p.add_argument("--after", type=float, default=10.0, help="seconds of load after it")
    p.add_argument("--callers", type=int, default=6, help="concurrent fetch/list callers")
    p.add_argument("--pause", type=float, default=0.01, help="seconds between a caller's requests")
    p.add_argument("--ids-per-sim", type=int, default=1000, help="tasks seeded in each sim")
    p.add_argument("--only", nargs="*", default=[], help="faults whose name contains these")
    return p


main = bench_main(NAME, parser, run)


if __name__ == "__main__":
    sys.exit(main())
