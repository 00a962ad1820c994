"""Live progress: ``GET /mj/task/{id}/events`` as Server-Sent Events. One event per change,
each with an ``id:`` that ``Last-Event-ID`` resumes from without gaps, and the stream ends
after the terminal event. Any gateway process serves any subscriber: changes found by the
watcher in one process reach a subscriber of another through the store's pub/sub. Browsers
use a short-lived token instead of their key, and a real headless Chromium shows it working.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis

from gateway.configfile import config_from_dict
from gateway.events import StreamTokens
from tests.gunicorn_support import gateway_process, metric
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

ORDER = {"NOT_START": 0, "SUBMITTED": 1, "IN_PROGRESS": 2, "SUCCESS": 3}
SECRET_KEY = "stream-secret-0123456789abcdef0123"


@pytest.fixture
def java(sims: list[SimProcess]) -> Iterator[SimProcess]:
    with faults_restored(sims[0], task_seconds=2, failure_rate=0) as sim:
        yield sim


def submit(base_url: str) -> str:
    body = {"prompt": f"a kite over the dunes {uuid.uuid4().hex}"}
    answer = httpx.post(f"{base_url}/mj/submit/imagine", json=body, headers=caller())
    assert answer.status_code == 200, answer.text
    task_id: str = answer.json()["result"]
    return task_id


def read_events(
    url: str, headers: dict[str, str], limit: int | None = None, timeout_s: float = 20
) -> list[tuple[str, dict[str, Any]]]:
    """(id, task) of each event until the stream ends (or ``limit`` events)."""
    events: list[tuple[str, dict[str, Any]]] = []
    event_id = ""
    with httpx.stream("GET", url, headers=headers, timeout=timeout_s) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: "):
                events.append((event_id, orjson.loads(line[6:])))
                if limit is not None and len(events) == limit:
                    break
    return events


def id_order(event_id: str) -> tuple[int, int]:
    millis, seq = event_id.split("-")
    return int(millis), int(seq)


def test_a_stream_sends_each_change_once_and_ends_after_the_terminal_one(
    java: SimProcess, store_url: str
) -> None:
    data = config_data([java], store_url, watcher={"interval_s": 0.1})
    with running_gateway(config_from_dict(data, env={})) as gateway:
        task_id = submit(gateway.url)
        events = read_events(f"{gateway.url}/mj/task/{task_id}/events", caller())
    assert events[-1][1]["status"] == "SUCCESS"
    assert {task["id"] for _, task in events} == {task_id}
    ids = [event_id for event_id, _ in events]
    assert ids == sorted(ids, key=id_order) and len(set(ids)) == len(ids)
    states = [(task["status"], task["progress"]) for _, task in events]
    assert len(set(states)) == len(states)  # each change once
    ranks = [ORDER[status] for status, _ in states]
    assert ranks == sorted(ranks) and len(events) >= 3


def test_last_event_id_resumes_without_gaps(
    java: SimProcess, redis_server: RedisProcess, redis_client: redis.Redis
) -> None:
    java.faults(task_seconds=3)
    data = config_data([java], redis_server.url, watcher={"interval_s": 0.1})
    with running_gateway(config_from_dict(data, env={})) as gateway:
        task_id = submit(gateway.url)
        url = f"{gateway.url}/mj/task/{task_id}/events"
        first = read_events(url, caller(), limit=2)
        time.sleep(0.5)  # changes happen while nobody listens
        resumed = read_events(url, {**caller(), "Last-Event-ID": first[-1][0]})
        bad = httpx.get(url, headers={**caller(), "Last-Event-ID": "not-an-id"})
        assert bad.status_code == 400
        again = read_events(url, {**caller(), "Last-Event-ID": resumed[-1][0]}, timeout_s=5)
    assert resumed[-1][1]["status"] == "SUCCESS"
    assert again == []  # the terminal event was the last: nothing more, and the stream ends
    key = f"{data['redis']['key_prefix']}:{{{task_id}}}:events"
    entries: list[tuple[bytes, Any]] = redis_client.xrange(key)  # type: ignore[assignment]
    logged = [entry_id.decode() for entry_id, _ in entries]
    start = logged.index(first[0][0])
    seen = [event_id for event_id, _ in first + resumed]
    assert seen == logged[start:]  # from the first event on, every logged change, in order


def test_a_subscriber_sees_changes_found_by_the_watcher_in_another_process(
    java: SimProcess, redis_server: RedisProcess, tmp_path: Path
) -> None:
    """Two gateway processes on one Redis: one watches (and publishes what it learns), the
    other does not watch and makes no upstream call for its subscriber beyond checking the
    task exists."""
    java.faults(task_seconds=3)
    watching = config_data([java], redis_server.url, watcher={"interval_s": 0.2})
    serving = {**watching, "watcher": {"enabled": False, "interval_s": 60}}
    with (
        gateway_process(tmp_path, watching) as watcher,
        gateway_process(tmp_path, serving) as subscriber,
    ):
        task_id = submit(watcher.url)
        events = read_events(f"{subscriber.url}/mj/task/{task_id}/events", caller())
        assert events[-1][1]["status"] == "SUCCESS"
        assert len(events) >= 3
        calls = metric(subscriber.url, "mjgate_upstream_requests_total", route="fetch")
        assert calls <= 1
        assert metric(subscriber.url, "mjgate_upstream_requests_total", route="watch") == 0
        assert metric(watcher.url, "mjgate_upstream_requests_total", route="watch") > 0


def test_stream_tokens_let_a_request_without_a_key_in_for_one_task(
    java: SimProcess, sims: list[SimProcess]
) -> None:
    data = config_data([java], "", watcher={"interval_s": 0.1})
    data["server"] = {"secret_key": SECRET_KEY}
    data["clients"][1]["visibility"] = "own"  # bob sees only his own tasks
    with running_gateway(config_from_dict(data, env={})) as gateway:
        task_id = submit(gateway.url)
        made = httpx.post(f"{gateway.url}/mj/task/{task_id}/events/token", headers=caller())
        assert made.status_code == 200, made.text
        grant = made.json()
        assert grant["expires_at"] > time.time() + 60
        events = read_events(f"{gateway.url}{grant['url']}", {})
        assert events[-1][1]["status"] == "SUCCESS"
        assert caller()["Authorization"].split()[-1] not in grant["url"]

        other = submit(gateway.url)
        wrong_task = f"{gateway.url}/mj/task/{other}/events?token={grant['token']}"
        assert httpx.get(wrong_task).status_code == 401
        tampered = grant["token"][:-2] + ("AA" if not grant["token"].endswith("AA") else "BB")
        forged = f"{gateway.url}/mj/task/{task_id}/events?token={tampered}"
        assert httpx.get(forged).status_code == 401
        assert httpx.get(f"{gateway.url}/mj/task/{task_id}/events").status_code == 401
        # Bob may not see alice's task: not found, exactly as fetch says.
        bobs = httpx.post(f"{gateway.url}/mj/task/{task_id}/events/token", headers=caller("bob"))
        assert bobs.status_code == 404
        stream = httpx.get(f"{gateway.url}/mj/task/{task_id}/events", headers=caller("bob"))
        assert stream.status_code == 404
        fetch = httpx.get(f"{gateway.url}/mj/task/{task_id}/fetch", headers=caller("bob"))
        assert fetch.status_code == 404
    tokens = StreamTokens(SECRET_KEY, config_from_dict(data, env={}).clients)
    token = tokens.make("alice", "123", int(time.time()) + 5)
    assert tokens.client_of(token, "123", time.time()) is not None
    assert tokens.client_of(token, "123", time.time() + 10) is None  # expired
    assert tokens.client_of(token, "124", time.time()) is None
    assert StreamTokens("", ()).client_of(token, "123", time.time()) is None


def test_without_a_secret_key_no_tokens_are_made(java: SimProcess) -> None:
    with running_gateway(config_from_dict(config_data([java], ""), env={})) as gateway:
        task_id = submit(gateway.url)
        made = httpx.post(f"{gateway.url}/mj/task/{task_id}/events/token", headers=caller())
        assert made.status_code == 503
        assert "server.secret_key" in made.json()["description"]


PAGE = """<!doctype html>
<html><head><title>waiting</title></head><body><ol id="log"></ol><script>
function watch(url) {
  const source = new EventSource(url);
  source.onmessage = (event) => {
    const task = JSON.parse(event.data);
    const item = document.createElement("li");
    item.textContent = task.status;
    document.getElementById("log").appendChild(item);
    if (["SUCCESS", "FAILURE", "CANCEL"].includes(task.status)) {
      source.close();
      document.title = "done";
    }
  };
}
</script></body></html>
"""


@contextmanager
def page_server() -> Iterator[str]:
    """Serves the page on its own origin, as a team's dashboard would be."""
    port = free_port()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = PAGE.encode()
            self.send_response(200)
            self.send_header("content-type", "text/html; charset=utf-8")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.fail("chromium and chromium-driver are needed (make system-deps installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()


def test_a_browser_eventsource_shows_a_task_going_from_submitted_to_success(
    java: SimProcess, browser: Any
) -> None:
    java.faults(task_seconds=10)
    with page_server() as origin:
        data = config_data([java], "", watcher={"interval_s": 0.2})
        data["server"] = {"secret_key": SECRET_KEY, "cors": {"allow_origins": [origin]}}
        with running_gateway(config_from_dict(data, env={})) as gateway:
            browser.get(origin)
            task_id = submit(gateway.url)
            grant = httpx.post(
                f"{gateway.url}/mj/task/{task_id}/events/token", headers=caller()
            ).json()
            browser.execute_script("watch(arguments[0])", f"{gateway.url}{grant['url']}")
            wait_until(lambda: browser.title == "done", 20, "the page to see the end")
            shown = browser.execute_script(
                "return [...document.querySelectorAll('#log li')].map(li => li.textContent)"
            )
    assert shown[-1] == "SUCCESS"
    assert "SUBMITTED" in shown
    assert shown.index("SUBMITTED") < shown.index("SUCCESS")
    assert shown.count("SUCCESS") == 1


async def test_a_log_appends_changes_only_and_never_an_older_state(store: Any) -> None:
    key = f"t{uuid.uuid4().hex}:{{1}}:events"
    first = await store.log_append(key, b"SUBMITTED|0%", 1000, b"a", 10, 60_000)
    assert first is not None and first[1] == b""
    assert await store.log_append(key, b"SUBMITTED|0%", 1000, b"a", 10, 60_000) is None
    second = await store.log_append(key, b"IN_PROGRESS|50%", 2050, b"b", 10, 60_000)
    assert second is not None and second[1] == b"SUBMITTED|0%"
    assert await store.log_append(key, b"IN_PROGRESS|20%", 2020, b"stale", 10, 60_000) is None
    assert id_order(second[0]) > id_order(first[0])
    assert await store.log_after(key, "", 10) == [(first[0], b"a"), (second[0], b"b")]
    assert await store.log_after(key, first[0], 10) == [(second[0], b"b")]
    assert await store.log_last(key) == (second[0], b"b")


async def test_a_subscriber_gets_what_is_published_after_it_subscribed(store: Any) -> None:
    channel = f"t{uuid.uuid4().hex}:chan"
    await store.publish(channel, b"before")
    messages = store.subscribe(channel)
    receiving = asyncio.ensure_future(messages.__anext__())
    await asyncio.sleep(0.2)
    await store.publish(channel, b"after")
    assert await asyncio.wait_for(receiving, 5) == b"after"
    await messages.aclose()
