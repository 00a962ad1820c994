"""deploy/: the Grafana dashboard and its provisioning, the Prometheus scrape config and the
alert rules. Every PromQL expression may name only metrics a real scrape of the gateway
declares; the rules pass ``promtool check rules`` and fire (and only fire) when they should,
by ``promtool test rules``."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import SimProcess, make_config, running_gateway
from tests.test_observability import (
    ALERTS_YML,
    DASHBOARD,
    PROMETHEUS_YML,
    exported_names,
    prometheus_binary,
    scrape,
    send_traffic,
)

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "deploy" / "grafana" / "provisioning"
METRIC = re.compile(r"mjgate_[a-z_]+")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, with those inside collapsed rows."""
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels += panel.get("panels", [])
    return panels


def panel_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in all_panels(dashboard)
        for target in panel.get("targets", ())
    ]


def alert_rules() -> list[dict[str, Any]]:
    rules = yaml.safe_load(ALERTS_YML.read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
def exported(session_sims: list[SimProcess]) -> set[str]:
    """The series names a real scrape of the gateway declares, after some traffic."""
    sim = session_sims[0]
    task_id = "1700000000777001"
    sim.seed(id=task_id, prompt="dashboards")
    with running_gateway(make_config(session_sims)) as gateway:
        send_traffic(gateway.url, sim, task_id)
        names = {n for n in exported_names(scrape(gateway.url)) if n.startswith("mjgate_")}
    assert "mjgate_requests_total" in names
    assert "mjgate_request_duration_seconds_bucket" in names
    return names


# --- the dashboard --------------------------------------------------------------------------


def test_dashboard_is_a_grafana_dashboard_with_a_datasource_variable() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "mjgate" and dashboard["title"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        assert variables[name]["datasource"] == DATASOURCE
        assert variables[name]["includeAll"] is True
        assert METRIC.findall(variables[name]["definition"])
    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target.get("datasource", DATASOURCE) == DATASOURCE, panel["title"]
            assert target["expr"].strip()
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']} has no unit"
        assert panel.get("description"), f"{panel['title']} says nothing about itself"


def test_panels_sit_on_the_grid_in_rows_without_overlapping() -> None:
    dashboard = load_dashboard()
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    taken: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        x, y, w, h = grid["x"], grid["y"], grid["w"], grid["h"]
        assert all(isinstance(v, int) for v in (x, y, w, h))
        assert x >= 0 and w >= 1 and x + w <= 24 and h >= 1 and y >= 0, panel["title"]
        if panel["type"] == "row":
            assert (x, w, h) == (0, 24, 1)
        for cell in ((cx, cy) for cx in range(x, x + w) for cy in range(y, y + h)):
            assert cell not in taken, f"{panel['title']} overlaps {taken[cell]}"
            taken[cell] = panel["title"]
    # Rows, each followed by its panels: a row per theme.
    top = dashboard["panels"]
    rows = [p["title"] for p in top if p["type"] == "row"]
    assert top[0]["type"] == "row"
    assert len(rows) >= 6
    for theme in ("Requests", "Latency", "Cache", "Upstreams", "Callers", "Tasks", "Store"):
        assert theme in rows
    for first, second in itertools.pairwise(top):
        assert not (first["type"] == "row" and second["type"] == "row"), f"empty row {first}"
    ys = [p["gridPos"]["y"] for p in top]
    assert ys == sorted(ys)


def test_every_panel_expression_names_only_exported_metrics(exported: set[str]) -> None:
    unknown = {
        (title, name)
        for title, expr in panel_exprs(load_dashboard())
        for name in METRIC.findall(expr)
        if name not in exported
    }
    assert not unknown, f"panels query metrics the gateway does not export: {sorted(unknown)}"


def test_the_metric_name_check_can_fail(exported: set[str]) -> None:
    """The check above would catch a misspelt or a base (suffix-less) histogram name."""
    for wrong in (
        "mjgate_request_duration_seconds",
        "mjgate_requests",
        "mjgate_cache_hits_total",
    ):
        assert wrong not in exported


def test_every_exported_metric_is_on_the_dashboard(exported: set[str]) -> None:
    used = {name for _, expr in panel_exprs(load_dashboard()) for name in METRIC.findall(expr)}
    families = {re.sub(r"_(total|bucket|sum|count|created)$", "", name) for name in exported}
    unused = {
        family
        for family in families
        if not any(name == family or name.startswith(family + "_") for name in used)
    }
    assert not unused, f"metrics no panel shows: {sorted(unused)}"


def test_dashboard_tells_the_story() -> None:
    everything = "\n".join(expr for _, expr in panel_exprs(load_dashboard()))
    for quantile in ("0.5", "0.95", "0.99"):
        assert re.search(
            rf"histogram_quantile\({quantile}, sum by \((route, )?le\) "
            r"\(rate\(mjgate_request_duration_seconds_bucket",
            everything,
        ), f"no p{quantile} latency"
    assert "sum by (route) (rate(mjgate_requests_total" in everything  # rate by route
    assert re.search(r'mjgate_requests_total\{[^}]*status=~"\[45\]\.\."', everything)  # errors
    assert re.search(r'mjgate_requests_total\{[^}]*cache=~"HIT\|COALESCED"', everything)
    assert "mjgate_coalesced_lookups_total" in everything  # upstream calls saved
    assert "sum by (upstream, le) (rate(mjgate_upstream_request_duration_seconds_bucket" in (
        everything
    )
    assert "sum by (upstream, outcome) (rate(mjgate_upstream_requests_total" in everything
    assert "sum by (client) (rate(mjgate_rate_limited_total" in everything
    assert "sum by (upstream, code) (rate(mjgate_submits_total" in everything
    assert "sum by (upstream, status) (rate(mjgate_tasks_finished_total" in everything
    assert "sum by (upstream, le) (rate(mjgate_task_duration_seconds_bucket" in everything
    assert "max by (upstream) (mjgate_circuit_state" in everything
    circuit = next(p for p in all_panels(load_dashboard()) if p["title"] == "Circuit state")
    mapping = circuit["fieldConfig"]["defaults"]["mappings"][0]["options"]
    assert {k: v["text"] for k, v in mapping.items()} == {
        "0": "closed",
        "1": "half-open",
        "2": "open",
    }


def test_panel_queries_filter_by_the_variables_and_use_grafana_windows() -> None:
    windows = 0
    for title, expr in panel_exprs(load_dashboard()):
        for selector in re.finditer(r"mjgate_[a-z_]+(\{[^}]*\})?", expr):
            labels = selector.group(1) or ""
            assert 'job=~"$job"' in labels and 'instance=~"$instance"' in labels, (
                title,
                selector.group(0),
            )
        for window in re.findall(r"\[([^\][]+)\]\)", expr):
            assert window in ("$__rate_interval", "$__range"), (title, window)
            windows += 1
    assert windows > 40  # the pattern does find the range selectors


# --- Grafana provisioning -------------------------------------------------------------------


def test_grafana_provisioning_files() -> None:
    datasources = yaml.safe_load((GRAFANA / "datasources" / "prometheus.yaml").read_text())
    assert datasources["apiVersion"] == 1
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert source["isDefault"] is True
    providers = yaml.safe_load((GRAFANA / "dashboards" / "mjgate.yaml").read_text())
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/")
    assert provider["folder"]
    compose_path = ROOT / "deploy" / "docker-compose.yml"
    if compose_path.exists():  # the stack mounts these files where they say they are read
        services = yaml.safe_load(compose_path.read_text())["services"]
        grafana = services["grafana"]["volumes"]
        assert f"./grafana/dashboards:{provider['options']['path']}:ro" in grafana
        assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana
        assert "prometheus" in services and "gateway" in services
        prometheus = " ".join(services["prometheus"]["volumes"])
        assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml" in prometheus
        assert "./prometheus/alerts.yml:/etc/prometheus/alerts.yml" in prometheus


# --- Prometheus: scrape config and alert rules ----------------------------------------------


def test_scrape_config_targets_the_gateway_and_loads_the_rules() -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "mjgate"
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"] == [{"targets": ["gateway:8080"]}]
    assert config["rule_files"] == ["alerts.yml"]
    promtool = prometheus_binary("promtool")
    checked = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_YML)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout


def test_promtool_check_rules() -> None:
    promtool = prometheus_binary("promtool")
    checked = subprocess.run(
        [promtool, "check", "rules", str(ALERTS_YML)], capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in checked.stdout


REQUIRED_ALERTS = {
    "MjgateHighErrorRatio",
    "MjgateUpstreamCircuitOpen",
    "MjgateCacheHitRatioCollapse",
    "MjgateStoreErrors",
    "MjgateHighLatencyP99",
    "MjgateWebhookDeadLetters",
    "MjgateStuckTasks",
}


def test_alert_rules_have_for_severity_and_annotations(exported: set[str]) -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    assert set(names) >= REQUIRED_ALERTS
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert rule["annotations"]["summary"].strip()
        assert len(rule["annotations"]["description"].strip()) > 40
        for name in METRIC.findall(rule["expr"]):
            assert name in exported, f"{rule['alert']} uses {name}, which nothing exports"


# Each alert: input series that must fire it (exp_labels beside alertname), when it must not
# fire yet (its `for:` still running) and when it must. Series at one sample a minute.
GW = 'job="mjgate", instance="gw:8080"'
FETCH = 'route="/mj/task/{task_id}/fetch"'


def upstream_calls(upstream: str, outcome: str) -> str:
    labels = f'upstream="{upstream}", route="fetch", outcome="{outcome}"'
    return f"mjgate_upstream_requests_total{{{GW}, {labels}}}"


SCENARIOS: dict[str, dict[str, Any]] = {
    "MjgateStuckTasks": {
        "series": {
            f'mjgate_stuck_tasks{{{GW}, upstream="java"}}': "0x5 2x30",
            f'mjgate_stuck_tasks{{{GW}, upstream="relay"}}': "0x40",
        },
        "quiet_at": "15m",
        "fires_at": "25m",
        "labels": {"severity": "warning", "job": "mjgate", "upstream": "java"},
    },
    "MjgateWebhookDeadLetters": {
        "series": {f'mjgate_webhook_queue_depth{{{GW}, state="dead"}}': "0x5 3x30"},
        "quiet_at": "12m",
        "fires_at": "20m",
        "labels": {"severity": "warning", "job": "mjgate"},
    },
    "MjgateDown": {
        "series": {f"up{{{GW}}}": "0x30"},
        "quiet_at": "1m",
        "fires_at": "5m",
        "labels": {"severity": "critical", "job": "mjgate", "instance": "gw:8080"},
    },
    "MjgateHighErrorRatio": {
        "series": {
            f'mjgate_requests_total{{{GW}, {FETCH}, method="GET", status="200", cache="HIT"}}': (
                "0+60x40"
            ),
            f'mjgate_requests_total{{{GW}, {FETCH}, method="GET", status="502", cache="MISS"}}': (
                "0+12x40"
            ),
        },
        "quiet_at": "3m",
        "fires_at": "10m",
        "labels": {"severity": "critical", "job": "mjgate"},
    },
    "MjgateUpstreamCircuitOpen": {
        "series": {
            f'mjgate_circuit_state{{{GW}, upstream="java"}}': "2x30",
            f'mjgate_circuit_state{{{GW}, upstream="relay"}}': "0x30",
        },
        "quiet_at": "1m",
        "fires_at": "5m",
        "labels": {"severity": "warning", "job": "mjgate", "upstream": "java"},
    },
    "MjgateUpstreamErrorRatio": {
        "series": {
            upstream_calls("relay", "ok"): "0+60x40",
            upstream_calls("relay", "timeout"): "0+30x40",
            upstream_calls("java", "ok"): "0+60x40",
        },
        "quiet_at": "5m",
        "fires_at": "20m",
        "labels": {"severity": "warning", "job": "mjgate", "upstream": "relay"},
    },
    "MjgateCacheHitRatioCollapse": {
        "series": {
            f'mjgate_cache_lookups_total{{{GW}, tier="l1", result="hit"}}': "0+6x60",
            f'mjgate_cache_lookups_total{{{GW}, tier="store", result="hit"}}': "0x60",
            f'mjgate_cache_lookups_total{{{GW}, tier="store", result="miss"}}': "0+120x60",
        },
        "quiet_at": "10m",
        "fires_at": "25m",
        "labels": {"severity": "warning", "job": "mjgate"},
    },
    "MjgateStoreErrors": {
        "series": {f'mjgate_store_errors_total{{{GW}, operation="get"}}': "0+30x40"},
        "quiet_at": "5m",
        "fires_at": "20m",
        "labels": {"severity": "warning", "job": "mjgate", "operation": "get"},
    },
    "MjgateHighLatencyP99": {
        "series": {
            f'mjgate_request_duration_seconds_bucket{{{GW}, {FETCH}, le="1"}}': "0x40",
            f'mjgate_request_duration_seconds_bucket{{{GW}, {FETCH}, le="2.5"}}': "0x40",
            f'mjgate_request_duration_seconds_bucket{{{GW}, {FETCH}, le="5"}}': "0+60x40",
            f'mjgate_request_duration_seconds_bucket{{{GW}, {FETCH}, le="+Inf"}}': "0+60x40",
            f"mjgate_request_duration_seconds_count{{{GW}, {FETCH}}}": "0+60x40",
        },
        "quiet_at": "5m",
        "fires_at": "20m",
        "labels": {
            "severity": "warning",
            "job": "mjgate",
            "route": "/mj/task/{task_id}/fetch",
        },
    },
}

# Near the thresholds but on the good side of each: no alert may fire.
HEALTHY = {
    f"up{{{GW}}}": "1x60",
    f'mjgate_requests_total{{{GW}, {FETCH}, method="GET", status="200", cache="HIT"}}': "0+60x60",
    f'mjgate_requests_total{{{GW}, {FETCH}, method="GET", status="502", cache="MISS"}}': (
        "0+1.8x60"  # 3% 5xx
    ),
    f'mjgate_circuit_state{{{GW}, upstream="java"}}': "0x60",
    upstream_calls("relay", "ok"): "0+60x60",
    upstream_calls("relay", "timeout"): "0+6x60",  # 9% failing
    f'mjgate_cache_lookups_total{{{GW}, tier="l1", result="hit"}}': "0+30x60",
    f'mjgate_cache_lookups_total{{{GW}, tier="store", result="miss"}}': "0+60x60",  # 33% hits
    f'mjgate_store_errors_total{{{GW}, operation="get"}}': "5x60",  # old errors, none now
    f'mjgate_request_duration_seconds_bucket{{{GW}, {FETCH}, le="1"}}': "0+60x60",
    f'mjgate_request_duration_seconds_bucket{{{GW}, {FETCH}, le="2.5"}}': "0+60x60",
    f'mjgate_request_duration_seconds_bucket{{{GW}, {FETCH}, le="+Inf"}}': "0+60x60",
    f"mjgate_request_duration_seconds_count{{{GW}, {FETCH}}}": "0+60x60",
    f'mjgate_stuck_tasks{{{GW}, upstream="java"}}': "0x60",
}
# All errors, but too little traffic to page anyone at night.
QUIET_NIGHT = {
    f'mjgate_requests_total{{{GW}, {FETCH}, method="GET", status="502", cache="MISS"}}': "0+3x60",
    f'mjgate_cache_lookups_total{{{GW}, tier="store", result="miss"}}': "0+30x60",
}


def _series(values: dict[str, str]) -> list[dict[str, str]]:
    return [{"series": name, "values": spec} for name, spec in values.items()]


def rule_tests(rules_path: Path) -> dict[str, Any]:
    tests: list[dict[str, Any]] = []
    for alert, scenario in SCENARIOS.items():
        tests.append(
            {
                "name": alert,
                "interval": "1m",
                "input_series": _series(scenario["series"]),
                "alert_rule_test": [
                    {"eval_time": scenario["quiet_at"], "alertname": alert, "exp_alerts": []},
                    {
                        "eval_time": scenario["fires_at"],
                        "alertname": alert,
                        "exp_alerts": [{"exp_labels": scenario["labels"]}],
                    },
                ],
            }
        )
    for name, series in (("healthy", HEALTHY), ("quiet night", QUIET_NIGHT)):
        tests.append(
            {
                "name": name,
                "interval": "1m",
                "input_series": _series(series),
                "alert_rule_test": [
                    {"eval_time": at, "alertname": alert, "exp_alerts": []}
                    for alert in SCENARIOS
                    for at in ("20m", "50m")
                ],
            }
        )
    return {"rule_files": [str(rules_path)], "evaluation_interval": "1m", "tests": tests}


@pytest.fixture
def unit_test_rules(tmp_path: Path) -> Iterator[Path]:
    """alerts.yml without annotations: promtool compares annotations too, and their text is
    checked above; here the expressions, `for:` and labels are under test."""
    rules = yaml.safe_load(ALERTS_YML.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    path = tmp_path / "alerts-without-annotations.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    yield path


def test_every_alert_has_a_firing_scenario() -> None:
    assert set(SCENARIOS) == {rule["alert"] for rule in alert_rules()}


def test_alert_rules_fire_when_they_should_and_only_then(
    unit_test_rules: Path, tmp_path: Path
) -> None:
    promtool = prometheus_binary("promtool")
    test_file = tmp_path / "alerts_test.yml"
    test_file.write_text(yaml.safe_dump(rule_tests(unit_test_rules), sort_keys=False))
    checked = subprocess.run(
        [promtool, "test", "rules", str(test_file)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout


def test_the_rule_tests_can_fail(unit_test_rules: Path, tmp_path: Path) -> None:
    """A threshold turned the wrong way makes ``promtool test rules`` fail: the test above
    has teeth."""
    promtool = prometheus_binary("promtool")
    broken = unit_test_rules.read_text().replace(") > 0.05", ") > 0.5")
    assert broken != unit_test_rules.read_text()
    broken_path = tmp_path / "broken.yml"
    broken_path.write_text(broken)
    test_file = tmp_path / "alerts_test.yml"
    test_file.write_text(yaml.safe_dump(rule_tests(broken_path), sort_keys=False))
    checked = subprocess.run(
        [promtool, "test", "rules", str(test_file)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode != 0
    assert "MjgateHighErrorRatio" in checked.stdout + checked.stderr
