"""What the bench's reference servers share: their command line's ``--host``/``--port`` and
the uvicorn settings of ``gateway.server`` (uvloop, httptools, no access log, no proxy
headers, lifespan on, 75 s keep-alive), so a ratio against them measures the gateway's code,
not its server."""

from __future__ import annotations

import argparse

import uvicorn
from starlette.applications import Starlette

__all__ = ["serve", "server_parser"]


def server_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser with ``--host`` (default loopback) and a required ``--port``."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    return parser


def serve(app: Starlette, host: str, port: int) -> None:
    """Serve ``app`` until interrupted, under the gateway's uvicorn settings."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        proxy_headers=False,
        log_level="warning",
        lifespan="on",
        timeout_keep_alive=75,
    )
    uvicorn.Server(config).run()
