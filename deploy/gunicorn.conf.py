"""gunicorn settings for mjgate.

    MJGATE_CONFIG=/etc/mjgate/config.yaml gunicorn -c deploy/gunicorn.conf.py

Environment: MJGATE_CONFIG (the gateway's YAML), MJGATE_BIND (default 0.0.0.0:8080),
WEB_CONCURRENCY (workers, default one per core), PROMETHEUS_MULTIPROC_DIR (default a
directory per bind address under the temp dir; wiped at start).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

bind = [os.environ.get("MJGATE_BIND", "0.0.0.0:8080")]
workers = int(os.environ.get("WEB_CONCURRENCY", os.cpu_count() or 1))
worker_class = "gateway.worker.MjgateWorker"  # uvicorn_worker.UvicornWorker, tuned
wsgi_app = "gateway.app:factory()"

# Above the idle timeout of common load balancers (60 s), so the balancer closes first.
keepalive = 75
timeout = 60
# On SIGTERM: stop accepting, finish in-flight requests (fan-outs included) for this long.
graceful_timeout = 30
# No recycling: each new worker pid leaves files behind in the metrics directory.
max_requests = 0
# The gateway writes its own JSON access line; gunicorn's would be a second one.
accesslog = None
errorlog = "-"
# Clients and pools are opened in the app's lifespan, after the fork: preloading is safe.
preload_app = False

# Multiprocess metrics: each worker writes its own files, /metrics sums them. Set before the
# app (and prometheus-client) is imported by any worker.
_metrics_dir = os.environ.setdefault(
    "PROMETHEUS_MULTIPROC_DIR",
    os.path.join(
        tempfile.gettempdir(), "mjgate-metrics-" + bind[0].replace(":", "_").replace("/", "_")
    ),
)


def on_starting(server: Any) -> None:
    """A fresh metrics directory per start: old workers' counters must not be summed in."""
    shutil.rmtree(_metrics_dir, ignore_errors=True)
    os.makedirs(_metrics_dir, exist_ok=True)


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
