"""The gateway as a real separate process: gunicorn with several workers, or ``mjgate serve``.

Its stdout (one JSON object per line) is kept in a file so a test can count log events after
the fact. Helpers here also fire requests as fast as possible for a bounded window and count
what came back, for the rate-limit and outbound-cap tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from httpx_aiohttp import AiohttpTransport
from prometheus_client.parser import text_string_to_metric_families

from tests.support import config_data, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

__all__ = [
    "GatewayProcess",
    "Hammered",
    "config_data",
    "gateway_process",
    "hammer",
    "metric",
    "stop_process",
    "worker_cpu_ticks",
    "worker_pids",
]


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM (a graceful stop), then SIGKILL if it is still running after ``timeout_s``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@dataclass
class GatewayProcess:
    proc: subprocess.Popen[bytes]
    url: str
    stdout_path: Path
    stderr_path: Path

    def stop(self) -> None:
        stop_process(self.proc, timeout_s=15)

    def log_lines(self) -> list[dict[str, Any]]:
        """Every JSON object the gateway wrote to stdout so far (other lines are skipped)."""
        lines: list[dict[str, Any]] = []
        for raw in self.stdout_path.read_text(errors="replace").splitlines():
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if isinstance(line, dict):
                lines.append(line)
        return lines

    def events(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            line
            for line in self.log_lines()
            if line.get("event") == event and all(line.get(k) == v for k, v in fields.items())
        ]


@contextmanager
def gateway_process(
    tmp_path: Path, config: dict[str, Any], workers: int | None = None
) -> Iterator[GatewayProcess]:
    """Run the gateway on a free port: gunicorn with ``workers`` uvicorn workers, or
    ``python -m gateway serve`` (one process) when ``workers`` is None."""
    port = free_port()
    name = uuid.uuid4().hex[:8]
    config_path = tmp_path / f"mjgate-{name}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("MJGATE_CONFIG", "REDIS_URL")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if workers is None:
        command = [sys.executable, "-m", "gateway", "serve", "--config", str(config_path)]
        command += ["--host", "127.0.0.1", "--port", str(port)]
    else:
        env["MJGATE_CONFIG"] = str(config_path)
        command = [str(BIN / "gunicorn"), "gateway.app:factory()"]
        command += ["-k", "uvicorn_worker.UvicornWorker", "-w", str(workers)]
        command += ["-b", f"127.0.0.1:{port}", "--graceful-timeout", "5"]
    stdout_path, stderr_path = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, cwd=ROOT, env=env)
    gateway = GatewayProcess(proc, f"http://127.0.0.1:{port}", stdout_path, stderr_path)

    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited: {stderr_path.read_text()[-2000:]}")
        return httpx.get(f"{gateway.url}/healthz", timeout=2).status_code == 200

    try:
        wait_until(healthy, timeout_s=30, what="gateway process")
        if workers is not None:
            # Every worker up (each logs "started" from its lifespan), not only the first.
            wait_until(
                lambda: len(gateway.events("started")) >= workers, timeout_s=30, what="workers"
            )
        yield gateway
    finally:
        gateway.stop()


def metric(base_url: str, name: str, **labels: str) -> float:
    """One sample from the gateway's ``/metrics`` (0 when it has not been counted yet)."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def worker_pids(master_pid: int) -> list[int]:
    """The direct children of a gunicorn master, from /proc."""
    path = Path(f"/proc/{master_pid}/task/{master_pid}/children")
    return [int(pid) for pid in path.read_text().split()]


def worker_cpu_ticks(pid: int) -> int:
    """User plus system CPU time of a process, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime 14 and stime 15 (1-based, proc(5)).
    return int(fields[11]) + int(fields[12])


@dataclass
class Hammered:
    """What a burst of requests got back."""

    statuses: Counter[int] = field(default_factory=Counter)
    elapsed_s: float = 0.0
    responses: list[httpx.Response] = field(default_factory=list)

    def count(self, status: int) -> int:
        return self.statuses[status]


async def hammer(
    base_url: str,
    headers: dict[str, str],
    duration_s: float,
    concurrency: int,
    request: Callable[[httpx.AsyncClient, int], Any],
    keep: Callable[[httpx.Response], bool] = lambda r: False,
    keepalive: bool = True,
) -> Hammered:
    """``concurrency`` callers each send requests back to back until ``duration_s`` is up.

    ``request(client, n)`` makes the n-th request (a coroutine returning a response).
    Without ``keepalive`` every request opens a new connection, so that the workers of a
    multi-process server, which take turns accepting connections, all get a share. The
    client runs on aiohttp's pool, as the gateway does: httpx's own pool slows down under
    a hundred concurrent requests (encode/httpx#3215) and would stretch the measured time.
    ``elapsed_s`` runs from before the first request was sent to after the last answer came
    back, so it bounds from above the time during which the gateway admitted requests.
    """
    result = Hammered()
    transport = AiohttpTransport(limits=httpx.Limits(max_connections=concurrency))
    if not keepalive:
        headers = {**headers, "Connection": "close"}
    counter = iter(range(10**9))
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, transport=transport, timeout=30
    ) as client:
        started = time.monotonic()
        stop_at = started + duration_s

        async def one_caller() -> None:
            while time.monotonic() < stop_at:
                response: httpx.Response = await request(client, next(counter))
                result.statuses[response.status_code] += 1
                if keep(response):
                    result.responses.append(response)

        await asyncio.gather(*(one_caller() for _ in range(concurrency)))
        result.elapsed_s = time.monotonic() - started
    return result
