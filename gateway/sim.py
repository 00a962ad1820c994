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
import re
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import Receive, Scope, Send

from .simtasks import (
    FAIL_REASONS,
    TERMINAL,
    Art,
    Json,
    SimTask,
    TaskStore,
    action_for_custom_id,
    playing_task,
    query_page,
    scrambled,
    seeded_task,
)

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
    "timeout_rate",
    "hang_s",
    "queue_full_rate",
    "failure_rate",
    "task_seconds",
)
PREFIXES = ("/mj", "/mj-fast", "/mj-relax", "/mj-turbo")
HISTORY = 200
QUEUE_SLOTS = 3
_JSON = b"application/json"
_BANNED = re.compile(r"\bbanned\b", re.IGNORECASE)
_SIMPLE_CHANGE = re.compile(r"^\s*(\S+)\s+([UV][1-4]|R)\s*$", re.IGNORECASE)


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


Reply = tuple[int, bytes, bytes]  # status, body, content type (b"" = none)


class BadRequest(Exception):
    """The request body is not the JSON object the route needs."""


class Call:
    """One request to a ``/mj`` route, as a handler sees it."""

    __slots__ = ("params", "raw")

    def __init__(self, params: dict[str, Any], raw: bytes) -> None:
        self.params = params
        self.raw = raw

    def json(self) -> Json:
        if not self.raw.strip():
            return {}
        try:
            value = orjson.loads(self.raw)
        except orjson.JSONDecodeError as exc:
            raise BadRequest("request body is not valid JSON") from exc
        if not isinstance(value, dict):
            raise BadRequest("request body must be a JSON object")
        return value


Handler = Callable[[Call], Reply]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def _text(body: Json, name: str) -> str:
    value = body.get(name)
    return value.strip() if isinstance(value, str) else ""


class Stats:
    """What the sim saw on its ``/mj`` routes, for ``/_sim/stats``."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests: dict[str, int] = {}
        self.prefixes: dict[str, int] = {}
        self.total = 0
        self.submits = 0
        self.inflight = 0
        self.max_inflight = 0
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
    """The simulated upstream's state and its ``/mj`` handlers."""

    def __init__(self, settings: SimSettings) -> None:
        self.settings = settings  # replaced (never mutated) by /_sim/faults
        self.rng = random.Random(settings.seed)
        self.store = TaskStore()
        self.stats = Stats()
        self.flavor = settings.flavor
        self.key = (settings.key or "").encode()
        self.auth: AuthStyle = settings.auth or FLAVOR_AUTH[settings.flavor]
        self.not_found = self._not_found_reply(settings.not_found or FLAVOR_NOT_FOUND[self.flavor])
        self.instance = str(self.rng.randrange(10**18, 10**19))

    # -- request pipeline ------------------------------------------------------------------

    async def serve(self, endpoint: MjEndpoint, scope: Scope, receive: Receive) -> Reply:
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
            return self._error(500, "simulated upstream error")
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
            # C# upstream: Authorization wins and is compared raw; "Bearer KEY" fails.
            given = found.get(b"authorization", found.get(b"mj-api-secret"))
        else:
            scheme, _, token = found.get(b"authorization", b"").strip().partition(b" ")
            given = token.strip() if scheme.lower() == b"bearer" else None
        return given is not None and hmac.compare_digest(given, self.key)

    def _unauthorized(self) -> Reply:
        if self.auth == "mj-api-secret":
            return 401, b"", b""
        if self.auth == "csharp":
            return 401, self._csharp_error("unauthorized"), _JSON
        return 401, _dumps({"error": {"message": "invalid token", "type": "auth_error"}}), _JSON

    def _csharp_error(self, message: str) -> bytes:
        return _dumps({"success": False, "code": -1, "message": message, "timestamp": _now_ms()})

    def _error(self, status: int, message: str) -> Reply:
        """An error answer in the flavor's style (Java: Spring's plain reason phrase)."""
        if self.flavor == "java":
            phrases = {400: b"Bad Request", 404: b"Not Found", 500: b"Internal Server Error"}
            return status, phrases.get(status, b"Error"), b"text/plain; charset=utf-8"
        if self.flavor == "csharp":
            return status, self._csharp_error(message), _JSON
        code = {400: 4, 404: 3}.get(status, 9)
        return status, _dumps({"code": code, "description": message}), _JSON

    @staticmethod
    def _not_found_reply(style: NotFoundStyle) -> Reply:
        return {
            "empty": (200, b"", b""),
            "204": (204, b"", b""),
            "null": (200, b"null", _JSON),
            "400": (400, b'{"code":4,"description":"task_no_found","result":null}', _JSON),
            "404": (404, b'{"code":3,"description":"task not found"}', _JSON),
        }[style]

    def not_served(self, call: Call) -> Reply:
        """A route this sim is configured not to serve (other list spelling, query)."""
        return self._error(404, "route not served by this upstream")

    # -- submits ---------------------------------------------------------------------------

    def _envelope(self, code: int, description: str, result: Any = None, **props: Any) -> Reply:
        body = {"code": code, "description": description, "result": result, "properties": props}
        return 200, _dumps(body), _JSON

    def _refused(self, prompt: str) -> Reply | None:
        """Banned prompt or full queue: the submit is not accepted."""
        if _BANNED.search(prompt):
            return self._envelope(
                24, "May contain sensitive words", None, promptEn=prompt, bannedWord="banned"
            )
        rate = self.settings.queue_full_rate
        if rate > 0 and self.rng.random() < rate:
            if self.flavor == "csharp":
                return self._envelope(9, "queue is full, please try again later")
            return self._envelope(
                23, "队列已满\uff0c请稍后尝试", None, discordInstanceId=self.instance
            )
        return None

    def _accept(self, task: SimTask, now: float) -> Reply:
        ahead = self.store.busy(now)
        self.store.add(task, now)
        if task.start is None:
            return self._envelope(21, "Waiting for window confirm", task.task_id)
        if ahead > QUEUE_SLOTS:
            return self._envelope(
                22,
                f"In queue, there are {ahead - QUEUE_SLOTS} tasks ahead",
                task.task_id,
                numberOfQueues=ahead - QUEUE_SLOTS,
                discordInstanceId=self.instance,
            )
        return self._envelope(1, "Submit success", task.task_id, discordInstanceId=self.instance)

    def new_task(
        self,
        action: str,
        prompt: str,
        body: Json,
        *,
        now: float,
        task_id: str | None = None,
        modal: bool = False,
        custom_id: str = "",
        properties: Json | None = None,
        extra: Json | None = None,
    ) -> SimTask:
        """A playing task; its outcome (SUCCESS or FAILURE) is drawn now."""
        settings = self.settings
        failing = settings.failure_rate > 0 and self.rng.random() < settings.failure_rate
        return playing_task(
            task_id or self.store.new_id(self.rng, now),
            action,
            prompt,
            now=now,
            duration=settings.task_seconds,
            fail_reason=self.rng.choice(FAIL_REASONS) if failing else None,
            ttl_s=settings.image_ttl_s,
            art=Art(self.rng),
            modal=modal,
            custom_id=custom_id,
            state=_text(body, "state"),
            properties=properties,
            extra=extra,
        )

    def _submit(self, action: str, prompt: str, body: Json) -> Reply:
        refused = self._refused(prompt)
        if refused is not None:
            return refused
        now = time.time()
        return self._accept(self.new_task(action, prompt, body, now=now), now)

    def _parent(self, task_id: Any) -> SimTask | Reply:
        if not isinstance(task_id, str) or not task_id.strip():
            return self._envelope(4, "taskId cannot be empty")
        parent = self.store.get(task_id.strip())
        if parent is None:
            return self._envelope(3, "task not found")
        if parent.status(time.time()) != "SUCCESS":
            return self._envelope(4, "the related task is not SUCCESS")
        return parent

    def _follow_up(self, parent: SimTask, action: str, custom_id: str, body: Json) -> Reply:
        view = parent.view(time.time())
        prompt = str(view.get("prompt") or "")
        refused = self._refused(prompt)
        if refused is not None:
            return refused
        now = time.time()
        modal = "CustomZoom" in custom_id or "Inpaint" in custom_id
        props = {"finalPrompt": view.get("promptEn") or prompt, "parentTaskId": parent.task_id}
        task = self.new_task(
            action, prompt, body, now=now, modal=modal, custom_id=custom_id, properties=props
        )
        return self._accept(task, now)

    def imagine(self, call: Call) -> Reply:
        body = call.json()
        prompt = _text(body, "prompt")
        if not prompt:
            return self._envelope(4, "prompt cannot be empty")
        return self._submit("IMAGINE", prompt, body)

    def shorten(self, call: Call) -> Reply:
        body = call.json()
        prompt = _text(body, "prompt")
        if not prompt:
            return self._envelope(4, "prompt cannot be empty")
        return self._submit("SHORTEN", prompt, body)

    def edits(self, call: Call) -> Reply:
        body = call.json()
        prompt = _text(body, "prompt")
        if not prompt:
            return self._envelope(4, "prompt cannot be empty")
        return self._submit("EDIT", prompt, body)

    def video(self, call: Call) -> Reply:
        body = call.json()
        prompt = _text(body, "prompt")
        if not prompt and not body.get("image") and not body.get("base64"):
            return self._envelope(4, "prompt or image is required")
        return self._submit("VIDEO", prompt, body)

    def blend(self, call: Call) -> Reply:
        body = call.json()
        images = body.get("base64Array")
        if not isinstance(images, list) or not 2 <= len(images) <= 5:
            return self._envelope(4, "base64Array must hold 2 to 5 images")
        return self._submit("BLEND", f"blend of {len(images)} images", body)

    def describe(self, call: Call) -> Reply:
        body = call.json()
        if not body.get("base64") and not body.get("link"):
            return self._envelope(4, "base64 or link is required")
        return self._submit("DESCRIBE", "", body)

    def show(self, call: Call) -> Reply:
        body = call.json()
        if not _text(body, "jobId"):
            return self._envelope(4, "jobId cannot be empty")
        return self._submit("SHOW", "", body)

    def swap_face(self, call: Call) -> Reply:
        body = call.json()
        if not body.get("sourceBase64") or not body.get("targetBase64"):
            return self._envelope(4, "sourceBase64 and targetBase64 are required")
        return self._submit("SWAP_FACE", "", body)

    def upload(self, call: Call) -> Reply:
        images = call.json().get("base64Array")
        if not isinstance(images, list) or not images:
            return self._envelope(4, "base64Array cannot be empty")
        urls = [
            f"https://cdn.discordapp.com/attachments/{self.instance}/"
            f"{self.rng.randrange(10**18, 10**19)}/upload_{n}.png"
            for n in range(len(images))
        ]
        return self._envelope(1, "success", urls)

    def action(self, call: Call) -> Reply:
        body = call.json()
        parent = self._parent(body.get("taskId"))
        if not isinstance(parent, SimTask):
            return parent
        custom_id = _text(body, "customId")
        if not custom_id:
            return self._envelope(4, "customId cannot be empty")
        return self._follow_up(parent, action_for_custom_id(custom_id), custom_id, body)

    def change(self, call: Call) -> Reply:
        body = call.json()
        parent = self._parent(body.get("taskId"))
        if not isinstance(parent, SimTask):
            return parent
        return self._change(parent, str(body.get("action") or "").upper(), body.get("index"), body)

    def simple_change(self, call: Call) -> Reply:
        body = call.json()
        match = _SIMPLE_CHANGE.match(str(body.get("content") or ""))
        if match is None:
            return self._envelope(4, "content must look like '<taskId> U1'")
        parent = self._parent(match[1])
        if not isinstance(parent, SimTask):
            return parent
        kind = match[2].upper()
        action = {"U": "UPSCALE", "V": "VARIATION", "R": "REROLL"}[kind[0]]
        return self._change(parent, action, int(kind[1:] or 0), body)

    def _change(self, parent: SimTask, action: str, index: Any, body: Json) -> Reply:
        job = parent.art.job
        if action == "REROLL":
            return self._follow_up(parent, action, f"MJ::JOB::reroll::0::{job}::SOLO", body)
        if action not in ("UPSCALE", "VARIATION"):
            return self._envelope(4, "action must be UPSCALE, VARIATION or REROLL")
        if isinstance(index, bool) or not isinstance(index, int) or not 1 <= index <= 4:
            return self._envelope(4, "index must be 1 to 4")
        kind = "upsample" if action == "UPSCALE" else "variation"
        return self._follow_up(parent, action, f"MJ::JOB::{kind}::{index}::{job}", body)

    def modal(self, call: Call) -> Reply:
        body = call.json()
        task_id = body.get("taskId")
        if not isinstance(task_id, str) or not task_id.strip():
            return self._envelope(4, "taskId cannot be empty")
        task = self.store.get(task_id.strip())
        if task is None:
            return self._envelope(3, "task not found")
        now = time.time()
        if task.status(now) != "MODAL":
            return self._envelope(4, "the task is not waiting in MODAL")
        prompt = _text(body, "prompt") or str(task.view(now).get("prompt") or "")
        refused = self._refused(prompt)
        if refused is not None:
            return refused
        if task.frozen:  # a seeded MODAL task starts playing with today's settings
            task.frozen, task.duration = False, self.settings.task_seconds
        task.base = {**task.base, "prompt": prompt, "promptEn": prompt}
        task.base["properties"] = {**(task.base.get("properties") or {}), "finalPrompt": prompt}
        if isinstance(body.get("maskBase64"), str):
            task.base["maskBase64"] = body["maskBase64"]
        task.start = now
        self.store.add(task, now)
        return self._envelope(1, "Submit success", task.task_id, discordInstanceId=self.instance)

    # -- task lookups ----------------------------------------------------------------------

    def fetch(self, call: Call) -> Reply:
        task = self.store.get(call.params["id"])
        if task is None:
            return self.not_found
        return 200, task.body_bytes(time.time()), _JSON

    def _array(self, tasks: list[SimTask]) -> Reply:
        now = time.time()
        return 200, b"[" + b",".join(task.body_bytes(now) for task in tasks) + b"]", _JSON

    def list_by_ids(self, call: Call) -> Reply:
        ids = call.json().get("ids")
        wanted = list(dict.fromkeys(str(i) for i in ids)) if isinstance(ids, list) else []
        found = [task for task in map(self.store.get, wanted) if task is not None]
        return self._array(scrambled(found, [task.task_id for task in found]))

    def query(self, call: Call) -> Reply:
        return 200, _dumps(query_page(self.store.views(time.time()), call.json())), _JSON

    def recent(self, call: Call) -> Reply:
        now = time.time()
        tasks = sorted(
            self.store.tasks.values(),
            key=lambda t: (_int_or_zero(t.view(now).get("submitTime")), t.task_id),
            reverse=True,
        )
        return self._array(tasks[:100])

    def queue(self, call: Call) -> Reply:
        return self._array(self.store.unfinished(time.time()))

    def image_seed(self, call: Call) -> Reply:
        task = self.store.get(call.params["id"])
        if task is None:
            return self.not_found
        view = task.view(time.time())
        if view.get("status") != "SUCCESS":
            return self._envelope(4, "the task is not SUCCESS")
        properties = dict(view.get("properties") or {})
        seed = str(properties.get("seed") or self.rng.randrange(10**8, 10**10))
        task.freeze({**view, "seed": seed, "properties": {**properties, "seed": seed}})
        return 200, _dumps({"code": 1, "description": "success", "result": seed}), _JSON

    def cancel(self, call: Call) -> Reply:
        task = self.store.get(call.params["id"])
        if task is None:
            return self.not_found
        now = time.time()
        view = task.view(now)
        if view.get("status") in TERMINAL:
            return self._envelope(4, "task already finished")
        task.freeze({**view, "status": "CANCEL", "finishTime": int(now * 1000)})
        self.store.unfinished(now)
        return self._envelope(1, "success", task.task_id)

    # -- routes ----------------------------------------------------------------------------

    def mj_routes(self, prefix: str) -> list[BaseRoute]:
        """Every ``/mj`` route under ``prefix`` (``/mj`` itself or a speed prefix)."""
        settings = self.settings
        submit: dict[str, Handler] = {
            "/submit/imagine": self.imagine,
            "/submit/action": self.action,
            "/submit/modal": self.modal,
            "/submit/blend": self.blend,
            "/submit/describe": self.describe,
            "/submit/shorten": self.shorten,
            "/submit/show": self.show,
            "/submit/change": self.change,
            "/submit/simple-change": self.simple_change,
            "/submit/upload-discord-images": self.upload,
            "/submit/edits": self.edits,
            "/submit/video": self.video,
            "/insight-face/swap": self.swap_face,
        }
        served = {"both": ("ids", "condition"), "list-by-ids": ("ids",)}
        spellings = served.get(settings.list_paths, ("condition",))
        other: list[tuple[str, str, Handler]] = [
            ("GET", "/task/{id}/fetch", self.fetch),
            ("GET", "/task/list", self.recent),
            ("GET", "/task/queue", self.queue),
            ("GET", "/task/{id}/image-seed", self.image_seed),
            ("POST", "/task/{id}/cancel", self.cancel),
            ("POST", "/task/query", self.query if settings.supports_query else self.not_served),
            *(
                (
                    "POST",
                    f"/task/list-by-{s}",
                    self.list_by_ids if s in spellings else self.not_served,
                )
                for s in ("ids", "condition")
            ),
        ]
        table = [("POST", path, handler, True) for path, handler in submit.items()]
        table += [(method, path, handler, False) for method, path, handler in other]
        return [
            Route(
                path,
                MjEndpoint(self, f"{method} {prefix}{path}", prefix, handler, is_submit),
                methods=[method],
            )
            for method, path, handler, is_submit in table
        ]


def _int_or_zero(value: Any) -> int:
    return value if isinstance(value, int) else 0


class Control:
    """``/_sim/...``: the unauthenticated control API for tests and benchmarks."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim

    @staticmethod
    def _json(value: Any, status: int = 200) -> Response:
        return Response(_dumps(value), status_code=status, media_type="application/json")

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
            self.sim.store.clear()
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
            extra = {k: v for k, v in body.items() if k not in ("action", "prompt")}
            task = sim.new_task(
                str(body.get("action") or "IMAGINE"),
                str(body.get("prompt") or "a simulated task"),
                body,
                now=now,
                task_id=str(task_id) if task_id else None,
                extra=extra,
            )
        elif not isinstance(task_id, str) or not task_id:
            return self._json({"error": "a seeded task needs a string id"}, 400)
        else:
            task = seeded_task(body, now=now, art=Art(sim.rng), ttl_s=sim.settings.image_ttl_s)
        sim.store.add(task, now)
        return Response(task.body_bytes(now), media_type="application/json")

    async def get_task(self, request: Request) -> Response:
        task = self.sim.store.get(request.path_params["id"])
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
    add("--error-rate", type=float, default=d.error_rate, help="share of requests answered 500")
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
