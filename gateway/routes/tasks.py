"""Reading tasks: fetch one, list by ids, paged query, and the recent and queued lists."""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.context import RequestInfo, request_info
from gateway.errors import GatewayError
from gateway.metrics import PARTIAL_ANSWERS
from gateway.query import page_object, parse_query
from gateway.routes.common import allowed, services
from gateway.validation import read_ids, read_json_object, require_task_id

__all__ = ["fetch", "list_by_ids", "query", "recent"]


async def fetch(mode: str, request: Request) -> Response:
    """``GET /mj/task/{id}/fetch``: one task, from cache or its owner."""
    task_id = require_task_id(request.path_params["task_id"])
    info = request_info(request.scope)
    answer = await services(request).lookup.fetch(mode, task_id, allowed(request), info)
    info.cache, info.tier = answer.cache, answer.tier
    if not answer.found:
        raise GatewayError(404, f"task {task_id} not found")
    return Response(answer.body, answer.status, headers={"content-type": answer.content_type})


async def list_by_ids(mode: str, request: Request) -> Response:
    """``POST /mj/task/list-by-ids`` and ``list-by-condition``: tasks in the caller's order."""
    config = services(request).config
    ids = await read_ids(request, config.server.max_body_bytes, config.fanout.max_ids)
    info = request_info(request.scope)
    result = await services(request).lookup.list_tasks(mode, ids, allowed(request), info)
    response = _merged(result.body, result.failed, info)
    info.cache = result.cache  # HIT when every id came from the cache
    return response


async def query(mode: str, request: Request) -> Response:
    """``POST /mj/task/query``: a Spring-style page of the merged, sorted search."""
    body = await read_json_object(request, services(request).config.server.max_body_bytes)
    spec = parse_query(body)
    info = request_info(request.scope)
    merged = await services(request).search.query(mode, spec, allowed(request), info)
    page = page_object(merged.rows, merged.total, spec)
    return _merged(orjson.dumps(page), merged.failed, info)


async def recent(mode: str, request: Request) -> Response:
    """``GET /mj/task/list`` and ``/mj/task/queue``, merged across upstreams."""
    kind = request.url.path.rsplit("/", 1)[1]
    info = request_info(request.scope)
    merged = await services(request).search.recent(mode, kind, allowed(request), info)
    return _merged(orjson.dumps(merged.rows), merged.failed, info)


def _merged(body: bytes, failed: list[str], info: RequestInfo) -> Response:
    headers = {"x-gateway-partial": ",".join(failed)} if failed else None
    info.cache = "PARTIAL" if failed else "MISS"
    for name in failed:
        PARTIAL_ANSWERS.labels(name).inc()
    return Response(body, headers=headers, media_type="application/json")
