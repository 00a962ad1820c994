"""No secret leaves the gateway: not in an answer, a log line (the gateway's or gunicorn's),
a metric, or what ``check-config`` prints.

The gateway runs as deployed (gunicorn, two workers) with distinctive secrets: an upstream
key per upstream, a Redis password holding ``@`` and ``:`` (written in the URL as it is,
which URL parsers accept), a metrics token and a signing key. One upstream quotes the key it
is sent in its answers, as some relays do in error messages. Every error path is provoked
once (``provoked``), then the tests search everything that came out for each secret, as
written, percent-encoded and JSON-escaped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
import redis as redis_client
import yaml

from tests.deployed import Deployed, deployed_gunicorn
from tests.garbage_upstream import GarbageProcess
from tests.sims_extra import dead_upstream
from tests.support import CALLER_KEYS, RedisProcess, SimProcess, free_port

pytestmark = pytest.mark.timeout(120)

JAVA_KEY = "sk-UPSTREAM-java-9f3c1a7e5b2d4c6e"
RELAY_KEY = "sk-UPSTREAM-relay-4e8b2c6a0f1d3b5a"
ECHO_KEY = "sk-UPSTREAM-echo-7a1c3e5f9b0d2e4f"
DEAD_KEY = "sk-UPSTREAM-dead-2b4d6f8a0c1e3a5c"
REDIS_PASSWORD = "p@ss:W0rd-r3dis-S3CRET-8c1d"
METRICS_TOKEN = "mtok-SECRET-5d7f9b1a3c6e8a0b"
SIGNING_KEY = "sign-SECRET-0f2e4d6c8b0a1f3e5d7c9b1a3f5e7d9c"
ADMIN_KEY = "ops-SECRET-admin-6b8d0f2a4c6e"
LIMITED_KEY = "limited-SECRET-3a5c7e9b1d3f"
NEAR_MISS = CALLER_KEYS["alice"] + "x"
SECRETS = {
    "java upstream key": JAVA_KEY,
    "relay upstream key": RELAY_KEY,
    "echoing upstream key": ECHO_KEY,
    "dead upstream key": DEAD_KEY,
    "redis password": REDIS_PASSWORD,
    "metrics token": METRICS_TOKEN,
    "signing key": SIGNING_KEY,
    "admin key": ADMIN_KEY,
    "limited client key": LIMITED_KEY,
    "alice key": CALLER_KEYS["alice"],
    "a near-miss key": NEAR_MISS,
}
# A caller presenting its own key gets that key back nowhere either, but an answer may name
# the caller; the secret is the key, not the name.


def forms(secret: str) -> set[bytes]:
    """The ways a secret shows in text: as written, percent-encoded, JSON-escaped."""
    return {
        form.encode()
        for form in (
            secret,
            quote(secret, safe=""),
            quote(secret),
            orjson.dumps(secret)[1:-1].decode(),
        )
    }


def leaks(text: bytes) -> list[str]:
    """Names of the secrets ``text`` shows, in any of their forms."""
    return [name for name, secret in SECRETS.items() if any(f in text for f in forms(secret))]


def test_the_search_finds_a_secret_in_every_form() -> None:
    for form in forms(REDIS_PASSWORD):
        assert leaks(b"xx " + form + b" yy") == ["redis password"]
    assert leaks(b"nothing here") == []


# -- the deployed gateway and what it was made to say -----------------------------------------


@pytest.fixture(scope="module")
def locked_redis() -> Iterator[RedisProcess]:
    server = RedisProcess()
    server.start()
    client = redis_client.Redis.from_url(server.url)
    client.config_set("requirepass", REDIS_PASSWORD)
    client.close()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[SimProcess, SimProcess, GarbageProcess]]:
    java = SimProcess("java", "java", JAVA_KEY, "mj-api-secret", "/mj/task/list-by-condition")
    relay = SimProcess(
        "relay",
        "relay",
        RELAY_KEY,
        "bearer",
        "/mj/task/list-by-ids",
        ("--list-paths", "list-by-ids"),
    )
    echo = GarbageProcess("echo", ECHO_KEY, free_port())
    java.start()
    relay.start()
    echo.start()
    echo.set_mode("echo-key")
    yield java, relay, echo
    for process in (echo, relay, java):
        process.stop()


def gateway_config(
    redis_url: str, java: SimProcess, relay: SimProcess, echo: GarbageProcess
) -> dict[str, Any]:
    return {
        "server": {"secret_key": SIGNING_KEY, "max_body_bytes": 65536},
        "redis": {"url": redis_url, "key_prefix": f"s{uuid.uuid4().hex[:10]}"},
        "upstreams": [
            java.upstream_config(timeout_s=1),
            relay.upstream_config(timeout_s=1),
            echo.upstream_config(timeout_s=1),
            dead_upstream("dead", key=DEAD_KEY, timeout_s=1),
        ],
        "clients": [
            {"name": "alice", "key": CALLER_KEYS["alice"]},
            {"name": "ops", "key": ADMIN_KEY, "admin": True},
            {"name": "limited", "key": LIMITED_KEY, "rate_limit": {"rps": 0.001, "burst": 1}},
        ],
        "rate_limit": {"default": {"rps": 10_000, "burst": 10_000}},
        "fanout": {"deadline_s": 2},
        "circuit": {"failure_threshold": 1000},
        "metrics": {"token": METRICS_TOKEN},
        "logging": {"level": "info", "format": "json"},
    }


@pytest.fixture(scope="module")
def config(
    locked_redis: RedisProcess, upstreams: tuple[SimProcess, SimProcess, GarbageProcess]
) -> dict[str, Any]:
    url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{locked_redis.port}/0"
    return gateway_config(url, *upstreams)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, config: dict[str, Any]) -> Iterator[Deployed]:
    with deployed_gunicorn(tmp_path_factory.mktemp("secrets"), config, workers=2) as deployed:
        yield deployed


@dataclass(frozen=True)
class Said:
    """One answer: what was asked, and everything that came back."""

    label: str
    status: int
    raw: bytes  # the status, every header and the body


def alice() -> dict[str, str]:
    return {"Authorization": f"Bearer {CALLER_KEYS['alice']}"}


@pytest.fixture(scope="module")
def provoked(
    gateway: Deployed,
    locked_redis: RedisProcess,
    upstreams: tuple[SimProcess, SimProcess, GarbageProcess],
) -> list[Said]:
    """Every error path, once (and some good answers too)."""
    java, _, echo = upstreams
    said: list[Said] = []
    client = httpx.Client(base_url=gateway.url, timeout=15)

    def ask(label: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = client.request(method, path, **kwargs)
        headers = "".join(f"{k}: {v}\n" for k, v in response.headers.multi_items())
        raw = f"{response.status_code}\n{headers}\n".encode() + response.content
        said.append(Said(label, response.status_code, raw))
        return response

    task = f"{int(time.time() * 1000)}001"
    java.control("POST", "tasks", {"id": task, "status": "SUCCESS"})
    fresh = f"{int(time.time() * 1000)}002"
    with client:
        ask("no key", "GET", f"/mj/task/{task}/fetch")
        ask("unknown key", "GET", f"/mj/task/{task}/fetch", headers={"mj-api-secret": NEAR_MISS})
        ask("an upstream's key", "GET", "/mj/task/list", headers={"mj-api-secret": JAVA_KEY})
        two = [("mj-api-secret", CALLER_KEYS["alice"]), ("mj-api-secret", NEAR_MISS)]
        ask("two keys", "GET", f"/mj/task/{task}/fetch", headers=two)
        ask("bad JSON", "POST", "/mj/task/list-by-ids", content=b'{"ids": [', headers=alice())
        ask("bad id", "GET", "/mj/task/bad!id/fetch", headers=alice())
        ask("not an admin", "POST", "/admin/cache/purge", json={"ids": [task]}, headers=alice())
        ask("no such route", "GET", "/mj/nothing/here", headers=alice())
        ask("wrong method", "DELETE", f"/mj/task/{task}/fetch", headers=alice())
        ask("too big", "POST", "/mj/task/list-by-ids", content=b"1" * 70_000, headers=alice())
        for _ in range(3):
            ask("rate limited", "GET", "/mj/task/list", headers={"mj-api-secret": LIMITED_KEY})
        # The echoing upstream claims every id it is asked for, and the first upstream to
        # answer a fan-out becomes the owner: while java's task is found, the echo answers
        # another id, so java owns it (its hang below must be java's 504).
        echo.set_mode("wrong-id")
        ask("fetch (owner found)", "GET", f"/mj/task/{task}/fetch", headers=alice())
        echo.set_mode("echo-key")
        ask("fetch (fan-out, echoing upstream)", "GET", f"/mj/task/{fresh}/fetch", headers=alice())
        ask("list", "POST", "/mj/task/list-by-ids", json={"ids": [task, fresh]}, headers=alice())
        ask("recent", "GET", "/mj/task/list", headers=alice())
        ask("queue", "GET", "/mj-fast/mj/task/queue", headers=alice())
        ask("query", "POST", "/mj/task/query", json={"ids": [fresh]}, headers=alice())
        for n in range(8):
            ask("submit", "POST", "/mj/submit/imagine", json={"prompt": f"p{n}"}, headers=alice())
        java.faults(error_rate=1.0)
        ask("action at a failing owner", "GET", f"/mj/task/{task}/image-seed", headers=alice())
        for n in range(4):
            body = {"prompt": f"q{n}"}
            ask(
                "submit, one upstream failing",
                "POST",
                "/mj/submit/imagine",
                json=body,
                headers=alice(),
            )
        java.faults(error_rate=0.0, timeout_rate=1.0, hang_s=3)
        ask("action at a hanging owner", "GET", f"/mj/task/{task}/image-seed", headers=alice())
        java.faults(timeout_rate=0.0)
        ask(
            "purge",
            "POST",
            "/admin/cache/purge",
            json={"ids": [task]},
            headers={"mj-api-secret": ADMIN_KEY},
        )
        assert locked_redis.proc is not None
        os.kill(locked_redis.proc.pid, signal.SIGSTOP)
        try:
            ask("fetch, store frozen", "GET", f"/mj/task/{task}/fetch", headers=alice())
            ask(
                "submit, store frozen",
                "POST",
                "/mj/submit/imagine",
                json={"prompt": "z"},
                headers=alice(),
            )
            ask("readiness, store frozen", "GET", "/readyz")
        finally:
            os.kill(locked_redis.proc.pid, signal.SIGCONT)
        ask("metrics without the token", "GET", "/metrics")
        ask("metrics with a caller key", "GET", "/metrics", headers=alice())
        ask("metrics", "GET", "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        ask("readiness", "GET", "/readyz")
        ask("openapi", "GET", "/openapi.json")
    assert echo.stats()["keys"] == [ECHO_KEY], "the echoing upstream was sent its key"
    time.sleep(0.5)  # the workers flush their log lines every 0.2 s
    return said


def test_every_error_path_was_provoked(provoked: list[Said]) -> None:
    statuses = {said.status for said in provoked}
    # As one string: pytest shortens a list in the message, and with it the one that matters.
    answered = "; ".join(f"{s.label}: {s.raw[:300]!r}" for s in provoked if s.status != 200)
    assert {400, 401, 403, 404, 405, 413, 429, 502, 503, 504} <= statuses, answered
    metrics = next(s for s in provoked if s.label == "metrics")
    assert metrics.status == 200 and b"mjgate_requests_total" in metrics.raw


def test_no_secret_in_any_answer(provoked: list[Said]) -> None:
    """Issue 10 item 19: an upstream that quotes its key must not hand it to callers."""
    leaked = {said.label: leaks(said.raw) for said in provoked if leaks(said.raw)}
    assert not leaked, leaked


def test_no_secret_in_any_log_line(gateway: Deployed, provoked: list[Said]) -> None:
    """Issue 10 items 12 and 19: neither the gateway's JSON lines nor gunicorn's say one."""
    stdout, stderr = gateway.stdout().encode(), gateway.stderr().encode()
    events = {line.get("event") for line in gateway.log_lines()}
    assert {"request", "upstream_error"} <= events, events
    assert b"Booting worker" in stderr
    for name, text in (("gateway stdout", stdout), ("gunicorn stderr", stderr)):
        lines = [line for line in text.splitlines() if leaks(line)]
        assert not lines, f"{name}: {lines[:3]}"


def test_a_rejected_reload_says_no_secret(
    gateway: Deployed, config: dict[str, Any], provoked: list[Said]
) -> None:
    """A HUP with a broken config is refused, one line per problem, naming no secret, even
    when the broken value is the one holding it."""
    good = gateway.config_path.read_text()
    gateway.config_path.write_text(yaml.safe_dump(broken_config(config)))
    before = len(gateway.stderr())
    try:
        gateway.reload()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "weight" not in gateway.stderr()[before:]:
            time.sleep(0.1)
        said = gateway.stderr()[before:]
        assert "weight" in said, said[-2000:]
        assert not leaks(said.encode()), said
        assert httpx.get(f"{gateway.url}/healthz").status_code == 200
    finally:
        gateway.config_path.write_text(good)


def broken_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with problems in values that hold secrets (a Redis URL of the wrong
    scheme, a password in a sentinel entry, an upstream key that is not a string) and in
    one that does not (a weight)."""
    redis = {
        **config["redis"],
        "url": f"http://:{REDIS_PASSWORD}@127.0.0.1:6379/0",
        "sentinels": [f"redis://:{REDIS_PASSWORD}@127.0.0.1:26379"],
    }
    upstreams = [{**u, "weight": "heavy"} for u in config["upstreams"]]
    upstreams[0]["key"] = {"value": JAVA_KEY}
    return {**config, "redis": redis, "upstreams": upstreams}


def check_config(path: Path) -> subprocess.CompletedProcess[bytes]:
    command = [sys.executable, "-m", "gateway", "check-config", str(path)]
    return subprocess.run(command, capture_output=True, timeout=60, check=False)


def test_check_config_says_no_secret(tmp_path: Path, config: dict[str, Any]) -> None:
    """Issue 10 item 20: neither the redacted config nor the problems of a broken one (see
    ``broken_config``) name a secret."""
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(yaml.safe_dump(config))
    bad.write_text(yaml.safe_dump(broken_config(config)))
    shown = check_config(good)
    assert shown.returncode == 0, shown.stderr
    assert b"upstreams" in shown.stdout
    refused = check_config(bad)
    assert refused.returncode != 0 and b"sentinels" in refused.stdout + refused.stderr
    for result in (shown, refused):
        assert not leaks(result.stdout + result.stderr), result.stdout + result.stderr
