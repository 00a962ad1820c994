"""Routes for ``admin: true`` clients."""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.auth import caller
from gateway.errors import GatewayError
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
    if not await svc.cache.invalidate(ids, [u.name for u in svc.pool.all]):
        raise GatewayError(503, "the store failed the delete; dropped from this worker only")
    return Response(orjson.dumps({"purged": ids}), media_type="application/json")
