"""``mjgate demo``: two simulated upstreams of different flavors and a gateway in front of them,
in one process, with the embedded store. Nothing to install, no credits spent."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import secrets
import socket
import sys

import uvicorn

from gateway.app import create_app
from gateway.config import Config, LoggingConfig
from gateway.configfile import config_from_dict
from gateway.logs import configure_logging
from gateway.sim import SimSettings, create_sim_app

__all__ = ["DEMO_KEY", "demo_config", "run_demo"]

DEMO_KEY = "demo-key"


def demo_config(port: int, java_port: int, relay_port: int, keys: tuple[str, str]) -> Config:
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
            # The demo caller may also read the admin routes (usage, task log, deliveries).
            "clients": [{"name": "demo", "key": DEMO_KEY, "admin": True}],
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


def run_demo(port: int) -> int:
    """Serve the demo until interrupted; 1, with one line on stderr, when ``port`` is taken."""
    try:
        listener = _listen(port)
    except OSError as exc:
        reason = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be used: {exc.strerror}"
        print(
            f"mjgate demo: port {port} on 127.0.0.1 {reason}; pick another with --port "
            "(make demo PORT=...)",
            file=sys.stderr,
        )
        return 1
    java, relay = _listen(0), _listen(0)
    keys = (secrets.token_urlsafe(16), secrets.token_urlsafe(16))
    config = demo_config(port, _port_of(java), _port_of(relay), keys)
    configure_logging(LoggingConfig(format="console"), keys)
    # No random failures in the demo: the README walk-through presses a finished task's button.
    java_sim = SimSettings(flavor="java", key=keys[0], task_seconds=15, failure_rate=0.0)
    relay_sim = SimSettings(
        flavor="relay", key=keys[1], task_seconds=15, failure_rate=0.0, list_paths="list-by-ids"
    )
    apps = [(create_sim_app(java_sim), java), (create_sim_app(relay_sim), relay)]
    apps.append((create_app(config), listener))
    servers = [
        (uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)), sock)
        for app, sock in apps
    ]
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_all(servers, _banner(f"http://127.0.0.1:{port}")))
    return 0


def _listen(port: int) -> socket.socket:
    """A socket bound to 127.0.0.1:``port`` (0: a free one). Binding here, before anything
    starts, turns a taken port into one clear line instead of a server failing half-way."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    return sock


def _port_of(sock: socket.socket) -> int:
    port: int = sock.getsockname()[1]
    return port


async def _serve_all(servers: list[tuple[uvicorn.Server, socket.socket]], banner: str) -> None:
    tasks = [asyncio.create_task(server.serve(sockets=[sock])) for server, sock in servers]

    def started() -> bool:
        return all(server.started for server, _ in servers)

    while not started() and not any(task.done() for task in tasks):
        await asyncio.sleep(0.01)
    if started():  # the banner only once every server listens
        print(banner, flush=True)
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for server, _ in servers:
        server.should_exit = True
    await asyncio.gather(*tasks, return_exceptions=True)
