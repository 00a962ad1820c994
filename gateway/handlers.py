"""Route handlers: one method per route family, and the route table."""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Coroutine, Sequence
from typing import Any

import orjson
import structlog
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Scope

from gateway.auth import caller
from gateway.cache import TaskCache
from gateway.circuit import CircuitBreaker
from gateway.config import Config, UpstreamConfig
from gateway.errors import GatewayError
from gateway.lookup import TaskLookup, UpstreamFailures, call
from gateway.metrics import CIRCUIT_STATE, CIRCUIT_VALUES, L1_HIT, PARTIAL_ANSWERS, SUBMITS
from gateway.middleware import FastAnswer, RequestInfo, request_info
from gateway.outbound import OutboundCaps
from gateway.owners import OwnerMap
from gateway.query import TaskSearch, page_object, parse_query
from gateway.ratelimit import CallerLimiter
from gateway.store import KeySpace, Store, open_store
from gateway.tasks import is_not_found, valid_task_id
from gateway.upstreams import Upstream, UpstreamError, UpstreamPool, UpstreamResponse
from gateway.validation import (
    NAME_SEGMENT,
    check_submit_fields,
    parent_task_id,
    read_ids,
    read_json_object,
    require_task_id,
)

log = structlog.get_logger("mjgate.handlers")

__all__ = ["MODES", "Handlers"]

# Speed-mode prefixes of new-api relays (`/mj-fast/mj/submit/imagine`); kept when forwarding.
MODES = ("", "/mj-fast", "/mj-relax", "/mj-turbo")
ACCEPTED_CODES = frozenset({1, 21, 22})
# Task actions after which an upstream's answer for the task differs from the cached one.
CHANGES_TASK = frozenset({"image-seed", "cancel"})
INVALIDATE_AGAIN_S = 2.0
_SAFE_QUERY = re.compile(r"[A-Za-z0-9_.~%&=+,-]*")
_FETCH_PATH = re.compile(r"(|/mj-fast|/mj-relax|/mj-turbo)/mj/task/([A-Za-z0-9_-]{1,64})/fetch")


class Handlers:
    """The gateway's endpoints and the services they use.

    Services are opened by ``start`` in the app's lifespan, not at construction, so the app
    may be built before a fork (gunicorn ``preload_app``) without sharing sockets.
    """

    store: Store
    pool: UpstreamPool
    owners: OwnerMap
    cache: TaskCache
    lookup: TaskLookup
    search: TaskSearch
    limiter: CallerLimiter

    def __init__(self, config: Config) -> None:
        self.config = config
        self.max_body = config.server.max_body_bytes
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        config = self.config
        self.store = open_store(config.redis)
        await self.store.open()
        keys = KeySpace(config.redis.key_prefix)
        self.pool = UpstreamPool([self._upstream(u, keys) for u in config.upstreams])
        self.limiter = CallerLimiter(self.store, keys, config.rate_limit)
        self.owners = OwnerMap(
            self.store, keys, config.cache.owner_ttl_s, config.cache.l1_max_entries
        )
        self.cache = TaskCache(self.store, keys, config.cache, self.owners)
        self.lookup = TaskLookup(self.owners, self.cache, config.fanout)
        self.search = TaskSearch(self.lookup, config.fanout.deadline_s)

    def _upstream(self, config: UpstreamConfig, keys: KeySpace) -> Upstream:
        def changed(old: str, new: str) -> None:
            log.warning("circuit_change", upstream=config.name, old=old, new=new)
            CIRCUIT_STATE.labels(config.name).set(CIRCUIT_VALUES[new])

        CIRCUIT_STATE.labels(config.name).set(0)

        circuit = self.config.circuit
        breaker = CircuitBreaker(circuit.failure_threshold, circuit.cooldown_s, changed)
        return Upstream(config, OutboundCaps(self.store, keys, config), breaker)

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.pool.aclose()
        await self.store.close()

    def routes(self) -> list[BaseRoute]:
        routes: list[BaseRoute] = []
        for mode in MODES:
            base = f"{mode}/mj"

            def bound(method: Any, mode: str = mode) -> Any:
                return functools.partial(method, mode)

            routes += [
                Route(f"{base}/task/{{task_id}}/fetch", bound(self.fetch), methods=["GET"]),
                Route(f"{base}/task/list-by-condition", bound(self.list_by_ids), methods=["POST"]),
                Route(f"{base}/task/list-by-ids", bound(self.list_by_ids), methods=["POST"]),
                Route(f"{base}/task/query", bound(self.query), methods=["POST"]),
                Route(f"{base}/task/list", bound(self.recent), methods=["GET"]),
                Route(f"{base}/task/queue", bound(self.recent), methods=["GET"]),
                Route(f"{base}/submit/{{kind}}", bound(self.submit), methods=["POST"]),
                Route(f"{base}/insight-face/{{kind}}", bound(self.submit), methods=["POST"]),
                Route(
                    f"{base}/task/{{task_id}}/{{action}}",
                    bound(self.task_action),
                    methods=["GET", "POST"],
                ),
            ]
        routes.append(Route("/admin/cache/purge", self.purge, methods=["POST"]))
        routes += [
            Route(path, self.passthrough, methods=["GET", "POST"])
            for path in self.config.passthrough
        ]
        return routes

    def cached_fetch(self, scope: Scope) -> FastAnswer | None:
        """A fetch this worker can answer from L1 alone, for the front layer's fast path."""
        match = _FETCH_PATH.fullmatch(scope["path"])
        if match is None:
            return None
        allowed = self.pool.allowed(caller(scope).upstreams)
        answer = self.lookup.fetch_cached(match.group(2), self.pool.names(allowed))
        if answer is None or not answer.found:
            return None  # the handler answers it, and counts the L1 miss
        L1_HIT.inc()
        route = f"{match.group(1)}/mj/task/{{task_id}}/fetch"
        return FastAnswer(answer.body, route, answer.cache, answer.tier)

    def _allowed(self, request: Request) -> tuple[Upstream, ...]:
        return self.pool.allowed(caller(request.scope).upstreams)

    async def fetch(self, mode: str, request: Request) -> Response:
        task_id = require_task_id(request.path_params["task_id"])
        info = request_info(request.scope)
        allowed = self._allowed(request)
        answer = await self._lookup(self.lookup.fetch(mode, task_id, allowed, info))
        info.cache, info.tier = answer.cache, answer.tier
        if not answer.found:
            raise GatewayError(404, f"task {task_id} not found")
        return Response(answer.body, answer.status, headers={"content-type": answer.content_type})

    async def list_by_ids(self, mode: str, request: Request) -> Response:
        ids = await read_ids(request, self.max_body, self.config.fanout.max_ids)
        info = request_info(request.scope)
        result = await self._lookup(self.lookup.list_tasks(mode, ids, self._allowed(request), info))
        response = self._merged(result.body, result.failed, info)
        info.cache = result.cache  # HIT when every id came from the cache
        return response

    async def query(self, mode: str, request: Request) -> Response:
        spec = parse_query(await read_json_object(request, self.max_body))
        info = request_info(request.scope)
        merged = await self.search.query(mode, spec, self._allowed(request), info)
        page = page_object(merged.rows, merged.total, spec)
        return self._merged(orjson.dumps(page), merged.failed, info)

    async def recent(self, mode: str, request: Request) -> Response:
        kind = request.url.path.rsplit("/", 1)[1]
        info = request_info(request.scope)
        merged = await self.search.recent(mode, kind, self._allowed(request), info)
        return self._merged(orjson.dumps(merged.rows), merged.failed, info)

    @staticmethod
    def _merged(body: bytes, failed: list[str], info: RequestInfo) -> Response:
        headers = {"x-gateway-partial": ",".join(failed)} if failed else None
        info.cache = "PARTIAL" if failed else "MISS"
        for name in failed:
            PARTIAL_ANSWERS.labels(name).inc()
        return Response(body, headers=headers, media_type="application/json")

    async def submit(self, mode: str, request: Request) -> Response:
        kind = request.path_params["kind"]
        if not NAME_SEGMENT.fullmatch(kind):
            raise GatewayError(404, f"unknown submit route: {kind!r}")
        data = await read_json_object(request, self.max_body)
        check_submit_fields(data)
        info = request_info(request.scope)
        allowed = self._allowed(request)
        parent = parent_task_id(kind, data)
        if parent is not None:
            owner = await self._lookup(self.lookup.owner_of(mode, parent, allowed, info))
            if owner is None:
                raise GatewayError(404, f"parent task {parent} not found")
            targets = [owner]
        else:
            targets = self.pool.submit_order(allowed)
        if not targets:
            raise GatewayError(503, "no upstream is available for submits")
        response = await self._submit_to(targets, request.url.path, orjson.dumps(data), info)
        envelope = _envelope(response)
        code = envelope.get("code") if envelope else None
        SUBMITS.labels(response.upstream, str(code) if code is not None else "none").inc()
        task_id = accepted_task_id(response)
        if task_id is not None:
            await self.owners.record(task_id, response.upstream)
        return forward(response)

    async def _submit_to(
        self, targets: Sequence[Upstream], path: str, body: bytes, info: RequestInfo
    ) -> UpstreamResponse:
        """Send to the first target that takes it.

        Moves on only when the upstream surely did not take the work: a queue-full answer,
        429/503, or a connection that never opened. After a timeout the work may exist, and
        sending it again could pay for the same image twice, so that fails instead.
        """
        refused: list[UpstreamError] = []
        response: UpstreamResponse | None = None
        for upstream in targets:
            try:
                response = await call(upstream, info, "submit", "POST", path, body)
            except UpstreamError as exc:
                if exc.sent:
                    raise UpstreamFailures([exc]) from None
                refused.append(exc)
                continue
            if not should_fail_over(response):
                return response
        if response is not None:
            return response
        raise UpstreamFailures(refused)

    async def task_action(self, mode: str, request: Request) -> Response:
        task_id = require_task_id(request.path_params["task_id"])
        action = request.path_params["action"]
        if not NAME_SEGMENT.fullmatch(action):
            raise GatewayError(404, f"unknown task action: {action!r}")
        data = None
        if request.method == "POST":
            data = await read_json_object(request, self.max_body, optional=True)
        info = request_info(request.scope)
        owner = await self._lookup(
            self.lookup.owner_of(mode, task_id, self._allowed(request), info)
        )
        if owner is None:
            raise GatewayError(404, f"task {task_id} not found")
        body = orjson.dumps(data) if data is not None else None
        try:
            response = await self._lookup(
                call(owner, info, "task_action", request.method, request.url.path, body)
            )
        finally:
            if action in CHANGES_TASK:
                await self._invalidate(task_id)
        if is_not_found(response.status, response.content):
            raise GatewayError(404, f"task {task_id} not found")
        return forward(response)

    async def _invalidate(self, task_id: str) -> None:
        """Drop a task that an action changed from every tier, and once more a moment later:
        a lookup already in flight during the action could otherwise write the old body
        back (the "delayed double delete")."""
        names = [u.name for u in self.pool.all]
        await self.cache.invalidate([task_id], names)
        self._background(self._invalidate_later(task_id, names))

    async def _invalidate_later(self, task_id: str, names: list[str]) -> None:
        await asyncio.sleep(INVALIDATE_AGAIN_S)
        await self.cache.invalidate([task_id], names)

    def _background(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def purge(self, request: Request) -> Response:
        """Drop task ids from every cache tier (admin callers only)."""
        if not caller(request.scope).admin:
            raise GatewayError(403, "this route needs a client with admin: true")
        ids = await read_ids(request, self.max_body, self.config.fanout.max_ids)
        if not await self.cache.invalidate(ids, [u.name for u in self.pool.all]):
            raise GatewayError(503, "the store failed the delete; dropped from this worker only")
        return Response(orjson.dumps({"purged": ids}), media_type="application/json")

    async def passthrough(self, request: Request) -> Response:
        """A path the config lists under ``passthrough``: forwarded as it is to one upstream."""
        data = None
        if request.method == "POST":
            data = await read_json_object(request, self.max_body, optional=True)
        query = request.url.query
        if not _SAFE_QUERY.fullmatch(query):
            raise GatewayError(400, "query string has characters that are not allowed")
        path = request.url.path + (f"?{query}" if query else "")
        targets = self.pool.submit_order(self._allowed(request))
        if not targets:
            raise GatewayError(503, "no upstream is available")
        info = request_info(request.scope)
        body = orjson.dumps(data) if data is not None else None
        for upstream in targets:
            try:
                response = await call(upstream, info, "passthrough", request.method, path, body)
                return forward(response)
            except UpstreamError as exc:
                if exc.sent or upstream is targets[-1]:
                    raise UpstreamFailures([exc]) from None
        raise AssertionError("unreachable")

    @staticmethod
    async def _lookup(awaitable: Any) -> Any:
        """Await an upstream call, turning a lone UpstreamError into UpstreamFailures."""
        try:
            return await awaitable
        except UpstreamError as exc:
            raise UpstreamFailures([exc]) from None


def forward(response: UpstreamResponse) -> Response:
    """The upstream's answer as it came: same status, same bytes."""
    return Response(
        response.content,
        status_code=response.status,
        headers={"content-type": response.content_type},
    )


def _envelope(response: UpstreamResponse) -> dict[str, Any] | None:
    if response.status != 200:
        return None
    try:
        data = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def should_fail_over(response: UpstreamResponse) -> bool:
    """Did the upstream refuse the work without doing any of it?"""
    if response.status in (429, 503):
        return True
    envelope = _envelope(response)
    if envelope is None:
        return False
    code = envelope.get("code")
    if code == 23:
        return True
    # The C# upstream reports a full queue as a plain system error.
    description = str(envelope.get("description") or envelope.get("message") or "").lower()
    return code == 9 and ("queue" in description or "队列" in description)


def accepted_task_id(response: UpstreamResponse) -> str | None:
    """The new task's id when the envelope says the submit was taken."""
    envelope = _envelope(response)
    if envelope is None or envelope.get("code") not in ACCEPTED_CODES:
        return None
    result = envelope.get("result")
    task_id = str(result) if isinstance(result, int | str) and not isinstance(result, bool) else ""
    return task_id if valid_task_id(task_id) else None
