"""Callbacks mjgate delivers: a submit's ``notifyHook`` (or the client's ``webhook.url``) is
kept by mjgate, never sent upstream, and called on every status change with a Standard
Webhooks signature, from a durable queue: retried with backoff, dead-lettered after
``webhooks.max_attempts``, retried by an admin, never lost across a restart, and never sent
anywhere ``webhooks.allow`` does not name (nor to a link-local or metadata address).

Real sims, real redis-server, the real app on a real port, and a real HTTP receiver.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from gateway.configfile import config_from_dict
from gateway.webhooks import Destinations, signature
from gateway.webhooks.destinations import GuardedResolver
from tests.hook_server import HookServer, hook_server
from tests.support import (
    CALLER_KEYS,
    RedisProcess,
    SimProcess,
    caller,
    config_data,
    faults_restored,
    running_gateway,
    wait_until,
)

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
ADMIN_KEY = "ops-admin-key-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def java(sims: list[SimProcess]) -> Iterator[SimProcess]:
    """The Java sim, its tasks finishing (always with SUCCESS) within a second and a half."""
    with faults_restored(sims[0], task_seconds=1.5, failure_rate=0) as sim:
        yield sim


@pytest.fixture
def hooks() -> Iterator[HookServer]:
    with hook_server() as server:
        yield server


def webhook_config(
    sim: SimProcess, hooks: HookServer, redis_url: str = "", **webhooks: Any
) -> dict[str, Any]:
    data = config_data([sim], redis_url, watcher={"interval_s": 0.2})
    data["clients"][0]["webhook"] = {"secret": SECRET}
    data["clients"].append({"name": "ops", "key": ADMIN_KEY, "admin": True})
    data["webhooks"] = {"allow": [f"127.0.0.1:{hooks.port}"], "backoff_s": 0.1, **webhooks}
    return data


def submit(base_url: str, hook: str | None = None, who: str = "alice") -> str:
    body: dict[str, Any] = {"prompt": f"a lighthouse at dusk {uuid.uuid4().hex}"}
    if hook is not None:
        body["notifyHook"] = hook
    answer = httpx.post(f"{base_url}/mj/submit/imagine", json=body, headers=caller(who))
    assert answer.status_code == 200, answer.text
    task_id: str = answer.json()["result"]
    return task_id


def deliveries(base_url: str, state: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{base_url}/admin/webhooks", params={"state": state}, headers=ADMIN)
    assert answer.status_code == 200, answer.text
    found: list[dict[str, Any]] = answer.json()["deliveries"]
    return found


def test_the_signature_is_the_standard_webhooks_one() -> None:
    body = b'{"id":"1","status":"SUCCESS"}'
    stamp = datetime.fromtimestamp(1_700_000_000, UTC)
    expected = Webhook(SECRET).sign("msg_abc", stamp, body.decode())
    assert signature(SECRET, "msg_abc", 1_700_000_000, body) == expected
    assert signature(SECRET, "msg_abd", 1_700_000_000, body) != expected


def test_callbacks_are_signed_and_the_provider_never_sees_the_hook(
    java: SimProcess, hooks: HookServer, store_url: str
) -> None:
    config = config_from_dict(webhook_config(java, hooks, store_url), env={})
    with running_gateway(config) as gateway:
        task_id = submit(gateway.url, hooks.url())
        hooks.wait_for_status(task_id, "SUCCESS")
    received = [r for r in hooks.received if r.task()["id"] == task_id]
    statuses = [r.task()["status"] for r in received]
    assert statuses[-1] == "SUCCESS"
    assert statuses.count("SUCCESS") == 1
    assert len(set(statuses)) == len(statuses) > 1  # one callback per status change
    for request in received:
        assert Webhook(SECRET).verify(request.body, request.headers)["id"] == task_id
        assert request.headers["content-type"] == "application/json"
    assert len({r.headers["webhook-id"] for r in received}) == len(received)
    with pytest.raises(WebhookVerificationError):
        tampered = received[-1].body.replace(b"SUCCESS", b"FAILURE")
        Webhook(SECRET).verify(tampered, received[-1].headers)
    # Neither the hook nor anything else reached the upstream as a notifyHook.
    assert java.stats()["notify_hooks"] == []
    assert java.stats()["submits"] == 1


def test_the_clients_configured_webhook_is_used_without_a_notify_hook(
    java: SimProcess, hooks: HookServer
) -> None:
    data = webhook_config(java, hooks)
    data["clients"][0]["webhook"]["url"] = hooks.url("/configured")
    with running_gateway(config_from_dict(data, env={})) as gateway:
        task_id = submit(gateway.url)
        hooks.wait_for_status(task_id, "SUCCESS")
    assert {r.path for r in hooks.received} == {"/configured"}
    assert java.stats()["notify_hooks"] == []


def test_a_hook_failing_three_times_is_retried_until_it_succeeds(
    java: SimProcess, hooks: HookServer
) -> None:
    config = config_from_dict(webhook_config(java, hooks, max_attempts=5), env={})
    hooks.fail_first = 3
    with running_gateway(config) as gateway:
        task_id = submit(gateway.url, hooks.url())
        hooks.wait_for_status(task_id, "SUCCESS")
        wait_until(lambda: deliveries(gateway.url, "pending") == [], 20, "every message taken")
        assert deliveries(gateway.url, "dead") == []
    messages: dict[str, list[bytes]] = {}
    for request in hooks.received:
        Webhook(SECRET).verify(request.body, request.headers)
        messages.setdefault(request.headers["webhook-id"], []).append(request.body)
    # Three refusals, then the attempt that was taken; the same message every time.
    assert messages and all(len(bodies) == 4 for bodies in messages.values())
    assert all(len(set(bodies)) == 1 for bodies in messages.values())


def test_a_hook_down_past_max_attempts_is_a_dead_letter_until_an_admin_retries_it(
    java: SimProcess, hooks: HookServer, redis_server: RedisProcess
) -> None:
    config = config_from_dict(webhook_config(java, hooks, redis_server.url, max_attempts=2), env={})
    hooks.down = True
    with running_gateway(config) as gateway:
        task_id = submit(gateway.url, hooks.url())
        wait_until(
            lambda: any(d["task_id"] == task_id for d in deliveries(gateway.url, "dead")),
            20,
            "a dead letter",
        )
        hooks.wait_for_status(task_id, "SUCCESS")  # attempted, refused by the receiver
        wait_until(lambda: deliveries(gateway.url, "pending") == [], 10, "every hook dead")
        dead = deliveries(gateway.url, "dead")
        assert {d["attempts"] for d in dead} == {2}
        assert {d["last_error"] for d in dead} == {"answered HTTP 503"}
        assert {d["url"] for d in dead} == {hooks.url()}
        assert "body" not in dead[0]
        success = next(
            r.headers["webhook-id"] for r in hooks.received if r.task()["status"] == "SUCCESS"
        )
        assert any(d["id"] == success for d in dead)

        hooks.down = False
        sent_before = len(hooks.received)
        retried = httpx.post(f"{gateway.url}/admin/webhooks/{success}/retry", headers=ADMIN)
        assert retried.status_code == 200, retried.text
        assert retried.json()["delivery"]["attempts"] == 0
        wait_until(lambda: len(hooks.received) > sent_before, 10, "the retried delivery")
        again = hooks.received[sent_before]
        assert again.headers["webhook-id"] == success  # the same message, once more
        assert Webhook(SECRET).verify(again.body, again.headers)["status"] == "SUCCESS"
        wait_until(
            lambda: all(d["id"] != success for d in deliveries(gateway.url, "dead")), 10, "gone"
        )
        missing = httpx.post(f"{gateway.url}/admin/webhooks/{success}/retry", headers=ADMIN)
        assert missing.status_code == 404
        not_admin = httpx.get(f"{gateway.url}/admin/webhooks", headers=caller())
        assert not_admin.status_code == 403


def test_no_delivery_is_lost_across_a_gateway_restart(
    java: SimProcess, hooks: HookServer, redis_server: RedisProcess
) -> None:
    data = webhook_config(java, hooks, redis_server.url, backoff_s=0.5, backoff_max_s=1)
    config = config_from_dict(data, env={})
    hooks.down = True
    with running_gateway(config) as gateway:
        task_id = submit(gateway.url, hooks.url())
        hooks.wait_for_status(task_id, "SUCCESS")  # tried, and failed
    # Down while the gateway is away too: everything still owed is in the store.
    hooks.down = False
    refused = len(hooks.received)
    with running_gateway(config) as gateway:
        wait_until(
            lambda: any(r.task()["status"] == "SUCCESS" for r in hooks.received[refused:]),
            20,
            "the SUCCESS callback after the restart",
        )
        wait_until(lambda: deliveries(gateway.url, "pending") == [], 10, "an empty queue")
    owed = {r.headers["webhook-id"] for r in hooks.received[:refused]}
    delivered = {r.headers["webhook-id"] for r in hooks.received[refused:]}
    assert owed <= delivered


def test_a_disallowed_destination_is_never_called(java: SimProcess, hooks: HookServer) -> None:
    with hook_server() as elsewhere:
        data = webhook_config(java, hooks, max_attempts=1)
        # A name that resolves to a loopback address the allow-list's CIDR does not cover.
        data["webhooks"]["allow"].append("127.0.0.2/32")
        with running_gateway(config_from_dict(data, env={})) as gateway:
            refused = submit(gateway.url, elsewhere.url())
            by_name = submit(gateway.url, f"http://localhost:{elsewhere.port}/hook")
            allowed = submit(gateway.url, hooks.url())
            hooks.wait_for_status(allowed, "SUCCESS")
            wait_until(
                lambda: any(d["task_id"] == by_name for d in deliveries(gateway.url, "dead")),
                10,
                "the name's delivery dead",
            )
            dead = [d for d in deliveries(gateway.url, "dead") if d["task_id"] == by_name]
            assert "webhooks.allow" in dead[0]["last_error"]
        assert elsewhere.received == []
        assert {t["id"] for t in hooks.tasks()} == {allowed}
        assert refused != allowed


def test_destinations_refuse_link_local_and_metadata_addresses_whatever_is_allowed() -> None:
    everything = Destinations(("0.0.0.0/0", "::/0", "169.254.169.254", "metadata.google.internal"))
    for url in (
        "http://169.254.169.254/latest/meta-data",
        "http://169.254.10.1:8080/",
        "http://[fe80::1]/",
        "http://[::ffff:169.254.169.254]/",
        "http://[fd00:ec2::254]/",
        "http://100.100.100.200/",
        "http://metadata.google.internal/",
        "http://0.0.0.0:80/",
    ):
        assert everything.refusal(url) is not None, url
    assert everything.refusal("http://10.1.2.3/hook") is None
    assert everything.refusal("ftp://10.1.2.3/hook") is not None
    named = Destinations(("hooks.example.com", "127.0.0.1:9000", "[::1]:9001", "10.0.0.0/8"))
    assert named.refusal("https://hooks.example.com/x") is None
    # Any name may resolve into an allowed CIDR: its addresses are checked on connecting.
    assert named.refusal("https://other.example.com/x") is None
    assert Destinations(("hooks.example.com",)).refusal("https://other.example.com/") is not None
    assert named.refusal("http://127.0.0.1:9000/x") is None
    assert named.refusal("http://127.0.0.1:9001/x") is not None
    assert named.refusal("http://[::1]:9001/x") is None
    assert named.address_allowed("hooks.example.com", 443, ipaddress.ip_address("10.9.9.9"))
    assert not named.address_allowed("hooks.example.com", 443, ipaddress.ip_address("169.254.1.1"))
    assert not named.address_allowed("other.example.com", 443, ipaddress.ip_address("8.8.8.8"))
    assert Destinations(()).refusal("http://127.0.0.1/") == "not in webhooks.allow"


async def test_the_resolver_drops_addresses_a_name_may_not_reach() -> None:
    loopback = GuardedResolver(Destinations(("127.0.0.0/8",)))
    found = await loopback.resolve("localhost", 80, socket.AF_INET)
    assert {r["host"] for r in found} == {"127.0.0.1"}
    other = GuardedResolver(Destinations(("10.0.0.0/8",)))
    with pytest.raises(OSError, match=r"webhooks\.allow"):
        await other.resolve("localhost", 80, socket.AF_INET)
    await asyncio.gather(loopback.close(), other.close())


def test_a_refused_hook_is_not_kept_and_the_submit_still_succeeds(
    java: SimProcess, hooks: HookServer
) -> None:
    data = webhook_config(java, hooks)
    data["webhooks"]["allow"] = []  # the default: no callbacks at all
    with running_gateway(config_from_dict(data, env={})) as gateway:
        task_id = submit(gateway.url, hooks.url())
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            fetched = httpx.get(f"{gateway.url}/mj/task/{task_id}/fetch", headers=caller())
            if fetched.json()["status"] == "SUCCESS":
                break
            time.sleep(0.1)
        assert fetched.json()["status"] == "SUCCESS"
        time.sleep(0.5)
        assert deliveries(gateway.url, "pending") == deliveries(gateway.url, "dead") == []
    assert hooks.received == []
    assert java.stats()["notify_hooks"] == []


def test_webhook_config_is_checked() -> None:
    data: dict[str, Any] = {
        "upstreams": [{"name": "u", "base_url": "http://u", "key": "k"}],
        "clients": [{"name": "alice", "key": CALLER_KEYS["alice"]}],
    }
    data["webhooks"] = {"allow": ["bad host!", "10.0.0.0/33"], "backoff_s": 5, "backoff_max_s": 1}
    data["clients"][0]["webhook"] = {"url": "ftp://x", "secret": "not-a-secret"}
    with pytest.raises(Exception) as raised:
        config_from_dict(data, env={})
    problems = str(raised.value).splitlines()
    assert any(p.startswith("webhooks.allow[0]:") for p in problems)
    assert any(p.startswith("webhooks.allow[1]:") for p in problems)
    assert any(p.startswith("webhooks.backoff_max_s:") for p in problems)
    assert any(p.startswith("clients[0].webhook.url:") for p in problems)
    assert any(p.startswith("clients[0].webhook.secret:") for p in problems)
    assert CALLER_KEYS["alice"] not in str(raised.value)


# -- the store's queue, on the embedded store and on a real Redis -------------------------


async def test_a_queue_entry_read_and_never_acknowledged_is_claimed_again(store: Any) -> None:
    queue = f"t{uuid.uuid4().hex}:{{q}}:queue"
    await store.queue_add(queue, b"one")
    await store.queue_add(queue, b"two")
    first = await store.queue_read(queue, "worker-a", 10)
    assert [data for _, data in first] == [b"one", b"two"]
    assert await store.queue_read(queue, "worker-b", 10) == []  # each entry goes to one reader
    await store.queue_ack(queue, [first[0][0]])
    assert await store.queue_reclaim(queue, "worker-b", 60_000, 10) == []  # not idle long yet
    await asyncio.sleep(0.05)
    claimed = await store.queue_reclaim(queue, "worker-b", 20, 10)
    assert claimed == [first[1]]  # worker-a died holding it
    await store.queue_ack(queue, [first[1][0]])
    assert await store.queue_length(queue) == 0


async def test_due_members_move_from_the_schedule_to_the_queue_at_once(store: Any) -> None:
    prefix = f"t{uuid.uuid4().hex}:{{s}}"
    schedule, queue = f"{prefix}:retry", f"{prefix}:queue"
    now = time.time()
    await store.schedule(schedule, {"late": now + 60, "due": now - 1, "also": now - 2})
    assert [m for m, _ in await store.scheduled(schedule, 10)] == ["also", "due", "late"]
    assert await store.release_due(schedule, queue, now, 10) == 2
    assert await store.schedule_size(schedule) == 1
    read = await store.queue_read(queue, "worker", 10)
    assert sorted(data for _, data in read) == [b"also", b"due"]
    await store.unschedule(schedule, ["late"])
    assert await store.schedule_size(schedule) == 0
