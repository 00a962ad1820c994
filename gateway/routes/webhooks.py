"""``GET /admin/webhooks`` and ``POST /admin/webhooks/{id}/retry``: the callback queue, for
``admin: true`` clients."""

from __future__ import annotations

import re

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import GatewayError
from gateway.routes.admin import require_admin
from gateway.routes.common import services
from gateway.webhooks import State

__all__ = ["deliveries", "retry"]

MAX_LIMIT = 1000
_DELIVERY_ID = re.compile(r"msg_[A-Za-z0-9_-]{1,64}")


async def deliveries(request: Request) -> Response:
    """``?state=pending|dead&limit=``: pending deliveries oldest first, or dead letters."""
    require_admin(request)
    params = request.query_params
    state: State = "dead" if params.get("state") == "dead" else "pending"
    if params.get("state", state) != state:
        raise GatewayError(400, "state must be pending or dead")
    limit_text = params.get("limit") or "100"
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_LIMIT:
        raise GatewayError(400, f"limit must be 1 to {MAX_LIMIT}")
    found = await services(request).deliveries.listing(state, int(limit_text))
    body = {"deliveries": [delivery.public() for delivery in found]}
    return Response(orjson.dumps(body), media_type="application/json")


async def retry(request: Request) -> Response:
    """A dead letter delivered again, its attempts counted from zero."""
    require_admin(request)
    delivery_id = request.path_params["delivery_id"]
    if not _DELIVERY_ID.fullmatch(delivery_id):
        raise GatewayError(400, "not a delivery id (msg_...)")
    delivery = await services(request).deliveries.retry(delivery_id)
    if delivery is None:
        raise GatewayError(404, f"no dead letter {delivery_id}")
    return Response(orjson.dumps({"delivery": delivery.public()}), media_type="application/json")
