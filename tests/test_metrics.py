"""gateway/metrics.py: every metric's name, type, labels and buckets; pre-bound children;
bounded label sets; the text exposition in single- and multiprocess mode."""

from __future__ import annotations

import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from gateway import metrics
from gateway.configfile import config_from_dict
from tests.ledger_support import faults
from tests.sims_extra import client, config_for
from tests.support import (
    SimProcess,
    caller,
    config_data,
    make_config,
    running_gateway,
    wait_until,
)
from tests.test_observability import sample_sum

# name (as the family is called in a scrape), type, label names: DESIGN.md section 5.
EXPECTED: dict[str, tuple[str, tuple[str, ...]]] = {
    "mjgate_requests": ("counter", ("route", "method", "status", "cache")),
    "mjgate_request_duration_seconds": ("histogram", ("route",)),
    "mjgate_inflight_requests": ("gauge", ()),
    "mjgate_upstream_requests": ("counter", ("upstream", "route", "outcome")),
    "mjgate_upstream_request_duration_seconds": ("histogram", ("upstream", "route")),
    "mjgate_cache_lookups": ("counter", ("tier", "result")),
    "mjgate_coalesced_lookups": ("counter", ()),
    "mjgate_fanout_width": ("histogram", ()),
    "mjgate_partial_answers": ("counter", ("upstream",)),
    "mjgate_rate_limited": ("counter", ("client",)),
    "mjgate_store_errors": ("counter", ("operation",)),
    "mjgate_circuit_state": ("gauge", ("upstream",)),
    "mjgate_submits": ("counter", ("upstream", "code")),
    "mjgate_tasks_finished": ("counter", ("upstream", "status")),
    "mjgate_task_duration_seconds": ("histogram", ("upstream",)),
    "mjgate_images_served": ("counter", ("source",)),
    "mjgate_image_bytes_served": ("counter", ("source",)),
    "mjgate_image_fetches": ("counter", ("outcome",)),
    "mjgate_image_fetch_duration_seconds": ("histogram", ()),
    "mjgate_images_rehosted": ("counter", ()),
    "mjgate_image_disk_bytes": ("gauge", ()),
    # The watcher and task events, webhooks, and the ledger (usage, quotas, dedup).
    "mjgate_watcher_leader": ("gauge", ()),
    "mjgate_watched_tasks": ("gauge", ("upstream",)),
    "mjgate_event_streams": ("gauge", ()),
    "mjgate_webhook_deliveries": ("counter", ("outcome",)),
    "mjgate_webhook_delivery_duration_seconds": ("histogram", ()),
    "mjgate_webhook_queue_depth": ("gauge", ("state",)),
    "mjgate_caller_submits": ("counter", ("client", "action")),
    "mjgate_caller_tasks_finished": ("counter", ("client", "action", "status")),
    "mjgate_quota_refused": ("counter", ("client", "quota")),
    "mjgate_deduplicated_submits": ("counter", ()),
    "mjgate_stuck_tasks": ("gauge", ("upstream",)),
}
LATENCY_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5]
LATENCY_BUCKETS += [1, 2.5, 5, 10, 30]
L1_HIT_LABELS = {"tier": "l1", "result": "hit"}
LIMITED_KEY = "limited-key-0123456789"
TEMPLATE = re.compile(r"(/([a-z][a-z-]*|\{[a-z_]+\}))+")
CLASS = re.compile(r"[a-z_]+")


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def single_process_scrape() -> str:
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain;")
    return body.decode()


def test_every_metric_has_its_type_labels_and_help() -> None:
    ours = {
        collector._name: collector
        for collector in REGISTRY._collector_to_names
        if isinstance(collector, MetricWrapperBase) and collector._name.startswith("mjgate_")
    }
    assert set(ours) == set(EXPECTED)
    scraped = families(single_process_scrape())
    for name, (kind, labels) in EXPECTED.items():
        collector = ours[name]
        assert collector._type == kind, name
        assert collector._labelnames == labels, name
        assert scraped[name].type == kind
        assert scraped[name].documentation, f"{name} has no help text"


def test_request_duration_has_sub_millisecond_buckets() -> None:
    for histogram in (metrics.REQUEST_DURATION, metrics.UPSTREAM_DURATION):
        assert histogram._upper_bounds == [*LATENCY_BUCKETS, float("inf")]
    route = f"/test/{uuid.uuid4().hex}"
    metrics.observe_request(route, "GET", 200, "HIT", 0.0004)
    buckets = {
        sample.labels["le"]: sample.value
        for sample in families(single_process_scrape())["mjgate_request_duration_seconds"].samples
        if sample.name.endswith("_bucket") and sample.labels["route"] == route
    }
    assert list(buckets)[:3] == ["0.0005", "0.001", "0.0025"]
    assert buckets["0.0005"] == 1  # 0.4 ms lands in the first bucket
    assert buckets["+Inf"] == 1


def test_task_duration_buckets_reach_an_hour() -> None:
    bounds = metrics.TASK_DURATION._upper_bounds
    assert bounds[0] <= 5 and bounds[-2] == 3600 and bounds[-1] == float("inf")
    assert bounds == sorted(bounds)


def test_observe_request_reuses_its_prebound_children(monkeypatch: pytest.MonkeyPatch) -> None:
    route = f"/test/{uuid.uuid4().hex}"
    calls: list[tuple[str, ...]] = []
    real_labels = metrics.REQUESTS.labels

    def counting_labels(*values: str) -> Any:
        calls.append(values)
        return real_labels(*values)

    monkeypatch.setattr(metrics.REQUESTS, "labels", counting_labels)
    metrics.observe_request(route, "GET", 200, "MISS", 0.002)
    metrics.observe_request(route, "GET", 200, "MISS", 0.003)
    assert calls == [(route, "GET", "200", "MISS")]  # bound once, then one dict get
    child = metrics._request_children[(route, "GET", 200, "MISS")]
    assert child is real_labels(route, "GET", "200", "MISS")
    assert metrics._duration_children[route] is metrics.REQUEST_DURATION.labels(route)

    scraped = families(single_process_scrape())
    series = [s for s in scraped["mjgate_requests"].samples if s.labels.get("route") == route]
    totals = [s for s in series if s.name == "mjgate_requests_total"]
    assert len(totals) == 1  # one series, incremented twice
    assert totals[0].value == 2
    assert totals[0].labels == {"route": route, "method": "GET", "status": "200", "cache": "MISS"}
    counts = [
        s
        for s in scraped["mjgate_request_duration_seconds"].samples
        if s.name.endswith("_count") and s.labels["route"] == route
    ]
    assert [c.value for c in counts] == [2]

    metrics.observe_request(route, "GET", 404, "MISS", 0.001)  # a new label set binds anew
    assert calls[-1] == (route, "GET", "404", "MISS") and len(calls) == 2


def test_cache_lookup_children_are_bound_at_import() -> None:
    assert metrics.L1_HIT is metrics.CACHE_LOOKUPS.labels("l1", "hit")
    assert metrics.L1_MISS is metrics.CACHE_LOOKUPS.labels("l1", "miss")
    assert metrics.STORE_HIT is metrics.CACHE_LOOKUPS.labels("store", "hit")
    assert metrics.STORE_MISS is metrics.CACHE_LOOKUPS.labels("store", "miss")


def test_multiprocess_modes_of_the_gauges() -> None:
    assert metrics.INFLIGHT._multiprocess_mode == "livesum"
    assert metrics.CIRCUIT_STATE._multiprocess_mode == "livemax"
    assert metrics.CIRCUIT_VALUES == {"closed": 0, "half_open": 1, "open": 2}
    assert "0 closed, 1 half-open, 2 open" in metrics.CIRCUIT_STATE._documentation


def test_exposition_reads_the_multiprocess_directory_when_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics.observe_request(f"/test/{uuid.uuid4().hex}", "GET", 200, "HIT", 0.001)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    body, content_type = metrics.exposition()
    # This process's values live in its memory, not in the (empty) directory.
    assert body == b""
    assert content_type.startswith("text/plain")


def test_labels_stay_bounded_whatever_ids_are_asked_for(sims: list[SimProcess]) -> None:
    """Many distinct task ids, in paths and bodies: no id becomes a label value, and the
    number of series does not grow with them."""
    ids = [f"17{uuid.uuid4().int % 10**14:014d}" for _ in range(25)]
    for task_id in ids[:3]:
        sims[0].seed(id=task_id, prompt="bounded labels")
    with (
        running_gateway(make_config(sims)) as gateway,
        httpx.Client(base_url=gateway.url, headers=caller("alice"), timeout=10) as http,
    ):
        warm = [
            http.get(f"/mj/task/{ids[0]}/fetch"),
            http.get("/mj/task/1700000000000000/fetch"),
            http.post("/mj/task/list-by-condition", json={"ids": ids[:2]}),
            http.get(f"/mj/task/{ids[0]}/image-seed"),
            http.get("/no/such/route/0"),
        ]
        assert [r.status_code for r in warm][:2] == [200, 404]
        before = single_process_scrape()
        for task_id in ids[1:]:
            http.get(f"/mj/task/{task_id}/fetch")
            http.get(f"/mj/task/{task_id}/image-seed")
            http.post("/mj/task/list-by-condition", json={"ids": [task_id, ids[0]]})
            http.get(f"/no/such/route/{task_id}")
            http.get(f"/mj/task/{task_id}/fetch", headers={"X-Request-Id": f"id-{task_id}"})
        after = httpx.get(f"{gateway.url}/metrics").text
    for task_id in ids:
        assert task_id not in after

    def series(text: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
        return {
            (s.name, tuple(sorted(s.labels.items())))
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name.startswith("mjgate_")
        }

    new = series(after) - series(before)
    # 24 more ids asked for in four ways gave only a few new series (new status/cache pairs).
    assert len(new) < 40, new
    routes = {
        s.labels["route"]
        for f in text_string_to_metric_families(after)
        for s in f.samples
        if "route" in s.labels and not s.labels["route"].startswith("/test/")  # this file's
    }
    assert "/mj/task/{task_id}/fetch" in routes and "fetch" in routes
    for route in routes:  # a template, a route class or "unmatched"; never a raw path
        assert TEMPLATE.fullmatch(route) or CLASS.fullmatch(route), route


def test_each_fetch_counts_one_l1_lookup(sims: list[SimProcess]) -> None:
    """A miss goes through the fast path, the handler and the lookup: it must count once."""
    task_id = f"17{uuid.uuid4().int % 10**14:014d}"
    sims[0].seed(id=task_id, status="SUCCESS")

    def l1(result: str) -> float:
        labels = {"tier": "l1", "result": result}
        return REGISTRY.get_sample_value("mjgate_cache_lookups_total", labels) or 0.0

    hits, misses = l1("hit"), l1("miss")
    with running_gateway(make_config(sims)) as gateway:
        for _ in range(3):
            response = httpx.get(f"{gateway.url}/mj/task/{task_id}/fetch", headers=caller())
            assert response.status_code == 200
    assert (l1("hit") - hits, l1("miss") - misses) == (2, 1)


def requests_counted(**labels: str) -> float:
    """``mjgate_requests_total`` of this process, summed over the series matching ``labels``."""
    return sample_sum(single_process_scrape(), "mjgate_requests_total", **labels)


def test_refusals_are_counted_under_the_route_asked_for(sims: list[SimProcess]) -> None:
    """401, 429 and 400 answered before routing carry the route's template, never the raw path
    and no longer "unmatched"; a path no route serves stays "unmatched"."""
    task_id = f"17{uuid.uuid4().int % 10**14:014d}"
    limited = {"name": "limited", "key": LIMITED_KEY, "rate_limit": {"rps": 0.001, "burst": 1}}
    config = config_data(sims)
    config["clients"].append(limited)
    limited_key = [("mj-api-secret", LIMITED_KEY)]
    asks: list[tuple[str, str, list[tuple[str, str]], str, str]] = [
        ("GET", f"/mj/task/{task_id}/fetch", [], "/mj/task/{task_id}/fetch", "401"),
        ("POST", "/mj-fast/mj/task/list-by-ids", [], "/mj-fast/mj/task/list-by-ids", "401"),
        ("GET", "/mj/task/list-by-ids", [], "/mj/task/list-by-ids", "401"),  # else a 405
        ("GET", f"/no/such/{task_id}", [], "unmatched", "401"),
        ("GET", "/mj/task/list", limited_key, "/mj/task/list", "200"),
        ("GET", "/mj/task/list", limited_key, "/mj/task/list", "429"),
        ("POST", "/mj/submit/imagine", limited_key * 2, "/mj/submit/{kind}", "400"),
    ]
    before = {
        (route, status): requests_counted(route=route, status=status) for *_, route, status in asks
    }
    with running_gateway(config_from_dict(config, env={})) as gateway:
        for method, path, headers, _, status in asks:
            answer = httpx.request(method, f"{gateway.url}{path}", headers=headers, json={})
            assert str(answer.status_code) == status, (path, answer.text)
        expected = {
            (route, status): count + sum(1 for *_, r, s in asks if (r, s) == (route, status))
            for (route, status), count in before.items()
        }

        def counted() -> dict[tuple[str, str], float]:
            # The count is taken just after the answer is sent: poll briefly for the last one.
            text = single_process_scrape()
            assert task_id not in text
            return {
                key: sample_sum(text, "mjgate_requests_total", route=key[0], status=key[1])
                for key in expected
            }

        wait_until(lambda: counted() == expected, timeout_s=3, what="the requests counted")


def test_an_l1_hit_is_not_counted_for_a_request_refused_with_429(sims: list[SimProcess]) -> None:
    task_id = f"17{uuid.uuid4().int % 10**14:014d}"
    sims[0].seed(id=task_id, status="SUCCESS")
    limited = {"name": "limited", "key": LIMITED_KEY, "rate_limit": {"rps": 0.001, "burst": 2}}
    config = config_data(sims)
    config["clients"].append(limited)

    def l1_hits() -> float:
        return REGISTRY.get_sample_value("mjgate_cache_lookups_total", L1_HIT_LABELS) or 0.0

    hits = l1_hits()
    with running_gateway(config_from_dict(config, env={})) as gateway:
        url = f"{gateway.url}/mj/task/{task_id}/fetch"
        statuses = [
            httpx.get(url, headers={"mj-api-secret": LIMITED_KEY}).status_code for _ in range(4)
        ]
    # A miss that fills L1, an L1 hit, then two refusals that an L1 hit could have answered.
    assert statuses == [200, 200, 429, 429]
    assert l1_hits() - hits == 1


@pytest.mark.parametrize(
    ("code", "label"),
    [
        (1, "1"),
        (21, "21"),
        (24, "24"),
        (9, "9"),
        (None, "none"),
        (7, "other"),
        (10**12, "other"),
        ("1", "other"),
        (True, "other"),
        (1.0, "other"),
        ([1], "other"),
        ("<script>", "other"),
    ],
)
def test_submit_code_labels_are_the_known_codes_or_other(code: object, label: str) -> None:
    assert metrics.submit_code(code) == label


class EnvelopeUpstream:
    """A real HTTP upstream answering every submit with the envelope code it is given."""

    def __init__(self) -> None:
        self.code: object = 1
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                body = json.dumps({"code": upstream.code, "description": "odd", "result": None})
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> EnvelopeUpstream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_submit_codes_an_upstream_makes_up_do_not_grow_the_label_set() -> None:
    name = f"odd{uuid.uuid4().hex[:6]}"
    with EnvelopeUpstream() as upstream:
        entry = {
            "name": name,
            "base_url": upstream.url,
            "auth": "bearer",
            "key": "odd-upstream-key-0123",
            "list_by_ids_path": "/mj/task/list-by-ids",
        }
        with running_gateway(config_for([entry])) as gateway, client(gateway) as http:
            for code in (1, 23, 4711, 99999999, -5, "1"):
                upstream.code = code
                answer = http.post("/mj/submit/imagine", json={"prompt": f"label {code!r}"})
                # A code that is not an integer is no envelope: mjgate's 502, labeled "none".
                assert answer.status_code == (200 if isinstance(code, int) else 502)
            text = single_process_scrape()
    codes = {
        sample.labels["code"]: sample.value
        for sample in families(text)["mjgate_submits"].samples
        if sample.name == "mjgate_submits_total" and sample.labels["upstream"] == name
    }
    assert codes == {"1": 1, "23": 1, "other": 3, "none": 1}


def test_the_in_flight_gauge_counts_what_the_app_is_answering(sims: list[SimProcess]) -> None:
    """A fetch waiting on a slow upstream is in flight while it waits; L1 hits, refusals and
    finished requests leave the gauge where it was."""
    task_id = f"17{uuid.uuid4().int % 10**14:014d}"
    sims[0].seed(id=task_id, status="SUCCESS")

    def in_flight() -> float:
        return REGISTRY.get_sample_value("mjgate_inflight_requests") or 0.0

    with running_gateway(make_config(sims)) as gateway:
        url = f"{gateway.url}/mj/task/{task_id}/fetch"
        for _ in range(3):  # a miss, then L1 hits
            assert httpx.get(url, headers=caller()).status_code == 200
        assert httpx.get(url, headers={"mj-api-secret": "not-a-key"}).status_code == 401
        idle = in_flight()
        slow_id = f"17{uuid.uuid4().int % 10**14:014d}"
        sims[0].seed(id=slow_id, status="SUCCESS")
        with faults(sims[0], latency_ms=800):
            slow = threading.Thread(
                target=httpx.get,
                args=(f"{gateway.url}/mj/task/{slow_id}/fetch",),
                kwargs={"headers": caller(), "timeout": 10},
            )
            slow.start()
            wait_until(lambda: in_flight() == idle + 1, what="the slow fetch in flight")
            slow.join()
        assert in_flight() == idle
