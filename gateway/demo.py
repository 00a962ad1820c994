"""``mjgate demo``: two simulated upstreams of different flavors and a gateway in front of them,
in one process, with the embedded store. Nothing to install, no credits spent."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket

import uvicorn

from gateway.app import create_app
from gateway.config import LoggingConfig
from gateway.configfile import config_from_dict
from gateway.logs import configure_logging
from gateway.sim import SimSettings, create_sim_app

__all__ = ["DEMO_KEY", "demo_config", "run_demo"]

DEMO_KEY = "demo-key"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def demo_config(port: int, java_port: int, relay_port: int, keys: tuple[str, str]) -> object:
    return config_from_dict(
        {
            "server": {"host": "127.0.0.1", "port": port},
            "upstreams": [
                {
                    "name": "java-sim",
                    "base_url": f"http://127.0.0.1:{java_port}",
                    "auth": "mj-api-secret",
                    "key": keys[0],
                    "list_by_ids_path": "/mj/task/list-by-condition",
                    "supports_query": True,
                    "timeout_s": 5,
                },
                {
                    "name": "relay-sim",
                    "base_url": f"http://127.0.0.1:{relay_port}",
                    "auth": "bearer",
                    "key": keys[1],
                    "list_by_ids_path": "/mj/task/list-by-ids",
                    "supports_query": True,
                    "timeout_s": 5,
                },
            ],
            "clients": [{"name": "demo", "key": DEMO_KEY}],
            "logging": {"format": "console"},
        },
        env={},
    )


def _banner(url: str) -> str:
    auth = f"-H 'Authorization: Bearer {DEMO_KEY}'"
    return f"""
mjgate demo: a gateway at {url} in front of two simulated upstreams (java and relay flavors).
Caller key: {DEMO_KEY}   (upstream keys are random and stay inside the gateway)

Try:
  curl -s {auth} -H 'Content-Type: application/json' \\
       -d '{{"prompt": "a lighthouse at dawn"}}' {url}/mj/submit/imagine
  curl -s {auth} {url}/mj/task/<id from above>/fetch
  curl -s -H 'mj-api-secret: {DEMO_KEY}' -H 'Content-Type: application/json' \\
       -d '{{"ids": ["<id>"]}}' {url}/mj/task/list-by-condition

Tasks finish in about 15 seconds. Ctrl-C stops everything.
"""


def run_demo(port: int) -> None:
    java_port, relay_port = _free_port(), _free_port()
    keys = (secrets.token_urlsafe(16), secrets.token_urlsafe(16))
    config = demo_config(port, java_port, relay_port, keys)
    from gateway.config import Config

    assert isinstance(config, Config)
    configure_logging(LoggingConfig(format="console"), keys)
    sims = [
        (SimSettings(flavor="java", key=keys[0], task_seconds=15), java_port),
        (
            SimSettings(flavor="relay", key=keys[1], task_seconds=15, list_paths="list-by-ids"),
            relay_port,
        ),
    ]
    servers = [
        uvicorn.Server(
            uvicorn.Config(create_sim_app(s), host="127.0.0.1", port=p, log_level="warning")
        )
        for s, p in sims
    ]
    servers.append(
        uvicorn.Server(
            uvicorn.Config(
                create_app(config),
                host="127.0.0.1",
                port=port,
                log_level="warning",
                access_log=False,
            )
        )
    )
    print(_banner(f"http://127.0.0.1:{port}"), flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_all(servers))


async def _serve_all(servers: list[uvicorn.Server]) -> None:
    tasks = [asyncio.create_task(server.serve()) for server in servers]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for server in servers:
        server.should_exit = True
    await asyncio.gather(*tasks, return_exceptions=True)
