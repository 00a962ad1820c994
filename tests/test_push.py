"""Upstream push: with ``server.public_url`` and ``upstreams[].push``, mjgate sends the
upstream its own hook, and takes the callbacks it gets there into the cache, the ledger,
task streams and the caller's callbacks at once. A wrong token is an unknown route and
changes nothing; a task that is not the upstream's is refused.

The Java sim calls a submit's ``notifyHook`` on every change, as the Java upstream does.
The watcher is off here, so everything the gateway learns comes by push.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from gateway.configfile import config_from_dict
from tests.hook_server import HookServer, hook_server
from tests.support import (
    RedisProcess,
    SimProcess,
    caller,
    config_data,
    faults_restored,
    free_port,
    running_gateway,
    wait_until,
)


@pytest.fixture
def java(sims: list[SimProcess]) -> Iterator[SimProcess]:
    with faults_restored(sims[0]) as sim:
        yield sim


@pytest.fixture
def hooks() -> Iterator[HookServer]:
    with hook_server() as server:
        yield server


def push_config(
    sims: list[SimProcess], port: int, hooks: HookServer, redis_url: str
) -> dict[str, Any]:
    data = config_data(sims, redis_url, watcher={"enabled": False})
    data["upstreams"][0]["push"] = True
    data["server"] = {"public_url": f"http://127.0.0.1:{port}", "secret_key": "k" * 40}
    data["webhooks"] = {"allow": [f"127.0.0.1:{hooks.port}"], "backoff_s": 0.1}
    return data


def submit(base_url: str, hook: str | None = None) -> str:
    body: dict[str, Any] = {"prompt": f"a paper boat {uuid.uuid4().hex}"}
    if hook:
        body["notifyHook"] = hook
    answer = httpx.post(f"{base_url}/mj/submit/imagine", json=body, headers=caller())
    assert answer.status_code == 200, answer.text
    task_id: str = answer.json()["result"]
    return task_id


def test_pushed_changes_reach_the_cache_and_the_callers_hook_at_once(
    java: SimProcess, hooks: HookServer, redis_server: RedisProcess
) -> None:
    java.faults(task_seconds=1.5, failure_rate=0)
    port = free_port()
    config = config_from_dict(push_config([java], port, hooks, redis_server.url), env={})
    with running_gateway(config, port) as gateway:
        task_id = submit(gateway.url, hooks.url())
        (sent,) = java.stats()["notify_hooks"]
        # The upstream got mjgate's own hook, never the caller's.
        assert sent.startswith(f"{gateway.url}/mj/notify/java/")
        assert hooks.url() not in sent
        hooks.wait_for_status(task_id, "SUCCESS")
        fetched = httpx.get(f"{gateway.url}/mj/task/{task_id}/fetch", headers=caller())
        assert fetched.json()["status"] == "SUCCESS"
        assert fetched.headers["x-cache"] == "HIT"
    requests = java.stats()["requests"]
    # Nobody asked the upstream: the watcher is off and every answer came by push.
    assert set(requests) == {"POST /mj/submit/imagine"}
    assert java.stats()["hooks_sent"] >= 2


def test_a_bad_token_is_404_and_changes_nothing(
    sims: list[SimProcess], java: SimProcess, hooks: HookServer
) -> None:
    java.faults(task_seconds=60, failure_rate=0)
    csharp = sims[1]
    port = free_port()
    config = config_from_dict(push_config([java, csharp], port, hooks, ""), env={})
    with running_gateway(config, port) as gateway:
        task_id = submit_to_java(gateway.url, java, hooks)
        wait_until(lambda: java.stats()["hooks_sent"] >= 1, 5, "the first push")
        (hook,) = java.stats()["notify_hooks"]
        token = urlsplit(hook).path.rsplit("/", 1)[1]
        before = fetch(gateway.url, task_id)
        forged = {**before, "status": "SUCCESS", "progress": "100%"}
        for path in (
            f"/mj/notify/java/{'0' * len(token)}",
            f"/mj/notify/java/{token[:-1]}",
            f"/mj/notify/csharp/{token}",
            f"/mj/notify/nosuch/{token}",
        ):
            refused = httpx.post(f"{gateway.url}{path}", json=forged)
            assert refused.status_code == 404, path
            assert token not in refused.text
        time.sleep(0.3)
        assert fetch(gateway.url, task_id)["status"] != "SUCCESS"
        assert all(t["status"] != "SUCCESS" for t in hooks.tasks())

        # The right token, but a task another upstream owns, or a body that is no task.
        csharp.seed(id="1700000000999001", prompt="someone else's")
        assert fetch(gateway.url, "1700000000999001")["status"] == "SUCCESS"
        theirs = {**forged, "id": "1700000000999001", "status": "FAILURE"}
        assert httpx.post(f"{gateway.url}/mj/notify/java/{token}", json=theirs).status_code == 404
        bad = httpx.post(f"{gateway.url}/mj/notify/java/{token}", json={"id": task_id})
        assert bad.status_code == 400
        assert fetch(gateway.url, "1700000000999001")["status"] == "SUCCESS"

        # With all of it right, the same body is taken.
        taken = httpx.post(f"{gateway.url}/mj/notify/java/{token}", json=forged)
        assert taken.status_code == 200
        assert fetch(gateway.url, task_id)["status"] == "SUCCESS"
        hooks.wait_for_status(task_id, "SUCCESS", timeout_s=5)


def submit_to_java(base_url: str, java: SimProcess, hooks: HookServer) -> str:
    """A submit that lands on the Java upstream (the weights pick; try until it does)."""
    for _ in range(20):
        task_id = submit(base_url, hooks.url())
        if java.stats()["submits"]:
            return task_id
    raise AssertionError("no submit went to the java upstream")


def fetch(base_url: str, task_id: str) -> dict[str, Any]:
    answer = httpx.get(f"{base_url}/mj/task/{task_id}/fetch", headers=caller())
    assert answer.status_code == 200, answer.text
    task: dict[str, Any] = answer.json()
    return task


def test_push_needs_a_public_url_and_a_secret_key(java: SimProcess) -> None:
    data = config_data([java], "")
    data["upstreams"][0]["push"] = True
    with pytest.raises(Exception, match=r"upstreams\[0\]\.push: needs server\.public_url"):
        config_from_dict(data, env={})
