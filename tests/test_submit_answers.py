"""What a submit's caller gets when an upstream breaks, lies or refuses the gateway's key.

A scripted upstream (a real HTTP server on a real port) answers submits with whatever the test
sets: a 5xx, HTML with 200, truncated JSON, a bare 302, a 401. The caller must get mjgate's
JSON error (or the next upstream's envelope), never the upstream's raw bytes, which real SDKs
would retry and pay for twice.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.sims_extra import FIRST, assert_error, client, config_for, submits, unique_id
from tests.support import SimProcess, faults_restored, free_port, running_gateway, wait_until
from tests.test_handlers import accepted


@dataclass
class Script:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    calls: int = 0


class ScriptedUpstream:
    """An upstream that answers every submit as ``script`` says and counts them."""

    def __init__(self) -> None:
        self.script = Script()
        self.port = free_port()

        async def submit(request: Request) -> Response:
            self.script.calls += 1
            script = self.script
            return Response(
                script.body, script.status, script.headers, media_type=script.content_type
            )

        paths = ("/mj/submit/{kind}", "/mj/insight-face/{kind}")
        app = Starlette(routes=[Route(path, submit, methods=["POST"]) for path in paths])
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()))

    def entry(self, **overrides: object) -> dict[str, object]:
        return {
            "name": "scripted",
            "base_url": f"http://127.0.0.1:{self.port}",
            "key": "scripted-upstream-key",
            **overrides,
        }


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedUpstream]:
    upstream = ScriptedUpstream()
    upstream.thread.start()
    wait_until(lambda: upstream.server.started, what="scripted upstream start-up")
    yield upstream
    upstream.server.should_exit = True
    upstream.thread.join(timeout=10)


@pytest.fixture
def script(scripted: ScriptedUpstream) -> Script:
    scripted.script = Script()
    return scripted.script


BROKEN_ANSWERS = {
    "500-text": (500, b"Internal Server Error", "text/plain"),
    "502-html": (502, b"<html>Bad Gateway</html>", "text/html"),
    "html-200": (200, b"<html><body>maintenance</body></html>", "text/html"),
    "truncated-json": (200, b'{"code":1,"description":"Submit suc', "application/json"),
    "json-not-envelope": (200, b'["1"]', "application/json"),
    "bare-302": (302, b"", "text/plain"),
    "404-text": (404, b"Not Found", "text/plain"),
}


@pytest.mark.parametrize("answer", BROKEN_ANSWERS.values(), ids=BROKEN_ANSWERS.keys())
def test_a_broken_submit_answer_becomes_a_502_json_error(
    scripted: ScriptedUpstream, script: Script, answer: tuple[int, bytes, str]
) -> None:
    script.status, script.body, script.content_type = answer
    if script.status == 302:
        script.headers = {"location": "http://127.0.0.1:1/elsewhere"}

    with running_gateway(config_for([scripted.entry()])) as gw, client(gw) as http:
        for route in ("/mj/submit/imagine", "/mj/insight-face/swap"):
            body = assert_error(http.post(route, json={"prompt": "x"}), 502)
            assert "scripted" in body["description"]
            assert body["result"] is None
    assert script.calls == 2  # sent once each: an answer of unknown meaning is never resent


def test_an_envelope_with_an_error_code_is_forwarded_as_it_is(
    scripted: ScriptedUpstream, script: Script
) -> None:
    script.body = b'{"code":24,"description":"banned prompt","result":null,"properties":{}}'

    with running_gateway(config_for([scripted.entry()])) as gw, client(gw) as http:
        response = http.post("/mj/submit/imagine", json={"prompt": "x"})
    assert response.status_code == 200
    assert response.content == script.body


def test_a_rejected_gateway_key_fails_over_to_the_next_upstream(
    scripted: ScriptedUpstream, script: Script, sims: list[SimProcess]
) -> None:
    """Nothing was taken by an upstream that refused the gateway's key: move on."""
    script.status, script.body = 401, b""
    java = sims[0]
    upstreams = [scripted.entry(weight=FIRST), java.upstream_config(weight=1)]

    with running_gateway(config_for(upstreams)) as gw, client(gw) as http:
        for _ in range(3):
            accepted(http.post("/mj/submit/imagine", json={"prompt": "failover"}))
    assert submits(java) == 3
    assert 1 <= script.calls <= 3  # the circuit may hold it back once it has opened


def test_a_rejected_gateway_key_with_nowhere_to_go_is_a_502(
    scripted: ScriptedUpstream, script: Script
) -> None:
    script.status, script.body = 403, b"forbidden"

    with running_gateway(config_for([scripted.entry()])) as gw, client(gw) as http:
        body = assert_error(http.post("/mj/submit/imagine", json={"prompt": "x"}), 502)
    assert "rejected the gateway's key" in body["description"]


@pytest.mark.parametrize("status", [500, 502, 429])
def test_a_task_action_failing_upstream_becomes_mjgates_json_error(
    sims: list[SimProcess], status: int
) -> None:
    """Task actions (image-seed, cancel, ...) at an owner answering 5xx or 429: the caller gets
    mjgate's JSON error with the request id, not the upstream's bare answer."""
    java = sims[0]
    task_id = unique_id()
    java.seed(id=task_id, status="SUCCESS")
    with running_gateway(config_for([java.upstream_config()])) as gw, client(gw) as http:
        assert http.get(f"/mj/task/{task_id}/fetch").status_code == 200  # the owner is known
        with faults_restored(java, error_rate=1.0, error_status=status):
            body = assert_error(http.get(f"/mj/task/{task_id}/image-seed"), 502)
    assert f"answered HTTP {status}" in body["description"]
