"""The front layer's two paths for a task fetch, the request a team makes most.

An L1 hit is answered at once, without an await (``cached_fetch``). Any other GET of a fetch
runs the route's own code, ``routes.tasks.fetch_task``, without Starlette's router
(``direct_fetch``): its matching, request object and three wrappers of ``send`` were a
tenth of a miss's CPU. HEAD goes through the router like every other request.
"""

from __future__ import annotations

import re

import structlog
from starlette.types import Scope, Send

from gateway.config import ClientConfig
from gateway.context import RequestInfo
from gateway.errors import GatewayError, error_response
from gateway.lookup import Answer
from gateway.metrics import INFLIGHT
from gateway.protocol import MODES, TASK_ID_PATTERN
from gateway.routes.common import error_answer
from gateway.routes.tasks import fetch_task
from gateway.services import Services

__all__ = [
    "FETCH_ROUTES",
    "body_headers",
    "cached_fetch",
    "direct_fetch",
    "fetch_target",
    "gateway_headers",
    "says_about_tasks",
    "send_answer",
]

_FETCH_PATH = re.compile(
    "(" + "|".join(re.escape(mode) for mode in MODES) + f")/mj/task/({TASK_ID_PATTERN})/fetch"
)
FETCH_ROUTES = {mode: f"{mode}/mj/task/{{task_id}}/fetch" for mode in MODES}

error_log = structlog.get_logger("mjgate.errors")


def fetch_target(scope: Scope) -> tuple[str, str] | None:
    """``(mode, task_id)`` of a GET of a task fetch, else None."""
    if scope["method"] != "GET":
        return None
    match = _FETCH_PATH.fullmatch(scope["path"])
    return None if match is None else (match.group(1), match.group(2))


def cached_fetch(services: Services, client: ClientConfig, task_id: str) -> Answer | None:
    """The answer this worker's L1 holds for the caller (no I/O, no await), if any."""
    if not services.visibility.known_visible(client, task_id):
        return None  # the route decides, answering an invisible task as an unknown one
    pool = services.pool
    answer = services.lookup.fetch_cached(task_id, pool.names(pool.allowed(client.upstreams)))
    if answer is None or not answer.found:
        return None  # the route answers it, and counts the L1 miss
    return answer


async def direct_fetch(
    services: Services,
    client: ClientConfig,
    target: tuple[str, str],
    info: RequestInfo,
    send: Send,
    extra: list[tuple[bytes, bytes]],
) -> int:
    """Answer a fetch with the route's own code and error answers; return the status."""
    structlog.contextvars.bind_contextvars(request_id=info.request_id, client=info.client)
    INFLIGHT.inc()
    try:
        answer = await fetch_task(services, client, *target, info)
    except GatewayError as exc:
        error = error_answer(exc, info.request_id)
    except Exception:
        error_log.exception("unhandled_error")
        error = error_response(500, "internal gateway error", info.request_id)
    else:
        head = body_headers(answer.body, answer.content_type)
        return await send_answer(send, answer.status, answer.body, head, info, extra)
    finally:
        INFLIGHT.dec()
    body = bytes(error.body)
    return await send_answer(send, error.status_code, body, error.raw_headers, info, extra)


def body_headers(body: bytes, content_type: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", content_type.encode("latin-1")),
        (b"content-length", str(len(body)).encode()),
    ]


async def send_answer(
    send: Send,
    status: int,
    body: bytes,
    head: list[tuple[bytes, bytes]],
    info: RequestInfo,
    extra: list[tuple[bytes, bytes]],
) -> int:
    """Send a whole answer about a task (``head``: its own headers) with the gateway's
    headers; return its status."""
    if not says_about_tasks(status):
        info.cache = "-"
    headers = [*head, *gateway_headers(info), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    return status


def says_about_tasks(status: int) -> bool:
    """An answer of a task route says something about tasks unless it refuses the request
    itself (a 4xx other than 404: bad input, too large, wrong method, too slow)."""
    return status < 400 or status == 404 or status >= 500


def gateway_headers(info: RequestInfo) -> list[tuple[bytes, bytes]]:
    """The request id, and the cache headers when they say something."""
    headers = [(b"x-request-id", info.request_id.encode())]
    if info.cache != "-":
        headers.append((b"x-cache", info.cache.encode()))
    if info.tier != "-":
        headers.append((b"x-cache-tier", info.tier.encode()))
    return headers
