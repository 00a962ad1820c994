"""``mjgate sim``: a simulated midjourney-proxy upstream.

Teams point their clients at it to develop without spending credits, and the gateway's tests
and benchmarks use it as the upstream. It plays each task's life over time, speaks the Java,
C# and relay flavors (auth style, not-found answer, error bodies, queue-full code), serves
both list spellings, ``query`` and the submit codes, and injects latency, errors, hangs and
queue-full answers on demand. ``/_sim/...`` is an unauthenticated control API for tests.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hmac
import random
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal, get_args

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import Receive, Scope, Send

from gateway.simroutes import BadRequest, Call, Handler, TaskRoutes
from gateway.simtasks import FAIL_REASONS, Art, Json, Reply, seeded_task

__all__ = ["SimSettings", "add_sim_arguments", "create_sim_app", "run_sim", "settings_from_args"]

Flavor = Literal["java", "csharp", "relay"]
AuthStyle = Literal["mj-api-secret", "bearer", "csharp"]
NotFoundStyle = Literal["empty", "204", "null", "400", "404"]
ListPaths = Literal["both", "list-by-ids", "list-by-condition"]

FLAVOR_AUTH: dict[str, AuthStyle] = {"java": "mj-api-secret", "csharp": "csharp", "relay": "bearer"}
FLAVOR_NOT_FOUND: dict[str, NotFoundStyle] = {"java": "empty", "csharp": "204", "relay": "400"}
# Settings /_sim/faults may change at run time.
RUNTIME_FIELDS = (
    "latency_ms",
    "error_rate",
    "error_status",
    "timeout_rate",
    "hang_s",
    "queue_full_rate",
    "failure_rate",
    "task_seconds",
)
PREFIXES = ("/mj", "/mj-fast", "/mj-relax", "/mj-turbo")
HISTORY = 200  # recent requests kept for /_sim/stats headers and paths
_JSON = b"application/json"
NOT_FOUND_REPLIES: dict[str, Reply] = {
    "empty": (200, b"", b""),
    "204": (204, b"", b""),
    "null": (200, b"null", _JSON),
    "400": (400, b'{"code":4,"description":"task_no_found","result":null}', _JSON),
    "404": (404, b'{"code":3,"description":"task not found"}', _JSON),
}


@dataclass(frozen=True, slots=True)
class SimSettings:
    """How the simulated upstream behaves. ``None`` for auth/not_found means the flavor's."""

    flavor: Literal["java", "csharp", "relay"] = "java"
    key: str | None = None
    auth: Literal["mj-api-secret", "bearer", "csharp"] | None = None
    not_found: Literal["empty", "204", "null", "400", "404"] | None = None
    list_paths: Literal["both", "list-by-ids", "list-by-condition"] = "both"
    supports_query: bool = True
    task_seconds: float = 8.0
    failure_rate: float = 0.1
    image_ttl_s: int = 86400
    latency_ms: float = 0.0
    error_rate: float = 0.0
    error_status: int = 500  # the status of injected errors: 500, 502, 503, 429...
    timeout_rate: float = 0.0
    hang_s: float = 30.0
    queue_full_rate: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("failure_rate", "error_rate", "timeout_rate", "queue_full_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        for name in ("task_seconds", "latency_ms", "hang_s", "image_ttl_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.flavor not in FLAVOR_AUTH:
            raise ValueError(f"flavor must be one of {', '.join(FLAVOR_AUTH)}")


def _now_ms() -> int:
    return int(time.time() * 1000)


class Stats:
    """What the sim saw on its ``/mj`` routes, for ``/_sim/stats``."""

    def __init__(self) -> None:
        self.inflight = 0
        self.reset()

    def reset(self) -> None:
        """Forget everything except the requests still in flight."""
        self.requests: dict[str, int] = {}
        self.prefixes: dict[str, int] = {}
        self.total = 0
        self.submits = 0
        self.max_inflight = self.inflight
        self.per_second: dict[int, int] = {}
        self.headers: deque[dict[str, str]] = deque(maxlen=HISTORY)
        self.paths: deque[str] = deque(maxlen=HISTORY)

    def arrive(self, key: str, prefix: str, scope: Scope) -> None:
        self.requests[key] = self.requests.get(key, 0) + 1
        self.prefixes[prefix] = self.prefixes.get(prefix, 0) + 1
        self.total += 1
        second = int(time.time())
        if second not in self.per_second:
            for old in [s for s in self.per_second if s <= second - 120]:
                del self.per_second[old]
        self.per_second[second] = self.per_second.get(second, 0) + 1
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope["headers"]:
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        self.headers.append(headers)
        path = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string") or b""
        self.paths.append((path + b"?" + query if query else path).decode("latin-1"))
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)

    def snapshot(self) -> Json:
        cutoff = int(time.time()) - 120
        return {
            "requests": dict(self.requests),
            "prefixes": dict(self.prefixes),
            "total": self.total,
            "submits": self.submits,
            "inflight": self.inflight,
            "max_inflight": self.max_inflight,
            "per_second": {str(s): n for s, n in sorted(self.per_second.items()) if s > cutoff},
            "headers": list(self.headers),
            "paths": list(self.paths),
        }


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


class Control:
    """``/_sim/...``: the unauthenticated control API for tests and benchmarks."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim

    @staticmethod
    def _json(value: Any, status: int = 200) -> Response:
        return Response(orjson.dumps(value), status_code=status, media_type="application/json")

    async def _body(self, request: Request) -> Json:
        raw = await request.body()
        value = orjson.loads(raw) if raw.strip() else {}
        if not isinstance(value, dict):
            raise BadRequest("body must be a JSON object")
        return value

    async def health(self, request: Request) -> Response:
        return self._json({"ok": True, "flavor": self.sim.flavor, "auth": self.sim.auth})

    async def stats(self, request: Request) -> Response:
        return self._json(self.sim.stats.snapshot())

    async def reset(self, request: Request) -> Response:
        body = await self._body(request)
        self.sim.stats.reset()
        if body.get("tasks") is True:
            self.sim.tasks.store.clear()
        return self._json({"ok": True})

    async def faults(self, request: Request) -> Response:
        sim = self.sim
        if request.method == "POST":
            body = await self._body(request)
            unknown = sorted(set(body) - set(RUNTIME_FIELDS))
            if unknown:
                return self._json({"error": f"unknown fields: {', '.join(unknown)}"}, 400)
            try:
                sim.settings = dataclasses.replace(sim.settings, **body)
            except (TypeError, ValueError) as exc:
                return self._json({"error": str(exc)}, 400)
        return self._json({name: getattr(sim.settings, name) for name in RUNTIME_FIELDS})

    async def seed_task(self, request: Request) -> Response:
        sim = self.sim
        body = await self._body(request)
        now = time.time()
        task_id = body.get("id")
        if body.pop("playing", False) is True:
            outcome, seconds = body.pop("outcome", None), body.pop("task_seconds", None)
            extra = {k: v for k, v in body.items() if k not in ("action", "prompt")}
            task = sim.tasks.new_task(
                str(body.get("action") or "IMAGINE"),
                str(body.get("prompt") or "a simulated task"),
                body,
                now=now,
                task_id=str(task_id) if task_id else None,
                extra=extra,
            )
            if outcome in ("SUCCESS", "FAILURE"):
                task.fail_reason = FAIL_REASONS[0] if outcome == "FAILURE" else None
            if isinstance(seconds, int | float) and seconds >= 0:
                task.duration = float(seconds)
        elif not isinstance(task_id, str) or not task_id:
            return self._json({"error": "a seeded task needs a string id"}, 400)
        else:
            task = seeded_task(body, now=now, art=Art(sim.rng), ttl_s=sim.settings.image_ttl_s)
        sim.tasks.store.add(task, now)
        return Response(task.body_bytes(now), media_type="application/json")

    async def get_task(self, request: Request) -> Response:
        task = self.sim.tasks.store.get(request.path_params["id"])
        if task is None:
            return self._json({"error": "no such task"}, 404)
        return Response(task.body_bytes(time.time()), media_type="application/json")

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/_sim/health", self.health, methods=["GET"]),
            Route("/_sim/stats", self.stats, methods=["GET"]),
            Route("/_sim/reset", self.reset, methods=["POST"]),
            Route("/_sim/faults", self.faults, methods=["GET", "POST"]),
            Route("/_sim/tasks", self.seed_task, methods=["POST"]),
            Route("/_sim/tasks/{id}", self.get_task, methods=["GET"]),
        ]


def create_sim_app(settings: SimSettings) -> Starlette:
    """The simulated upstream as a Starlette app; its ``Sim`` is at ``app.state.sim``."""
    sim = Sim(settings)
    control = Control(sim)
    # new-api relays also take the speed prefix in front of /mj: /mj-fast/mj/...
    mounts: list[BaseRoute] = [
        Mount(f"{speed}/mj", routes=sim.mj_routes(f"{speed}/mj")) for speed in PREFIXES[1:]
    ]
    mounts += [Mount(prefix, routes=sim.mj_routes(prefix)) for prefix in PREFIXES]

    async def bad_request(request: Request, exc: Exception) -> Response:
        return Control._json({"error": str(exc)}, 400)

    app = Starlette(
        routes=[*control.routes(), *mounts],
        exception_handlers={BadRequest: bad_request, orjson.JSONDecodeError: bad_request},
    )
    app.state.sim = sim
    return app


def add_sim_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--host``, ``--port`` and one flag per ``SimSettings`` field to ``parser``."""
    d = SimSettings()
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    add("--port", type=int, default=8090, help="port to listen on; 0 picks a free one")
    add("--flavor", choices=get_args(Flavor), default=d.flavor, help="upstream to imitate")
    add("--key", default=d.key, help="API key callers must present (default: no auth check)")
    add("--auth", choices=get_args(AuthStyle), default=None, help="auth style (default: flavor's)")
    add("--not-found", choices=get_args(NotFoundStyle), default=None, help="unknown-id answer")
    add("--list-paths", choices=get_args(ListPaths), default=d.list_paths, help="list spellings")
    add("--no-query", dest="supports_query", action="store_false", help="do not serve /task/query")
    add("--task-seconds", type=float, default=d.task_seconds, help="submit to terminal time")
    add("--failure-rate", type=float, default=d.failure_rate, help="share of tasks that fail")
    add("--image-ttl-s", type=int, default=d.image_ttl_s, help="image URL lifetime after finish")
    add("--latency-ms", type=float, default=d.latency_ms, help="latency added to /mj requests")
    add("--error-rate", type=float, default=d.error_rate, help="share of requests failing")
    add("--error-status", type=int, default=d.error_status, help="their status (default 500)")
    add("--timeout-rate", type=float, default=d.timeout_rate, help="share of requests that hang")
    add("--hang-s", type=float, default=d.hang_s, help="how long a hanging request hangs")
    add("--queue-full-rate", type=float, default=d.queue_full_rate, help="share of queue-full")
    add("--seed", type=int, default=d.seed, help="random seed for reproducible runs")


def settings_from_args(args: argparse.Namespace) -> SimSettings:
    """The ``SimSettings`` the parsed ``add_sim_arguments`` flags describe."""
    names = [field.name for field in dataclasses.fields(SimSettings)]
    return SimSettings(**{name: getattr(args, name) for name in names if hasattr(args, name)})


def run_sim(args: argparse.Namespace) -> None:
    """Serve the simulated upstream until interrupted; prints where it listens once bound."""
    settings = settings_from_args(args)
    config = uvicorn.Config(
        create_sim_app(settings),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )
    server = uvicorn.Server(config)

    async def serve() -> None:
        serving = asyncio.create_task(server.serve())
        while not server.started and not serving.done():
            await asyncio.sleep(0.01)
        if server.started:
            port = server.servers[0].sockets[0].getsockname()[1]
            print(f"mjgate sim ({settings.flavor}) listening on http://{args.host}:{port}")
            sys.stdout.flush()
        await serving

    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(serve())
