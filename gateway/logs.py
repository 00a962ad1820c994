"""Logging: structlog, one JSON line per event, with secrets redacted before rendering."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any

import orjson
import structlog
from structlog.typing import EventDict, WrappedLogger

from gateway.config import LoggingConfig

__all__ = ["SecretRedactor", "configure_logging"]

_SENSITIVE_FIELDS = frozenset({"authorization", "mj-api-secret", "key", "api_key", "password"})
_REDACTED = "[redacted]"


class SecretRedactor:
    """Masks known secret values anywhere in an event, and fields named like credentials.

    The gateway never logs headers or keys on purpose; this is the net under that rule, for
    an upstream error message or an exception text that happens to carry one.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = tuple(sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True))

    def __call__(self, logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
        for name, value in event.items():
            if name.lower() in _SENSITIVE_FIELDS:
                event[name] = _REDACTED
            elif not isinstance(value, int | float | bool | None):
                event[name] = self._scrub(value)
        return event

    def _scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self._secrets:
                if secret in value:
                    value = value.replace(secret, _REDACTED)
            return value
        if isinstance(value, dict):
            return {
                k: _REDACTED if str(k).lower() in _SENSITIVE_FIELDS else self._scrub(v)
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self._scrub(v) for v in value]
        return value


def configure_logging(config: LoggingConfig, secrets: Iterable[str] = ()) -> None:
    """Set up structlog for the process: JSON lines (orjson) or colored console lines, to
    standard output."""
    level = logging.getLevelNamesMapping()[config.level.upper()]
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        SecretRedactor(secrets),
    ]
    if config.format == "console":
        renderer: Any = structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
        factory: Any = structlog.PrintLoggerFactory(sys.stdout)
    else:
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        factory = structlog.BytesLoggerFactory(sys.stdout.buffer)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
