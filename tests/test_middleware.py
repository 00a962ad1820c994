"""The request middleware as a real process writes it: one JSON access line per request with
the caller's request id, nothing for health, readiness and metrics, readable console lines,
and no key from any header in logs, metrics or error bodies."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import ACCESS_LOG_FIELDS, CALLER_KEYS, SimProcess, caller, wait_until
from tests.test_observability import (
    GatewayProc,
    config_data,
    gateway_proc,
    sample_sum,
    scrape,
)

LIMITED_KEY = "limited-key-0123456789"
GENERATED_ID = re.compile(r"[0-9a-f]{32}")
QUIET = ("/healthz", "/readyz", "/metrics")


@pytest.fixture(scope="module")
def gateway(
    session_sims: list[SimProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProc]:
    """``python -m gateway serve --config FILE``, JSON logs on its stdout."""
    config = config_data(session_sims)
    config["clients"].append(
        {"name": "limited", "key": LIMITED_KEY, "rate_limit": {"rps": 0.001, "burst": 1}}
    )
    with gateway_proc(tmp_path_factory.mktemp("serve"), config) as process:
        yield process


def new_id() -> str:
    return f"req-{uuid.uuid4().hex[:16]}"


def seeded(sim: SimProcess) -> str:
    task_id = f"17{uuid.uuid4().int % 10**14:014d}"
    sim.seed(id=task_id, prompt="middleware")
    return task_id


def test_access_line_has_every_field_and_the_request_id_the_caller_got(
    gateway: GatewayProc, session_sims: list[SimProcess]
) -> None:
    task_id = seeded(session_sims[0])
    answer = httpx.get(f"{gateway.url}/mj/task/{task_id}/fetch", headers=caller("alice"))
    assert answer.status_code == 200
    request_id = answer.headers["x-request-id"]
    assert GENERATED_ID.fullmatch(request_id)
    line = gateway.wait_for_line(request_id)
    assert set(ACCESS_LOG_FIELDS) <= set(line)
    assert line["request_id"] == request_id
    assert line["client"] == "alice"
    assert line["method"] == "GET"
    assert line["route"] == "/mj/task/{task_id}/fetch"
    assert task_id not in json.dumps(line)  # the route template, never the raw path
    assert line["status"] == 200
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] > 0
    assert line["cache"] == "MISS"
    assert line["upstreams"] and set(line["upstreams"]) <= {s.name for s in session_sims}
    assert isinstance(line["upstream_ms"], int | float) and line["upstream_ms"] > 0
    assert line["level"] == "info" and line["event"] == "request"

    again = httpx.get(f"{gateway.url}/mj/task/{task_id}/fetch", headers=caller("alice"))
    hit = gateway.wait_for_line(again.headers["x-request-id"])
    assert hit["cache"] == "HIT" == again.headers["x-cache"]
    assert hit["upstreams"] == [] and hit["upstream_ms"] == 0
    assert hit["request_id"] != request_id


def test_every_stdout_line_is_one_json_object(gateway: GatewayProc) -> None:
    httpx.get(f"{gateway.url}/mj/task/list", headers=caller("alice"))
    lines = gateway.output().splitlines()
    assert lines
    for raw in lines:
        assert isinstance(json.loads(raw), dict), raw


def test_caller_request_id_is_echoed_logged_and_in_error_bodies(gateway: GatewayProc) -> None:
    request_id = new_id() + ".a:b_c"
    answer = httpx.get(f"{gateway.url}/mj/task/list", headers={"X-Request-Id": request_id})
    assert answer.status_code == 401
    assert answer.headers["x-request-id"] == request_id
    assert answer.json()["request_id"] == request_id
    line = gateway.wait_for_line(request_id)
    assert line["status"] == 401 and line["client"] == "-"
    assert line["route"] == "/mj/task/list"  # refused before routing, logged under its route
    assert line["cache"] == "-" and "x-cache" not in answer.headers


@pytest.mark.parametrize("bad", ["has spaces in it", "x" * 129, "semi;colon", "slash/id"])
def test_malformed_request_id_is_replaced(gateway: GatewayProc, bad: str) -> None:
    headers = {**caller("alice"), "X-Request-Id": bad}
    answer = httpx.get(f"{gateway.url}/no/such/route", headers=headers)
    assert answer.status_code == 404
    request_id = answer.headers["x-request-id"]
    assert GENERATED_ID.fullmatch(request_id)
    assert answer.json()["request_id"] == request_id
    line = gateway.wait_for_line(request_id)
    assert line["route"] == "unmatched" and line["status"] == 404
    assert bad not in gateway.output()


def test_one_access_line_per_request(gateway: GatewayProc) -> None:
    ids = [new_id() for _ in range(5)]
    for request_id in ids:
        headers = {**caller("alice"), "X-Request-Id": request_id}
        assert httpx.get(f"{gateway.url}/mj/task/list", headers=headers).status_code == 200
    for request_id in ids:
        gateway.wait_for_line(request_id)
    for request_id in ids:
        assert len(gateway.events("request", request_id=request_id)) == 1
        assert sum(request_id in raw for raw in gateway.output().splitlines()) == 1


def test_health_readiness_and_metrics_write_no_access_line_and_are_not_counted(
    gateway: GatewayProc,
) -> None:
    quiet_ids = {path: new_id() for path in ("/healthz", "/readyz", "/metrics")}
    for path, request_id in quiet_ids.items():
        answer = httpx.get(f"{gateway.url}{path}", headers={"X-Request-Id": request_id})
        assert answer.status_code == 200
        assert answer.headers["x-request-id"] == request_id
    marker = new_id()
    httpx.get(f"{gateway.url}/mj/task/list", headers={**caller("alice"), "X-Request-Id": marker})
    gateway.wait_for_line(marker)  # written after the quiet requests were answered
    output = gateway.output()
    for request_id in quiet_ids.values():
        assert request_id not in output
    routes = {line.get("route") for line in gateway.events("request")}
    assert not routes & set(quiet_ids)
    body = scrape(gateway.url)
    for path in quiet_ids:
        assert sample_sum(body, "mjgate_requests_total", route=path) == 0
        assert f'route="{path}"' not in body


def test_console_format_gives_readable_lines(
    session_sims: list[SimProcess], tmp_path: Path
) -> None:
    config = config_data(session_sims, logging={"level": "info", "format": "console"})
    with gateway_proc(tmp_path, config) as process:
        request_id = new_id()
        headers = {**caller("alice"), "X-Request-Id": request_id}
        assert httpx.get(f"{process.url}/mj/task/list", headers=headers).status_code == 200

        def written() -> bool:
            return request_id in process.output()

        wait_until(written, 5, "console access line")
        lines = process.output().splitlines()
    assert lines
    for raw in lines:
        with pytest.raises(ValueError):
            json.loads(raw)
    (line,) = [raw for raw in lines if request_id in raw]
    assert "request" in line and "[info" in line
    for field, value in (("client", "alice"), ("method", "GET"), ("route", "/mj/task/list")):
        assert f"{field}={value}" in line
    assert "status=200" in line and "duration_ms=" in line and "upstreams=" in line
    assert "\x1b[" not in "\n".join(lines)  # no colors when stdout is not a terminal


def test_keys_in_every_header_leave_no_trace(
    gateway: GatewayProc, session_sims: list[SimProcess]
) -> None:
    """Caller keys and upstream keys, in every header a key could be put in, never reach the
    logs, the metrics or an answer."""
    alice, bob = CALLER_KEYS["alice"], CALLER_KEYS["bob"]
    upstream_keys = [sim.key for sim in session_sims]
    java_key, relay_key = upstream_keys[0], upstream_keys[-1]
    everywhere = {
        "Cookie": f"session={alice}; upstream={java_key}",
        "X-Api-Key": alice,
        "X-Upstream-Key": java_key,  # an upstream key guessed into a header
        "Proxy-Authorization": f"Bearer {relay_key}",
    }
    task_id = seeded(session_sims[0])
    attempts: list[tuple[str, str, dict[str, str], bytes | None]] = [
        ("GET", f"/mj/task/{task_id}/fetch", {"Authorization": f"Bearer {alice}"}, None),
        ("GET", f"/mj/task/{task_id}/fetch", {"Authorization": alice}, None),
        ("GET", "/mj/task/1799999999999995/fetch", {"mj-api-secret": bob}, None),
        ("POST", "/mj/submit/imagine", {"Authorization": f"Bearer {alice}"}, b"{not json"),
        ("GET", "/no/such/route", {"mj-api-secret": alice}, None),
        # Upstream keys presented as caller keys, in each way a key is accepted.
        ("GET", f"/mj/task/{task_id}/fetch", {"mj-api-secret": java_key}, None),
        ("GET", f"/mj/task/{task_id}/fetch", {"Authorization": f"Bearer {relay_key}"}, None),
        ("GET", f"/mj/task/{task_id}/fetch", {"Authorization": upstream_keys[1]}, None),
        ("GET", "/metrics", {"Authorization": f"Bearer {alice}"}, None),
        ("GET", "/readyz", {"mj-api-secret": java_key}, None),
    ]
    answers: list[httpx.Response] = []
    for method, path, key_header, body in attempts:
        headers = {**everywhere, **key_header}
        answers.append(httpx.request(method, f"{gateway.url}{path}", headers=headers, content=body))
    statuses = [a.status_code for a in answers]
    assert statuses == [200, 200, 404, 400, 404, 401, 401, 401, 200, 200]
    for answer in answers[:8]:  # every non-quiet request was logged: the logs were looked at
        gateway.wait_for_line(answer.headers["x-request-id"])
    texts = {
        "stdout": gateway.output(),
        "stderr": gateway.errors(),
        "metrics": scrape(gateway.url),
    }
    for index, answer in enumerate(answers):
        if answer.request.url.path != "/metrics":
            texts[f"answer {index}"] = answer.text + repr(answer.headers.items())
    for key in [alice, bob, *upstream_keys]:
        for where, text in texts.items():
            assert key not in text, f"a key reached {where}"


def test_x_cache_is_sent_on_answers_about_tasks_only(
    gateway: GatewayProc, session_sims: list[SimProcess]
) -> None:
    """A task fetched, listed, searched or acted on says where it came from; an answer that
    never involved a task (health, bad input, a refusal, a submit, no such route) does not,
    and its access line says "-"."""
    task_id = seeded(session_sims[0])
    alice = caller("alice")
    limited = {"mj-api-secret": LIMITED_KEY}
    about_tasks: list[tuple[str, str, dict[str, str], Any, int, str]] = [
        ("GET", f"/mj/task/{task_id}/fetch", alice, None, 200, "MISS"),
        ("GET", f"/mj/task/{task_id}/fetch", alice, None, 200, "HIT"),
        ("GET", "/mj/task/1799999999999993/fetch", alice, None, 404, "MISS"),
        ("POST", "/mj/task/list-by-condition", alice, {"ids": [task_id]}, 200, "HIT"),
        ("POST", "/mj/task/query", alice, {}, 200, "MISS"),
        ("GET", "/mj-fast/mj/task/list", alice, None, 200, "MISS"),
        ("GET", "/mj/task/queue", alice, None, 200, "MISS"),
        ("GET", f"/mj/task/{task_id}/image-seed", alice, None, 200, "MISS"),
        ("GET", "/mj/task/list", limited, None, 200, "MISS"),  # its one token: next, 429
    ]
    twice = [("mj-api-secret", CALLER_KEYS["alice"])] * 2
    not_about_tasks: list[tuple[str, str, Any, Any, int]] = [
        ("GET", "/healthz", {}, None, 200),
        ("GET", "/readyz", {}, None, 200),
        ("GET", f"/mj/task/{task_id}/fetch", {}, None, 401),
        ("GET", f"/mj/task/{task_id}/fetch", twice, None, 400),
        ("GET", f"/mj/task/{task_id}/fetch", limited, None, 429),
        ("GET", "/mj/task/has.a.dot/fetch", alice, None, 400),
        ("POST", "/mj/task/list-by-ids", alice, {"ids": "not a list"}, 400),
        ("PUT", "/mj/task/list-by-ids", alice, None, 405),
        ("POST", "/mj/submit/imagine", alice, {"prompt": f"x-cache {task_id}"}, 200),
        ("GET", "/no/such/route", alice, None, 404),
    ]
    logged: dict[str, str] = {}
    for method, path, headers, body, status, cache in about_tasks:
        answer = httpx.request(method, f"{gateway.url}{path}", headers=headers, json=body)
        assert answer.status_code == status, (path, answer.text)
        assert answer.headers.get("x-cache") == cache, path
        logged[answer.headers["x-request-id"]] = cache
    for method, path, headers, body, status in not_about_tasks:
        answer = httpx.request(method, f"{gateway.url}{path}", headers=headers, json=body)
        assert answer.status_code == status, (path, answer.text)
        assert "x-cache" not in answer.headers and "x-cache-tier" not in answer.headers, path
        if path not in QUIET:
            logged[answer.headers["x-request-id"]] = "-"
    for request_id, cache in logged.items():
        assert gateway.wait_for_line(request_id)["cache"] == cache
