"""The gateway as deployed: ``gunicorn -c deploy/gunicorn.conf.py`` with ``MJGATE_CONFIG``,
``WEB_CONCURRENCY`` and a metrics directory, listening where the config's ``server`` section
says; its stdout (the gateway's JSON lines) and stderr (gunicorn's lines) kept in files.

Also what a fault test reads off the processes: worker pids, resident memory, open files.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml

from tests.gunicorn_support import stop_process, worker_pids
from tests.support import free_port, wait_until

__all__ = ["Deployed", "deployed_gunicorn", "open_fds", "rss_mb"]

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = Path(sys.executable).parent / "gunicorn"


def rss_mb(pid: int) -> float:
    """A process's resident memory in MB (VmRSS), 0 if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return 0.0
    line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def open_fds(pid: int) -> int:
    """A process's open file descriptors, 0 if it is gone."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        return 0


@dataclass
class Deployed:
    proc: subprocess.Popen[bytes]
    url: str
    stdout_path: Path
    stderr_path: Path
    config_path: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def workers(self) -> list[int]:
        return worker_pids(self.proc.pid)

    def rss_mb(self) -> dict[int, float]:
        return {pid: rss_mb(pid) for pid in self.workers()}

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def log_lines(self) -> list[dict[str, Any]]:
        """Every JSON object the gateway wrote to stdout so far."""
        lines: list[dict[str, Any]] = []
        for raw in self.stdout().splitlines():
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if isinstance(line, dict):
                lines.append(line)
        return lines

    def started_workers(self) -> int:
        """Workers whose lifespan completed start-up so far (uvicorn says so on stderr)."""
        return self.stderr().count("Application startup complete.")

    def wait_workers(self, count: int, timeout_s: float = 30) -> None:
        """Until ``count`` workers are up and their lifespans complete."""

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited:\n{self.stderr()[-3000:]}")
            return len(self.workers()) == count and self.started_workers() >= count

        wait_until(ready, timeout_s=timeout_s, what=f"{count} gunicorn workers")

    def reload(self) -> None:
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        stop_process(self.proc, timeout_s=40)


@contextmanager
def deployed_gunicorn(
    directory: Path, config: dict[str, Any], workers: int = 2
) -> Iterator[Deployed]:
    """Run the gateway under gunicorn as the image does, on a free loopback port."""
    config = {**config, "server": {**config.get("server", {}), "host": "127.0.0.1"}}
    config["server"].setdefault("port", free_port())
    name = uuid.uuid4().hex[:8]
    config_path = directory / f"mjgate-{name}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    drop = ("REDIS_URL", "MJGATE_CONFIG", "MJGATE_BIND", "WEB_CONCURRENCY")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    metrics_dir = directory / f"metrics-{name}"
    metrics_dir.mkdir()
    env |= {
        "MJGATE_CONFIG": str(config_path),
        "WEB_CONCURRENCY": str(workers),
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    stdout_path = directory / f"gunicorn-{name}.out"
    stderr_path = directory / f"gunicorn-{name}.err"
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        proc = subprocess.Popen(
            [str(GUNICORN), "-c", "deploy/gunicorn.conf.py"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=err,
        )
    url = f"http://127.0.0.1:{config['server']['port']}"
    deployed = Deployed(proc, url, stdout_path, stderr_path, config_path)
    try:
        deployed.wait_workers(workers)
        wait_until(lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200)
        yield deployed
    finally:
        deployed.stop()
