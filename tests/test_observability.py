"""Observability end to end: the gateway as real processes (gunicorn with two workers sharing
one multiprocess metrics directory, and ``mjgate serve``), scraped by ``promtool check
metrics`` and by a real Prometheus server, plus ``/metrics``, ``/healthz`` and ``/readyz``.

The helpers at the top (a gateway process, scraping, Prometheus binaries) are shared with
tests/test_middleware.py and tests/test_dashboards.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests.support import (
    RedisProcess,
    SimProcess,
    caller,
    config_data,
    free_port,
    make_config,
    running_gateway,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "mjgate.json"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERTS_YML = ROOT / "deploy" / "prometheus" / "alerts.yml"
METRICS_TOKEN = "metrics-scrape-token-5150"
QUIET_PATHS = ("/healthz", "/readyz", "/metrics")

__all__ = [
    "ALERTS_YML",
    "DASHBOARD",
    "GatewayProc",
    "config_data",
    "exported_names",
    "gateway_proc",
    "prometheus_binary",
    "sample_sum",
    "scrape",
    "send_traffic",
]


# --- helpers shared by the observability test files ----------------------------------------


def prometheus_binary(name: str) -> str:
    """The path of ``promtool`` or ``prometheus`` (Debian's ``prometheus`` package, which
    ``scripts/install-prometheus`` installs). Missing under CI is a failure; missing on a
    developer's machine skips, with the command that installs it."""
    found = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/bin") / name, Path("/usr/sbin") / name) if p.exists()), None
    )
    if found is not None:
        return found
    message = f"{name} is not installed: run scripts/install-prometheus (make system-deps)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class GatewayProc:
    """A gateway running as its own process, with stdout and stderr kept in files."""

    proc: subprocess.Popen[bytes]
    url: str
    stdout_path: Path
    stderr_path: Path
    metrics_dir: Path | None = None

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def errors(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def json_lines(self) -> list[dict[str, Any]]:
        """Every stdout line, each of which must be one JSON object."""
        lines: list[dict[str, Any]] = []
        for raw in self.output().splitlines():
            line = json.loads(raw)
            assert isinstance(line, dict), raw
            lines.append(line)
        return lines

    def events(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            line
            for line in self.json_lines()
            if line.get("event") == event and all(line.get(k) == v for k, v in fields.items())
        ]

    def wait_for_line(self, request_id: str, timeout_s: float = 5.0) -> dict[str, Any]:
        """The access-log line of one request; it is written after the answer is sent."""
        found: list[dict[str, Any]] = []

        def written() -> bool:
            found[:] = self.events("request", request_id=request_id)
            return bool(found)

        wait_until(written, timeout_s, f"access line of {request_id}")
        return found[0]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@contextmanager
def gateway_proc(
    tmp: Path, config: dict[str, Any], workers: int | None = None
) -> Iterator[GatewayProc]:
    """``python -m gateway serve --config FILE`` (``workers`` None), or gunicorn with
    ``deploy/gunicorn.conf.py`` and ``workers`` workers, metrics in a directory of its own."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config_path = tmp / "mjgate.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    drop = ("MJGATE_CONFIG", "MJGATE_BIND", "WEB_CONCURRENCY", "PROMETHEUS_MULTIPROC_DIR")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    metrics_dir: Path | None = None
    if workers is None:
        command = [sys.executable, "-m", "gateway", "serve", "--config", str(config_path)]
        command += ["--host", "127.0.0.1", "--port", str(port)]
    else:
        metrics_dir = tmp / "prometheus-multiproc"
        env |= {
            "MJGATE_CONFIG": str(config_path),
            "MJGATE_BIND": f"127.0.0.1:{port}",
            "WEB_CONCURRENCY": str(workers),
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        }
        command = [str(BIN / "gunicorn"), "-c", str(ROOT / "deploy" / "gunicorn.conf.py")]
    stdout_path, stderr_path = tmp / "gateway.out", tmp / "gateway.err"
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, cwd=ROOT, env=env)
    gateway = GatewayProc(proc, f"http://127.0.0.1:{port}", stdout_path, stderr_path, metrics_dir)

    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited: {gateway.errors()[-3000:]}")
        return httpx.get(f"{gateway.url}/healthz", timeout=2).status_code == 200

    try:
        wait_until(healthy, 20, "gateway process")
        if workers is not None:
            # Each worker logs "started" from its lifespan: wait for all, not only the first.
            wait_until(lambda: len(gateway.events("started")) >= workers, 20, "every worker")
        yield gateway
    finally:
        gateway.stop()


def scrape(url: str, token: str = "") -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(f"{url}/metrics", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def sample_sum(text: str, name: str, **labels: str) -> float:
    """The sum of every sample called ``name`` whose labels include ``labels``."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}


def exported_names(text: str) -> set[str]:
    """The series names a scrape declares: its samples, and for every family (including
    those with no sample yet) the names its type exports."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


async def _send_all(url: str, requests: list[tuple[str, str, dict[str, str], Any]]) -> list[int]:
    """Send requests concurrently, each on a fresh connection (no keep-alive), so that the
    kernel spreads them over every gunicorn worker accepting on the socket."""
    limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=20) as client:
        responses = await asyncio.gather(
            *(client.request(m, p, headers=h, json=b) for m, p, h, b in requests)
        )
    return [r.status_code for r in responses]


def send_traffic(url: str, sim: SimProcess, task_id: str) -> int:
    """A mix that touches most metrics (cache hits and misses, fan-out, upstream calls,
    submits, a finished task, errors); returns how many requests were sent, all counted."""
    alice = caller("alice")
    requests: list[tuple[str, str, dict[str, str], Any]] = [
        ("GET", f"/mj/task/{task_id}/fetch", alice, None) for _ in range(8)
    ]
    requests += [
        ("GET", "/mj/task/1799999999999999/fetch", alice, None),
        ("POST", "/mj/submit/imagine", alice, {"prompt": "a lighthouse at dusk"}),
        ("POST", "/mj/task/list-by-condition", alice, {"ids": [task_id, "1799999999999998"]}),
        ("GET", "/mj/task/list", alice, None),
        ("GET", f"/mj/task/{task_id}/fetch", {}, None),  # 401: no key
        ("GET", "/no/such/route", alice, None),  # 404
    ]
    asyncio.run(_send_all(url, requests[:1]))  # the miss first; the rest may hit the cache
    asyncio.run(_send_all(url, requests[1:]))
    return len(requests)


def seed_finished(sim: SimProcess) -> str:
    task_id = f"17{uuid.uuid4().int % 10**14:014d}"
    sim.seed(id=task_id, prompt="observability")
    return task_id


def test_a_missing_prometheus_binary_fails_under_ci_and_skips_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    missing = "promtool-that-is-not-installed"
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="scripts/install-prometheus"):
        prometheus_binary(missing)
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="scripts/install-prometheus"):
        prometheus_binary(missing)


def test_install_script_is_idempotent_when_both_binaries_are_there() -> None:
    prometheus_binary("promtool")
    prometheus_binary("prometheus")
    script = ROOT / "scripts" / "install-prometheus"
    done = subprocess.run([str(script)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""  # nothing to do, nothing installed


# --- a gunicorn gateway with two workers ----------------------------------------------------


@pytest.fixture(scope="module")
def two_workers(
    session_sims: list[SimProcess],
    redis_server: RedisProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayProc]:
    """gunicorn with deploy/gunicorn.conf.py, two workers, the real Redis store, and a metrics
    token; its metrics directory starts with a stale file that the config must wipe."""
    tmp = tmp_path_factory.mktemp("gunicorn")
    stale = tmp / "prometheus-multiproc" / "counter_999999.db"
    stale.parent.mkdir()
    stale.write_bytes(b"left over from an earlier run")
    config = config_data(session_sims, redis_server.url, metrics={"token": METRICS_TOKEN})
    with gateway_proc(tmp, config, workers=2) as gateway:
        yield gateway


def per_worker_requests(metrics_dir: Path) -> dict[str, float]:
    """``mjgate_requests_total`` summed per worker, read from each worker's own file."""
    counts: dict[str, float] = {}
    for path in sorted(metrics_dir.glob("counter_*.db")):
        metrics = MultiProcessCollector.merge([str(path)], accumulate=True)  # type: ignore[no-untyped-call]
        counts[path.name] = sum(
            sample.value
            for metric in metrics
            for sample in metric.samples
            if sample.name == "mjgate_requests_total"
        )
    return counts


def test_gunicorn_config_wipes_the_metrics_directory_at_start(two_workers: GatewayProc) -> None:
    assert two_workers.metrics_dir is not None
    assert not (two_workers.metrics_dir / "counter_999999.db").exists()
    assert len(two_workers.events("started")) == 2


def test_two_workers_counters_are_summed_in_one_scrape(
    two_workers: GatewayProc, session_sims: list[SimProcess]
) -> None:
    metrics_dir = two_workers.metrics_dir
    assert metrics_dir is not None
    task_id = seed_finished(session_sims[0])
    before = sample_sum(scrape(two_workers.url, METRICS_TOKEN), "mjgate_requests_total")
    per_worker_before = per_worker_requests(metrics_dir)
    fetch = ("GET", f"/mj/task/{task_id}/fetch", caller("alice"), None)
    sent = 0
    for _ in range(10):  # bounded: until both workers have answered some
        statuses = asyncio.run(_send_all(two_workers.url, [fetch] * 40))
        assert set(statuses) == {200}
        sent += len(statuses)
        # Neither health, readiness nor metrics requests are counted.
        for path in ("/healthz", "/readyz"):
            assert httpx.get(f"{two_workers.url}{path}", timeout=5).status_code == 200
        after_workers = per_worker_requests(metrics_dir)
        served = [
            name
            for name, count in after_workers.items()
            if count > per_worker_before.get(name, 0.0)
        ]
        if len(served) >= 2 and sum(after_workers.values()) - sum(per_worker_before.values()):
            break
    assert len(served) >= 2, f"one worker served everything: {after_workers}"

    def total() -> float:
        return sample_sum(scrape(two_workers.url, METRICS_TOKEN), "mjgate_requests_total")

    # A worker counts a request just after sending its answer: wait for the last ones.
    wait_until(lambda: total() >= before + sent, 5, "every request counted")
    assert total() == before + sent
    after_workers = per_worker_requests(metrics_dir)
    deltas = [after_workers[n] - per_worker_before.get(n, 0.0) for n in after_workers]
    assert sum(deltas) == sent
    assert sum(1 for d in deltas if d > 0) >= 2


def test_promtool_check_metrics_on_a_gunicorn_scrape(
    two_workers: GatewayProc, session_sims: list[SimProcess]
) -> None:
    promtool = prometheus_binary("promtool")
    send_traffic(two_workers.url, session_sims[0], seed_finished(session_sims[0]))
    body = scrape(two_workers.url, METRICS_TOKEN)
    names = exported_names(body)
    for name in (
        "mjgate_requests_total",
        "mjgate_request_duration_seconds_bucket",
        "mjgate_upstream_requests_total",
        "mjgate_upstream_request_duration_seconds_bucket",
        "mjgate_cache_lookups_total",
        "mjgate_fanout_width_bucket",
        "mjgate_circuit_state",
        "mjgate_submits_total",
        "mjgate_tasks_finished_total",
        "mjgate_task_duration_seconds_bucket",
    ):
        assert name in names
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == "" and checked.stderr.strip() == ""


def test_promtool_check_metrics_on_a_single_process_scrape(
    sims: list[SimProcess], tmp_path: Path
) -> None:
    promtool = prometheus_binary("promtool")
    with gateway_proc(tmp_path, config_data(sims)) as gateway:
        send_traffic(gateway.url, sims[0], seed_finished(sims[0]))
        body = scrape(gateway.url)
    assert "mjgate_request_duration_seconds_bucket" in body
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == "" and checked.stderr.strip() == ""


# --- a real Prometheus server ---------------------------------------------------------------


@dataclass
class PrometheusServer:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def api(self, path: str, **params: str) -> Any:
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result


@contextmanager
def prometheus_server(tmp: Path, target: str, token: str) -> Iterator[PrometheusServer]:
    """Prometheus with deploy/prometheus/prometheus.yml, changed only to scrape ``target``
    every second with the metrics token, and to read the alert rules by absolute path."""
    binary = prometheus_binary("prometheus")
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"] |= {"scrape_interval": "1s", "scrape_timeout": "1s"}
    config["global"]["evaluation_interval"] = "1s"
    config["rule_files"] = [str(ALERTS_YML)]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "mjgate" and job["metrics_path"] == "/metrics"
    job["static_configs"] = [{"targets": [target]}]
    job["authorization"] = {"type": "Bearer", "credentials": token}
    config_path = tmp / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = tmp / "prometheus.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp,
        )
    server = PrometheusServer(proc, f"http://127.0.0.1:{port}", log_path)

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited: {log_path.read_text()[-3000:]}")
        return httpx.get(f"{server.url}/-/ready", timeout=2).status_code == 200

    try:
        wait_until(ready, 20, "prometheus ready")
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel in the dashboard JSON."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs: list[tuple[str, str]] = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            exprs += [(inner["title"], t["expr"]) for t in inner.get("targets", ())]
    return exprs


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's variables the way Grafana would before sending the query."""
    for variable, value in (
        ("$__rate_interval", "1m"),
        ("$__interval", "15s"),
        ("$__range", "5m"),
        ("$job", ".*"),
        ("$instance", ".*"),
    ):
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unreplaced variable in {expr}"
    return expr


def test_real_prometheus_scrapes_the_gateway_and_evaluates_rules_and_panels(
    two_workers: GatewayProc, session_sims: list[SimProcess], tmp_path: Path
) -> None:
    target = two_workers.url.removeprefix("http://")
    with prometheus_server(tmp_path, target, METRICS_TOKEN) as prometheus:

        def counted() -> float:
            return sample_sum(scrape(two_workers.url, METRICS_TOKEN), "mjgate_requests_total")

        before = counted()
        expected = before + send_traffic(
            two_workers.url, session_sims[0], seed_finished(session_sims[0])
        )
        # A worker counts a request just after answering it: let the last ones land.
        wait_until(lambda: counted() == expected, 5, "the gateway's own count")
        seen: list[float] = []

        def scraped_everything() -> bool:
            result = prometheus.query("sum(mjgate_requests_total)")
            seen[:] = [float(r["value"][1]) for r in result]
            return seen == [expected]

        try:
            wait_until(scraped_everything, 20, "Prometheus to scrape the requests")
        except TimeoutError:
            pytest.fail(f"Prometheus saw {seen} requests, the gateway counted {expected}")
        (up,) = prometheus.query('up{job="mjgate"}')
        assert up["value"][1] == "1"
        assert up["metric"]["instance"] == target

        # Two more scrapes after traffic: rate() over the panels' window has two points.
        time.sleep(2.5)
        for _, expr in dashboard_exprs():
            prometheus.query(grafana_to_promql(expr))  # valid PromQL, or the API says error
        must_show = ("Request rate by route", "Latency p50 / p95 / p99", "Cache hit ratio")
        for title, expr in dashboard_exprs():
            if title in must_show:
                result = prometheus.query(grafana_to_promql(expr))
                assert result, f"panel {title!r} shows no data after traffic: {expr}"

        rules: list[dict[str, Any]] = []

        def rules_evaluated() -> bool:
            groups = prometheus.api("rules")["groups"]
            rules[:] = [rule for group in groups for rule in group["rules"]]
            return bool(rules) and all(
                r["health"] == "ok" and not r["lastEvaluation"].startswith("0001") for r in rules
            )

        wait_until(rules_evaluated, 10, "every alert rule evaluated")
        names = {rule["name"] for rule in rules}
        assert names == set(re.findall(r"alert: (\w+)", ALERTS_YML.read_text()))
        # A healthy gateway under light traffic fires nothing.
        assert all(rule["state"] == "inactive" for rule in rules), rules


# --- /metrics, /healthz and /readyz ---------------------------------------------------------


def _no_rate_limit_headers(response: httpx.Response) -> None:
    names = {name.lower() for name in response.headers}
    assert not {n for n in names if n.startswith("ratelimit") or n == "retry-after"}, names


def test_metrics_token_guards_metrics_and_quiet_paths_need_no_caller_key(
    two_workers: GatewayProc,
) -> None:
    url = f"{two_workers.url}/metrics"
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token-0000"},
        {"Authorization": METRICS_TOKEN},  # not as a bearer token
        caller("alice"),  # a caller key is not the metrics token
    ):
        refused = httpx.get(url, headers=headers, timeout=5)
        assert refused.status_code == 401
        assert refused.headers["content-type"] == "application/json"
        body = refused.json()
        assert body["request_id"] == refused.headers["x-request-id"]
        assert "token" in body["description"]
        assert METRICS_TOKEN not in refused.text
        _no_rate_limit_headers(refused)
    allowed = httpx.get(url, headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=5)
    assert allowed.status_code == 200
    assert "mjgate_requests_total" in allowed.text
    _no_rate_limit_headers(allowed)
    for path in ("/healthz", "/readyz"):
        for headers in ({}, caller("alice")):
            response = httpx.get(f"{two_workers.url}{path}", headers=headers, timeout=5)
            assert response.status_code == 200, response.text
            _no_rate_limit_headers(response)
    # A caller's ordinary request does carry them: the check above can see them.
    ordinary = f"{two_workers.url}/mj/task/1799999999999997/fetch"
    assert "ratelimit-limit" in httpx.get(ordinary, headers=caller("alice"), timeout=10).headers


def test_metrics_without_a_token_is_open_and_needs_no_caller_key(sims: list[SimProcess]) -> None:
    with running_gateway(make_config(sims)) as gateway:
        for path in QUIET_PATHS:
            response = httpx.get(f"{gateway.url}{path}", timeout=5)
            assert response.status_code == 200, (path, response.text)
            _no_rate_limit_headers(response)
        assert "# TYPE mjgate_requests_total counter" in httpx.get(f"{gateway.url}/metrics").text


def test_metrics_path_follows_the_config(sims: list[SimProcess]) -> None:
    config = make_config(sims, metrics={"path": "/internal/prometheus"})
    with running_gateway(config) as gateway:
        assert httpx.get(f"{gateway.url}/internal/prometheus").status_code == 200
        assert httpx.get(f"{gateway.url}/metrics", headers=caller("alice")).status_code == 404
    with running_gateway(make_config(sims, metrics={"enabled": False})) as gateway:
        assert httpx.get(f"{gateway.url}/metrics", headers=caller("alice")).status_code == 404


def test_readyz_reports_circuits_while_the_store_answers_and_503_when_it_does_not(
    sims: list[SimProcess],
) -> None:
    redis = RedisProcess()
    redis.start()
    try:
        dead = sims[0].upstream_config(name="dead", base_url=f"http://127.0.0.1:{free_port()}")
        config = make_config(
            sims,
            redis.url,
            upstreams=[*(s.upstream_config() for s in sims), dead],
            circuit={"failure_threshold": 1, "cooldown_s": 60},
        )
        with running_gateway(config) as gateway:
            ready = httpx.get(f"{gateway.url}/readyz", timeout=5)
            assert ready.status_code == 200
            assert ready.json() == {
                "status": "ready",
                "store": "ok",
                "upstreams": {name: "closed" for name in ("java", "csharp", "relay", "dead")},
                "worker": os.getpid(),  # the gateway runs in a thread of this process
            }
            # The dead upstream fails a fan-out and its circuit opens: still ready.
            httpx.get(
                f"{gateway.url}/mj/task/1799999999999996/fetch", headers=caller("alice"), timeout=10
            )
            ready = httpx.get(f"{gateway.url}/readyz", timeout=5)
            assert ready.status_code == 200
            assert ready.json()["upstreams"]["dead"] == "open"
            assert ready.json()["upstreams"]["java"] == "closed"
            body = httpx.get(f"{gateway.url}/metrics").text
            assert sample_sum(body, "mjgate_circuit_state", upstream="dead") == 2
            assert sample_sum(body, "mjgate_circuit_state", upstream="java") == 0

            redis.stop()
            started = time.monotonic()
            down = httpx.get(f"{gateway.url}/readyz", timeout=5)
            assert time.monotonic() - started < 2.0
            assert down.status_code == 503
            assert down.json()["status"] == "not ready"
            assert down.json()["store"] == "unreachable"
            assert down.json()["upstreams"]["dead"] == "open"
            # The process itself is still up, and the failed ping is counted.
            assert httpx.get(f"{gateway.url}/healthz", timeout=5).status_code == 200
            body = httpx.get(f"{gateway.url}/metrics").text
            assert sample_sum(body, "mjgate_store_errors_total", operation="ping") >= 1
    finally:
        redis.stop()
        shutil.rmtree(redis.dir, ignore_errors=True)


def circuit_by_worker(metrics_dir: Path, upstream: str) -> dict[str, float]:
    """Each live worker's own ``mjgate_circuit_state`` for ``upstream``, from its gauge file."""
    states: dict[str, float] = {}
    for path in sorted(metrics_dir.glob("gauge_livemax_*.db")):
        metrics = MultiProcessCollector.merge([str(path)], accumulate=False)  # type: ignore[no-untyped-call]
        for metric in metrics:
            for sample in metric.samples:
                if sample.name == "mjgate_circuit_state" and sample.labels["upstream"] == upstream:
                    states[path.stem.rsplit("_", 1)[1]] = sample.value
    return states


def test_readyz_under_gunicorn_reports_a_circuit_open_in_any_worker(
    sims: list[SimProcess], tmp_path: Path
) -> None:
    """One worker's circuit to an upstream opens; the other worker never called it. Whichever
    worker answers ``/readyz`` says "open" (each used to report only its own view)."""
    broken = sims[1]
    config = config_data(sims, circuit={"failure_threshold": 2, "cooldown_s": 120})
    with gateway_proc(tmp_path, config, workers=2) as gateway:
        assert gateway.metrics_dir is not None
        broken.faults(error_rate=1.0, error_status=500)
        try:
            # One connection, so one worker: two failed fan-outs open its circuit.
            with httpx.Client(base_url=gateway.url, headers=caller("alice"), timeout=10) as one:
                for n in range(2):
                    one.get(f"/mj/task/17999999999990{n:02d}/fetch")
                tripped = one.get("/readyz").json()
        finally:
            broken.reset()
        assert tripped["upstreams"][broken.name] == "open"
        local = circuit_by_worker(gateway.metrics_dir, broken.name)
        assert sorted(local.values()) == [0, 2], local  # open in one worker only
        assert local[str(tripped["worker"])] == 2

        seen: dict[int, dict[str, str]] = {}
        for _ in range(200):
            # A new connection each time: the kernel hands it to either worker.
            answer = httpx.get(f"{gateway.url}/readyz", headers={"Connection": "close"})
            assert answer.status_code == 200
            seen[answer.json()["worker"]] = answer.json()["upstreams"]
            if len(seen) == 2:
                break
        assert len(seen) == 2, "one worker answered every readiness check"
        for upstreams in seen.values():
            assert upstreams == {s.name: "open" if s is broken else "closed" for s in sims}
