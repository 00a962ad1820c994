"""What the fault and soak benchmarks share: the gateway as deployed (gunicorn with two
workers, Redis, three sims, and for faults a garbage upstream), seeded tasks, and reading the
workers' memory and open files from /proc.

Load comes from ``tests.load.MixedLoad`` and the garbage upstream from
``tests.garbage_upstream``: the benchmarks measure, for minutes, what the fault tests check
in seconds.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.common import (
    CLIENT_KEY,
    GATEWAY_SRC,
    REPO,
    BenchError,
    Processes,
    Sim,
    caller_headers,
    free_port,
    need,
    start_sim,
    wait_http,
    wait_redis,
)
from tests.deployed import rss_mb
from tests.garbage_upstream import GarbageProcess
from tests.gunicorn_support import worker_pids
from tests.support import redis_server_args

__all__ = ["Fleet", "Redis", "fleet", "seed_tasks"]

GUNICORN = Path(sys.executable).parent / "gunicorn"


class Redis:
    """A redis-server on a fixed port that a fault may kill and start again."""

    def __init__(self, procs: Processes) -> None:
        self.procs = procs
        self.binary = need("redis-server")["redis-server"]
        self.port = free_port()
        self.dir = procs.workdir / "redis"
        self.dir.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = redis_server_args(self.binary, self.port, str(self.dir))
        self.proc = self.procs.start("redis-server", args, core=None)
        wait_redis(self.port, self.proc)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.procs.stop(self.proc)


@dataclass
class Fleet:
    """A running gateway (gunicorn master ``pid``) and what stands behind it."""

    procs: Processes
    url: str
    pid: int
    redis: Redis
    sims: list[Sim]
    junk: GarbageProcess | None
    log: Path

    def workers(self) -> list[int]:
        return sorted(worker_pids(self.pid))

    def rss(self) -> dict[int, float]:
        return {pid: rss_mb(pid) for pid in self.workers()}

    def submits_received(self) -> int:
        total = sum(int(sim.stats()["submits"]) for sim in self.sims)
        return total + (int(self.junk.stats()["submits"]) if self.junk else 0)


def seed_tasks(sims: Sequence[Sim], per_sim: int, running_share: float = 0.1) -> list[str]:
    """Tasks in every sim, finished and (a share of them) running for ten minutes; their
    ids, interleaved over the sims."""
    ids: list[str] = []
    base = int(time.time() * 1000) * 1000
    with httpx.Client(timeout=10) as client:
        for n in range(per_sim):
            for index, sim in enumerate(sims):
                task_id = str(base + n * len(sims) + index)
                task: dict[str, Any] = {"id": task_id, "status": "SUCCESS", "prompt": "seeded"}
                if n < per_sim * running_share:
                    task = {"id": task_id, "playing": True, "task_seconds": 600, "prompt": "seed"}
                client.post(f"{sim.url}/_sim/tasks", json=task).raise_for_status()
                ids.append(task_id)
    return ids


def _config(
    port: int, redis_url: str, sims: Sequence[Sim], junk: GarbageProcess | None
) -> dict[str, Any]:
    limit = {"rps": 1_000_000, "burst": 1_000_000}
    upstreams = [{**sim.upstream_config(), "timeout_s": 2} for sim in sims]
    if junk is not None:
        upstreams.append(junk.upstream_config(timeout_s=2))
    return {
        "server": {"host": "127.0.0.1", "port": port},
        "redis": {"url": redis_url, "key_prefix": f"fleet{uuid.uuid4().hex[:8]}"},
        "upstreams": upstreams,
        "clients": [{"name": "bench", "key": CLIENT_KEY, "rate_limit": limit}],
        "rate_limit": {"default": limit},
        "fanout": {"deadline_s": 3},
        "circuit": {"failure_threshold": 5, "cooldown_s": 2},
        "logging": {"level": "warning", "format": "json"},
    }


@contextmanager
def fleet(with_junk: bool, workers: int = 2) -> Iterator[Fleet]:
    """Redis, three sims (and the garbage upstream), and ``gunicorn -c
    deploy/gunicorn.conf.py`` with ``workers`` workers; all stopped on the way out."""
    with Processes() as procs:
        redis = Redis(procs)
        redis.start()
        sims = [start_sim(procs, f"sim{n}", latency_ms=2) for n in range(3)]
        junk = None
        if with_junk:
            junk = GarbageProcess("junk", "bench-junk-key-4c2e9a", free_port())
            log = procs.workdir / "junk.log"
            procs.start("junk", junk.command(), core=None, stdout=log, stderr=log)
            junk.wait_ready()
        port = free_port()
        config_path = procs.workdir / "fleet.yaml"
        config_path.write_text(yaml.safe_dump(_config(port, redis.url, sims, junk)))
        metrics = procs.workdir / "metrics"
        metrics.mkdir()
        env = [f"MJGATE_CONFIG={config_path}", f"WEB_CONCURRENCY={workers}"]
        env += [f"PROMETHEUS_MULTIPROC_DIR={metrics}"]
        out, err = procs.workdir / "gunicorn.out", procs.workdir / "gunicorn.err"
        args = ["env", *env, str(GUNICORN), "-c", str(REPO / "deploy/gunicorn.conf.py")]
        proc = procs.start("gunicorn", args, core=None, stdout=out, stderr=err, cwd=GATEWAY_SRC)
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/readyz", proc, "gunicorn", timeout_s=30, log=err)
        running = Fleet(procs, url, proc.pid, redis, sims, junk, out)
        deadline = time.monotonic() + 30
        while len(running.workers()) < workers:
            if time.monotonic() > deadline:
                raise BenchError(f"gunicorn did not start {workers} workers")
            time.sleep(0.2)
        httpx.get(f"{url}/mj/task/list", headers=caller_headers(), timeout=10)
        yield running
