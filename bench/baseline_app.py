"""The Python ceiling: one Starlette route answering a task fetch with bytes held in memory.

``python -m bench.baseline_app --port P --body-file F`` serves ``GET /mj/task/{id}/fetch``
with the file's bytes, under the same uvicorn settings as ``gateway.server`` (uvloop,
httptools, no access log, lifespan on, 75 s keep-alive): no auth, no cache lookup, no log
line. Whatever the gateway does on a cached fetch is paid on top of this.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

__all__ = ["create_baseline_app", "main"]


def create_baseline_app(body: bytes) -> Starlette:
    async def fetch(request: Request) -> Response:
        return Response(body, media_type="application/json")

    return Starlette(routes=[Route("/mj/task/{task_id}/fetch", fetch, methods=["GET"])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--body-file", type=Path, required=True)
    args = parser.parse_args()
    config = uvicorn.Config(
        create_baseline_app(args.body_file.read_bytes()),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        lifespan="on",
        timeout_keep_alive=75,
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
