"""Logging: the secret redactor, and the configured pipeline in a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from structlog.processors import JSONRenderer

from gateway.configfile import config_from_dict
from gateway.logs import (
    FILE_WRITE_BYTES,
    LINE_LIMIT,
    LineWriter,
    SecretRedactor,
    fit_line,
    redact_credential_fields,
    secrets_of,
)

ROOT = Path(__file__).resolve().parent.parent
KEY = "upstream-secret-key-4242"
OTHER = "relay-secret-key-9999"


def redact(secrets: list[str], **event: Any) -> dict[str, Any]:
    return dict(SecretRedactor(secrets)(None, "info", dict(event)))


def rendered(secrets: list[str], **event: Any) -> str:
    """What the JSON log line would hold after the redactor."""
    event_dict = SecretRedactor(secrets)(None, "info", dict(event))
    line = JSONRenderer(serializer=orjson.dumps)(None, "info", event_dict)
    return line.decode() if isinstance(line, bytes) else line


def test_known_secret_inside_a_string_is_masked() -> None:
    event = redact([KEY], event="upstream_error", error=f"401 for key {KEY} at upstream")
    assert event["error"] == "401 for key [redacted] at upstream"
    assert event["event"] == "upstream_error"


def test_known_secret_in_the_event_message_is_masked() -> None:
    assert redact([KEY], event=f"failed with {KEY}")["event"] == "failed with [redacted]"


def test_every_occurrence_and_every_secret_is_masked() -> None:
    event = redact([KEY, OTHER], error=f"{KEY}/{OTHER}/{KEY}")
    assert event["error"] == "[redacted]/[redacted]/[redacted]"


def test_a_longer_secret_is_masked_whole_when_a_shorter_one_is_its_prefix() -> None:
    event = redact(["abcd", "abcdefgh"], error="x abcdefgh y abcd z")
    assert event["error"] == "x [redacted] y [redacted] z"
    assert "efgh" not in event["error"]


@pytest.mark.parametrize(
    "field", ["authorization", "Authorization", "mj-api-secret", "MJ-API-SECRET", "key", "Key"]
)
def test_fields_named_like_credentials_are_masked_whatever_they_hold(field: str) -> None:
    event = redact([], **{field: "Bearer some-caller-key-1", "event": "x"})
    assert event[field] == "[redacted]"


@pytest.mark.parametrize("field", ["api_key", "password"])
def test_other_credential_fields(field: str) -> None:
    assert redact([], **{field: "hunter2-value"})[field] == "[redacted]"


def test_credential_fields_are_masked_even_when_not_strings() -> None:
    event = redact([], key=1234567, authorization=["Bearer x"])
    assert event == {"key": "[redacted]", "authorization": "[redacted]"}


def test_other_fields_are_left_alone() -> None:
    event = redact(
        [KEY],
        event="request",
        route="/mj/task/{task_id}/fetch",
        status=200,
        duration_ms=1.25,
        upstreams=["java"],
        client="alice",
    )
    assert event == {
        "event": "request",
        "route": "/mj/task/{task_id}/fetch",
        "status": 200,
        "duration_ms": 1.25,
        "upstreams": ["java"],
        "client": "alice",
    }


def test_empty_and_tiny_secrets_do_not_mask_everything() -> None:
    event = redact(["", "a"], event="a plain message", error="a b c")
    assert event == {"event": "a plain message", "error": "a b c"}


def test_known_secret_inside_a_nested_value_is_masked() -> None:
    """The redactor is "the net under the rule" that keys never reach a log line
    (DESIGN.md section 2); its docstring promises secrets are masked *anywhere* in an event.
    A secret inside a list or a mapping (headers, an error payload) must not get through."""
    line = rendered(
        [KEY],
        event="upstream_error",
        headers={"mj-api-secret": KEY, "accept": "application/json"},
        details=[f"sent {KEY}"],
    )
    assert KEY not in line


# --- the configured pipeline in a real process -----------------------------------------------


def run_logging(
    fmt: str, level: str, body: str, secrets: str = f"[{KEY!r}, {OTHER!r}]"
) -> subprocess.CompletedProcess[str]:
    """``body`` run after ``configure_logging`` with the secrets of the Python expression
    ``secrets``, in a process of its own; what it wrote."""
    script = textwrap.dedent(
        f"""
        import structlog
        from gateway.config import LoggingConfig
        from gateway.configfile import load_config
        from gateway.logs import configure_logging, secrets_of

        configure_logging(LoggingConfig(level={level!r}, format={fmt!r}), {secrets})
        log = structlog.get_logger("mjgate.test")
        """
    )
    return subprocess.run(
        [sys.executable, "-c", script + textwrap.dedent(body)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )


def test_json_lines_with_secrets_redacted_and_levels_filtered() -> None:
    result = run_logging(
        "json",
        "info",
        f"""
        structlog.contextvars.bind_contextvars(request_id="req-1")
        log.debug("hidden_debug")
        log.info("hello", detail="uses {KEY}", authorization="Bearer caller-key-77")
        try:
            raise ValueError("upstream said {OTHER}")
        except ValueError:
            log.error("failed", exc_info=True)
        """,
    )
    assert KEY not in result.stdout + result.stderr
    assert OTHER not in result.stdout + result.stderr
    assert "caller-key-77" not in result.stdout + result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["event"] for line in lines] == ["hello", "failed"]
    hello, failed = lines
    assert hello["detail"] == "uses [redacted]"
    assert hello["authorization"] == "[redacted]"
    assert hello["level"] == "info"
    assert hello["request_id"] == "req-1"
    assert "timestamp" in hello
    assert failed["level"] == "error"
    assert "ValueError" in failed["exception"]
    assert "[redacted]" in failed["exception"]


def test_warning_level_drops_info() -> None:
    result = run_logging("json", "warning", 'log.info("quiet")\nlog.warning("loud")\n')
    assert [json.loads(line)["event"] for line in result.stdout.splitlines()] == ["loud"]


def test_console_format_redacts_too() -> None:
    result = run_logging("console", "info", f'log.info("console line", detail="{KEY}")\n')
    assert "console line" in result.stdout
    assert KEY not in result.stdout
    assert "[redacted]" in result.stdout


ACCESS_FIELDS = (
    '{"request_id": "%s", "client": "alice", "method": "GET", "route": "/mj/task/{task_id}/fetch",'
    ' "status": 200, "duration_ms": 0.25, "cache": "HIT", "cache_tier": "l1", "upstreams": [],'
    ' "upstream_ms": 0.0}'
)


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_the_access_line_is_the_line_the_structlog_chain_renders(fmt: str) -> None:
    """``log_access`` skips structlog's chain for speed in JSON; its line must not differ
    from ``info("request", **fields)`` but for the time, and still mask secret values."""
    body = f"""
        import json
        from gateway.logs import log_access
        log_access(json.loads({ACCESS_FIELDS % KEY!r}))
        log.info("request", **json.loads({ACCESS_FIELDS % KEY!r}))
        """
    fast, chain = run_logging(fmt, "info", body).stdout.splitlines()
    assert KEY not in fast and "[redacted]" in fast
    if fmt == "console":
        assert fast.split(" ", 2)[2] == chain.split(" ", 2)[2]  # after the time
        return
    fast_line, chain_line = json.loads(fast), json.loads(chain)
    assert list(fast_line) == list(chain_line)
    assert fast_line.pop("timestamp") <= chain_line.pop("timestamp")
    assert fast_line == chain_line


def test_the_access_line_follows_the_level() -> None:
    body = f"""
        import json
        from gateway.logs import log_access
        log_access(json.loads({ACCESS_FIELDS % "r-1"!r}))
        log.warning("loud")
        """
    assert [
        json.loads(line)["event"]
        for line in run_logging("json", "warning", body).stdout.splitlines()
    ] == ["loud"]


# --- credential fields in JSON mode, in any letter case ------------------------------------


@pytest.mark.parametrize(
    "field", ["authorization", "Authorization", "MJ-API-SECRET", "Mj-Api-Secret", "API_KEY", "Key"]
)
def test_json_mode_masks_credential_fields_whatever_their_case(field: str) -> None:
    event = redact_credential_fields(None, "info", {field: "caller-key-77", "event": "x"})
    assert event == {field: "[redacted]", "event": "x"}


def test_json_lines_mask_credential_fields_in_any_case_at_any_depth() -> None:
    result = run_logging(
        "json",
        "info",
        """
        log.info(
            "hello",
            Authorization="Bearer caller-key-71",
            PASSWORD="caller-key-72",
            headers={"MJ-API-SECRET": "caller-key-73", "Accept": "application/json"},
        )
        """,
        secrets="[]",
    )
    assert "caller-key-7" not in result.stdout
    (line,) = [json.loads(raw) for raw in result.stdout.splitlines()]
    assert line["Authorization"] == line["PASSWORD"] == "[redacted]"
    assert line["headers"] == {"MJ-API-SECRET": "[redacted]", "Accept": "application/json"}


# --- every secret of a config -----------------------------------------------------------------

UPSTREAM_KEYS = ("sk-java-Zq7pX2mJ9v-distinctive", "relay:key@with-odd-chars-5521")
REDIS_PASSWORD = "p@ss:w0rd@Redis-61"
METRICS_TOKEN = "metrics-token-7781-ZZ"
SECRET_KEY = "signing-key-0123456789abcdef0123456789"


def secret_config_document() -> dict[str, Any]:
    return {
        "server": {"secret_key": SECRET_KEY},
        "redis": {"url": f"redis://:{REDIS_PASSWORD}@127.0.0.1:6379/0"},
        "upstreams": [
            {"name": f"u{i}", "base_url": f"http://127.0.0.1:{9000 + i}", "key": key}
            for i, key in enumerate(UPSTREAM_KEYS)
        ],
        "clients": [{"name": "alice", "key": "alice-key-0123456789"}],
        "metrics": {"token": METRICS_TOKEN},
    }


def test_secrets_of_holds_every_secret_of_the_config() -> None:
    """The Redis password holds ``@`` and ``:``: it is read as a URL parser reads it, not
    cut at the first ``@``."""
    config = config_from_dict(secret_config_document(), env={})
    expected = {*UPSTREAM_KEYS, REDIS_PASSWORD, METRICS_TOKEN, SECRET_KEY}
    assert set(secrets_of(config)) == expected


def test_secrets_of_holds_a_redis_password_as_written_and_as_sent() -> None:
    document = secret_config_document()
    document["redis"]["url"] = "redis://mjgate:pa%40ss%3Aword@127.0.0.1:6379/0"
    secrets = secrets_of(config_from_dict(document, env={}))
    assert {"pa%40ss%3Aword", "pa@ss:word"} <= set(secrets)


def test_no_secret_of_the_config_reaches_a_log_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(secret_config_document()))
    every = [*UPSTREAM_KEYS, REDIS_PASSWORD, METRICS_TOKEN, SECRET_KEY]
    result = run_logging(
        "json",
        "info",
        f"""
        every = {every!r}
        log.info("joined", detail=" ".join(every), nested={{"list": every}})
        for secret in every:
            log.warning("one", error=f"upstream said: {{secret}}!")
        try:
            raise ConnectionError("AUTH " + "{REDIS_PASSWORD}" + " refused")
        except ConnectionError:
            log.error("store_error", exc_info=True)
        """,
        secrets=f"secrets_of(load_config({str(path)!r}))",
    )
    lines = [json.loads(raw) for raw in result.stdout.splitlines()]
    assert len(lines) == 2 + len(every)
    for secret in every:
        assert secret not in result.stdout
    # Nor a piece of one: the old redactor masked only what followed the last ":" before
    # the first "@" of the Redis URL.
    assert "w0rd" not in result.stdout
    assert "Redis-61" not in result.stdout


# --- whole lines from several processes on one pipe -----------------------------------------


def test_lines_of_two_processes_on_one_pipe_arrive_whole() -> None:
    """Two real processes log long lines (200 to 4000 bytes) as fast as they can into one
    pipe whose reader is slow, so the pipe is often full: a write bigger than PIPE_BUF is
    then split, and the other process's lines land inside it. With 64 KiB writes, about
    one line in twenty came out broken here."""
    script = textwrap.dedent(
        """
        import sys
        import structlog
        from gateway.config import LoggingConfig
        from gateway.logs import configure_logging

        configure_logging(LoggingConfig(), [])
        log = structlog.get_logger("mjgate.test")
        for n in range(3000):
            log.info("line", writer=sys.argv[1], n=n, pad="x" * (200 + n * 37 % 3800))
        """
    )
    read_end, write_end = os.pipe()
    writers = [
        subprocess.Popen([sys.executable, "-c", script, name], stdout=write_end, cwd=ROOT)
        for name in ("a", "b")
    ]
    os.close(write_end)
    received = bytearray()
    with os.fdopen(read_end, "rb") as pipe:
        while chunk := pipe.read1(8192):
            received += chunk
            time.sleep(0.0005)
    assert [writer.wait(timeout=30) for writer in writers] == [0, 0]
    lines = [json.loads(raw) for raw in received.splitlines()]
    for name in ("a", "b"):
        assert [line["n"] for line in lines if line["writer"] == name] == list(range(3000))


def test_lines_of_two_processes_in_one_file_arrive_whole(tmp_path: Path) -> None:
    """To a regular file the writes are up to FILE_WRITE_BYTES: Linux keeps each whole."""
    script = textwrap.dedent(
        """
        import sys
        import structlog
        from gateway.config import LoggingConfig
        from gateway.logs import configure_logging

        configure_logging(LoggingConfig(), [])
        log = structlog.get_logger("mjgate.test")
        for n in range(3000):
            log.info("line", writer=sys.argv[1], n=n, pad="x" * (200 + n * 37 % 3800))
        """
    )
    with (tmp_path / "out.log").open("wb") as shared:  # one file description, as with ">"
        writers = [
            subprocess.Popen([sys.executable, "-c", script, name], stdout=shared, cwd=ROOT)
            for name in ("a", "b")
        ]
        assert [writer.wait(timeout=30) for writer in writers] == [0, 0]
    lines = [json.loads(raw) for raw in (tmp_path / "out.log").read_bytes().splitlines()]
    for name in ("a", "b"):
        assert [line["n"] for line in lines if line["writer"] == name] == list(range(3000))


@pytest.mark.parametrize("to", ["pipe", "file"])
def test_lines_are_written_in_batches_that_fit_where_they_go(to: str, tmp_path: Path) -> None:
    """Lines wait in the buffer until the next line would pass the batch size: PIPE_BUF for
    a pipe, FILE_WRITE_BYTES for a regular file."""
    if to == "pipe":
        reader, fd = os.pipe()
        os.set_blocking(reader, False)
    else:
        fd = os.open(tmp_path / "out.log", os.O_WRONLY | os.O_CREAT)

    def written() -> int:
        if to == "file":
            return os.fstat(fd).st_size
        try:
            return len(os.read(reader, 1 << 20))
        except BlockingIOError:
            return 0

    batch = LINE_LIMIT if to == "pipe" else FILE_WRITE_BYTES
    writer = LineWriter(fd)
    for _ in range(batch // 100):
        writer.write_line(b"x" * 99)  # 100 bytes with its newline
    assert written() == 0
    writer.write_line(b"x" * 99)  # past the batch: the full batch goes out, this one waits
    assert written() == batch // 100 * 100
    os.close(fd)


def test_a_line_longer_than_pipe_buf_is_cut_to_fit_keeping_its_ends() -> None:
    result = run_logging(
        "json",
        "info",
        f"""
        try:
            raise ValueError("{KEY}" + "-detail" * 2000 + " {KEY} end of message")
        except ValueError:
            log.error("failed", exc_info=True, upstream="java")
        """,
    )
    (raw,) = result.stdout.splitlines()
    assert len(raw.encode()) < LINE_LIMIT
    assert KEY not in raw
    line = json.loads(raw)
    assert line["upstream"] == "java"
    assert line["exception"].startswith("Traceback (most recent call last):")
    assert line["exception"].endswith("[redacted] end of message")
    assert "chars cut]..." in line["exception"]


def test_fit_line_cuts_the_longest_values_whatever_their_type() -> None:
    line = orjson.dumps({"event": "x", "ids": list(range(3000)), "note": "n" * 3000})
    fitted = fit_line(line, 1000)
    assert len(fitted) <= 1000
    event = json.loads(fitted)
    assert event["event"] == "x"
    assert event["ids"].startswith("[0,1,2") and event["ids"].endswith("2998,2999]")
    assert event["note"].startswith("nnn") and event["note"].endswith("nnn")
