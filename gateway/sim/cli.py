"""``mjgate sim``: its flags, and serving the simulated upstream until interrupted."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from collections.abc import Sequence
from typing import get_args

import uvicorn

from gateway.sim.app import create_sim_app
from gateway.sim.settings import AuthStyle, Flavor, ListPaths, NotFoundStyle, SimSettings

__all__ = ["add_sim_arguments", "main", "run_sim", "settings_from_args"]


def main(argv: Sequence[str]) -> int:
    """``mjgate sim ARGS``: parse the flags and serve until interrupted."""
    parser = argparse.ArgumentParser(
        prog="mjgate sim", description="Run a simulated midjourney-proxy upstream."
    )
    add_sim_arguments(parser)
    run_sim(parser.parse_args(argv))
    return 0


def add_sim_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--host``, ``--port`` and one flag per ``SimSettings`` field to ``parser``."""
    d = SimSettings()
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    add("--port", type=int, default=8090, help="port to listen on; 0 picks a free one")
    add("--flavor", choices=get_args(Flavor), default=d.flavor, help="upstream to imitate")
    add("--key", default=d.key, help="API key callers must present (default: no auth check)")
    add("--auth", choices=get_args(AuthStyle), default=None, help="auth style (default: flavor's)")
    add("--not-found", choices=get_args(NotFoundStyle), default=None, help="unknown-id answer")
    add("--list-paths", choices=get_args(ListPaths), default=d.list_paths, help="list spellings")
    add("--no-query", dest="supports_query", action="store_false", help="do not serve /task/query")
    add("--task-seconds", type=float, default=d.task_seconds, help="submit to terminal time")
    add("--failure-rate", type=float, default=d.failure_rate, help="share of tasks that fail")
    add("--image-ttl-s", type=int, default=d.image_ttl_s, help="image URL lifetime after finish")
    add("--latency-ms", type=float, default=d.latency_ms, help="latency added to /mj requests")
    add("--error-rate", type=float, default=d.error_rate, help="share of requests failing")
    add("--error-status", type=int, default=d.error_status, help="their status (default 500)")
    add("--timeout-rate", type=float, default=d.timeout_rate, help="share of requests that hang")
    add("--hang-s", type=float, default=d.hang_s, help="how long a hanging request hangs")
    add("--queue-full-rate", type=float, default=d.queue_full_rate, help="share of queue-full")
    add("--seed", type=int, default=d.seed, help="random seed for reproducible runs")


def settings_from_args(args: argparse.Namespace) -> SimSettings:
    """The ``SimSettings`` the parsed ``add_sim_arguments`` flags describe."""
    names = [field.name for field in dataclasses.fields(SimSettings)]
    return SimSettings(**{name: getattr(args, name) for name in names if hasattr(args, name)})


def run_sim(args: argparse.Namespace) -> None:
    """Serve the simulated upstream until interrupted; prints where it listens once bound."""
    settings = settings_from_args(args)
    config = uvicorn.Config(
        create_sim_app(settings),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )
    server = uvicorn.Server(config)

    async def serve() -> None:
        serving = asyncio.create_task(server.serve())
        while not server.started and not serving.done():
            await asyncio.sleep(0.01)
        if server.started:
            port = server.servers[0].sockets[0].getsockname()[1]
            print(f"mjgate sim ({settings.flavor}) listening on http://{args.host}:{port}")
            sys.stdout.flush()
        await serving

    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(serve())
