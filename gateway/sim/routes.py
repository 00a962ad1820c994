"""The task routes of the simulated upstream: submits, lookups and task actions.

``TaskRoutes`` holds them as ``Call -> Reply`` handlers; ``gateway.sim.upstream`` wraps them
with auth, faults and stats.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from gateway.protocol import TERMINAL
from gateway.sim.hooks import HookCaller
from gateway.sim.order import scrambled
from gateway.sim.query import query_page
from gateway.sim.settings import SimSettings
from gateway.sim.tasks import (
    FAIL_REASONS,
    Art,
    Json,
    SimTask,
    TaskStore,
    action_for_custom_id,
    playing_task,
)

__all__ = ["BadRequest", "Call", "Handler", "Reply", "TaskRoutes", "envelope"]

Reply = tuple[int, bytes, bytes]  # status, body, content type (b"" = none)
_BANNED = re.compile(r"\bbanned\b", re.IGNORECASE)
_SIMPLE_CHANGE = re.compile(r"^\s*(\S+)\s+([UV][1-4]|R)\s*$", re.IGNORECASE)
_JSON = b"application/json"
QUEUE_SLOTS = 3  # tasks running at once before new ones answer 22 "in queue"


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


def _text(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    return value.strip() if isinstance(value, str) else ""


def _present(value: Any) -> bool:
    return bool(value.strip()) if isinstance(value, str) else value not in (None, [], {})


def _int_or_zero(value: Any) -> int:
    return value if isinstance(value, int) else 0


def envelope(code: int, description: str, result: Any = None, **properties: Any) -> Reply:
    """The submit answer: ``{code, description, result, properties}`` with HTTP 200."""
    body = {"code": code, "description": description, "result": result, "properties": properties}
    return 200, orjson.dumps(body), _JSON


# Submits that make a fresh task: action, and the body fields they need (all, or any one).
SIMPLE_SUBMITS: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "/submit/imagine": ("IMAGINE", ("prompt",), True),
    "/submit/shorten": ("SHORTEN", ("prompt",), True),
    "/submit/edits": ("EDIT", ("prompt",), True),
    "/submit/video": ("VIDEO", ("prompt", "image", "base64"), False),
    "/submit/describe": ("DESCRIBE", ("base64", "link"), False),
    "/submit/show": ("SHOW", ("jobId",), True),
    "/insight-face/swap": ("SWAP_FACE", ("sourceBase64", "targetBase64"), True),
}


class TaskRoutes:
    """The submit and task routes of the simulated upstream, as ``Call -> Reply`` handlers."""

    def __init__(
        self, settings: Callable[[], SimSettings], rng: random.Random, not_found: Reply
    ) -> None:
        self.settings = settings  # a getter: /_sim/faults replaces the settings at run time
        self.rng = rng
        self.not_found = not_found
        self.store = TaskStore()
        self.hooks = HookCaller(self.store, enabled=settings().flavor != "relay")
        self.instance = str(rng.randrange(10**18, 10**19))

    def handlers(self) -> dict[tuple[str, str], Handler]:
        """Every route this side serves, by (method, path under ``/mj``)."""
        routes: dict[tuple[str, str], Handler] = {
            ("POST", path): self._simple(action, fields, need_all)
            for path, (action, fields, need_all) in SIMPLE_SUBMITS.items()
        }
        routes.update(
            {
                ("POST", "/submit/blend"): self.blend,
                ("POST", "/submit/upload-discord-images"): self.upload,
                ("POST", "/submit/action"): self.action,
                ("POST", "/submit/change"): self.change,
                ("POST", "/submit/simple-change"): self.simple_change,
                ("POST", "/submit/modal"): self.modal,
                ("GET", "/task/{id}/fetch"): self.fetch,
                ("GET", "/task/list"): self.recent,
                ("GET", "/task/queue"): self.queue,
                ("GET", "/task/{id}/image-seed"): self.image_seed,
                ("POST", "/task/{id}/cancel"): self.cancel,
                ("POST", "/task/query"): self.query,
                ("POST", "/task/list-by-ids"): self.list_by_ids,
                ("POST", "/task/list-by-condition"): self.list_by_ids,
            }
        )
        return routes

    # -- submits ---------------------------------------------------------------------------

    def new_task(
        self,
        action: str,
        prompt: str,
        body: Mapping[str, Any],
        *,
        now: float,
        task_id: str | None = None,
        modal: bool = False,
        custom_id: str = "",
        properties: Json | None = None,
        extra: Json | None = None,
    ) -> SimTask:
        """A playing task; whether it ends SUCCESS or FAILURE is drawn now."""
        settings = self.settings()
        failing = settings.failure_rate > 0 and self.rng.random() < settings.failure_rate
        task = playing_task(
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
        self.hooks.remember(task.task_id, body.get("notifyHook"))
        return task

    def _refused(self, prompt: str) -> Reply | None:
        """Banned prompt or full queue: the submit is not accepted."""
        if _BANNED.search(prompt):
            return envelope(
                24, "May contain sensitive words", None, promptEn=prompt, bannedWord="banned"
            )
        settings = self.settings()
        if settings.queue_full_rate > 0 and self.rng.random() < settings.queue_full_rate:
            if settings.flavor == "csharp":  # the C# upstream reports a full queue as code 9
                return envelope(9, "queue is full, please try again later")
            return envelope(23, "队列已满\uff0c请稍后尝试", None, discordInstanceId=self.instance)
        return None

    def _accept(self, task: SimTask, now: float) -> Reply:
        running = self.store.busy(now)
        self.store.add(task, now)
        if task.start is None:
            return envelope(21, "Waiting for window confirm", task.task_id)
        if running > QUEUE_SLOTS:
            ahead = running - QUEUE_SLOTS
            return envelope(
                22,
                f"In queue, there are {ahead} tasks ahead",
                task.task_id,
                numberOfQueues=ahead,
                discordInstanceId=self.instance,
            )
        return envelope(1, "Submit success", task.task_id, discordInstanceId=self.instance)

    def _submit(self, action: str, prompt: str, body: Json) -> Reply:
        refused = self._refused(prompt)
        if refused is not None:
            return refused
        now = time.time()
        return self._accept(self.new_task(action, prompt, body, now=now), now)

    def _simple(self, action: str, fields: tuple[str, ...], need_all: bool) -> Handler:
        check = all if need_all else any
        message = (" and " if need_all else " or ").join(fields) + " required"

        def handler(call: Call) -> Reply:
            body = call.json()
            if not check(_present(body.get(name)) for name in fields):
                return envelope(4, message)
            return self._submit(action, _text(body, "prompt"), body)

        return handler

    def blend(self, call: Call) -> Reply:
        body = call.json()
        images = body.get("base64Array")
        if not isinstance(images, list) or not 2 <= len(images) <= 5:
            return envelope(4, "base64Array must hold 2 to 5 images")
        return self._submit("BLEND", f"blend of {len(images)} images", body)

    def upload(self, call: Call) -> Reply:
        images = call.json().get("base64Array")
        if not isinstance(images, list) or not images:
            return envelope(4, "base64Array required")
        urls = [
            f"https://cdn.discordapp.com/attachments/{self.instance}/"
            f"{self.rng.randrange(10**18, 10**19)}/upload_{n}.png"
            for n in range(len(images))
        ]
        return envelope(1, "success", urls)

    def _parent(self, task_id: Any) -> SimTask | Reply:
        if not isinstance(task_id, str) or not task_id.strip():
            return envelope(4, "taskId required")
        parent = self.store.get(task_id.strip())
        if parent is None:
            return envelope(3, "task not found")
        if parent.status(time.time()) != "SUCCESS":
            return envelope(4, "the related task is not SUCCESS")
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

    def action(self, call: Call) -> Reply:
        body = call.json()
        parent = self._parent(body.get("taskId"))
        if not isinstance(parent, SimTask):
            return parent
        custom_id = _text(body, "customId")
        if not custom_id:
            return envelope(4, "customId required")
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
            return envelope(4, "content must look like '<taskId> U1'")
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
            return envelope(4, "action must be UPSCALE, VARIATION or REROLL")
        if isinstance(index, bool) or not isinstance(index, int) or not 1 <= index <= 4:
            return envelope(4, "index must be 1 to 4")
        kind = "upsample" if action == "UPSCALE" else "variation"
        return self._follow_up(parent, action, f"MJ::JOB::{kind}::{index}::{job}", body)

    def modal(self, call: Call) -> Reply:
        body = call.json()
        task_id = body.get("taskId")
        if not isinstance(task_id, str) or not task_id.strip():
            return envelope(4, "taskId required")
        task = self.store.get(task_id.strip())
        if task is None:
            return envelope(3, "task not found")
        now = time.time()
        if task.status(now) != "MODAL":
            return envelope(4, "the task is not waiting in MODAL")
        prompt = _text(body, "prompt") or str(task.view(now).get("prompt") or "")
        refused = self._refused(prompt)
        if refused is not None:
            return refused
        if task.frozen:  # a seeded MODAL task starts playing with today's settings
            task.frozen, task.duration = False, self.settings().task_seconds
        properties = {**(task.base.get("properties") or {}), "finalPrompt": prompt}
        task.base = {**task.base, "prompt": prompt, "promptEn": prompt, "properties": properties}
        if isinstance(body.get("maskBase64"), str):
            task.base["maskBase64"] = body["maskBase64"]
        task.start = now
        self.store.add(task, now)
        return envelope(1, "Submit success", task.task_id, discordInstanceId=self.instance)

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
        page = query_page(self.store.views(time.time()), call.json())
        return 200, orjson.dumps(page), _JSON

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
            return envelope(4, "the task is not SUCCESS")
        properties = dict(view.get("properties") or {})
        seed = str(properties.get("seed") or self.rng.randrange(10**8, 10**10))
        task.freeze({**view, "seed": seed, "properties": {**properties, "seed": seed}})
        return 200, orjson.dumps({"code": 1, "description": "success", "result": seed}), _JSON

    def cancel(self, call: Call) -> Reply:
        task = self.store.get(call.params["id"])
        if task is None:
            return self.not_found
        now = time.time()
        view = task.view(now)
        if view.get("status") in TERMINAL:
            return envelope(4, "task already finished")
        task.freeze({**view, "status": "CANCEL", "finishTime": int(now * 1000)})
        self.store.unfinished(now)
        return envelope(1, "success", task.task_id)
