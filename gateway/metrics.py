"""Prometheus metrics: definitions, pre-bound children for the hot path, and ``/metrics``.

Labels are bounded: route templates (never raw paths), client and upstream names (never
keys or ids). Under gunicorn, ``PROMETHEUS_MULTIPROC_DIR`` switches prometheus-client to
multiprocess mode and ``/metrics`` aggregates every worker.
"""

from __future__ import annotations

import glob
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
    "CALLER_SUBMITS",
    "CALLER_TASKS_FINISHED",
    "CIRCUIT_STATE",
    "COALESCED",
    "DEDUPLICATED",
    "EVENT_STREAMS",
    "FANOUT_WIDTH",
    "IMAGES_REHOSTED",
    "IMAGES_SERVED",
    "IMAGE_BYTES",
    "IMAGE_DISK_BYTES",
    "IMAGE_FETCHES",
    "IMAGE_FETCH_DURATION",
    "INFLIGHT",
    "PARTIAL_ANSWERS",
    "QUOTA_REFUSED",
    "RATE_LIMITED",
    "STORE_ERRORS",
    "STUCK_TASKS",
    "SUBMITS",
    "TASKS_FINISHED",
    "TASK_DURATION",
    "UPSTREAM_DURATION",
    "UPSTREAM_REQUESTS",
    "WATCHED_TASKS",
    "WATCHER_LEADER",
    "WEBHOOK_DELIVERIES",
    "WEBHOOK_DURATION",
    "WEBHOOK_QUEUE",
    "exposition",
    "fleet_circuit_values",
    "observe_request",
    "submit_code",
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

# Images (gateway.images): served by where they were found (disk, s3, or fetched from the cdn).
IMAGES_SERVED = Counter("mjgate_images_served", "Image answers by where the image was", ["source"])
IMAGE_BYTES = Counter("mjgate_image_bytes_served", "Image bytes sent to callers", ["source"])
IMAGE_FETCHES = Counter(
    "mjgate_image_fetches", "Fetches from image hosts (the CDN) by outcome", ["outcome"]
)
IMAGE_FETCH_DURATION = Histogram(
    "mjgate_image_fetch_duration_seconds",
    "Time to fetch an image from its host",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
IMAGES_REHOSTED = Counter(
    "mjgate_images_rehosted", "Images kept when their task was first seen finished"
)
IMAGE_DISK_BYTES = Gauge(
    "mjgate_image_disk_bytes", "Bytes of images in the disk cache", multiprocess_mode="livemax"
)
# The watcher, task events and webhook deliveries.
WATCHER_LEADER = Gauge(
    "mjgate_watcher_leader",
    "1 in the worker that holds the watcher's lease",
    multiprocess_mode="livesum",
)
WATCHED_TASKS = Gauge(
    "mjgate_watched_tasks",
    "Running tasks the watcher refreshes",
    ["upstream"],
    multiprocess_mode="livesum",
)
EVENT_STREAMS = Gauge(
    "mjgate_event_streams", "Open task event streams (SSE)", multiprocess_mode="livesum"
)
WEBHOOK_DELIVERIES = Counter(
    "mjgate_webhook_deliveries",
    "Webhook delivery attempts: delivered, failed (tried again), dead, refused",
    ["outcome"],
)
WEBHOOK_DURATION = Histogram(
    "mjgate_webhook_delivery_duration_seconds",
    "Time for a webhook destination to answer",
    buckets=_BUCKETS,
)
WEBHOOK_QUEUE = Gauge(
    "mjgate_webhook_queue_depth",
    "Webhook deliveries not done: pending (queued or waiting to retry) and dead letters",
    ["state"],
    multiprocess_mode="livemax",
)
# The ledger: usage by caller (client names come from the config, actions from a fixed list),
# quotas, duplicate submits and stuck tasks.
CALLER_SUBMITS = Counter(
    "mjgate_caller_submits", "Submits accepted, by caller and action", ["client", "action"]
)
CALLER_TASKS_FINISHED = Counter(
    "mjgate_caller_tasks_finished",
    "Tasks submitted through mjgate seen finishing, by caller, action and final status",
    ["client", "action", "status"],
)
QUOTA_REFUSED = Counter(
    "mjgate_quota_refused", "Submits refused because a quota was used up", ["client", "quota"]
)
DEDUPLICATED = Counter(
    "mjgate_deduplicated_submits", "Duplicate submits answered with the first one's answer"
)
STUCK_TASKS = Gauge(
    "mjgate_stuck_tasks",
    "Tasks in the ledger not finished ledger.stuck_after_s after their submit",
    ["upstream"],
    multiprocess_mode="livemax",
)

CIRCUIT_VALUES = {"closed": 0, "half_open": 1, "open": 2}
# The submit envelope's codes: 1 accepted, 21 exists (MODAL), 22 queued, 23 queue full, 24
# banned prompt, 3 not found, 4 invalid, 9 failure. An upstream picks the code, so any other
# value is counted as "other": it must not pick the label set too.
SUBMIT_CODES = frozenset({1, 3, 4, 9, 21, 22, 23, 24})
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


def submit_code(code: object) -> str:
    """The ``code`` label of ``SUBMITS`` for an envelope's ``code``: a known code, ``other``,
    or ``none`` when the answer had none."""
    if code is None:
        return "none"
    if type(code) is int and code in SUBMIT_CODES:  # not bool: True == 1
        return str(code)
    return "other"


def fleet_circuit_values() -> dict[str, int]:
    """The worst ``mjgate_circuit_state`` any live worker of this host reports, by upstream.

    Read from the multiprocess directory (each gunicorn worker writes its gauges there, and
    the files of a worker are removed when it exits); empty when not in multiprocess mode.
    """
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return {}
    paths = glob.glob(os.path.join(directory, "gauge_livemax_*.db"))
    merged = multiprocess.MultiProcessCollector.merge(paths, accumulate=False)  # type: ignore[no-untyped-call]
    values: dict[str, int] = {}
    for family in merged:
        if family.name != "mjgate_circuit_state":
            continue
        for sample in family.samples:
            upstream = sample.labels["upstream"]
            values[upstream] = max(values.get(upstream, 0), int(sample.value))
    return values


def exposition() -> tuple[bytes, str]:
    """The current metrics in the text format, summed over workers in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
