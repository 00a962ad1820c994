"""Routing through the HTTP API: key custody, owner routing, submit failover, no resend after a
timeout, follow-ups, speed prefixes, passthrough, and bad input that never reaches an upstream.

Everything is real: `mjgate sim` processes as upstreams, the app under uvicorn, httpx callers,
and a redis-server for the tests parametrized with ``store_url``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.sims_extra import (
    FIRST,
    LAST,
    assert_error,
    client,
    config_for,
    control,
    count,
    dead_upstream,
    fresh,
    reset_stats,
    stats,
    submits,
    total,
    unique_id,
    wait_for_status,
)
from tests.support import CALLER_KEYS, GatewayThread, SimProcess, caller, running_gateway

FETCH = "GET /mj/task/{id}/fetch"
IMAGE_SEED = "GET /mj/task/{id}/image-seed"
CANCEL = "POST /mj/task/{id}/cancel"
ACCEPTED = (1, 21, 22)


@pytest.fixture
def sims(session_sims: list[SimProcess]) -> list[SimProcess]:
    """The conftest fixture of the same name, on a pooled control client (much faster)."""
    return fresh(session_sims)


@pytest.fixture(scope="module")
def gateway(session_sims: list[SimProcess]) -> Iterator[GatewayThread]:
    """One gateway for the tests that need no special config: all three sims, memory store."""
    with running_gateway(config_for([s.upstream_config() for s in session_sims])) as gw:
        yield gw


def accepted(response: httpx.Response, codes: tuple[int, ...] = ACCEPTED) -> str:
    """The task id of an accepted submit envelope."""
    assert response.status_code == 200, response.text
    envelope = response.json()
    assert envelope["code"] in codes, envelope
    task_id = envelope["result"]
    assert isinstance(task_id, str) and task_id
    return task_id


def upstream_keys(sims: list[SimProcess]) -> list[str]:
    return [s.key for s in sims]


def owned_by_relay(sims: list[SimProcess]) -> list[dict[str, Any]]:
    """All three sims; submits go to relay, the last one in config order."""
    return [s.upstream_config(weight=FIRST if s is sims[2] else 1) for s in sims]


@pytest.fixture
def fast_tasks(sims: list[SimProcess]) -> Iterator[list[SimProcess]]:
    """Sim tasks finish SUCCESS in 0.3 s for this test; the sims' settings are restored after."""
    before = [control(sim, "GET", "faults") for sim in sims]
    for sim in sims:
        control(sim, "POST", "faults", {"task_seconds": 0.3, "failure_rate": 0})
    yield sims
    for sim, saved in zip(sims, before, strict=True):
        restore = {"task_seconds": saved["task_seconds"], "failure_rate": saved["failure_rate"]}
        control(sim, "POST", "faults", restore)


# -- key custody and headers -----------------------------------------------------------------

HOP_AND_CUSTOM = {
    "Connection": "keep-alive, hop-marker",
    "Keep-Alive": "timeout=5, hop-marker",
    "TE": "hop-marker",
    "Upgrade": "hop-marker",
    "Proxy-Authorization": "Basic hop-marker",
    "Cookie": "session=hop-marker",
    "X-Custom-Thing": "hop-marker",
    "X-Forwarded-For": "hop-marker",
}
NOT_FORWARDED = [n.lower() for n in HOP_AND_CUSTOM if n != "Connection"]


@pytest.mark.parametrize("style", ["bearer", "raw", "mj-api-secret"])
def test_each_upstream_gets_only_its_own_key_in_its_own_style(
    sims: list[SimProcess], gateway: GatewayThread, style: str
) -> None:
    relay = sims[2]
    parents = [unique_id() for _ in sims]
    buttons = [
        sim.seed(id=parent, prompt=f"custody {sim.name}")["buttons"][0]["customId"]
        for sim, parent in zip(sims, parents, strict=True)
    ]
    headers = {**caller("alice", style), **HOP_AND_CUSTOM, "X-Request-Id": "req-custody-1"}
    with httpx.Client(base_url=gateway.url, headers=headers, timeout=15) as http:
        calls = [
            http.get(f"/mj/task/{unique_id()}/fetch"),  # fan-out, not found anywhere
            http.post("/mj/task/list-by-ids", json={"ids": [*parents, unique_id()]}),
            http.get(f"/mj/task/{parents[1]}/image-seed"),
            http.post("/mj/submit/imagine", json={"prompt": "custody"}),
        ]
        for parent, button in zip(parents, buttons, strict=True):
            calls.append(
                http.post("/mj/submit/action", json={"taskId": parent, "customId": button})
            )
    assert [r.status_code for r in calls] == [404, 200, 200] + [200] * 4, [r.text for r in calls]
    assert [t["id"] for t in calls[1].json()] == parents
    for response in calls[3:]:
        accepted(response)
    counts = [submits(s) for s in sims]
    assert sum(counts) == 4 and min(counts) >= 1, counts

    caller_keys = list(CALLER_KEYS.values())
    for sim in sims:
        seen: list[dict[str, str]] = stats(sim)["headers"]
        assert len(seen) >= 3, f"{sim.name} saw {len(seen)} requests"
        other_keys = [s.key for s in sims if s is not sim]
        for headers_seen in seen:
            if sim is relay:
                assert headers_seen.get("authorization") == f"Bearer {relay.key}"
                assert "mj-api-secret" not in headers_seen
            else:
                assert headers_seen.get("mj-api-secret") == sim.key
                # csharp reads Authorization raw before mj-api-secret: none may arrive.
                assert "authorization" not in headers_seen, (sim.name, headers_seen)
            assert headers_seen.get("x-request-id") == "req-custody-1"
            for name in NOT_FORWARDED:
                assert name not in headers_seen, (sim.name, name)
            for name, value in headers_seen.items():
                assert "hop-marker" not in value, (sim.name, name, value)
                for key in caller_keys + other_keys:
                    assert key not in value, (sim.name, name)
    for response in calls:
        assert response.headers["x-request-id"] == "req-custody-1"
        for key in caller_keys + upstream_keys(sims):
            assert key.encode() not in response.content


def test_user_agent_and_accept_language_are_the_only_caller_headers_passed_on(
    sims: list[SimProcess], gateway: GatewayThread
) -> None:
    java = sims[0]
    task_id = unique_id()
    java.seed(id=task_id, prompt="forwarded headers")
    headers = {
        **caller("alice"),
        "User-Agent": "dashboard/2.1",
        "Accept-Language": "zh-CN",
        "X-Custom-Thing": "hop-marker",
    }
    with httpx.Client(base_url=gateway.url, headers=headers, timeout=15) as http:
        assert http.get(f"/mj/task/{task_id}/fetch").status_code == 200
    seen = [h for h in stats(java)["headers"] if h.get("user-agent") == "dashboard/2.1"]
    assert seen, stats(java)["headers"]
    assert seen[-1].get("accept-language") == "zh-CN"
    assert "x-custom-thing" not in seen[-1]


def test_malformed_request_id_is_replaced_and_the_new_one_forwarded(
    sims: list[SimProcess], gateway: GatewayThread
) -> None:
    with client(gateway) as http:
        response = http.get(f"/mj/task/{unique_id()}/fetch", headers={"X-Request-Id": "bad id!"})
    body = assert_error(response, 404)
    generated = response.headers["x-request-id"]
    assert generated != "bad id!" and body["request_id"] == generated
    for sim in sims:
        assert [h.get("x-request-id") for h in stats(sim)["headers"]] == [generated]


# -- owner routing after submit --------------------------------------------------------------


def test_owner_routing_after_submit(fast_tasks: list[SimProcess], store_url: str) -> None:
    java, csharp, relay = fast_tasks
    # relay takes the submit: the owner is the last upstream in config order.
    upstreams = [s.upstream_config(weight=FIRST if s is relay else 1) for s in fast_tasks]
    with running_gateway(config_for(upstreams, store_url)) as gw, client(gw) as http:
        task_id = accepted(http.post("/mj/submit/imagine", json={"prompt": "owner routing"}))
        assert [submits(s) for s in fast_tasks] == [0, 0, 1]
        task = wait_for_status(relay, task_id, "SUCCESS")
        job = task["properties"]["messageHash"]
        reset_stats(fast_tasks)

        fetched = http.get(f"/mj/task/{task_id}/fetch")
        assert fetched.status_code == 200 and fetched.json()["id"] == task_id
        seed = http.get(f"/mj/task/{task_id}/image-seed")
        assert seed.status_code == 200 and seed.json()["code"] == 1, seed.text
        upscale = task["buttons"][0]["customId"]
        child = accepted(
            http.post("/mj/submit/action", json={"taskId": task_id, "customId": upscale})
        )
        accepted(
            http.post(
                "/mj/submit/change", json={"taskId": task_id, "action": "VARIATION", "index": 2}
            )
        )
        accepted(http.post("/mj/submit/simple-change", json={"content": f"{task_id} U3"}))
        zoom = {"taskId": task_id, "customId": f"MJ::CustomZoom::{job}"}
        modal_child = accepted(http.post("/mj/submit/action", json=zoom), (21,))
        accepted(http.post("/mj/submit/modal", json={"taskId": modal_child, "prompt": "zoomed"}))
        cancelled = http.post(f"/mj/task/{child}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["code"] in (1, 4)
        child_fetch = http.get(f"/mj/task/{child}/fetch")
        assert child_fetch.status_code == 200 and child_fetch.json()["id"] == child

    assert total(java) == 0, stats(java)["requests"]
    assert total(csharp) == 0, stats(csharp)["requests"]
    requests = stats(relay)["requests"]
    for route in (
        FETCH,
        IMAGE_SEED,
        CANCEL,
        "POST /mj/submit/action",
        "POST /mj/submit/change",
        "POST /mj/submit/simple-change",
        "POST /mj/submit/modal",
    ):
        assert requests.get(route, 0) >= 1, (route, requests)
    assert submits(relay) == 5


def test_speed_prefixes_route_the_same_and_keep_the_prefix(sims: list[SimProcess]) -> None:
    java, csharp, relay = sims
    upstreams = [s.upstream_config(weight=FIRST if s is relay else 1) for s in sims]
    with running_gateway(config_for(upstreams)) as gw, client(gw) as http:
        task_id = accepted(http.post("/mj-fast/mj/submit/imagine", json={"prompt": "fast one"}))
        assert stats(relay)["paths"] == ["/mj-fast/mj/submit/imagine"]
        assert [submits(s) for s in sims] == [0, 0, 1]
        fetched = http.get(f"/mj-relax/mj/task/{task_id}/fetch")
        assert fetched.status_code == 200 and fetched.json()["id"] == task_id
        assert stats(relay)["paths"][-1] == f"/mj-relax/mj/task/{task_id}/fetch"
        assert total(java) == 0 and total(csharp) == 0  # owner known: nobody else asked

        listed = http.post(
            "/mj-turbo/mj/task/list-by-condition", json={"ids": ["1700000000200001"]}
        )
        assert listed.status_code == 200 and listed.json() == []
    assert stats(java)["paths"] == ["/mj-turbo/mj/task/list-by-condition"]
    assert stats(csharp)["paths"] == ["/mj-turbo/mj/task/list-by-condition"]
    assert stats(relay)["paths"][-1] == "/mj-turbo/mj/task/list-by-ids"


def test_insight_face_is_routed_like_a_submit(sims: list[SimProcess]) -> None:
    java, csharp, relay = sims
    faces = {
        "sourceBase64": "data:image/png;base64,AAAA",
        "targetBase64": "data:image/png;base64,BBBB",
    }
    with running_gateway(config_for(owned_by_relay(sims))) as gw, client(gw) as http:
        task_id = accepted(http.post("/mj-turbo/mj/insight-face/swap", json=faces))
        assert stats(relay)["paths"] == ["/mj-turbo/mj/insight-face/swap"]
        fetched = http.get(f"/mj/task/{task_id}/fetch")
        assert fetched.status_code == 200 and fetched.json()["action"] == "SWAP_FACE"
    assert total(java) == 0 and total(csharp) == 0


def test_weight_zero_upstreams_serve_lookups_but_no_submits(sims: list[SimProcess]) -> None:
    """bob may use only the first upstream, which has weight 0: lookups, never submits."""
    java, relay = sims[0], sims[2]
    task_id = unique_id()
    java.seed(id=task_id, prompt="still readable")
    upstreams = [java.upstream_config(weight=0), relay.upstream_config(weight=1)]
    with running_gateway(config_for(upstreams)) as gw, client(gw, "bob") as http:
        assert_error(http.post("/mj/submit/imagine", json={"prompt": "nowhere"}), 503)
        fetched = http.get(f"/mj/task/{task_id}/fetch")
    assert fetched.status_code == 200 and fetched.json()["prompt"] == "still readable"
    assert submits(java) == 0 and submits(relay) == 0


def test_null_task_id_on_a_fresh_submit_is_no_parent(sims: list[SimProcess]) -> None:
    """Clients that serialize every DTO field send ``"taskId": null`` with an imagine; the
    other known fields treat null as absent, and so does any upstream."""
    with running_gateway(config_for(owned_by_relay(sims))) as gw, client(gw) as http:
        response = http.post("/mj/submit/imagine", json={"prompt": "a cat", "taskId": None})
    accepted(response)
    assert submits(sims[2]) == 1


# -- submit failover -------------------------------------------------------------------------


@pytest.mark.parametrize("full", [0, 1], ids=["java-code-23", "csharp-code-9"])
def test_queue_full_fails_over_to_the_next_upstream(sims: list[SimProcess], full: int) -> None:
    refusing, taking = sims[full], sims[1 - full]
    refusing.faults(queue_full_rate=1)
    upstreams = [refusing.upstream_config(weight=FIRST), taking.upstream_config(weight=1)]
    with running_gateway(config_for(upstreams)) as gw, client(gw) as http:
        response = http.post("/mj/submit/imagine", json={"prompt": "failover"})
        task_id = accepted(response)
        assert submits(refusing) == 1 and submits(taking) == 1
        # The answer is the taking upstream's own envelope, and the task lives there.
        assert response.json()["properties"]["discordInstanceId"]
        assert control(taking, "GET", f"tasks/{task_id}")["prompt"] == "failover"
        fetched = http.get(f"/mj/task/{task_id}/fetch")
        assert fetched.status_code == 200
    assert count(refusing, FETCH) == 0  # the owner is the upstream that took it


@pytest.mark.parametrize("status", [503, 429])
def test_busy_http_status_fails_over_to_the_next_upstream(
    sims: list[SimProcess], status: int
) -> None:
    refusing, taking = sims[0], sims[1]
    refusing.faults(error_rate=1, error_status=status)
    upstreams = [refusing.upstream_config(weight=FIRST), taking.upstream_config(weight=1)]
    with running_gateway(config_for(upstreams)) as gw, client(gw) as http:
        task_id = accepted(http.post("/mj/submit/imagine", json={"prompt": "busy"}))
    assert submits(refusing) == 1 and submits(taking) == 1
    assert control(taking, "GET", f"tasks/{task_id}")["prompt"] == "busy"


def test_dead_upstream_fails_over_to_the_next(sims: list[SimProcess]) -> None:
    java = sims[0]
    upstreams = [dead_upstream(weight=FIRST), java.upstream_config(weight=1)]
    with running_gateway(config_for(upstreams)) as gw, client(gw) as http:
        task_id = accepted(http.post("/mj/submit/imagine", json={"prompt": "after a dead one"}))
    assert submits(java) == 1
    assert control(java, "GET", f"tasks/{task_id}")["prompt"] == "after a dead one"


def test_all_refusing_forwards_the_last_envelope(sims: list[SimProcess]) -> None:
    java, csharp = sims[0], sims[1]
    java.faults(queue_full_rate=1)
    csharp.faults(queue_full_rate=1)
    upstreams = [
        java.upstream_config(weight=FIRST),
        csharp.upstream_config(weight=1),
        dead_upstream(weight=LAST),
    ]
    with running_gateway(config_for(upstreams)) as gw, client(gw) as http:
        response = http.post("/mj/submit/imagine", json={"prompt": "nobody can"})
    assert submits(java) == 1 and submits(csharp) == 1
    # csharp answered last (the dead one never answered): its queue-full envelope, as it was.
    assert response.status_code == 200
    envelope = response.json()
    assert envelope["code"] == 9 and "queue" in envelope["description"]


def test_no_upstream_answering_a_submit_is_502_without_urls_or_keys(
    sims: list[SimProcess],
) -> None:
    first, second = dead_upstream("gone-a"), dead_upstream("gone-b")
    with running_gateway(config_for([first, second])) as gw, client(gw) as http:
        response = http.post("/mj/submit/imagine", json={"prompt": "into the void"})
    body = assert_error(response, 502)
    assert "gone-a" in body["description"] or "gone-b" in body["description"]
    for entry in (first, second):
        assert entry["base_url"].split("//")[1] not in response.text
        assert str(entry["key"]) not in response.text


def test_server_error_on_submit_is_not_sent_elsewhere(sims: list[SimProcess]) -> None:
    """A 500 may come after the work started: it is not one of the failover answers."""
    java, csharp = sims[0], sims[1]
    java.faults(error_rate=1)
    upstreams = [java.upstream_config(weight=FIRST), csharp.upstream_config(weight=1)]
    with running_gateway(config_for(upstreams)) as gw, client(gw) as http:
        response = http.post("/mj/submit/imagine", json={"prompt": "maybe made"})
    assert response.status_code >= 500
    assert submits(java) == 1 and submits(csharp) == 0


def test_no_resend_after_a_timeout(sims: list[SimProcess]) -> None:
    java, csharp, relay = sims
    java.faults(timeout_rate=1, hang_s=3)
    upstreams = [
        java.upstream_config(weight=FIRST, timeout_s=0.5),
        csharp.upstream_config(weight=1),
        relay.upstream_config(weight=1),
    ]
    with running_gateway(config_for(upstreams)) as gw, client(gw) as http:
        started = time.monotonic()
        response = http.post("/mj/submit/imagine", json={"prompt": "paid once"})
        elapsed = time.monotonic() - started
    body = assert_error(response, 504)
    assert "java" in body["description"]
    assert java.url.split("//")[1] not in response.text and java.key not in response.text
    assert elapsed < 3
    assert submits(java) == 1
    assert submits(csharp) == 0 and submits(relay) == 0


def test_follow_up_to_a_hanging_owner_is_504_and_sent_once(sims: list[SimProcess]) -> None:
    java, csharp = sims[0], sims[1]
    java.seed(id="1700000000300001", prompt="parent")
    upstreams = [java.upstream_config(timeout_s=0.5), csharp.upstream_config()]
    with running_gateway(config_for(upstreams)) as gw, client(gw) as http:
        assert http.get("/mj/task/1700000000300001/fetch").status_code == 200
        java.faults(timeout_rate=1, hang_s=3)
        body = {"taskId": "1700000000300001", "customId": "MJ::JOB::upsample::1::x"}
        response = http.post("/mj/submit/action", json=body)
    assert "java" in assert_error(response, 504)["description"]
    assert submits(java) == 1 and submits(csharp) == 0


# -- follow-ups ------------------------------------------------------------------------------


def test_follow_ups_go_to_the_parents_owner(sims: list[SimProcess], store_url: str) -> None:
    java, csharp, relay = sims
    parent = csharp.seed(id="1700000000400001", prompt="a parent on csharp")
    csharp.seed(id="1700000000400002", prompt="waiting", status="MODAL")
    upscale = parent["buttons"][0]["customId"]
    config = config_for([s.upstream_config() for s in sims], store_url)
    with running_gateway(config) as gw, client(gw) as http:
        action = {"taskId": "1700000000400001", "customId": upscale}
        first = accepted(http.post("/mj/submit/action", json=action))
        change = {"taskId": "1700000000400001", "action": "UPSCALE", "index": 2}
        accepted(http.post("/mj/submit/change", json=change))
        simple = {"content": "1700000000400001 V1"}
        accepted(http.post("/mj/submit/simple-change", json=simple))
        modal = {"taskId": "1700000000400002", "prompt": "go on"}
        accepted(http.post("/mj/submit/modal", json=modal))
        # The child of an accepted follow-up belongs to the same upstream.
        child = http.get(f"/mj/task/{first}/fetch")
        assert child.status_code == 200 and child.json()["id"] == first
    assert submits(csharp) == 4
    assert submits(java) == 0 and submits(relay) == 0
    # Only the two fan-out owner look-ups (for the two parents) reached the others.
    assert count(java, FETCH) <= 2 and count(relay, FETCH) <= 2


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("action", {"taskId": "1700000000499999", "customId": "MJ::JOB::upsample::1::x"}),
        ("change", {"taskId": "1700000000499999", "action": "UPSCALE", "index": 1}),
        ("simple-change", {"content": "1700000000499999 U1"}),
        ("modal", {"taskId": "1700000000499999", "prompt": "p"}),
        ("imagine", {"prompt": "with a parent", "taskId": "1700000000499999"}),
    ],
)
def test_unknown_parent_is_404_and_no_submit_reaches_an_upstream(
    sims: list[SimProcess], gateway: GatewayThread, kind: str, body: dict[str, Any]
) -> None:
    with client(gateway) as http:
        response = http.post(f"/mj/submit/{kind}", json=body)
    assert "1700000000499999" in assert_error(response, 404)["description"]
    assert [submits(s) for s in sims] == [0, 0, 0]


# -- upstream failures -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/mj/task/1700000000500001/fetch", None),
        ("POST", "/mj/task/list-by-ids", {"ids": ["1700000000500001"]}),
        ("POST", "/mj/submit/imagine", {"prompt": "x"}),
        ("GET", "/mj/task/1700000000500001/image-seed", None),
    ],
    ids=["fetch", "list", "submit", "image-seed"],
)
def test_connection_errors_are_502_naming_the_upstream_only(
    sims: list[SimProcess], method: str, path: str, body: dict[str, Any] | None
) -> None:
    dead = dead_upstream("faraway")
    with running_gateway(config_for([dead])) as gw, client(gw) as http:
        response = http.request(method, path, json=body)
    description = assert_error(response, 502)["description"]
    assert "faraway" in description
    assert dead["base_url"].split("//")[1] not in response.text
    assert str(dead["base_url"].rsplit(":", 1)[1]) not in description
    assert dead["key"] not in response.text


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/mj/task/1700000000500002/fetch", None),
        ("POST", "/mj/task/list-by-condition", {"ids": ["1700000000500002"]}),
        ("POST", "/mj/task/1700000000500002/cancel", None),
    ],
    ids=["fetch", "list", "cancel"],
)
def test_deadline_is_504(
    sims: list[SimProcess], method: str, path: str, body: dict[str, Any] | None
) -> None:
    java = sims[0]
    java.faults(timeout_rate=1, hang_s=3)
    config = config_for([java.upstream_config(timeout_s=0.5)])
    with running_gateway(config) as gw, client(gw) as http:
        response = http.request(method, path, json=body)
    assert "java" in assert_error(response, 504)["description"]
    assert java.key not in response.text


# -- passthrough -----------------------------------------------------------------------------


def test_passthrough_forwards_listed_paths_only(sims: list[SimProcess]) -> None:
    """``/mj-fast/task/list`` (speed prefix without ``/mj``) is served by the sim and routed
    by nothing in the gateway, so only the ``passthrough`` entry can make it reach upstream."""
    java = sims[0]
    java.seed(id="1700000000600001", prompt="listed")
    config = config_for([java.upstream_config()], passthrough=["/mj-fast/task/list"])
    with running_gateway(config) as gw, client(gw) as http:
        listed = http.get("/mj-fast/task/list", params={"size": "5"})
        assert listed.status_code == 200, listed.text
        assert "1700000000600001" in [t["id"] for t in listed.json()]
        assert stats(java)["paths"] == ["/mj-fast/task/list?size=5"]
        assert stats(java)["headers"][-1]["mj-api-secret"] == java.key
        for path in ("/mj-fast/task/queue", "/mj-relax/task/list", "/mj/account/list"):
            assert_error(http.get(path), 404)
    assert stats(java)["paths"] == ["/mj-fast/task/list?size=5"]


# -- bad input never reaches an upstream -----------------------------------------------------

MAX_BODY = 1024
MAX_IDS = 3
LONG_ID = "a" * 65


@pytest.fixture(scope="module")
def strict_gateway(session_sims: list[SimProcess]) -> Iterator[GatewayThread]:
    config = config_for(
        [s.upstream_config() for s in session_sims],
        server={"max_body_bytes": MAX_BODY},
        fanout={"max_ids": MAX_IDS, "deadline_s": 3},
    )
    with running_gateway(config) as gw:
        yield gw


BAD_REQUESTS: list[tuple[str, str, str, bytes | None, int | tuple[int, ...]]] = [
    ("id-too-long", "GET", f"/mj/task/{LONG_ID}/fetch", None, 400),
    ("id-dot", "GET", "/mj/task/abc.def/fetch", None, 400),
    ("id-space", "GET", "/mj/task/abc%20def/fetch", None, 400),
    ("id-encoded-slash", "GET", "/mj/task/abc%2Fdef/fetch", None, (400, 404)),
    ("id-non-ascii", "GET", "/mj/task/t%C3%A2che/fetch", None, 400),
    ("id-nul", "GET", "/mj/task/abc%00/fetch", None, 400),
    ("id-prefixed-mode", "GET", "/mj-fast/mj/task/bad.id/fetch", None, 400),
    ("seed-bad-id", "GET", f"/mj/task/{LONG_ID}/image-seed", None, 400),
    ("cancel-bad-id", "POST", "/mj/task/bad%20id/cancel", None, 400),
    ("list-not-json", "POST", "/mj/task/list-by-ids", b'{"ids": [', 400),
    ("list-array", "POST", "/mj/task/list-by-ids", b'["1700000000000001"]', 400),
    ("list-empty", "POST", "/mj/task/list-by-condition", b"", 400),
    ("list-ids-string", "POST", "/mj/task/list-by-ids", b'{"ids": "1700000000000001"}', 400),
    ("list-ids-missing", "POST", "/mj/task/list-by-ids", b"{}", 400),
    ("list-id-number", "POST", "/mj/task/list-by-ids", b'{"ids": [1700000000000001]}', 400),
    ("list-bad-id", "POST", "/mj/task/list-by-ids", b'{"ids": ["ok-1", "bad id"]}', 400),
    ("list-empty-id", "POST", "/mj/task/list-by-condition", b'{"ids": [""]}', 400),
    ("list-long-id", "POST", "/mj/task/list-by-ids", f'{{"ids": ["{LONG_ID}"]}}'.encode(), 400),
    ("list-too-many", "POST", "/mj/task/list-by-ids", b'{"ids": ["a", "b", "c", "d"]}', 400),
    ("cond-too-many", "POST", "/mj/task/list-by-condition", b'{"ids":["1","2","3","4"]}', 400),
    ("submit-not-json", "POST", "/mj/submit/imagine", b"prompt=cat", 400),
    ("submit-array", "POST", "/mj/submit/imagine", b'["a cat"]', 400),
    ("submit-empty", "POST", "/mj/submit/imagine", b"", 400),
    ("submit-prompt-number", "POST", "/mj/submit/imagine", b'{"prompt": 5}', 400),
    ("submit-prompt-bool", "POST", "/mj/submit/imagine", b'{"prompt": true}', 400),
    ("submit-base64array", "POST", "/mj/submit/blend", b'{"base64Array": "x"}', 400),
    ("action-taskid-list", "POST", "/mj/submit/action", b'{"taskId": ["1"], "customId": "c"}', 400),
    ("action-taskid-num", "POST", "/mj/submit/action", b'{"taskId": 17, "customId": "c"}', 400),
    ("action-taskid-bad", "POST", "/mj/submit/action", b'{"taskId": "a/b", "customId": "c"}', 400),
    ("action-no-taskid", "POST", "/mj/submit/action", b'{"customId": "c"}', 400),
    ("simple-change-bad", "POST", "/mj/submit/simple-change", b'{"content": "bad.id U1"}', 400),
    ("simple-change-type", "POST", "/mj/submit/simple-change", b'{"content": 5}', 400),
    ("modal-bad-id", "POST", "/mj/submit/modal", b'{"taskId": "x y"}', 400),
    ("submit-unknown-kind", "POST", "/mj/submit/Not_A_Kind", b'{"prompt": "p"}', 404),
    ("unknown-path", "GET", "/mj/nothing/here", None, 404),
    ("unknown-root", "GET", "/nothing", None, 404),
    ("unlisted-path", "GET", "/mj-fast/task/list", None, 404),
    ("method-submit", "GET", "/mj/submit/imagine", None, 405),
    ("method-fetch", "DELETE", "/mj/task/1700000000000001/fetch", None, 405),
    ("method-list", "PUT", "/mj/task/list-by-ids", b'{"ids": []}', 405),
    ("method-list-get", "GET", "/mj/task/list-by-condition", None, 405),
]


@pytest.mark.parametrize(
    ("method", "path", "content", "status"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_input_is_refused_before_any_upstream(
    session_sims: list[SimProcess],
    strict_gateway: GatewayThread,
    method: str,
    path: str,
    content: bytes | None,
    status: int | tuple[int, ...],
) -> None:
    headers = {"Content-Type": "application/json"} if content is not None else {}
    before = [total(s) for s in session_sims]
    with client(strict_gateway) as http:
        response = http.request(method, path, content=content, headers=headers)
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status_code in statuses, (response.status_code, response.text)
    assert_error(response, response.status_code)
    assert [total(s) for s in session_sims] == before


def _padded(prompt_size: int) -> bytes:
    return b'{"prompt": "' + b"x" * prompt_size + b'"}'


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("path", ["/mj/submit/imagine", "/mj/task/list-by-ids"])
def test_body_over_the_limit_is_413(
    session_sims: list[SimProcess], strict_gateway: GatewayThread, chunked: bool, path: str
) -> None:
    body = _padded(MAX_BODY)
    assert len(body) > MAX_BODY

    def pieces() -> Iterator[bytes]:
        for start in range(0, len(body), 256):
            yield body[start : start + 256]

    before = [total(s) for s in session_sims]
    with client(strict_gateway) as http:
        if chunked:
            response = http.post(
                path, content=pieces(), headers={"Content-Type": "application/json"}
            )
            assert response.request.headers.get("transfer-encoding") == "chunked"
        else:
            response = http.post(path, content=body, headers={"Content-Type": "application/json"})
            assert response.request.headers["content-length"] == str(len(body))
    assert_error(response, 413)
    assert [total(s) for s in session_sims] == before


def test_body_just_under_the_limit_is_accepted(
    sims: list[SimProcess], strict_gateway: GatewayThread
) -> None:
    body = _padded(MAX_BODY - 40)
    assert len(body) <= MAX_BODY
    with client(strict_gateway) as http:
        response = http.post(
            "/mj/submit/imagine", content=body, headers={"Content-Type": "application/json"}
        )
    accepted(response)
    assert sum(submits(s) for s in sims) == 1


def test_empty_id_list_is_an_empty_answer_without_upstream_calls(
    session_sims: list[SimProcess], strict_gateway: GatewayThread
) -> None:
    before = [total(s) for s in session_sims]
    with client(strict_gateway) as http:
        for spelling in ("list-by-ids", "list-by-condition"):
            response = http.post(f"/mj/task/{spelling}", json={"ids": []})
            assert response.status_code == 200 and response.json() == []
    assert [total(s) for s in session_sims] == before
