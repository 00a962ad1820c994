"""Extra upstreams and small helpers for the routing, lookup and upstream tests.

Extra sims (special flags) are started from module-scoped fixtures in the test files with
``started(...)``; the helpers here only describe them. A "dead" upstream is a config entry for
a loopback port nobody listens on. ``config_for`` builds a gateway config from any upstream
entries (the standard ``make_config`` always uses every sim it is given, with equal weights).
"""

from __future__ import annotations

import functools
import itertools
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import httpx

from gateway.config import Config
from gateway.configfile import config_from_dict
from tests.support import CALLER_KEYS, GatewayThread, SimProcess, caller, free_port

__all__ = [
    "FIRST",
    "LAST",
    "assert_error",
    "client",
    "config_for",
    "control",
    "count",
    "dead_upstream",
    "fresh",
    "not_found_sim",
    "raw_get",
    "reset_stats",
    "started",
    "stats",
    "submits",
    "total",
    "unique_id",
    "wait_for_status",
]


def not_found_sim(style: str, flavor: str = "java") -> SimProcess:
    """A sim answering unknown ids in ``style`` (``--not-found null`` / ``404`` / ...)."""
    auth = "bearer" if flavor == "relay" else "mj-api-secret"
    list_path = "/mj/task/list-by-ids" if flavor == "relay" else "/mj/task/list-by-condition"
    return SimProcess(
        f"nf{style}",
        flavor,
        f"nf-{style}-upstream-key",
        auth,
        list_path,
        ("--not-found", style),
    )


def dead_upstream(name: str = "dead", **overrides: Any) -> dict[str, Any]:
    """An upstream config entry whose port refuses connections."""
    return {
        "name": name,
        "base_url": f"http://127.0.0.1:{free_port()}",
        "auth": "bearer",
        "key": f"{name}-upstream-key-secret",
        "list_by_ids_path": "/mj/task/list-by-ids",
        "timeout_s": 2,
        **overrides,
    }


@contextmanager
def started(sims: Sequence[SimProcess]) -> Iterator[list[SimProcess]]:
    """Start these sims; stop them all on the way out."""
    running: list[SimProcess] = []
    try:
        for sim in sims:
            sim.start()
            running.append(sim)
        yield running
    finally:
        for sim in running:
            sim.stop()


_ids = itertools.count(1)


def unique_id() -> str:
    """A task id shaped like the real ones (epoch ms + 3 digits), unique in this process."""
    return f"{int(time.time() * 1000)}{next(_ids) % 1000:03d}"


@functools.cache
def _control_client() -> httpx.Client:
    # One pooled client: SimProcess.control makes a new client (and TLS context) per call,
    # about 20 ms each, which adds up over a few hundred calls.
    return httpx.Client(timeout=10)


def control(sim: SimProcess, method: str, path: str, body: Any = None) -> Any:
    """The sim's ``/_sim/`` control API, like ``SimProcess.control`` but on a shared client."""
    response = _control_client().request(method, f"{sim.url}/_sim/{path}", json=body)
    response.raise_for_status()
    return response.json()


def stats(sim: SimProcess) -> dict[str, Any]:
    result: dict[str, Any] = control(sim, "GET", "stats")
    return result


def total(sim: SimProcess) -> int:
    """Requests the sim received on its ``/mj`` routes since the last reset."""
    return int(stats(sim)["total"])


def submits(sim: SimProcess) -> int:
    return int(stats(sim)["submits"])


def count(sim: SimProcess, route: str) -> int:
    """Requests on one route, keyed like ``GET /mj/task/{id}/fetch``."""
    return int(stats(sim)["requests"].get(route, 0))


def fresh(sims: list[SimProcess]) -> list[SimProcess]:
    """What ``SimProcess.reset`` does (tasks, counters, faults), on the shared client."""
    for sim in sims:
        control(sim, "POST", "reset", {"tasks": True})
        faults = {
            "latency_ms": 0,
            "error_rate": 0,
            "error_status": 500,
            "timeout_rate": 0,
            "queue_full_rate": 0,
        }
        control(sim, "POST", "faults", faults)
    return sims


def reset_stats(sims: Sequence[SimProcess]) -> None:
    """Forget what the sims saw so far, keeping their tasks."""
    for sim in sims:
        control(sim, "POST", "reset", {})


def raw_get(sim: SimProcess, path: str) -> httpx.Response:
    """A request straight to a sim with its own key in its own style (no gateway)."""
    header = (
        {"Authorization": f"Bearer {sim.key}"}
        if sim.gateway_auth == "bearer"
        else {"mj-api-secret": sim.key}
    )
    return _control_client().get(f"{sim.url}{path}", headers=header)


def wait_for_status(sim: SimProcess, task_id: str, status: str, timeout_s: float = 10.0) -> Any:
    """Poll the sim's control API (not the gateway) until the task has ``status``."""
    deadline = time.monotonic() + timeout_s
    task: Any = None
    while time.monotonic() < deadline:
        task = control(sim, "GET", f"tasks/{task_id}")
        if task.get("status") == status:
            return task
        time.sleep(0.05)
    raise TimeoutError(f"task {task_id} on {sim.name} never reached {status}: {task}")


# Weights that fix the submit order (weighted sampling without replacement): an upstream with
# FIRST is tried before one with weight 1 except with probability ~1e-9, LAST after it.
FIRST = 1e9
LAST = 1e-9


def config_for(upstreams: Sequence[dict[str, Any]], redis_url: str = "", **sections: Any) -> Config:
    """A config with these upstream entries; alice may use all, bob only the first.

    Caller rate limits and outbound caps are set far above what any test sends, so that
    tests about routing are not about limits (each entry may still set its own ``max_rps``).
    A submit sent again is sent again: the duplicate-submit window is off.
    """
    data: dict[str, Any] = {
        "redis": {"url": redis_url, "key_prefix": f"t{uuid.uuid4().hex[:12]}"},
        "upstreams": [{"max_rps": 10000, **entry} for entry in upstreams],
        "rate_limit": {"default": {"rps": 10000, "burst": 10000}},
        "clients": [
            {"name": "alice", "key": CALLER_KEYS["alice"]},
            {"name": "bob", "key": CALLER_KEYS["bob"], "upstreams": [upstreams[0]["name"]]},
        ],
        "fanout": {"deadline_s": 3},
        "submit": {"dedup_window_s": 0},
        # Off unless a test turns it on: its polls would add to what tests count upstream.
        "watcher": {"enabled": False},
    }
    data.update(sections)
    return config_from_dict(data, env={})


def client(gateway: GatewayThread, name: str = "alice", style: str = "bearer") -> httpx.Client:
    """An HTTP client for the gateway, presenting ``name``'s key."""
    return httpx.Client(base_url=gateway.url, headers=caller(name, style), timeout=15)


def assert_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """The gateway's own JSON error: ``{code, description, request_id}`` with ``status``."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body: dict[str, Any] = response.json()
    assert {"code", "description", "request_id"} <= set(body), body
    assert isinstance(body["code"], int) and not isinstance(body["code"], bool)
    if status == 404:
        assert body["code"] == 3, body
    assert isinstance(body["description"], str) and body["description"].strip(), body
    assert body["request_id"] == response.headers["x-request-id"], body
    return body
