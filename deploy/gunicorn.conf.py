"""gunicorn settings for mjgate.

    MJGATE_CONFIG=/etc/mjgate/config.yaml gunicorn -c deploy/gunicorn.conf.py

The master reads and checks the gateway's config before any worker starts (gateway.master):
an invalid config stops start-up with one line per problem (exit status 2), and a reload
(SIGHUP) with an invalid config is refused while the running workers keep serving.

Environment: MJGATE_CONFIG (the gateway's YAML, default config.yaml), MJGATE_BIND (overrides
the config's server.host:server.port, as --bind does), WEB_CONCURRENCY (workers, default one
per core), PROMETHEUS_MULTIPROC_DIR (default a directory per bind address under the temp dir;
wiped at start).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from gateway import master

bind = [master.bind_address(master.running_config())]
workers = int(os.environ.get("WEB_CONCURRENCY", os.cpu_count() or 1))
worker_class = "gateway.worker.MjgateWorker"  # uvicorn_worker.UvicornWorker, tuned
# Each worker serves the config the master checked; it never reads the file itself.
wsgi_app = "gateway.master:worker_app()"

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
    """A fresh metrics directory per start: old workers' counters must not be summed in.
    A reload is checked first; an address other than the config's is reported."""
    shutil.rmtree(_metrics_dir, ignore_errors=True)
    os.makedirs(_metrics_dir, exist_ok=True)
    master.check_reloads(server)
    master.report_bind(server)


def on_reload(server: Any) -> None:
    master.report_bind(server)


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
