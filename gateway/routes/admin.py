"""Routes for ``admin: true`` clients."""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.auth import caller
from gateway.errors import GatewayError, StoreError
from gateway.purge import purge_ids
from gateway.routes.common import services
from gateway.validation import read_ids

__all__ = ["purge"]


def require_admin(request: Request) -> None:
    """Refuse with 403 unless the caller is an admin client."""
    if not caller(request.scope).admin:
        raise GatewayError(403, "this route needs a client with admin: true")


async def purge(request: Request) -> Response:
    """``POST /admin/cache/purge``: drop task ids from every cache tier."""
    require_admin(request)
    svc = services(request)
    ids = await read_ids(request, svc.config.server.max_body_bytes, svc.config.fanout.max_ids)
    names = [u.name for u in svc.pool.all]
    try:
        done = await purge_ids(svc.store, svc.keys, svc.cache, ids, names)
    except StoreError:
        detail = "the store failed the delete; dropped from this worker only"
        raise GatewayError(503, detail) from None
    body = {"purged": done.purged, "absent": done.absent}
    return Response(orjson.dumps(body), media_type="application/json")
