"""Dropping task ids from the cache on demand (``gateway/purge.py``): the
``mjgate cache purge`` command against a real Redis, and the ``/admin/cache/purge`` route."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from gateway.config import Config
from gateway.configfile import config_from_dict, load_config
from gateway.store import KeySpace
from tests.support import (
    CALLER_KEYS,
    RedisProcess,
    SimProcess,
    caller,
    free_port,
    running_gateway,
)

FETCH = "GET /mj/task/{id}/fetch"
ADMIN_KEY = "root-admin-key-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
NO_LIMITS = {"default": {"rps": 100_000, "burst": 100_000}}


def new_id() -> str:
    return f"{int(time.time() * 1000)}{random.randrange(10_000):04d}"


def config_data(sims: list[SimProcess], redis_url: str = "", **cache: Any) -> dict[str, Any]:
    """A config document with alice, bob and an admin client, root."""
    return {
        "redis": {"url": redis_url, "key_prefix": f"t{uuid.uuid4().hex[:12]}"},
        "upstreams": [s.upstream_config(max_rps=10_000) for s in sims],
        "clients": [
            {"name": "alice", "key": CALLER_KEYS["alice"]},
            {"name": "bob", "key": CALLER_KEYS["bob"], "upstreams": [sims[0].name]},
            {"name": "root", "key": ADMIN_KEY, "admin": True},
        ],
        "rate_limit": NO_LIMITS,
        "cache": cache,
        "fanout": {"deadline_s": 3},
    }


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def offline_config(tmp_path: Path, redis_url: str = "") -> Path:
    """A valid config whose upstream nobody listens on (the CLI never calls upstreams)."""
    upstream = {
        "name": "main",
        "base_url": f"http://127.0.0.1:{free_port()}",
        "auth": "mj-api-secret",
        "key": "main-upstream-key-0123",
    }
    data = {
        "redis": {"url": redis_url},
        "upstreams": [upstream],
        "clients": [{"name": "alice", "key": CALLER_KEYS["alice"]}],
    }
    return write_config(tmp_path / "mjgate.yaml", data)


def purge_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MJGATE_CONFIG", "REDIS_URL")}
    return subprocess.run(
        [sys.executable, "-m", "gateway", "cache", "purge", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )


def task_key(config: Config, upstream: str, task_id: str) -> str:
    return KeySpace(config.redis.key_prefix).task(upstream, task_id)


def fetch(client: httpx.Client, task_id: str) -> httpx.Response:
    return client.get(f"/mj/task/{task_id}/fetch")


def cache_of(response: httpx.Response) -> tuple[str, str | None]:
    return response.headers["x-cache"], response.headers.get("x-cache-tier")


# -- mjgate cache purge ------------------------------------------------------------------------


def test_cli_purge_drops_the_ids_from_redis_and_the_next_fetch_goes_upstream(
    sims: list[SimProcess],
    redis_server: RedisProcess,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    java = sims[0]
    purged, kept, missing = new_id(), new_id(), new_id()
    java.seed(id=purged, status="SUCCESS")
    java.seed(id=kept, status="SUCCESS")
    path = write_config(tmp_path / "mjgate.yaml", config_data(sims, redis_server.url, l1_ttl_s=1))
    config = load_config(path)
    keys = KeySpace(config.redis.key_prefix)
    with (
        running_gateway(config) as gateway,
        httpx.Client(base_url=gateway.url, headers=caller("bob"), timeout=10) as c,
    ):
        assert cache_of(fetch(c, purged)) == ("MISS", "upstream")
        filled = time.monotonic()
        assert fetch(c, kept).status_code == 200
        assert fetch(c, missing).status_code == 404
        assert redis_client.exists(task_key(config, "java", purged), keys.not_found(missing)) == 2

        done = purge_cli("--config", str(path), purged, missing)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "purged 2 task id(s) from the shared store"

        assert redis_client.exists(task_key(config, "java", purged)) == 0
        assert redis_client.exists(keys.not_found(missing)) == 0
        assert redis_client.exists(task_key(config, "java", kept)) == 1  # only the named ids

        # The CLI cannot reach the gateway's L1: it follows within l1_ttl_s (1 s here).
        time.sleep(max(0.0, filled + 1.1 - time.monotonic()))
        asked = java.count(FETCH)
        assert cache_of(fetch(c, purged)) == ("MISS", "upstream")
        assert java.count(FETCH) == asked + 1
        assert cache_of(fetch(c, kept)) == ("HIT", "store")
        assert java.count(FETCH) == asked + 1


def test_cli_purge_tells_purged_ids_from_ids_it_never_stored(
    redis_server: RedisProcess, redis_client: redis.Redis, tmp_path: Path
) -> None:
    path = offline_config(tmp_path, redis_server.url)
    config = load_config(path)
    cached, not_found, never, also_never = new_id(), new_id(), new_id(), new_id()
    redis_client.set(task_key(config, "main", cached), b"Tcached body", px=60_000)
    redis_client.set(KeySpace(config.redis.key_prefix).not_found(not_found), b"1", px=60_000)

    done = purge_cli("--config", str(path), never, cached, not_found, also_never, cached)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "purged 2 task id(s) from the shared store",
        f"not in the shared store, nothing to purge: {never} {also_never}",
    ]
    assert redis_client.exists(task_key(config, "main", cached)) == 0

    again = purge_cli("--config", str(path), cached)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == [
        "purged 0 task id(s) from the shared store",
        f"not in the shared store, nothing to purge: {cached}",
    ]


def test_cli_purge_with_the_embedded_store_exits_2_and_points_to_the_route(
    tmp_path: Path,
) -> None:
    done = purge_cli("--config", str(offline_config(tmp_path)), "1700000000000001")
    assert done.returncode == 2
    assert done.stdout == ""
    assert "embedded store" in done.stderr
    assert "POST /admin/cache/purge" in done.stderr


def test_cli_purge_rejects_a_bad_id(redis_server: RedisProcess, tmp_path: Path) -> None:
    done = purge_cli("--config", str(offline_config(tmp_path, redis_server.url)), "bad/id")
    assert done.returncode == 2
    assert "not a task id: 'bad/id'" in done.stderr


def test_cli_purge_says_when_redis_cannot_be_reached(tmp_path: Path) -> None:
    path = offline_config(tmp_path, f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    done = purge_cli("--config", str(path), "1700000000000001")
    assert done.returncode == 2
    assert "cannot reach the store" in done.stderr
    assert time.monotonic() - started < 10


def test_cli_purge_needs_a_config(tmp_path: Path) -> None:
    done = purge_cli("1700000000000001")
    assert done.returncode == 2
    assert "no config file" in done.stderr


def test_cli_purge_fails_when_redis_refuses_the_delete(
    own_redis: RedisProcess, tmp_path: Path
) -> None:
    """Redis answers PING but refuses DEL (here: an ACL; in life: a read-only replica, OOM, a
    failover in the middle). Nothing was purged, so the command must not say it was."""
    path = offline_config(tmp_path, own_redis.url)
    config = load_config(path)
    key = task_key(config, "main", "1700000000000001")
    with redis.Redis.from_url(own_redis.url) as admin:
        admin.set(key, b"Tcached body", px=60_000)
        admin.execute_command("ACL", "SETUSER", "default", "-del", "-unlink")
        done = purge_cli("--config", str(path), "1700000000000001")
        assert admin.exists(key) == 1  # still cached
    assert done.returncode != 0, f"exit 0 and said {done.stdout.strip()!r}; key still there"
    assert "purged" not in done.stdout


# -- POST /admin/cache/purge -------------------------------------------------------------------


def test_admin_route_purges_for_an_admin_client(sims: list[SimProcess], store_url: str) -> None:
    java = sims[0]
    task_id, other = new_id(), new_id()
    java.seed(id=task_id, status="SUCCESS")
    java.seed(id=other, status="SUCCESS")
    config = config_from_dict(config_data(sims, store_url), env={})
    with (
        running_gateway(config) as gateway,
        httpx.Client(base_url=gateway.url, headers=caller("bob"), timeout=10) as c,
        httpx.Client(base_url=gateway.url, headers=ADMIN, timeout=10) as root,
    ):
        for task in (task_id, other):
            fetch(c, task)
            assert cache_of(fetch(c, task)) == ("HIT", "l1")

        never = new_id()
        answer = root.post("/admin/cache/purge", json={"ids": [task_id, never]})
        assert answer.status_code == 200
        assert answer.json() == {"purged": [task_id], "absent": [never]}  # only what it held

        asked = java.count(FETCH)
        assert cache_of(fetch(c, task_id)) == ("MISS", "upstream")  # this worker at once
        assert cache_of(fetch(c, other)) == ("HIT", "l1")  # only the named ids
        assert java.count(FETCH) == asked + 1


def test_admin_route_purge_reaches_another_gateway_through_redis(
    sims: list[SimProcess], redis_server: RedisProcess, redis_client: redis.Redis
) -> None:
    java = sims[0]
    task_id = new_id()
    java.seed(id=task_id, status="SUCCESS")
    config = config_from_dict(config_data(sims, redis_server.url), env={})
    with (
        running_gateway(config) as one,
        running_gateway(config) as two,
        httpx.Client(base_url=one.url, headers=ADMIN, timeout=10) as root,
        httpx.Client(base_url=two.url, headers=caller("bob"), timeout=10) as c,
    ):
        assert cache_of(fetch(c, task_id)) == ("MISS", "upstream")
        assert root.post("/admin/cache/purge", json={"ids": [task_id]}).status_code == 200
        assert redis_client.exists(task_key(config, "java", task_id)) == 0


def test_admin_route_is_403_for_other_clients_and_purges_nothing(sims: list[SimProcess]) -> None:
    java = sims[0]
    task_id = new_id()
    java.seed(id=task_id, status="SUCCESS")
    config = config_from_dict(config_data(sims), env={})
    with (
        running_gateway(config) as gateway,
        httpx.Client(base_url=gateway.url, headers=caller(), timeout=10) as c,
    ):
        fetch(c, task_id)
        answer = c.post("/admin/cache/purge", json={"ids": [task_id]})
        assert answer.status_code == 403
        assert answer.headers["content-type"].startswith("application/json")
        error = answer.json()
        assert error["code"] == 4
        assert "admin" in error["description"]
        assert cache_of(fetch(c, task_id)) == ("HIT", "l1")  # still cached

        anonymous = httpx.post(f"{gateway.url}/admin/cache/purge", json={"ids": [task_id]})
        assert anonymous.status_code == 401


@pytest.mark.parametrize(
    "body",
    [{}, {"ids": "1700000000000001"}, {"ids": ["bad/id"]}, {"ids": [1700000000000001]}],
)
def test_admin_route_rejects_a_bad_body(sims: list[SimProcess], body: dict[str, Any]) -> None:
    config = config_from_dict(config_data(sims), env={})
    with running_gateway(config) as gateway:
        answer = httpx.post(f"{gateway.url}/admin/cache/purge", json=body, headers=ADMIN)
    assert answer.status_code == 400
    assert answer.json()["code"] == 4


def test_admin_route_does_not_claim_a_purge_that_redis_refused(
    sims: list[SimProcess], own_redis: RedisProcess
) -> None:
    """Redis answers reads but refuses DEL. The route must not answer "purged" while the old
    body stays in the store, where this very gateway finds it again on the next fetch."""
    java = sims[0]
    task_id = new_id()
    java.seed(id=task_id, status="SUCCESS")
    config = config_from_dict(config_data(sims, own_redis.url), env={})
    with (
        running_gateway(config) as gateway,
        httpx.Client(base_url=gateway.url, headers=caller("bob"), timeout=10) as c,
        httpx.Client(base_url=gateway.url, headers=ADMIN, timeout=10) as root,
        redis.Redis.from_url(own_redis.url) as admin,
    ):
        assert cache_of(fetch(c, task_id)) == ("MISS", "upstream")
        admin.execute_command("ACL", "SETUSER", "default", "-del", "-unlink")
        answer = root.post("/admin/cache/purge", json={"ids": [task_id]})
        after = fetch(c, task_id)
        claimed = answer.status_code == 200 and answer.json()["purged"] == [task_id]
        assert not (claimed and cache_of(after)[0] == "HIT"), (
            f"answered {answer.status_code} {answer.text}, then served the task from "
            f"{cache_of(after)}"
        )
