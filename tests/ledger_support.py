"""Callers, config and small helpers for the ledger, visibility, quota and dedup tests.

Four callers: alice (team red, sees her own tasks), bob (team red, sees his team's), carol
(team blue, sees every task) and ops (an admin whose visibility says ``own``: admins see all).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from gateway.config import Config
from gateway.configfile import config_from_dict
from gateway.protocol import TERMINAL
from tests.sims_extra import control
from tests.support import GatewayThread, SimProcess

KEYS = {
    "alice": "alice-ledger-key-5b1f0c9e",
    "bob": "bob-ledger-key-7d3a2e8f",
    "carol": "carol-ledger-key-1c6b4d0a",
    "ops": "ops-ledger-key-9e8f7a6b",
}
CALLERS: dict[str, dict[str, Any]] = {
    "alice": {"team": "red", "visibility": "own"},
    "bob": {"team": "red", "visibility": "team"},
    "carol": {"team": "blue", "visibility": "all"},
    "ops": {"visibility": "own", "admin": True},
}


def clients(**extra: dict[str, Any]) -> list[dict[str, Any]]:
    """The four callers' config entries, each updated with ``extra[name]``."""
    return [
        {"name": name, "key": KEYS[name], **settings, **extra.get(name, {})}
        for name, settings in CALLERS.items()
    ]


def config_dict(
    sims: list[SimProcess],
    redis_url: str = "",
    callers: list[dict[str, Any]] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """A config document: these sims (generous caps), the four callers, generous rate
    limits and a fresh key prefix."""
    data: dict[str, Any] = {
        "redis": {"url": redis_url, "key_prefix": f"t{uuid.uuid4().hex[:12]}"},
        "upstreams": [s.upstream_config() for s in sims],
        "clients": callers if callers is not None else clients(),
        "rate_limit": {"default": {"rps": 10000, "burst": 10000}},
        "fanout": {"deadline_s": 3},
    }
    data.update(sections)
    return data


def config(sims: list[SimProcess], redis_url: str = "", **sections: Any) -> Config:
    return config_from_dict(config_dict(sims, redis_url, **sections), env={})


def as_caller(gateway: GatewayThread | str, name: str) -> httpx.Client:
    url = gateway if isinstance(gateway, str) else gateway.url
    return httpx.Client(base_url=url, headers={"mj-api-secret": KEYS[name]}, timeout=15)


def submit(http: httpx.Client, prompt: str | None = None, **body: Any) -> str:
    """An accepted imagine (or the submit ``path`` in ``body``); its task id."""
    path = body.pop("path", "/mj/submit/imagine")
    payload = {"prompt": prompt or f"ledger {uuid.uuid4().hex}", **body}
    response = http.post(path, json=payload)
    assert response.status_code == 200, response.text
    envelope = response.json()
    assert envelope["code"] in (1, 21, 22), envelope
    task_id: str = envelope["result"]
    return task_id


def finished(http: httpx.Client, task_id: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """Poll the gateway until the task is terminal; the task."""
    deadline = time.monotonic() + timeout_s
    task: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = http.get(f"/mj/task/{task_id}/fetch")
        assert response.status_code == 200, response.text
        task = response.json()
        if task["status"] in TERMINAL:
            return task
        time.sleep(0.05)
    raise TimeoutError(f"task {task_id} never finished: {task}")


def eventually(check: Any, timeout_s: float = 5.0, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}: last {value!r}")
        time.sleep(0.05)


@contextmanager
def faults(sim: SimProcess, **values: Any) -> Iterator[None]:
    """Set sim faults (``task_seconds``, ``failure_rate``, ...) for a block, then restore."""
    before = control(sim, "GET", "faults")
    control(sim, "POST", "faults", values)
    try:
        yield
    finally:
        control(sim, "POST", "faults", {name: before[name] for name in values})
