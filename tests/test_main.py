"""The ``mjgate`` command, run as real processes: hash-key, check-config, and serve in front of
the session's sims, with the key-custody check over everything the process wrote."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.config import hash_key
from tests.support import ACCESS_LOG_FIELDS, CALLER_KEYS, SimProcess, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
MJGATE = Path(sys.executable).parent / "mjgate"
EXAMPLE = ROOT / "config.example.yaml"
EXAMPLE_ENV = {
    "MAIN_MJ_KEY": "main-upstream-secret-4711",
    "RELAY_MJ_KEY": "relay-upstream-secret-0815",
    "ALICE_KEY": "alice-caller-secret-1234",
}
# A caller whose config holds only the digest of its key.
CAROL_KEY = "carol-digest-only-key-31"
WRONG_KEYS = ("wrong-caller-key-aaaa", "wrong-caller-key-bbbb", "wrong-caller-key-cccc")


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in EXAMPLE_ENV and k != "MJGATE_CONFIG"}
    env.pop("REDIS_URL", None)
    env.update(extra or {})
    return env


def run_cli(
    *args: str,
    stdin: str = "",
    env: dict[str, str] | None = None,
    command: Sequence[str] = (sys.executable, "-m", "gateway"),
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command, *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=cli_env(env),
        timeout=30,
        check=False,
    )


# --- hash-key -----------------------------------------------------------------------------


@pytest.mark.parametrize("line", ["my-caller-key\n", "my-caller-key", "my-caller-key\r\n"])
def test_hash_key_prints_the_digest_of_the_key_on_stdin(line: str) -> None:
    result = run_cli("hash-key", stdin=line)
    assert result.returncode == 0, result.stderr
    assert result.stdout == hash_key("my-caller-key") + "\n"


def test_hash_key_through_the_console_script() -> None:
    result = run_cli("hash-key", stdin="password\n", command=[str(MJGATE)])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
    )


def test_hash_key_without_a_key_fails() -> None:
    result = run_cli("hash-key", stdin="")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "no key" in result.stderr


def test_no_command_prints_help_and_fails() -> None:
    result = run_cli()
    assert result.returncode == 2
    for command in ("serve", "sim", "demo", "check-config", "hash-key"):
        assert command in result.stdout


# --- check-config -------------------------------------------------------------------------


def test_check_config_prints_the_resolved_config_with_every_secret_redacted() -> None:
    redis_url = "redis://default:redis-pass-5150@cache.internal:6379/0"
    result = run_cli("check-config", str(EXAMPLE), env={**EXAMPLE_ENV, "REDIS_URL": redis_url})
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    for secret in (*EXAMPLE_ENV.values(), "redis-pass-5150"):
        assert secret not in output
    first, _, rest = result.stdout.partition("\n")
    assert first.startswith("#") and "valid" in first
    shown: dict[str, Any] = yaml.safe_load(rest)
    assert [u["name"] for u in shown["upstreams"]] == ["main", "relay"]
    assert [u["key"] for u in shown["upstreams"]] == ["<redacted>", "<redacted>"]
    assert shown["redis"]["url"] == "redis://default:<redacted>@cache.internal:6379/0"
    assert shown["clients"][0]["key_sha256"] == hash_key(EXAMPLE_ENV["ALICE_KEY"])
    assert shown["upstreams"][1]["list_by_ids_path"] == "/mj/task/list-by-ids"


def test_check_config_on_a_bad_file_prints_one_line_per_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "upstreams": [
                    {"name": "main", "base_url": "http://a", "key": "upstream-k-1111"},
                    {"name": "relay", "base_url": "http://b", "key": "k2", "auth": "token"},
                ],
                "clients": [{"name": "alice", "key": "${ALICE_KEY}"}],
                "redis": {"url": "http://not-redis"},
            }
        )
    )
    result = run_cli("check-config", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    header, *problems = result.stderr.splitlines()
    assert str(path) in header
    assert sorted(p.strip() for p in problems) == sorted(
        [
            "upstreams[1].auth: must be mj-api-secret or bearer",
            "clients[0].key: environment variable ALICE_KEY is not set",
            "redis.url: must be a redis://, rediss:// or unix:// URL, or empty",
        ]
    )
    assert "upstream-k-1111" not in result.stderr


def test_check_config_on_a_missing_file_fails(tmp_path: Path) -> None:
    result = run_cli("check-config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "nope.yaml" in result.stderr


# --- serve ------------------------------------------------------------------------------------


@dataclass
class ServeProcess:
    proc: subprocess.Popen[bytes]
    url: str
    stdout_path: Path
    stderr_path: Path

    def stop(self) -> tuple[str, str]:
        """Stop the process and return everything it wrote."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return self.stdout_path.read_text(), self.stderr_path.read_text()


def gateway_yaml(
    tmp_path: Path, sims: list[SimProcess], port: int, *extra_upstreams: dict[str, Any]
) -> Path:
    data = {
        "server": {"host": "127.0.0.1", "port": port},
        "upstreams": [*(sim.upstream_config() for sim in sims), *extra_upstreams],
        "clients": [
            {"name": "alice", "key": CALLER_KEYS["alice"]},
            {"name": "bob", "key": CALLER_KEYS["bob"], "upstreams": [sims[0].name]},
            {"name": "carol", "key_sha256": hash_key(CAROL_KEY)},
        ],
        "fanout": {"deadline_s": 3},
        "logging": {"level": "info", "format": "json"},
    }
    path = tmp_path / f"mjgate-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@contextmanager
def serving(
    tmp_path: Path, command: Sequence[str], env: dict[str, str] | None = None, port: int = 0
) -> Iterator[ServeProcess]:
    name = uuid.uuid4().hex[:8]
    stdout_path, stderr_path = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        proc = subprocess.Popen(list(command), stdout=out, stderr=err, cwd=ROOT, env=cli_env(env))
    server = ServeProcess(proc, f"http://127.0.0.1:{port}", stdout_path, stderr_path)

    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"mjgate serve exited: {stderr_path.read_text()[-2000:]}")
        return httpx.get(f"{server.url}/healthz").status_code == 200

    try:
        wait_until(healthy, timeout_s=20, what="mjgate serve")
        yield server
    finally:
        server.stop()


def log_lines(text: str) -> list[dict[str, Any]]:
    """Every line the gateway wrote, each of which must be a JSON object."""
    lines = []
    for raw in text.splitlines():
        if raw.strip():
            line = json.loads(raw)
            assert isinstance(line, dict), raw
            lines.append(line)
    return lines


def seed(sim: SimProcess) -> str:
    task_id = f"cli{uuid.uuid4().hex[:16]}"
    sim.seed(id=task_id, status="SUCCESS")
    return task_id


def test_serve_keeps_every_key_out_of_logs_and_error_bodies(
    tmp_path: Path, sims: list[SimProcess]
) -> None:
    """Caller keys in every header, right and wrong, upstream errors and a misconfigured
    upstream key: none of those keys may show in anything the process writes or answers."""
    port = free_port()
    # A second entry for the first sim with a key it refuses: the gateway logs and answers
    # that failure, and must do so without the key. Weight 0: lookups only, no submits.
    misconfigured_key = "misconfigured-upstream-key-zz"
    misconfigured = {
        "name": "badkey",
        "base_url": sims[0].url,
        "auth": "mj-api-secret",
        "key": misconfigured_key,
        "weight": 0,
    }
    config = gateway_yaml(tmp_path, sims, port, misconfigured)
    command = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
    alice, bob = CALLER_KEYS["alice"], CALLER_KEYS["bob"]
    upstream_keys = [sim.key for sim in sims] + [misconfigured_key]
    caller_keys = [alice, bob, CAROL_KEY, *WRONG_KEYS]
    task_id = seed(sims[0])
    fetch = f"/mj/task/{task_id}/fetch"
    unknown = "/mj/task/1700000000000999/fetch"
    as_alice = {"Authorization": f"Bearer {alice}"}
    # (headers, method, path, JSON body or raw bytes, expected status, client in the log)
    calls: list[tuple[dict[str, str], str, str, Any, int, str]] = [
        (as_alice, "GET", fetch, None, 200, "alice"),
        ({"Authorization": bob}, "GET", f"/mj/task/{seed(sims[0])}/fetch", None, 200, "bob"),
        ({"mj-api-secret": CAROL_KEY}, "GET", fetch, None, 200, "carol"),
        (
            # bob's submits can only go to the first sim, which does not fail.
            {"mj-api-secret": bob, "Authorization": "midjourney-proxy"},
            "POST",
            "/mj/submit/imagine",
            {"prompt": "a red fox"},
            200,
            "bob",
        ),
        # bob may use only the first sim, which answers "not found": 404.
        ({"Authorization": f"Bearer {bob}"}, "GET", unknown, None, 404, "bob"),
        # alice's fan-out also reaches "badkey", whose key is refused, and the sim that fails
        # every request: the gateway cannot be sure, so 502, naming upstreams but no keys.
        (as_alice, "GET", unknown, None, 502, "alice"),
        (as_alice, "POST", "/mj/submit/imagine", b"{not json", 400, "alice"),
        (as_alice, "POST", "/mj/task/list-by-ids", {"ids": [task_id, "bad id"]}, 400, "alice"),
        (as_alice, "GET", "/mj/unknown/route", None, 404, "alice"),
        ({"Authorization": f"Bearer {WRONG_KEYS[0]}"}, "GET", fetch, None, 401, "-"),
        ({"Authorization": WRONG_KEYS[1]}, "POST", "/mj/submit/imagine", {"prompt": "x"}, 401, "-"),
        ({"mj-api-secret": WRONG_KEYS[2]}, "GET", fetch, None, 401, "-"),
        # Upstream keys presented as caller keys are refused and must not be logged either.
        ({"mj-api-secret": sims[0].key}, "GET", fetch, None, 401, "-"),
        ({"Authorization": f"Bearer {sims[2].key}"}, "GET", fetch, None, 401, "-"),
        ({}, "GET", fetch, None, 401, "-"),
    ]
    responses: list[tuple[httpx.Response, int, str]] = []
    sims[1].faults(error_rate=1.0)
    try:
        with serving(tmp_path, command, port=port) as server, httpx.Client(timeout=10) as http:
            for headers, method, path, body, status, client in calls:
                raw = body if isinstance(body, bytes) else None
                response = http.request(
                    method,
                    f"{server.url}{path}",
                    headers=headers,
                    content=raw,
                    json=None if raw is not None else body,
                )
                assert response.status_code == status, (path, response.text)
                responses.append((response, status, client))
            stdout, stderr = server.stop()
    finally:
        sims[1].faults(error_rate=0)

    everything = stdout + stderr
    for secret in (*caller_keys, *upstream_keys):
        assert secret not in everything, f"a key reached the process output: {secret[:8]}..."
    for response, status, _ in responses:
        for secret in (*caller_keys, *upstream_keys):
            assert secret not in response.text
        if status >= 400:
            error = response.json()
            assert set(error) == {"code", "description", "result", "request_id"}
            assert error["result"] is None
            assert error["request_id"] == response.headers["x-request-id"]

    lines = log_lines(stdout) + log_lines(stderr)
    access = {line["request_id"]: line for line in lines if line.get("event") == "request"}
    assert len(access) == len(calls)
    for response, status, client in responses:
        line = access[response.headers["x-request-id"]]
        for name in ACCESS_LOG_FIELDS:
            assert name in line, (name, line)
        assert line["status"] == status
        assert line["client"] == client
        assert line["method"] == response.request.method
        assert isinstance(line["duration_ms"], int | float)
        assert isinstance(line["upstream_ms"], int | float)
        assert isinstance(line["upstreams"], list)
    first = access[responses[0][0].headers["x-request-id"]]
    assert first["route"] == "/mj/task/{task_id}/fetch"
    assert "java" in first["upstreams"]
    assert access[responses[9][0].headers["x-request-id"]]["upstreams"] == []
    # The upstream failures were logged (and redacted) rather than silently dropped.
    failures = [line for line in lines if line.get("event") == "upstream_error"]
    assert {line.get("upstream") for line in failures} >= {"badkey", "csharp"}

    # Nor did a caller key travel upstream.
    for sim in sims:
        recorded = repr(sim.stats()["headers"])
        for secret in caller_keys:
            assert secret not in recorded


def test_serve_with_config_from_mjgate_config_env_and_request_ids(
    tmp_path: Path, sims: list[SimProcess]
) -> None:
    port = free_port()
    config = gateway_yaml(tmp_path, sims, port)
    bob = f"Bearer {CALLER_KEYS['bob']}".encode()  # bob uses only the first sim
    sent_id = "trace-42.a:b_c-D"
    malformed = ["has space", "<script>", "x" * 129, "é-accent"]
    with (
        serving(
            tmp_path, [str(MJGATE), "serve"], env={"MJGATE_CONFIG": str(config)}, port=port
        ) as server,
        httpx.Client(timeout=10) as http,
    ):

        def fetch_new_task(request_id: bytes) -> httpx.Response:
            """A task the gateway has not seen, so the call surely goes upstream."""
            url = f"{server.url}/mj/task/{seed(sims[0])}/fetch"
            response = http.get(url, headers={b"authorization": bob, b"x-request-id": request_id})
            assert response.status_code == 200, response.text
            return response

        response = fetch_new_task(sent_id.encode())
        assert response.headers["x-request-id"] == sent_id
        assert sims[0].stats()["headers"][-1]["x-request-id"] == sent_id

        generated = []
        for bad in malformed:
            request_id = fetch_new_task(bad.encode("utf-8")).headers["x-request-id"]
            assert request_id != bad
            assert re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", request_id)
            assert sims[0].stats()["headers"][-1]["x-request-id"] == request_id
            generated.append(request_id)
        assert len(set(generated)) == len(generated)

        # A refused request carries its request id in the body and the header alike.
        url = f"{server.url}/mj/task/{seed(sims[0])}/fetch"
        refused = http.get(url, headers={"X-Request-Id": "refused-1"})
        assert refused.status_code == 401
        assert refused.json()["request_id"] == "refused-1"
        stdout, stderr = server.stop()

    ids = {line["request_id"] for line in log_lines(stdout) if line.get("event") == "request"}
    assert ids == {sent_id, "refused-1", *generated}
    assert CALLER_KEYS["bob"] not in stdout + stderr


def test_serve_without_a_config_fails() -> None:
    result = run_cli("serve")
    assert result.returncode == 2
    assert "MJGATE_CONFIG" in result.stderr


def test_serve_with_a_bad_config_fails_with_its_problems_and_no_keys(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "upstreams": [
                    {"name": "Main", "base_url": "http://a", "key": "upstream-k-2222"},
                ],
                "clients": [{"name": "alice", "key": "caller-k-3333", "key_sha256": "00"}],
            }
        )
    )
    result = run_cli("serve", "--config", str(path), "--port", str(free_port()))
    assert result.returncode == 2
    assert "upstreams[0].name" in result.stderr
    assert "clients[0]" in result.stderr
    assert "upstream-k-2222" not in result.stderr + result.stdout
    assert "caller-k-3333" not in result.stderr + result.stdout


def test_serve_does_not_import_the_simulator(tmp_path: Path, sims: list[SimProcess]) -> None:
    """`mjgate serve` loads only what serving needs: not the simulator, the demo or the purge
    tool. ``-X importtime`` lists every module the process imports, at start-up and later."""
    port = free_port()
    config = gateway_yaml(tmp_path, sims, port)
    command = [
        sys.executable,
        "-X",
        "importtime",
        "-m",
        "gateway",
        "serve",
        "--config",
        str(config),
    ]
    with serving(tmp_path, command, port=port) as server:
        answer = httpx.get(
            f"{server.url}/mj/task/{seed(sims[0])}/fetch",
            headers={"Authorization": f"Bearer {CALLER_KEYS['alice']}"},
        )
        assert answer.status_code == 200, answer.text
        _, stderr = server.stop()
    imported = {
        line.rpartition("|")[2].strip()
        for line in stderr.splitlines()
        if line.startswith("import time:")
    }
    assert {"gateway.server", "gateway.app"} <= imported
    unneeded = {"gateway.sim", "gateway.demo"}  # purge serves the admin route too
    assert sorted(m for m in imported if m in unneeded or m.startswith("gateway.sim.")) == []


def test_sim_reads_its_own_flags_and_other_commands_refuse_unknown_ones() -> None:
    helped = run_cli("sim", "--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: mjgate sim")
    assert "--flavor" in helped.stdout and "--queue-full-rate" in helped.stdout
    wrong = run_cli("sim", "--flavor", "cobol")
    assert wrong.returncode == 2
    assert "invalid choice: 'cobol'" in wrong.stderr
    unknown = run_cli("serve", "--flavor", "java")
    assert unknown.returncode == 2
    assert "unrecognized arguments: --flavor java" in unknown.stderr


# --- demo -------------------------------------------------------------------------------------


def test_demo_on_a_busy_port_says_so_in_one_line_and_fails() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("demo", "--port", str(port))
    assert result.returncode != 0
    assert result.stdout == ""  # no banner for a demo that never started
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"port {port} on 127.0.0.1 is in use" in result.stderr
    assert "--port" in result.stderr


def test_make_demo_takes_a_port(tmp_path: Path) -> None:
    """`make demo PORT=...` serves the demo on that port (-o: the venv is taken as built)."""
    venv = Path(sys.executable).parent.parent
    port = free_port()
    command = ["make", "--no-print-directory", "-o", f"{venv}/bin/mjgate", f"VENV={venv}"]
    output = tmp_path / "demo.out"
    with output.open("wb") as out:
        proc = subprocess.Popen(
            [*command, "demo", f"PORT={port}"],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=cli_env(),
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: url in output.read_text(), timeout_s=30, what="the demo's banner")
        answer = httpx.get(f"{url}/mj/task/list", headers={"mj-api-secret": "demo-key"})
        assert answer.status_code == 200, answer.text
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
