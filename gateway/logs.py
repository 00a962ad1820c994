"""Logging: structlog, one JSON line per event, with secrets redacted before rendering."""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import re
import sys
import time
from collections.abc import Iterable
from typing import Any, BinaryIO

import orjson
import structlog
from structlog.typing import EventDict, WrappedLogger

from gateway.config import LoggingConfig

__all__ = [
    "RedactingJSONRenderer",
    "SecretRedactor",
    "configure_logging",
    "flush_logs_every",
    "redact_credential_fields",
]

_SENSITIVE_FIELDS = frozenset({"authorization", "mj-api-secret", "key", "api_key", "password"})
_REDACTED = "[redacted]"


class SecretRedactor:
    """Masks known secret values anywhere in an event, and fields named like credentials.

    The gateway never logs headers or keys on purpose; this is the net under that rule, for
    an upstream error message or an exception text that happens to carry one.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        # Longest first, so a secret that contains another is masked whole.
        ordered = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def __call__(self, logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
        for name, value in event.items():
            if name.lower() in _SENSITIVE_FIELDS:
                event[name] = _REDACTED
            elif not isinstance(value, int | float | bool | None):
                event[name] = self._scrub(value)
        return event

    def _scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            if self._pattern is not None and self._pattern.search(value):
                return self._pattern.sub(_REDACTED, value)
            return value
        if isinstance(value, dict):
            return {
                k: _REDACTED if str(k).lower() in _SENSITIVE_FIELDS else self._scrub(v)
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self._scrub(v) for v in value]
        return value


def redact_credential_fields(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
    """Mask fields named like credentials, at any depth."""
    for name in _SENSITIVE_FIELDS.intersection(event):
        event[name] = _REDACTED
    for name, value in event.items():
        if value and isinstance(value, dict | list | tuple):
            event[name] = _mask_nested(value)
    return event


class _Timestamp:
    """structlog's ISO UTC timestamp (``2026-11-21T11:12:39.988412Z``), with the part up to
    the second formatted once a second: ``datetime.now(tz)`` costs microseconds per line."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event["timestamp"] = f"{self._prefix}.{int((now - second) * 1e6):06d}Z"
        return event


def _mask_nested(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _REDACTED if str(k).lower() in _SENSITIVE_FIELDS else _mask_nested(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_mask_nested(v) for v in value]
    return value


class RedactingJSONRenderer:
    """orjson rendering, then known secret values masked in the rendered bytes, in the raw
    and in the JSON-escaped form they take inside a string."""

    def __init__(self, secrets: Iterable[str]) -> None:
        forms = {
            form for s in secrets if len(s) >= 4 for form in (s.encode(), orjson.dumps(s)[1:-1])
        }
        ordered = sorted(forms, key=len, reverse=True)
        self._pattern = re.compile(b"|".join(map(re.escape, ordered))) if ordered else None

    def __call__(self, logger: WrappedLogger, method: str, event: EventDict) -> bytes:
        line = orjson.dumps(event, default=repr)
        if self._pattern is not None and self._pattern.search(line):
            line = self._pattern.sub(_REDACTED.encode(), line)
        return line


class _LineLogger:
    """structlog's BytesLogger without a flush per line (the cost of a system call on every
    request): info lines go out when the buffer fills or ``flush_logs_every`` ticks; warnings
    and errors are flushed at once."""

    def __init__(self, out: BinaryIO) -> None:
        self._write = out.write
        self._flush = out.flush

    def msg(self, message: bytes) -> None:
        self._write(message + b"\n")

    debug = info = msg

    def warning(self, message: bytes) -> None:
        self._write(message + b"\n")
        self._flush()

    warn = error = err = critical = fatal = exception = warning


class _LineLoggerFactory:
    def __init__(self, out: BinaryIO) -> None:
        self._logger = _LineLogger(out)

    def __call__(self, *args: Any) -> _LineLogger:
        return self._logger


def _console_renderer() -> Any:
    return structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())


_streams: list[BinaryIO] = []


def _log_stream() -> BinaryIO:
    """Standard output with a 64 KiB buffer: one write system call per ~200 lines."""
    if not _streams:
        sys.stdout.flush()
        _streams.append(os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=1 << 16))
        atexit.register(_flush_all)
    return _streams[0]


def _flush_all() -> None:
    sys.stdout.flush()
    for stream in _streams:
        stream.flush()


async def flush_logs_every(interval_s: float) -> None:
    """Run for the life of the app: buffered log lines never wait longer than this."""
    try:
        while True:
            await asyncio.sleep(interval_s)
            _flush_all()
    finally:
        _flush_all()


def configure_logging(config: LoggingConfig, secrets: Iterable[str] = ()) -> None:
    """Set up structlog for the process: JSON lines (orjson) or colored console lines, to
    standard output."""
    level = logging.getLevelNamesMapping()[config.level.upper()]
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _Timestamp(),
        structlog.processors.format_exc_info,
    ]
    if config.format == "console":
        processors = [*shared, SecretRedactor(secrets), _console_renderer()]
        factory: Any = structlog.PrintLoggerFactory(sys.stdout)
    else:
        # Values are scrubbed once, in the rendered line: one regex pass per line instead
        # of one per field.
        processors = [*shared, redact_credential_fields, RedactingJSONRenderer(secrets)]
        factory = _LineLoggerFactory(_log_stream())
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
