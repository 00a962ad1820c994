"""The Python ceiling: one Starlette route answering a task fetch with bytes held in memory.

``python -m bench.baseline_app --port P --body-file F`` serves ``GET /mj/task/{id}/fetch``
with the file's bytes, under the same uvicorn settings as ``gateway.server`` (uvloop,
httptools, no access log, no proxy headers, lifespan on, 75 s keep-alive): no auth, no cache
lookup, no log line. Whatever the gateway does on a cached fetch is paid on top of this.
"""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bench.serving import serve, server_parser

__all__ = ["create_baseline_app", "main"]


def create_baseline_app(body: bytes) -> Starlette:
    async def fetch(request: Request) -> Response:
        return Response(body, media_type="application/json")

    return Starlette(routes=[Route("/mj/task/{task_id}/fetch", fetch, methods=["GET"])])


def main() -> None:
    parser = server_parser(__doc__)
    parser.add_argument("--body-file", type=Path, required=True)
    args = parser.parse_args()
    serve(create_baseline_app(args.body_file.read_bytes()), args.host, args.port)


if __name__ == "__main__":
    main()
