"""Running the gateway in one process with uvicorn (gunicorn uses ``gateway.master``)."""

from __future__ import annotations

import uvicorn

from gateway.app import create_app
from gateway.config import Config
from gateway.http11 import bounded_http
from gateway.logs import configure_logging, secrets_of
from gateway.worker import DrainingServer

__all__ = ["serve", "uvicorn_config"]


def uvicorn_config(
    config: Config, host: str | None = None, port: int | None = None
) -> uvicorn.Config:
    """uvicorn settings for the gateway: uvloop, httptools with the header bounds of
    ``server``, and no access log of its own (the gateway writes one line per request)."""
    return uvicorn.Config(
        create_app(config),
        host=host or config.server.host,
        port=port or config.server.port,
        loop="uvloop",
        http=bounded_http(config.server),
        access_log=False,
        # Nothing in the gateway reads the caller's address; uvicorn's middleware that
        # rewrites it from X-Forwarded-For would cost every request for nothing.
        proxy_headers=False,
        log_level="warning",
        lifespan="on",
        timeout_keep_alive=75,
    )


def serve(config: Config, host: str | None = None, port: int | None = None) -> None:
    configure_logging(config.logging, secrets_of(config))
    DrainingServer(uvicorn_config(config, host, port)).run()
