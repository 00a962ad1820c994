"""Errors the gateway itself answers with, all JSON in the envelope's shape."""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from starlette.responses import Response

__all__ = ["GatewayError", "error_response"]

# `code` follows the midjourney-proxy envelope: 3 not found, 4 the request must change,
# 9 a failure on the gateway's or a provider's side.
_CODES = {404: 3, 500: 9, 502: 9, 503: 9, 504: 9}


class GatewayError(Exception):
    """Raised anywhere in a handler to answer with a JSON error."""

    def __init__(
        self, status: int, description: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(description)
        self.status = status
        self.description = description
        self.headers = dict(headers or {})


def error_response(
    status: int,
    description: str,
    request_id: str,
    headers: Mapping[str, str] | None = None,
) -> Response:
    body = orjson.dumps(
        {"code": _CODES.get(status, 4), "description": description, "request_id": request_id}
    )
    return Response(body, status_code=status, headers=headers, media_type="application/json")
