"""Real Redis topologies on loopback for tests: a three-node Redis Cluster and a master
watched by one Sentinel.

Also ``listen_port()``: a free port outside the ephemeral range, for servers the tests start.

Both topologies speak the same small interface (``Topology``): the ``redis`` config section
that points the gateway at them, every key under a prefix across all nodes, a value by key.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import redis
from redis.cluster import RedisCluster as SyncRedisCluster

from tests.support import RedisProcess, wait_until

__all__ = ["ClusterProcesses", "SentinelProcesses", "Topology", "find_binary"]

# A node or sentinel that does not answer this long after start has failed.
START_TIMEOUT_S = 20.0


class Topology(Protocol):
    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def redis_section(self, key_prefix: str) -> dict[str, Any]:
        """The gateway's ``redis:`` config section for this topology."""
        ...

    def keys(self, prefix: str) -> list[str]:
        """Every key starting with ``prefix:`` on every node (SCAN, never KEYS)."""
        ...

    def get(self, key: str) -> bytes | None: ...


def find_binary(name: str) -> str | None:
    """A Redis binary on PATH or in /usr/sbin and /usr/bin (Debian's packages)."""
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/bin", "/usr/sbin"):
        path = Path(folder) / name
        if path.exists():
            return str(path)
    return None


def listen_port() -> int:
    """A free loopback port below Linux's ephemeral range (32768 and up), so no outgoing
    connection of this machine takes it between this check and the server's bind."""
    for _ in range(200):
        port = random.randrange(20_000, 32_000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


def _need(name: str) -> str:
    binary = find_binary(name)
    if binary is None:
        raise RuntimeError(f"{name} is not installed (make system-deps installs it)")
    return binary


def _scan(client: redis.Redis, prefix: str) -> Iterator[str]:
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        yield key.decode() if isinstance(key, bytes) else str(key)


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


class ClusterProcesses:
    """Three ``redis-server --cluster-enabled yes`` masters on loopback, joined with
    ``redis-cli --cluster create ... --cluster-replicas 0``. Each node has its own free
    client port and cluster bus port, so nothing depends on ``port + 10000`` being free."""

    name = "cluster"

    def __init__(self, nodes: int = 3) -> None:
        self.server = _need("redis-server")
        self.cli = _need("redis-cli")
        self.dir = Path(tempfile.mkdtemp(prefix="mjgate-cluster-"))
        self.ports = [listen_port() for _ in range(nodes)]
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self) -> None:
        try:
            for port in self.ports:
                node_dir = self.dir / str(port)
                node_dir.mkdir()
                args = [self.server, "--port", str(port), "--bind", "127.0.0.1"]
                args += ["--cluster-enabled", "yes", "--cluster-port", str(listen_port())]
                args += ["--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000"]
                args += ["--save", "", "--appendonly", "no", "--dir", str(node_dir)]
                self.procs.append(
                    subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                )
            for port in self.ports:
                client = redis.Redis(port=port, socket_timeout=1)
                wait_until(client.ping, timeout_s=START_TIMEOUT_S, what=f"cluster node {port}")
                client.close()
            create = [self.cli, "--cluster", "create"]
            create += [f"127.0.0.1:{port}" for port in self.ports]
            create += ["--cluster-replicas", "0", "--cluster-yes"]
            done = subprocess.run(create, capture_output=True, timeout=60, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout[-2000:]!r}")
            wait_until(self._converged, timeout_s=START_TIMEOUT_S, what="cluster_state:ok")
        except BaseException:
            self.stop()
            raise

    def _converged(self) -> bool:
        """Every node sees every slot covered and every other node."""
        for port in self.ports:
            client = redis.Redis(port=port, socket_timeout=1)
            try:
                info = client.cluster("info")
            finally:
                client.close()
            if (
                info.get("cluster_state") != "ok"
                or int(info.get("cluster_slots_ok", 0)) != 16384
                or int(info.get("cluster_known_nodes", 0)) != len(self.ports)
            ):
                return False
        return True

    def stop(self) -> None:
        for proc in self.procs:
            _stop(proc)
        self.procs = []
        shutil.rmtree(self.dir, ignore_errors=True)

    def redis_section(self, key_prefix: str) -> dict[str, Any]:
        return {"url": self.url, "cluster": True, "key_prefix": key_prefix}

    def client(self) -> SyncRedisCluster:
        return SyncRedisCluster(host="127.0.0.1", port=self.ports[0], socket_timeout=2)

    def keys(self, prefix: str) -> list[str]:
        found: list[str] = []
        for port in self.ports:
            client = redis.Redis(port=port, socket_timeout=2)
            try:
                found.extend(_scan(client, prefix))
            finally:
                client.close()
        return sorted(found)

    def get(self, key: str) -> bytes | None:
        client = self.client()
        try:
            return _as_bytes(client.get(key))
        finally:
            client.close()

    def node_of_slot(self, slot: int) -> int:
        """The client port of the node that serves ``slot``."""
        client = redis.Redis(port=self.ports[0], socket_timeout=2)
        try:
            for start, end, master, *_ in client.cluster("slots"):
                if int(start) <= slot <= int(end):
                    return int(master[1])
        finally:
            client.close()
        raise LookupError(f"slot {slot} is not served")


class SentinelProcesses:
    """One master (a plain ``RedisProcess``) watched by one ``redis-sentinel`` on loopback."""

    name = "sentinel"

    def __init__(self, service_name: str = "mjgate-test") -> None:
        self.binary = _need("redis-sentinel")
        self.service_name = service_name
        self.master = RedisProcess()
        self.port = listen_port()
        self.dir = Path(tempfile.mkdtemp(prefix="mjgate-sentinel-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        try:
            self.master.start()
            config = self.dir / "sentinel.conf"  # the sentinel rewrites it: its own copy
            config.write_text(
                f"port {self.port}\n"
                "bind 127.0.0.1\n"
                f"dir {self.dir}\n"
                f"sentinel monitor {self.service_name} 127.0.0.1 {self.master.port} 1\n"
                f"sentinel down-after-milliseconds {self.service_name} 5000\n"
            )
            self.proc = subprocess.Popen(
                [self.binary, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            wait_until(self._watching, timeout_s=START_TIMEOUT_S, what="redis-sentinel")
        except BaseException:
            self.stop()
            raise

    def _watching(self) -> bool:
        client = redis.Redis(port=self.port, socket_timeout=1)
        try:
            address: Any = client.sentinel_get_master_addr_by_name(self.service_name)
        finally:
            client.close()
        return [_text(part) for part in address or []] == ["127.0.0.1", str(self.master.port)]

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None
        self.master.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.master.dir, ignore_errors=True)

    def redis_section(self, key_prefix: str) -> dict[str, Any]:
        return {
            "sentinels": [f"127.0.0.1:{self.port}"],
            "service_name": self.service_name,
            "key_prefix": key_prefix,
        }

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.master.port, socket_timeout=2)

    def keys(self, prefix: str) -> list[str]:
        client = self.client()
        try:
            return sorted(_scan(client, prefix))
        finally:
            client.close()

    def get(self, key: str) -> bytes | None:
        client = self.client()
        try:
            return _as_bytes(client.get(key))
        finally:
            client.close()


def _as_bytes(value: Any) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def wait_gone(topology: Topology, key: str, timeout_s: float = 5.0) -> None:
    """Wait until ``key`` is absent (a delete may land just after the answer)."""
    deadline = time.monotonic() + timeout_s
    while topology.get(key) is not None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{key} is still in the store")
        time.sleep(0.05)
