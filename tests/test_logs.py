"""Logging: the secret redactor, and the configured pipeline in a real process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.processors import JSONRenderer

from gateway.logs import SecretRedactor

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


def run_logging(fmt: str, level: str, body: str) -> subprocess.CompletedProcess[str]:
    script = textwrap.dedent(
        f"""
        import structlog
        from gateway.config import LoggingConfig
        from gateway.logs import configure_logging

        configure_logging(LoggingConfig(level={level!r}, format={fmt!r}), [{KEY!r}, {OTHER!r}])
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
