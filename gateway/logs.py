"""Logging: structlog, one JSON line per event, with secrets redacted before rendering, and
every line written whole even when several workers share one standard output."""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import re
import select
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import unquote, unquote_plus, urlsplit

import orjson
import structlog
from structlog.typing import EventDict, WrappedLogger

from gateway.config import Config, LoggingConfig

__all__ = [
    "FILE_WRITE_BYTES",
    "LINE_LIMIT",
    "LineWriter",
    "RedactingJSONRenderer",
    "SecretRedactor",
    "configure_logging",
    "fit_line",
    "flush_logs_every",
    "log_access",
    "redact_credential_fields",
    "secrets_of",
]

_SENSITIVE_FIELDS = frozenset({"authorization", "mj-api-secret", "key", "api_key", "password"})
_REDACTED = "[redacted]"
# The most bytes one write to a pipe keeps in one piece (POSIX PIPE_BUF; 4096 on Linux).
LINE_LIMIT = select.PIPE_BUF
# The writes to a log file: over two hundred access lines per system call.
FILE_WRITE_BYTES = 64 * 1024


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
    """Mask fields named like credentials, in any letter case, at any depth."""
    for name, value in event.items():
        if _is_sensitive(name):
            event[name] = _REDACTED
        elif value and isinstance(value, dict | list | tuple):
            event[name] = _mask_nested(value)
    return event


# Event field names already judged: an access line has a dozen fields, the same on every
# request, and lower-casing each of them was a tenth of the line's cost.
_judged: dict[str, bool] = {}


def _is_sensitive(name: str) -> bool:
    sensitive = _judged.get(name)
    if sensitive is None:
        sensitive = name.lower() in _SENSITIVE_FIELDS
        if len(_judged) < 10_000:
            _judged[name] = sensitive
    return sensitive


class _Timestamp:
    """structlog's ISO UTC timestamp (``2026-11-21T11:12:39.988412Z``), with the part up to
    the second formatted once a second: ``datetime.now(tz)`` costs microseconds per line."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
        event["timestamp"] = self.now()
        return event

    def now(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((now - second) * 1e6):06d}Z"


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
    and in the JSON-escaped form they take inside a string; a line longer than
    ``LINE_LIMIT`` is then shortened to fit (see ``fit_line``)."""

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
        if len(line) >= LINE_LIMIT:
            line = fit_line(line, LINE_LIMIT - 1)
        return line

    def finds_secret(self, data: bytes) -> bool:
        """Whether a known secret occurs in ``data``."""
        return self._pattern is not None and self._pattern.search(data) is not None


# Values this short are left whole: cutting them would save less than the marker costs.
_UNCUT_BYTES = 64
# Room for the "...[N chars cut]..." marker.
_MARKER_BYTES = 40


def fit_line(line: bytes, limit: int) -> bytes:
    """A rendered JSON line cut down to ``limit`` bytes: the longest values lose their
    middle to a ``...[N chars cut]...`` marker, down to one common length, so a traceback
    keeps its first frames and the exception itself, and short fields stay whole. A value
    that is not a string is cut as its JSON text. The line is cut after redaction: a cut
    can shorten a mask, never uncover part of a secret. Only a line of more than about 60
    fields cannot be cut down that far."""
    event: dict[str, Any] = orjson.loads(line)
    texts = {k: v if isinstance(v, str) else orjson.dumps(v).decode() for k, v in event.items()}
    sizes = {k: len(orjson.dumps(text)) for k, text in texts.items()}
    long = sorted((k for k in sizes if sizes[k] > _UNCUT_BYTES), key=sizes.__getitem__)[::-1]
    as_text = len(line) + sum(sizes[k] - len(orjson.dumps(event[k])) for k in long)
    level = _level([sizes[k] for k in long], as_text - limit)
    cut = {k: texts[k] for k in long if sizes[k] > level}
    # First as many characters as the bytes to save take on average, then, if escapes or
    # wide characters bunch up in the middle, one character per byte, which always fits.
    fitted = _cut_values(event, cut, sizes, level, scaled=True)
    return fitted if len(fitted) <= limit else _cut_values(event, cut, sizes, level, scaled=False)


def _cut_values(
    event: dict[str, Any], cut: dict[str, str], sizes: dict[str, int], level: int, scaled: bool
) -> bytes:
    """The event rendered with each value in ``cut`` shortened in its middle to about
    ``level`` bytes."""
    shortened = dict(event)
    for name, text in cut.items():
        drop = sizes[name] - level
        if scaled:
            drop = -(-drop * len(text) // (sizes[name] - 2))
        keep = max(len(text) - drop, 0)
        head, tail = text[: keep // 2], text[len(text) - (keep - keep // 2) :]
        shortened[name] = f"{head}...[{len(text) - keep} chars cut]...{tail}"
    return orjson.dumps(shortened)


def _level(sizes: list[int], excess: int) -> int:
    """The size to cut every larger value down to (``sizes`` from the largest) so that the
    cuts, markers included, save ``excess`` bytes."""
    total = 0
    for count, size in enumerate(sizes, 1):
        total += size
        below = sizes[count] if count < len(sizes) else _UNCUT_BYTES
        level = (total - excess - _MARKER_BYTES * count) // count
        if level >= below:
            return level
    return _UNCUT_BYTES


class LineWriter:
    """Log lines to a file descriptor, buffered, in writes of whole lines and at most
    ``LINE_LIMIT`` bytes each (``FILE_WRITE_BYTES`` to a regular file).

    Every gunicorn worker writes to the same standard output, usually a pipe, and a pipe
    keeps one write in one piece only up to PIPE_BUF bytes: a bigger write can be split
    and another worker's lines land in the middle of it. Writes that end on a line
    boundary and stay within PIPE_BUF arrive whole, and still carry about ten access lines
    per system call. The JSON renderer keeps each line within the limit (``fit_line``); a
    longer line would go out in a write of its own. A regular file keeps every write whole
    (Linux writes to it under the inode's lock), so there the writes can be larger.
    """

    def __init__(self, fd: int, limit: int | None = None) -> None:
        self._fd = fd
        if limit is None:
            limit = FILE_WRITE_BYTES if stat.S_ISREG(os.fstat(fd).st_mode) else LINE_LIMIT
        self._limit = limit
        self._pending = bytearray()
        self._lock = threading.Lock()

    def write_line(self, line: bytes) -> None:
        with self._lock:
            if len(self._pending) + len(line) + 1 > self._limit:
                self._drain()
            self._pending += line
            self._pending += b"\n"

    def flush(self) -> None:
        with self._lock:
            self._drain()

    def _drain(self) -> None:
        data = bytes(self._pending)
        self._pending.clear()
        while data:
            data = data[os.write(self._fd, data) :]


class _LineLogger:
    """structlog's BytesLogger without a flush per line (the cost of a system call on every
    request): info lines go out when a write's worth is buffered or ``flush_logs_every``
    ticks; warnings and errors are flushed at once."""

    def __init__(self, out: LineWriter) -> None:
        self._write = out.write_line
        self._flush = out.flush

    def msg(self, message: bytes) -> None:
        self._write(message)

    debug = info = msg

    def warning(self, message: bytes) -> None:
        self._write(message)
        self._flush()

    warn = error = err = critical = fatal = exception = warning


class _LineLoggerFactory:
    def __init__(self, out: LineWriter) -> None:
        self._logger = _LineLogger(out)

    def __call__(self, *args: Any) -> _LineLogger:
        return self._logger


def _console_renderer() -> Any:
    return structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())


_writers: list[LineWriter] = []


def _log_writer() -> LineWriter:
    """The process's one writer to standard output (a copy of the descriptor, so that
    closing or replacing ``sys.stdout`` does not cut the log off)."""
    if not _writers:
        sys.stdout.flush()
        _writers.append(LineWriter(os.dup(sys.stdout.fileno())))
        atexit.register(_flush_all)
    return _writers[0]


def _flush_all() -> None:
    sys.stdout.flush()
    for writer in _writers:
        writer.flush()


async def flush_logs_every(interval_s: float) -> None:
    """Run for the life of the app: buffered log lines never wait longer than this."""
    try:
        while True:
            await asyncio.sleep(interval_s)
            _flush_all()
    finally:
        _flush_all()


class _JSONAccessLine:
    """The access line in JSON, the same bytes structlog's chain renders for
    ``access_log.info("request", **fields)``, without the chain: its fields are the gateway's
    own (no contextvars to merge, no exception, no field named like a credential), and the
    chain was a third of a cached fetch's CPU. A caller chooses one of them, the request id:
    when a secret occurs in it, the renderer masks the line as it masks any other (looking
    in the id alone, not in the whole line, saves a cached fetch a microsecond or two)."""

    def __init__(self, render: RedactingJSONRenderer, out: LineWriter) -> None:
        self._render = render
        self._write = out.write_line
        self._clock = _Timestamp()

    def __call__(self, fields: dict[str, Any]) -> None:
        fields["event"] = "request"
        fields["level"] = "info"
        fields["timestamp"] = self._clock.now()
        if self._render.finds_secret(fields["request_id"].encode()):
            self._write(self._render(None, "info", fields))
        else:
            self._write(orjson.dumps(fields))


_access_log = structlog.get_logger("mjgate.access")


def _structlog_access_line(fields: dict[str, Any]) -> None:
    _access_log.info("request", **fields)


def _no_access_line(fields: dict[str, Any]) -> None:
    pass


_access_line: Callable[[dict[str, Any]], None] = _structlog_access_line


def log_access(fields: dict[str, Any]) -> None:
    """Log one request's access line (event ``request``, level info) with these fields, in
    this order."""
    _access_line(fields)


def configure_logging(config: LoggingConfig, secrets: Iterable[str] = ()) -> None:
    """Set up structlog for the process: JSON lines (orjson) or colored console lines (for
    a terminal: an event with a traceback spans several lines), to standard output."""
    global _access_line
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
        _access_line = _structlog_access_line
    else:
        # Values are scrubbed once, in the rendered line: one regex pass per line instead
        # of one per field.
        renderer = RedactingJSONRenderer(secrets)
        processors = [*shared, redact_credential_fields, renderer]
        factory = _LineLoggerFactory(_log_writer())
        _access_line = _JSONAccessLine(renderer, _log_writer())
    if level > logging.INFO:
        _access_line = _no_access_line
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )


def secrets_of(config: Config) -> list[str]:
    """Every secret value in the config, for the log redactor: each upstream key, the
    metrics token, the server's secret key, the S3 keys and the Redis password (sentinel
    entries hold none: the config refuses credentials there, and Sentinel uses the one in
    ``redis.url``)."""
    secrets = [u.key.reveal() for u in config.upstreams]
    secrets += [config.metrics.token.reveal(), config.server.secret_key.reveal()]
    secrets += [config.images.s3.access_key.reveal(), config.images.s3.secret_key.reveal()]
    secrets += _url_passwords(config.redis.url.reveal())
    return [s for s in secrets if s]


def _url_passwords(url: str) -> set[str]:
    """The password in a URL's user part and in its ``password=`` query parameters (redis-py
    reads both), parsed as a URL parser does (the password may hold ``@`` and ``:``), each
    as written and as decoded, the form the Redis client sends."""
    parts = urlsplit(url)
    found = {parts.password, unquote(parts.password)} if parts.password else set()
    for item in parts.query.split("&"):
        name, _, value = item.partition("=")
        if unquote_plus(name).lower() == "password" and value:
            found |= {value, unquote_plus(value)}
    return found
