"""Soak: the gateway as deployed under mixed traffic for minutes (not in ``all``).

gunicorn with two workers, Redis and three sims holding thousands of seeded tasks (a tenth
of them running); ``tests.load.MixedLoad`` fetches, lists (10 ids) and submits throughout,
a new connection per request, every answer judged. Every ``--sample`` seconds the workers'
resident memory and open file descriptors are read from /proc.

Printed per minute: answers, p99 latency, errors, and each worker's RSS and open files.
Targets: no answer lost and no error; each worker's RSS slope (least squares over the
samples after the first minute, the warm-up) at most 1 MB/min; open files at the end at
most 20 above those after the first minute; each worker alive throughout.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.common import (
    Verdict,
    bench_main,
    bench_parser,
    caller_headers,
    machine_note,
    percentile,
    print_table,
)
from bench.fleet import fleet, seed_tasks
from tests.deployed import open_fds, rss_mb
from tests.load import Answer, MixedLoad

__all__ = ["main", "parser", "run", "slope_per_minute"]

NAME = "soak"
SLOPE_MB_PER_MIN = 1.0
FD_GROWTH = 20
WARM_UP_S = 60.0


@dataclass
class Samples:
    """(seconds since start, MB) and (seconds, fds) per worker pid."""

    rss: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    fds: dict[int, list[tuple[float, int]]] = field(default_factory=dict)


def slope_per_minute(points: Sequence[tuple[float, float]]) -> float:
    """The least-squares slope of (seconds, value) points, per minute."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if spread == 0:
        return 0.0
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / spread * 60


def sample(
    workers: Sequence[int], samples: Samples, started: float, stop: threading.Event, every: float
) -> None:
    while not stop.wait(every):
        now = time.monotonic() - started
        for pid in workers:
            samples.rss.setdefault(pid, []).append((now, rss_mb(pid)))
            samples.fds.setdefault(pid, []).append((now, open_fds(pid)))


def per_minute(answers: Sequence[Answer], started: float, samples: Samples) -> list[list[str]]:
    rows = []
    minutes = int(max((a.ended for a in answers), default=started) - started) // 60 + 1
    for minute in range(minutes):
        lo, hi = started + minute * 60, started + (minute + 1) * 60
        these = [a for a in answers if lo <= a.started < hi]
        if not these:
            continue
        errors = sum(1 for a in these if not a.good)
        row = [str(minute + 1), str(len(these))]
        row += [f"{percentile([a.seconds * 1000 for a in these], 0.99):.1f}", str(errors)]
        for pid in sorted(samples.rss):
            last_rss = [v for t, v in samples.rss[pid] if t < hi - started]
            last_fds = [v for t, v in samples.fds[pid] if t < hi - started]
            row += [
                f"{last_rss[-1]:.0f}" if last_rss else "-",
                str(last_fds[-1]) if last_fds else "-",
            ]
        rows.append(row)
    return rows


def run(args: argparse.Namespace) -> list[Verdict]:
    print(f"== soak ({NAME}): {args.minutes:g} min, two gunicorn workers, Redis, three sims")
    print(machine_note())
    with fleet(with_junk=False) as running:
        ids = seed_tasks(running.sims, args.ids_per_sim)
        workers = running.workers()
        print(f"{len(ids)} seeded ids; workers {workers}")
        samples = Samples()
        stop = threading.Event()
        started = time.monotonic()
        sampler = threading.Thread(
            target=sample, args=(workers, samples, started, stop, args.sample)
        )
        sampler.start()
        load = MixedLoad(
            running.url,
            caller_headers(),
            ids,
            missing=[f"404{n:010d}" for n in range(50)],
            callers=args.callers,
            pause_s=args.pause,
            submits_per_s=args.submits_per_s,
            prompt_prefix="soak",
        )
        try:
            with load:
                time.sleep(args.minutes * 60)
        finally:
            stop.set()
            sampler.join()
        alive = running.workers()
    answers = list(load.answers)
    header = ["minute", "answers", "p99 ms", "errors"]
    for pid in sorted(samples.rss):
        header += [f"RSS MB {pid}", f"fds {pid}"]
    print_table(header, per_minute(answers, started, samples))
    errors = Counter(a.verdict for a in answers if not a.good)
    lost = sum(n for kind, n in errors.items() if kind.startswith("lost"))
    print(
        f"{len(answers)} answers, {len(load.submitted)} submits, errors: {dict(errors) or 'none'}"
    )
    verdicts = [
        Verdict(NAME, "no answer lost", f"{lost} lost", lost == 0),
        Verdict(NAME, "no error", str(dict(errors) or "none"), not errors),
        Verdict(NAME, "workers alive throughout", f"{workers} -> {alive}", alive == workers),
    ]
    for pid in sorted(samples.rss):
        warm = [(t, v) for t, v in samples.rss[pid] if t >= min(WARM_UP_S, args.minutes * 30)]
        slope = slope_per_minute(warm)
        verdicts.append(
            Verdict(
                NAME,
                f"worker {pid}: RSS slope <= {SLOPE_MB_PER_MIN:g} MB/min",
                f"{slope:+.2f} MB/min",
                slope <= SLOPE_MB_PER_MIN,
            )
        )
        fds = [v for t, v in samples.fds[pid] if t >= min(WARM_UP_S, args.minutes * 30)]
        growth = fds[-1] - fds[0] if fds else 0
        verdicts.append(
            Verdict(
                NAME,
                f"worker {pid}: open files grow <= {FD_GROWTH}",
                f"{growth:+d}",
                growth <= FD_GROWTH,
            )
        )
    return verdicts


def parser() -> argparse.ArgumentParser:
    p = bench_parser(NAME, __doc__)
    p.add_argument("--minutes", type=float, default=5.0, help="how long to run (default: 5)")
    p.add_argument("--callers", type=int, default=8, help="concurrent fetch/list callers")
    p.add_argument("--pause", type=float, default=0.005, help="seconds between a caller's requests")
    p.add_argument("--submits-per-s", type=float, default=5.0, help="submits a second")
    p.add_argument("--ids-per-sim", type=int, default=1000, help="tasks seeded in each sim")
    p.add_argument("--sample", type=float, default=5.0, help="seconds between RSS/fd samples")
    return p


main = bench_main(NAME, parser, run)


if __name__ == "__main__":
    sys.exit(main())
