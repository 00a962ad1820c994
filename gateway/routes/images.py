"""``GET /mj/image/{task_id}`` and ``/mj/image/{task_id}/{n}``: a task's image, from mjgate.

Allowed with the caller's key, for a task the caller may fetch (its upstreams and its
visibility), or with a signed URL (``?exp=&sig=``: no key, so an ``<img src>`` works), which
answers for any upstream. ``n`` picks one of the task's ``imageUrls`` (from 0). The image is
served from the disk cache as a file (``ETag``, ``Last-Modified``, 304, ``Range``/206).
"""

from __future__ import annotations

import time
from email.utils import formatdate, parsedate_to_datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.types import Message, Receive, Scope, Send

from gateway.auth import caller
from gateway.context import request_info
from gateway.errors import GatewayError
from gateway.images.links import source_link
from gateway.images.service import ImageService, Served
from gateway.metrics import IMAGE_BYTES, IMAGES_SERVED
from gateway.protocol import TERMINAL
from gateway.routes.common import allowed, services
from gateway.tasks import parse_task
from gateway.upstreams import Upstream
from gateway.validation import require_task_id

__all__ = ["image"]

_MAX_INDEX = 64


async def image(request: Request) -> Response:
    """A task's image: checked, found (disk, S3 or its host), and sent as a file."""
    svc = services(request)
    images = svc.images
    assert images is not None, "the image routes exist only with images.enabled"
    task_id = require_task_id(request.path_params["task_id"])
    n = _index(request.path_params.get("n"))
    expires: int | None = None
    if "sig" in request.query_params or caller(request.scope) is images.signed_caller:
        expires = images.check_signature(task_id, n, request.query_params)
        upstreams: tuple[Upstream, ...] = svc.pool.all
    else:
        upstreams = await _visible_to_caller(request, task_id)
    answer = await svc.lookup.fetch("", task_id, upstreams, request_info(request.scope))
    task = parse_task(answer.body) if answer.found else None
    if task is None:
        raise GatewayError(404, f"task {task_id} not found")
    url = source_link(task, n)
    if url is None:
        which = "image" if n is None else f"image {n}"
        raise GatewayError(404, f"task {task_id} has no {which}")
    served = await images.image(task_id, url)
    IMAGES_SERVED.labels(served.source).inc()
    headers = _headers(images, served, task, expires)
    if _not_modified(request, headers["etag"], served.image.stat.st_mtime):
        return Response(status_code=304, headers=headers)
    return _ImageFile(served, headers)


async def _visible_to_caller(request: Request, task_id: str) -> tuple[Upstream, ...]:
    """The upstreams to look the task up on for a caller with a key; 404 when the caller
    may not see the task (visibility ``own``/``team``), exactly as the fetch route answers."""
    svc = services(request)
    if not await svc.visibility.check(caller(request.scope), task_id):
        raise GatewayError(404, f"task {task_id} not found")
    return allowed(request)


def _index(raw: Any) -> int | None:
    if raw is None:
        return None
    text = str(raw)
    if not (text.isascii() and text.isdigit()) or int(text) >= _MAX_INDEX:
        raise GatewayError(404, f"no image {text!r}: the index is a number from 0")
    return int(text)


def _headers(
    images: ImageService, served: Served, task: dict[str, Any], expires: int | None
) -> dict[str, str]:
    stored = served.image
    if task.get("status") not in TERMINAL:
        cache_control = "private, no-cache"  # a running task's progress image changes
    elif expires is not None:
        left = max(expires - int(time.time()), 0)
        cache_control = f"private, max-age={left}, immutable"
    else:
        cache_control = f"private, max-age={images.config.url_ttl_s}"
    return {
        "etag": f'"{stored.key}"',
        "last-modified": formatdate(stored.stat.st_mtime, usegmt=True),
        "cache-control": cache_control,
        "x-content-type-options": "nosniff",
        "x-image-source": served.source,
    }


def _not_modified(request: Request, etag: str, modified: float) -> bool:
    """A conditional request the stored image satisfies (``If-None-Match`` wins)."""
    tags = request.headers.get("if-none-match")
    if tags is not None:
        listed = {tag.strip().removeprefix("W/") for tag in tags.split(",")}
        return "*" in listed or etag in listed
    since = request.headers.get("if-modified-since")
    if since is None:
        return False
    try:
        return int(modified) <= parsedate_to_datetime(since).timestamp()
    except (TypeError, ValueError):
        return False


class _ImageFile(FileResponse):
    """The stored file (Starlette serves ``Range`` requests), counted in bytes sent."""

    chunk_size = 1024 * 1024

    def __init__(self, served: Served, headers: dict[str, str]) -> None:
        stored = served.image
        super().__init__(
            stored.path, headers=headers, media_type=stored.content_type, stat_result=stored.stat
        )
        self.source = served.source

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sent = 0

        async def counting(message: Message) -> None:
            nonlocal sent
            if message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await super().__call__(scope, receive, counting)
        finally:
            IMAGE_BYTES.labels(self.source).inc(sent)
