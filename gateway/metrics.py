"""Prometheus metrics: definitions, pre-bound children for the hot path, and ``/metrics``.

Labels are bounded: route templates (never raw paths), client and upstream names (never
keys or ids). Under gunicorn, ``PROMETHEUS_MULTIPROC_DIR`` switches prometheus-client to
multiprocess mode and ``/metrics`` aggregates every worker.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

__all__ = [
    "CACHE_LOOKUPS",
    "CIRCUIT_STATE",
    "COALESCED",
    "FANOUT_WIDTH",
    "INFLIGHT",
    "PARTIAL_ANSWERS",
    "RATE_LIMITED",
    "STORE_ERRORS",
    "SUBMITS",
    "TASKS_FINISHED",
    "TASK_DURATION",
    "UPSTREAM_DURATION",
    "UPSTREAM_REQUESTS",
    "exposition",
    "observe_request",
]

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_TASK_BUCKETS = (5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200, 1800, 3600)

REQUESTS = Counter("mjgate_requests", "Requests answered", ["route", "method", "status", "cache"])
REQUEST_DURATION = Histogram(
    "mjgate_request_duration_seconds", "Time to answer a request", ["route"], buckets=_BUCKETS
)
INFLIGHT = Gauge("mjgate_inflight_requests", "Requests being answered", multiprocess_mode="livesum")
UPSTREAM_REQUESTS = Counter(
    "mjgate_upstream_requests", "Requests sent to upstreams", ["upstream", "route", "outcome"]
)
UPSTREAM_DURATION = Histogram(
    "mjgate_upstream_request_duration_seconds",
    "Time for an upstream to answer",
    ["upstream", "route"],
    buckets=_BUCKETS,
)
CACHE_LOOKUPS = Counter("mjgate_cache_lookups", "Task cache lookups", ["tier", "result"])
COALESCED = Counter("mjgate_coalesced_lookups", "Lookups that shared another's upstream call")
FANOUT_WIDTH = Histogram(
    "mjgate_fanout_width",
    "Upstream calls made for one fan-out",
    buckets=(1, 2, 3, 4, 5, 8, 12, 16, 32),
)
PARTIAL_ANSWERS = Counter(
    "mjgate_partial_answers", "Merged answers missing a failed upstream", ["upstream"]
)
RATE_LIMITED = Counter("mjgate_rate_limited", "Requests refused by rate limits", ["client"])
STORE_ERRORS = Counter("mjgate_store_errors", "Store operations that failed", ["operation"])
CIRCUIT_STATE = Gauge(
    "mjgate_circuit_state",
    "Upstream circuit: 0 closed, 1 half-open, 2 open",
    ["upstream"],
    multiprocess_mode="livemax",
)
SUBMITS = Counter("mjgate_submits", "Submit answers by envelope code", ["upstream", "code"])
TASKS_FINISHED = Counter(
    "mjgate_tasks_finished", "Tasks seen reaching a terminal status", ["upstream", "status"]
)
TASK_DURATION = Histogram(
    "mjgate_task_duration_seconds",
    "submitTime to finishTime of tasks seen finishing",
    ["upstream"],
    buckets=_TASK_BUCKETS,
)

CIRCUIT_VALUES = {"closed": 0, "half_open": 1, "open": 2}
L1_HIT = CACHE_LOOKUPS.labels("l1", "hit")
L1_MISS = CACHE_LOOKUPS.labels("l1", "miss")
STORE_HIT = CACHE_LOOKUPS.labels("store", "hit")
STORE_MISS = CACHE_LOOKUPS.labels("store", "miss")

# Children bound once per label set: a labels() call hashes and locks; this is one dict get.
_request_children: dict[tuple[str, str, int, str], Any] = {}
_duration_children: dict[str, Any] = {}


def observe_request(route: str, method: str, status: int, cache: str, seconds: float) -> None:
    key = (route, method, status, cache)
    counter = _request_children.get(key)
    if counter is None:
        counter = _request_children[key] = REQUESTS.labels(route, method, str(status), cache)
    counter.inc()
    histogram = _duration_children.get(route)
    if histogram is None:
        histogram = _duration_children[route] = REQUEST_DURATION.labels(route)
    histogram.observe(seconds)


def exposition() -> tuple[bytes, str]:
    """The current metrics in the text format, summed over workers in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
