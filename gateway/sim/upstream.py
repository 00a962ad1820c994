"""The simulated upstream's ``/mj`` side: auth in the flavor's style, injected faults, stats,
then the task routes' handler."""

from __future__ import annotations

import asyncio
import hmac
import random
import time

import orjson
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from gateway.sim.routes import BadRequest, Call, Handler, Reply, TaskRoutes
from gateway.sim.settings import FLAVOR_AUTH, FLAVOR_NOT_FOUND, AuthStyle, SimSettings
from gateway.sim.stats import Stats

__all__ = ["NOT_FOUND_REPLIES", "MjEndpoint", "Sim"]

_JSON = b"application/json"
NOT_FOUND_REPLIES: dict[str, Reply] = {
    "empty": (200, b"", b""),
    "204": (204, b"", b""),
    "null": (200, b"null", _JSON),
    "400": (400, b'{"code":4,"description":"task_no_found","result":null}', _JSON),
    "404": (404, b'{"code":3,"description":"task not found"}', _JSON),
}


def _now_ms() -> int:
    return int(time.time() * 1000)


class MjEndpoint:
    """The ASGI app behind one ``/mj`` route: stats, auth and faults, then the handler."""

    def __init__(self, sim: Sim, key: str, prefix: str, handler: Handler, submit: bool) -> None:
        self.sim = sim
        self.key = key
        self.prefix = prefix
        self.handler = handler
        self.submit = submit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stats = self.sim.stats
        stats.arrive(self.key, self.prefix, scope)
        try:
            status, body, content_type = await self.sim.serve(self, scope, receive)
            headers = [(b"content-length", str(len(body)).encode())]
            if content_type:
                headers.append((b"content-type", content_type))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        finally:
            stats.inflight -= 1


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


class Sim:
    """The simulated upstream: settings, stats, and the auth/fault pipeline of ``/mj``."""

    def __init__(self, settings: SimSettings) -> None:
        self.settings = settings  # replaced (never mutated) by /_sim/faults
        self.rng = random.Random(settings.seed)
        self.stats = Stats()
        self.flavor = settings.flavor
        self.key = (settings.key or "").encode()
        self.auth: AuthStyle = settings.auth or FLAVOR_AUTH[settings.flavor]
        not_found = NOT_FOUND_REPLIES[settings.not_found or FLAVOR_NOT_FOUND[self.flavor]]
        self.tasks = TaskRoutes(lambda: self.settings, self.rng, not_found)

    async def serve(self, endpoint: MjEndpoint, scope: Scope, receive: Receive) -> Reply:
        """Latency, auth, hang and error injection, then the route's handler."""
        settings = self.settings
        if settings.latency_ms > 0:
            await asyncio.sleep(settings.latency_ms / 1000)
        if self.key and not self._authorized(scope["headers"]):
            return self._unauthorized()
        if endpoint.submit:
            self.stats.submits += 1
        if settings.timeout_rate > 0 and self.rng.random() < settings.timeout_rate:
            await asyncio.sleep(settings.hang_s)
        if settings.error_rate > 0 and self.rng.random() < settings.error_rate:
            return self._error(settings.error_status, "simulated upstream error")
        raw = await _read_body(receive) if scope["method"] == "POST" else b""
        try:
            return endpoint.handler(Call(scope["path_params"], raw))
        except BadRequest as exc:
            return self._error(400, str(exc))

    def _authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        found = dict(headers)  # ASGI servers lowercase header names
        if self.auth == "mj-api-secret":
            given = found.get(b"mj-api-secret")
        elif self.auth == "csharp":
            # The C# upstream reads Authorization first and raw: "Bearer KEY" fails.
            given = found.get(b"authorization", found.get(b"mj-api-secret"))
        else:
            scheme, _, token = found.get(b"authorization", b"").strip().partition(b" ")
            given = token.strip() if scheme.lower() == b"bearer" else None
        return given is not None and hmac.compare_digest(given, self.key)

    def _unauthorized(self) -> Reply:
        if self.auth == "mj-api-secret":
            return 401, b"", b""
        if self.auth == "csharp":
            return 401, _csharp_error("unauthorized"), _JSON
        return (
            401,
            orjson.dumps({"error": {"message": "invalid token", "type": "auth_error"}}),
            _JSON,
        )

    def _error(self, status: int, message: str) -> Reply:
        """An error answer in the flavor's style (Java: the plain reason phrase)."""
        if self.settings.echo_key:
            message = f"{message} (key {self.key.decode()})"
        if self.flavor == "java":
            phrases = {400: b"Bad Request", 404: b"Not Found", 500: b"Internal Server Error"}
            return status, phrases.get(status, b"Error"), b"text/plain; charset=utf-8"
        if self.flavor == "csharp":
            return status, _csharp_error(message), _JSON
        code = {400: 4, 404: 3}.get(status, 9)
        return status, orjson.dumps({"code": code, "description": message}), _JSON

    def not_served(self, call: Call) -> Reply:
        """A route this sim is configured not to serve (the other list spelling, query)."""
        return self._error(404, "route not served by this upstream")

    def mj_routes(self, prefix: str) -> list[BaseRoute]:
        """Every ``/mj`` route under ``prefix`` (``/mj`` itself or a speed prefix)."""
        settings = self.settings
        handlers = self.tasks.handlers()
        list_paths = {
            "list-by-ids": "/task/list-by-condition",
            "list-by-condition": "/task/list-by-ids",
        }
        unserved = {list_paths.get(settings.list_paths, "")}
        if not settings.supports_query:
            unserved.add("/task/query")
        return [
            Route(
                path,
                MjEndpoint(
                    self,
                    f"{method} {prefix}{path}",
                    prefix,
                    self.not_served if path in unserved else handler,
                    submit=path.startswith(("/submit/", "/insight-face/")),
                ),
                methods=[method],
            )
            for (method, path), handler in handlers.items()
        ]


def _csharp_error(message: str) -> bytes:
    return orjson.dumps({"success": False, "code": -1, "message": message, "timestamp": _now_ms()})
