"""``python -m bench [all|cache|miss|amplification|fanout|images|watcher|profile] [options]``.

``python -m bench`` runs the six benchmarks one after the other (about 7 minutes) and
prints every table, then a summary of the targets. ``python -m bench miss`` (etc.) runs one;
``python -m bench miss --help`` shows its options; options after the name go to that
benchmark. ``profile`` (py-spy on the gateway under a cached-fetch or miss-path load) is a
diagnostic, not part of ``all``; nor are ``faults`` (faults under load, about 5 minutes) and
``soak`` (two workers under mixed traffic, 5 minutes by default).

Exit code: 0 every target met, 1 a target missed, 2 a benchmark could not run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench import (
    amplification,
    cache_fetch,
    fanout,
    faults,
    images,
    miss_fetch,
    profile_fetch,
    soak,
    watcher,
)
from bench.common import (
    BenchError,
    Verdict,
    install_signal_handlers,
    pin_self_to_load_core,
    print_verdicts,
)

__all__ = ["main"]


@dataclass(frozen=True)
class Bench:
    parser: Callable[[], argparse.ArgumentParser]
    run: Callable[[argparse.Namespace], list[Verdict]]
    main: Callable[[Sequence[str] | None], int]


BENCHES = {
    "cache": Bench(cache_fetch.parser, cache_fetch.run, cache_fetch.main),
    "miss": Bench(miss_fetch.parser, miss_fetch.run, miss_fetch.main),
    "amplification": Bench(amplification.parser, amplification.run, amplification.main),
    "fanout": Bench(fanout.parser, fanout.run, fanout.main),
    "images": Bench(images.parser, images.run, images.main),
    "watcher": Bench(watcher.parser, watcher.run, watcher.main),
}
# Not part of "all": a diagnostic for the cache benchmark, needs py-spy; and the fault and
# soak runs, minutes each.
EXTRA = {"profile": profile_fetch.main, "faults": faults.main, "soak": soak.main}
ALIASES = {
    "amp": "amplification",
    "cache-fetch": "cache",
    "cache_fetch": "cache",
    "miss-fetch": "miss",
    "miss_fetch": "miss",
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        print(f"benchmarks: {', '.join(BENCHES)}, all (default); diagnostics: {', '.join(EXTRA)}")
        return 0
    name = ALIASES.get(args[0], args[0]) if args else "all"
    if name in BENCHES:
        return BENCHES[name].main(args[1:])
    if name in EXTRA:
        return EXTRA[name](args[1:])
    if name != "all" and not name.startswith("-"):
        print(
            f"usage: python -m bench [{'|'.join([*BENCHES, *EXTRA])}] [options] "
            "| python -m bench [all] [--quiet-wait S]",
            file=sys.stderr,
        )
        return 2
    every = argparse.ArgumentParser(prog="python -m bench all")
    every.add_argument("--quiet-wait", type=float, default=15.0, help="per benchmark")
    options = every.parse_args(args[1:] if name == "all" else args)
    install_signal_handlers()
    pin_self_to_load_core()
    verdicts: list[Verdict] = []
    failed: list[str] = []
    for bench_name, bench in BENCHES.items():
        try:
            settings = ["--quiet-wait", str(options.quiet_wait)]
            verdicts += bench.run(bench.parser().parse_args(settings))
        except BenchError as exc:
            print(f"bench {bench_name}: {exc}", file=sys.stderr)
            failed.append(bench_name)
        except KeyboardInterrupt:
            print(f"bench {bench_name}: interrupted; every process it started was stopped")
            return 130
        print()
    print("== summary")
    print_verdicts(verdicts)
    for bench_name in failed:
        print(f"ERROR [{bench_name}] could not run (see above)")
    if failed:
        return 2
    return 0 if all(v.passed for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
