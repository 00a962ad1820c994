"""The ``mjgate`` command: serve, sim, demo, check-config, cache purge, usage, hash-key,
gen-key.

Each sub-command imports what it needs when it runs, so ``mjgate serve`` loads neither the
simulator nor the tools it never uses.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.config import Config

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    # `sim` declares no flags here: its own parser reads the rest, so that building this one
    # does not import the simulator.
    args, rest = parser.parse_known_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    if rest and args.command != "sim":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    result: int = args.run(args)
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mjgate", description="A caching gateway for midjourney-proxy-style task APIs."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway (one process)")
    serve.add_argument("--config", default=os.environ.get("MJGATE_CONFIG"), help="YAML file")
    serve.add_argument("--host", help="overrides server.host")
    serve.add_argument("--port", type=int, help="overrides server.port")
    serve.set_defaults(run=_serve)

    sim = commands.add_parser(
        "sim", help="run a simulated midjourney-proxy upstream", add_help=False
    )
    sim.set_defaults(run=_sim)

    demo = commands.add_parser("demo", help="two sims and a gateway wired to them, in one go")
    demo.add_argument("--port", type=int, default=8080, help="the gateway's port")
    demo.set_defaults(run=_demo)

    check = commands.add_parser("check-config", help="validate a config and print it redacted")
    check.add_argument("file")
    check.set_defaults(run=_check_config)

    cache = commands.add_parser("cache", help="act on the shared cache")
    cache_commands = cache.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    purge = cache_commands.add_parser("purge", help="drop task ids from the shared store")
    purge.add_argument("--config", default=os.environ.get("MJGATE_CONFIG"), help="YAML file")
    purge.add_argument("ids", nargs="+", metavar="ID")
    purge.set_defaults(run=_cache_purge)

    usage = commands.add_parser("usage", help="what each caller spent, from the ledger in Redis")
    usage.add_argument("--config", default=os.environ.get("MJGATE_CONFIG"), help="YAML file")
    usage.add_argument(
        "--from", dest="start", help="first UTC day, YYYY-MM-DD or ISO-8601 (default: the 1st)"
    )
    usage.add_argument("--to", dest="end", help="last UTC day, included (default: today)")
    usage.add_argument("--client", help="only this client")
    usage.add_argument(
        "--group-by", default="client", help="day, client, action, upstream (comma-separated)"
    )
    usage.add_argument("--format", choices=["table", "csv", "json"], default="table")
    usage.set_defaults(run=_usage)

    hash_cmd = commands.add_parser("hash-key", help="read a key on stdin, print its key_sha256")
    hash_cmd.set_defaults(run=_hash_key)

    gen = commands.add_parser("gen-key", help="make a new caller key and its config snippet")
    gen.add_argument("name", help="the client's name in the config")
    gen.set_defaults(run=_gen_key)
    return parser


def _load(path: str | None) -> Config | None:
    from gateway.config import ConfigError
    from gateway.configfile import load_config
    from gateway.master import report_invalid

    if not path:
        print("mjgate: no config file: pass --config FILE or set MJGATE_CONFIG", file=sys.stderr)
        return None
    try:
        return load_config(path)
    except ConfigError as exc:
        report_invalid(path, exc.problems)
        return None


def _serve(args: argparse.Namespace) -> int:
    from gateway.server import serve

    config = _load(args.config)
    if config is None:
        return 2
    serve(config, host=args.host, port=args.port)
    return 0


def _sim(args: argparse.Namespace) -> int:
    from gateway.sim import main as sim_main

    return sim_main(args.rest)


def _demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return run_demo(args.port)


def _check_config(args: argparse.Namespace) -> int:
    import yaml

    from gateway.config import redacted

    config = _load(args.file)
    if config is None:
        return 2
    print(f"# {args.file}: valid")
    print(yaml.safe_dump(redacted(config), sort_keys=False), end="")
    return 0


def _cache_purge(args: argparse.Namespace) -> int:
    import asyncio

    from gateway.purge import purge

    config = _load(args.config)
    if config is None:
        return 2
    if not config.redis.enabled:
        print(
            "mjgate: the embedded store lives inside the gateway process; purge through its "
            'route instead: POST /admin/cache/purge {"ids": [...]} as an admin client',
            file=sys.stderr,
        )
        return 2
    try:
        result = asyncio.run(purge(config, args.ids))
    except ValueError as exc:
        print(f"mjgate: {exc}", file=sys.stderr)
        return 2
    print(f"purged {len(result.purged)} task id(s) from the shared store")
    if result.absent:
        print(f"not in the shared store, nothing to purge: {' '.join(result.absent)}")
    return 0


def _usage(args: argparse.Namespace) -> int:
    import asyncio
    import json
    from datetime import UTC, datetime

    from gateway.errors import GatewayError
    from gateway.ledger import GROUPS, UsageQuery, parse_day, read_usage, usage_csv

    config = _load(args.config)
    if config is None:
        return 2
    if not config.redis.enabled:
        print(
            "mjgate: the embedded store lives inside the gateway process; ask its route "
            "instead: GET /admin/usage as an admin client",
            file=sys.stderr,
        )
        return 2
    group_by = tuple(dict.fromkeys(args.group_by.split(",")))
    try:
        end = parse_day(args.end, "--to") if args.end else datetime.now(UTC).date()
        start = parse_day(args.start, "--from") if args.start else end.replace(day=1)
        if not set(group_by) <= set(GROUPS):
            raise GatewayError(400, f"--group-by must name some of: {', '.join(GROUPS)}")
        rows = asyncio.run(read_usage(config, UsageQuery(start, end, args.client, group_by)))
    except GatewayError as exc:
        print(f"mjgate: {exc.description}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"mjgate: {exc}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    elif args.format == "csv":
        print(usage_csv(rows, group_by), end="")
    else:
        table = [line.split(",") for line in usage_csv(rows, group_by).splitlines()]
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        for row in table:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    return 0


def _hash_key(args: argparse.Namespace) -> int:
    from gateway.config import hash_key

    key = sys.stdin.readline().rstrip("\r\n")
    if not key:
        print("mjgate: no key on standard input", file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0


def _gen_key(args: argparse.Namespace) -> int:
    import secrets

    from gateway.config import hash_key
    from gateway.configfile import CLIENT_NAME

    if not CLIENT_NAME.match(args.name):
        print("mjgate: a client name is 1-64 characters of A-Z a-z 0-9 _ . -", file=sys.stderr)
        return 2
    key = "mjg-" + secrets.token_urlsafe(32)
    print(f"# Give this key to {args.name}; it is not stored anywhere else:")
    print(f"#   {key}")
    print("# and add this to clients: in the config (only the digest is kept):")
    print(f"  - name: {args.name}")
    print(f"    key_sha256: {hash_key(key)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
