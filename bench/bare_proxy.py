"""The miss path's Python ceiling: a bare proxy for a task fetch.

``python -m bench.bare_proxy --port P --upstream URL --upstream-key K --client-key C`` serves
``GET /mj/task/{id}/fetch``: it checks the caller's bearer key, forwards the request with one
pooled aiohttp session to the upstream (``mj-api-secret`` auth) and answers the upstream's
status, content type and bytes, under the same uvicorn settings as ``gateway.server``
(uvloop, httptools, no access log, no proxy headers, 75 s keep-alive). No cache, no owner
lookup, no limits, no metrics, no log line: whatever the gateway does on a miss is paid on
top of this.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import aiohttp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bench.serving import serve, server_parser

__all__ = ["create_bare_proxy", "main"]

UNAUTHORIZED = b'{"error":"unauthorized"}'


def create_bare_proxy(upstream: str, upstream_key: str, client_key: str) -> Starlette:
    expected = f"Bearer {client_key}"

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, aiohttp.ClientSession]]:
        timeout = aiohttp.ClientTimeout(total=10)
        headers = {"mj-api-secret": upstream_key}
        async with aiohttp.ClientSession(upstream, headers=headers, timeout=timeout) as session:
            yield {"session": session}

    async def fetch(request: Request) -> Response:
        if request.headers.get("authorization") != expected:
            return Response(UNAUTHORIZED, status_code=401, media_type="application/json")
        session: aiohttp.ClientSession = request.state.session
        async with session.get(f"/mj/task/{request.path_params['task_id']}/fetch") as answer:
            body = await answer.read()
            return Response(body, status_code=answer.status, media_type=answer.content_type)

    routes = [Route("/mj/task/{task_id}/fetch", fetch, methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan)


def main() -> None:
    parser = server_parser(__doc__)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--upstream-key", required=True, help="sent as mj-api-secret")
    parser.add_argument("--client-key", required=True, help="the caller's bearer key")
    args = parser.parse_args()
    app = create_bare_proxy(args.upstream, args.upstream_key, args.client_key)
    serve(app, args.host, args.port)


if __name__ == "__main__":
    main()
