"""Real parts for tests: a redis-server process, `mjgate sim` processes, a gateway on a port."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn

from gateway.config import Config
from gateway.configfile import config_from_dict
from gateway.server import uvicorn_config

CALLER_KEYS = {"alice": "alice-key-0123456789", "bob": "bob-key-0123456789"}
# The fields of the one access-log line per request.
ACCESS_LOG_FIELDS = (
    "request_id",
    "client",
    "method",
    "route",
    "status",
    "duration_ms",
    "cache",
    "upstreams",
    "upstream_ms",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(check: Any, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def redis_server_args(binary: str, port: int, directory: str) -> list[str]:
    """redis-server on a loopback ``port`` without persistence, its files in ``directory``."""
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    return [*args, "--appendonly", "no", "--dir", directory]


class RedisProcess:
    """A throwaway redis-server on a free loopback port, without persistence."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (the test command installs it)")
        self.binary = binary
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="mjgate-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = redis_server_args(self.binary, self.port, self.dir)
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def ready() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")

        wait_until(ready, what="redis-server")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)  # a test may have frozen it
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@dataclass
class SimProcess:
    """A real `mjgate sim` process; its control API tells what it received."""

    name: str
    flavor: str
    key: str
    gateway_auth: str
    list_path: str
    extra_args: tuple[str, ...] = ()
    supports_query: bool = False
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [sys.executable, "-m", "gateway", "sim", "--port", str(self.port)]
        args += ["--flavor", self.flavor, "--key", self.key, *self.extra_args]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: httpx.get(f"{self.url}/_sim/health").status_code == 200, what=self.name)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def control(self, method: str, path: str, body: Any = None) -> Any:
        response = httpx.request(method, f"{self.url}/_sim/{path}", json=body, timeout=10)
        response.raise_for_status()
        return response.json()

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.control("GET", "stats")
        return result

    def reset(self) -> None:
        self.control("POST", "reset", {"tasks": True})
        self.control(
            "POST",
            "faults",
            {
                "latency_ms": 0,
                "error_rate": 0,
                "error_status": 500,
                "timeout_rate": 0,
                "queue_full_rate": 0,
            },
        )

    def faults(self, **values: Any) -> None:
        self.control("POST", "faults", values)

    def seed(self, **task: Any) -> dict[str, Any]:
        result: dict[str, Any] = self.control("POST", "tasks", task)
        return result

    def count(self, key: str) -> int:
        return int(self.stats()["requests"].get(key, 0))

    def upstream_config(self, **overrides: Any) -> dict[str, Any]:
        return {
            "name": self.name,
            "base_url": self.url,
            "auth": self.gateway_auth,
            "key": self.key,
            "list_by_ids_path": self.list_path,
            "supports_query": self.supports_query,
            "timeout_s": 5,
            # Generous caps: tests of the caps themselves set their own.
            "max_rps": 1000,
            "max_concurrency": 256,
            **overrides,
        }


@contextmanager
def faults_restored(sim: SimProcess, **faults: Any) -> Iterator[SimProcess]:
    """``sim`` with ``faults`` set (if any); on the way out, the sim's defaults again (tasks
    take 8 s, one in ten fails)."""
    if faults:
        sim.faults(**faults)
    try:
        yield sim
    finally:
        sim.faults(task_seconds=8.0, failure_rate=0.1)


def standard_sims() -> list[SimProcess]:
    """Three upstream flavors, each with its own key and auth style."""
    return [
        SimProcess(
            "java", "java", "java-upstream-key-1", "mj-api-secret", "/mj/task/list-by-condition"
        ),
        SimProcess(
            "csharp",
            "csharp",
            "csharp-upstream-key-2",
            "mj-api-secret",
            "/mj/task/list-by-condition",
        ),
        SimProcess(
            "relay",
            "relay",
            "relay-upstream-key-3",
            "bearer",
            "/mj/task/list-by-ids",
            ("--list-paths", "list-by-ids", "--no-query"),
        ),
    ]


def config_data(sims: list[SimProcess], redis_url: str = "", **sections: Any) -> dict[str, Any]:
    """A config document with callers alice (every upstream) and bob (the first upstream
    only), generous limits (tests of the limits set their own), no duplicate-submit window
    and no watcher (tests of them set their own) and a fresh key prefix."""
    data: dict[str, Any] = {
        "redis": {"url": redis_url, "key_prefix": f"t{uuid.uuid4().hex[:12]}"},
        "upstreams": [s.upstream_config() for s in sims],
        "clients": [
            {"name": "alice", "key": CALLER_KEYS["alice"]},
            {"name": "bob", "key": CALLER_KEYS["bob"], "upstreams": [sims[0].name]},
        ],
        "fanout": {"deadline_s": 3},
        "rate_limit": {"default": {"rps": 10000, "burst": 10000}},
        "submit": {"dedup_window_s": 0},
        # Off unless a test turns it on: its polls would add to what tests count upstream.
        "watcher": {"enabled": False},
    }
    data.update(sections)
    return data


def make_config(sims: list[SimProcess], redis_url: str = "", **sections: Any) -> Config:
    """``config_data`` as a validated Config."""
    return config_from_dict(config_data(sims, redis_url, **sections), env={})


class GatewayThread:
    """The real ASGI app under a real uvicorn server, in a thread, on a free port."""

    def __init__(self, config: Config, port: int | None = None) -> None:
        self.port = port or free_port()
        # The settings `mjgate serve` uses (header bounds included), on a port of its own.
        self.server = uvicorn.Server(uvicorn_config(config, "127.0.0.1", self.port))
        self.thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.run(self.server.serve())

    def start(self) -> None:
        self.thread.start()
        wait_until(lambda: self.server.started, what="gateway start-up")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@contextmanager
def running_gateway(config: Config, port: int | None = None) -> Iterator[GatewayThread]:
    gateway = GatewayThread(config, port)
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()


def caller(name: str = "alice", style: str = "bearer") -> dict[str, str]:
    """Headers presenting a caller's key in one of the three accepted ways."""
    key = CALLER_KEYS[name]
    if style == "bearer":
        return {"Authorization": f"Bearer {key}"}
    if style == "raw":
        return {"Authorization": key}
    return {"mj-api-secret": key}
