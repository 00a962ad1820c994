"""Every exception mjgate raises, under one root, and the JSON error answer.

::

    GatewayError                 answered to the caller as JSON: ``status`` and ``description``
     +-- StoreError              the shared store failed; callers see a cache miss or a limit
     +-- UpstreamError           one upstream gave no usable answer (``kind``, ``sent``)
     +-- UpstreamFailures        every upstream that could have answered failed (502/503/504)
     +-- Saturated               the outbound caps held a request back too long

``ConfigError`` (in ``gateway.config``) stands apart: it stops start-up and is never answered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import orjson
from starlette.responses import Response

__all__ = [
    "FailureKind",
    "GatewayError",
    "Saturated",
    "StoreError",
    "UpstreamError",
    "UpstreamFailures",
    "error_response",
]

# `code` follows the midjourney-proxy envelope: 3 not found, 4 the request must change,
# 9 a failure on the gateway's or a provider's side.
_CODES = {404: 3, 500: 9, 502: 9, 503: 9, 504: 9}

# connect/timeout/broken: the upstream failed. open/saturated: the gateway held the request
# back (circuit open, outbound caps full), so it surely never left.
FailureKind = Literal["connect", "timeout", "broken", "open", "saturated"]


class GatewayError(Exception):
    """The root of mjgate's errors; raised in a route, it answers with a JSON error."""

    def __init__(
        self, status: int, description: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(description)
        self.status = status
        self.description = description
        self.headers = dict(headers or {})


class StoreError(GatewayError):
    """The shared store did not answer. Callers treat it as a miss, never as a crash."""

    def __init__(self, description: str) -> None:
        super().__init__(503, description)


class UpstreamError(GatewayError):
    """No usable answer from one upstream.

    ``sent`` is False only when the upstream surely did not take the work: the request never
    left (connection refused, connect timeout, held back by the gateway) or was refused before
    any work (the gateway's key rejected). Such a request may be repeated elsewhere without
    buying anything twice.
    """

    def __init__(self, upstream: str, kind: FailureKind, sent: bool, detail: str) -> None:
        super().__init__(504 if kind == "timeout" else 502, f"upstream {upstream}: {detail}")
        self.upstream = upstream
        self.kind = kind
        self.sent = sent


class UpstreamFailures(GatewayError):
    """Every upstream that could have answered failed: 504 if all timed out, 503 if the
    gateway held every request back, else 502."""

    def __init__(self, errors: Sequence[UpstreamError]) -> None:
        self.errors = list(errors)
        timed_out = all(e.kind == "timeout" for e in self.errors)
        held_back = all(e.kind in ("open", "saturated") for e in self.errors)
        status = 504 if timed_out else 503 if held_back else 502
        super().__init__(status, "; ".join(e.description for e in self.errors))


class Saturated(GatewayError):
    """An upstream's outbound caps stayed full for longer than the request may wait."""

    def __init__(self) -> None:
        super().__init__(503, "outbound caps saturated")


def error_response(
    status: int,
    description: str,
    request_id: str,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """mjgate's own error in the envelope's shape, with the request id to quote."""
    body = orjson.dumps(
        {
            "code": _CODES.get(status, 4),
            "description": description,
            "result": None,
            "request_id": request_id,
        }
    )
    return Response(body, status_code=status, headers=headers, media_type="application/json")
