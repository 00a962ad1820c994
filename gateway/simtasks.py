"""Task side of the simulated upstream (``gateway.sim``): the task model and its routes.

A playing task computes its phase lazily from the time its life started; there is no
background loop. The first read that finds it terminal freezes it: its JSON is stored, its
bytes are cached, and it never changes again except for image-seed. Seeded tasks are frozen
from the start and are served exactly as they were given. ``TaskRoutes`` holds the submit
and lookup handlers; ``gateway.sim`` wraps them with auth, faults and stats.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import orjson

__all__ = [
    "FAIL_REASONS",
    "MAX_TASKS",
    "TERMINAL",
    "Art",
    "BadRequest",
    "Call",
    "Handler",
    "Json",
    "Knobs",
    "Reply",
    "SimTask",
    "TaskRoutes",
    "TaskStore",
    "action_for_custom_id",
    "envelope",
    "image_url",
    "playing_task",
    "query_page",
    "scrambled",
    "seeded_task",
]

Json = dict[str, Any]
Reply = tuple[int, bytes, bytes]  # status, body, content type (b"" = none)

TERMINAL = frozenset({"SUCCESS", "FAILURE", "CANCEL"})
# Real upstreams purge old tasks too; this keeps a long benchmark from eating the machine.
MAX_TASKS = 200_000
NOT_START_END = 0.05
SUBMITTED_END = 0.15
FAIL_REASONS = (
    "[Invalid parameter] Invalid aspect ratio",
    "Action needed to continue",
    "Job action restricted",
    "Request cancelled due to image filters",
)
GRID_ACTIONS = frozenset(
    {"IMAGINE", "VARIATION", "REROLL", "BLEND", "PAN", "ZOOM", "INPAINT", "SHOW"}
)
# Fields the life of a playing task owns; seeded values for them would be overwritten anyway.
LIFE_FIELDS = frozenset(
    {"status", "progress", "startTime", "finishTime", "imageUrl", "failReason", "buttons"}
)
_WORD = re.compile(r"[a-z0-9]+")
_BANNED = re.compile(r"\bbanned\b", re.IGNORECASE)
_SIMPLE_CHANGE = re.compile(r"^\s*(\S+)\s+([UV][1-4]|R)\s*$", re.IGNORECASE)
_JSON = b"application/json"
QUEUE_SLOTS = 3  # tasks running at once before new ones answer 22 "in queue"


class Art:
    """The random parts of a task's Discord-style output, drawn once when the task is made."""

    __slots__ = ("channel", "job", "message")

    def __init__(self, rng: random.Random, job: str | None = None) -> None:
        self.job = job or str(uuid.UUID(int=rng.getrandbits(128), version=4))
        self.channel = rng.randrange(10**18, 10**19)
        self.message = rng.randrange(10**18, 10**19)


def image_url(art: Art, prompt: str, finish_ms: int, ttl_s: int, *, progress: bool = False) -> str:
    """A Discord CDN style signed URL; ``ex`` (expiry) is ``finish_ms // 1000 + ttl_s``."""
    issued = finish_ms // 1000
    expires = issued + ttl_s
    signature = hashlib.sha256(f"{art.job}:{expires}".encode()).hexdigest()
    stem = "_".join(_WORD.findall(prompt.lower())[:6])[:48] or "image"
    kind, ext = ("ephemeral-attachments", "webp") if progress else ("attachments", "png")
    return (
        f"https://cdn.discordapp.com/{kind}/{art.channel}/{art.message}/"
        f"mjsim_{stem}_{art.job}.{ext}?ex={expires:08x}&is={issued:08x}&hm={signature}&"
    )


def _button(custom_id: str, label: str = "", emoji: str = "") -> Json:
    return {"customId": custom_id, "emoji": emoji, "label": label, "type": 2, "style": 2}


def _grid_buttons(job: str) -> list[Json]:
    return [
        *(_button(f"MJ::JOB::upsample::{i}::{job}", f"U{i}") for i in range(1, 5)),
        _button(f"MJ::JOB::reroll::0::{job}::SOLO", emoji="\U0001f504"),
        *(_button(f"MJ::JOB::variation::{i}::{job}", f"V{i}") for i in range(1, 5)),
    ]


def _upscale_buttons(job: str) -> list[Json]:
    solo = f"1::{job}::SOLO"
    return [
        _button(f"MJ::JOB::upsample_v6_2x_subtle::{solo}", "Upscale (Subtle)"),
        _button(f"MJ::JOB::upsample_v6_2x_creative::{solo}", "Upscale (Creative)"),
        _button(f"MJ::JOB::high_variation::{solo}", "Vary (Strong)", "\U0001fa84"),
        _button(f"MJ::JOB::low_variation::{solo}", "Vary (Subtle)", "\U0001fa84"),
        _button(f"MJ::Inpaint::{solo}", "Vary (Region)", "\U0001f58c\ufe0f"),
        _button(f"MJ::Outpaint::50::{solo}", "Zoom Out 2x", "\U0001f50d"),
        _button(f"MJ::Outpaint::75::{solo}", "Zoom Out 1.5x", "\U0001f50d"),
        _button(f"MJ::CustomZoom::{job}", "Custom Zoom", "\U0001f50d"),
        _button(f"MJ::JOB::pan_left::{solo}", emoji="\u2b05\ufe0f"),
        _button(f"MJ::JOB::pan_right::{solo}", emoji="\u27a1\ufe0f"),
        _button(f"MJ::JOB::pan_up::{solo}", emoji="\u2b06\ufe0f"),
        _button(f"MJ::JOB::pan_down::{solo}", emoji="\u2b07\ufe0f"),
    ]


def buttons_for(action: str, job: str) -> list[Json]:
    """The buttons a SUCCESS task of ``action`` offers."""
    if action in GRID_ACTIONS:
        return _grid_buttons(job)
    if action == "UPSCALE":
        return _upscale_buttons(job)
    if action == "DESCRIBE":
        picks = [_button(f"MJ::Job::PicReader::{i}", str(i)) for i in range(1, 5)]
        return [*picks, _button("MJ::Picread::Retry", emoji="\U0001f504")]
    if action == "SHORTEN":
        return [_button(f"MJ::Job::PromptAnalyzer::{i}", str(i)) for i in range(1, 6)]
    return []


def action_for_custom_id(custom_id: str) -> str:
    """The task action a button's customId starts."""
    rules = (
        ("upsample", "UPSCALE"),
        ("variation", "VARIATION"),
        ("reroll", "REROLL"),
        ("pan_", "PAN"),
        ("Outpaint", "ZOOM"),
        ("CustomZoom", "ZOOM"),
        ("Inpaint", "INPAINT"),
        ("Picread::Retry", "DESCRIBE"),
        ("PicReader", "IMAGINE"),
        ("PromptAnalyzer", "IMAGINE"),
    )
    return next((action for part, action in rules if part in custom_id), "VARIATION")


class SimTask:
    """One task: a frozen JSON object, or a life played lazily from ``start``."""

    __slots__ = ("art", "base", "body", "duration", "fail_reason", "frozen", "start", "ttl_s")

    def __init__(
        self,
        base: Json,
        art: Art,
        *,
        start: float | None,
        duration: float,
        fail_reason: str | None,
        ttl_s: int,
        frozen: bool = False,
    ) -> None:
        self.base = base
        self.art = art
        self.start = start  # None: waits in MODAL for /submit/modal
        self.duration = duration
        self.fail_reason = fail_reason
        self.ttl_s = ttl_s
        self.frozen = frozen
        self.body: bytes | None = None

    @property
    def task_id(self) -> str:
        return str(self.base.get("id"))

    def view(self, now: float) -> Json:
        """The task as the upstream shows it at ``now`` (epoch seconds). Do not mutate."""
        if self.frozen:
            return self.base
        task = dict(self.base)
        if self.start is None:
            task["status"] = "MODAL"
            return task
        elapsed = now - self.start
        if elapsed >= self.duration:
            self.freeze(self._terminal(task))
            return self.base
        share = elapsed / self.duration
        if share < NOT_START_END:
            task["status"] = "NOT_START"
            return task
        task["startTime"] = self._ms(NOT_START_END)
        if share < SUBMITTED_END:
            task["status"] = "SUBMITTED"
            return task
        percent = min(99, int((share - SUBMITTED_END) / (1 - SUBMITTED_END) * 100))
        task["status"] = "IN_PROGRESS"
        task["progress"] = f"{percent}%"
        if percent > 0 and (task.get("action") in GRID_ACTIONS or task.get("action") == "UPSCALE"):
            task["imageUrl"] = image_url(
                self.art, str(task.get("prompt") or ""), int(now * 1000), self.ttl_s, progress=True
            )
        return task

    def body_bytes(self, now: float) -> bytes:
        """The task's JSON bytes at ``now``; cached once the task is frozen."""
        view = self.view(now)
        if not self.frozen:
            return orjson.dumps(view)
        if self.body is None:
            self.body = orjson.dumps(view)
        return self.body

    def freeze(self, task: Json) -> None:
        """Make ``task`` the final JSON of this task."""
        self.base = task
        self.frozen = True
        self.body = None

    def status(self, now: float) -> str:
        return str(self.view(now).get("status"))

    def _ms(self, share: float) -> int:
        assert self.start is not None
        return int((self.start + share * self.duration) * 1000)

    def _terminal(self, task: Json) -> Json:
        task["startTime"] = self._ms(NOT_START_END)
        finish = self._ms(1.0)
        task["finishTime"] = finish
        if self.fail_reason is not None:
            task.update(status="FAILURE", progress="", failReason=self.fail_reason, imageUrl="")
            return task
        action = str(task.get("action"))
        prompt = str(task.get("prompt") or "")
        properties = dict(task.get("properties") or {})
        properties.update(messageId=str(self.art.message), messageHash=self.art.job, flags=0)
        if action == "DESCRIBE":
            prompt = "\n\n".join(
                f"{n}\ufe0f\u20e3 a simulated picture, variant {n} --ar 1:1" for n in range(1, 5)
            )
            task.update(prompt=prompt, promptEn=prompt)
            properties["finalPrompt"] = prompt
        task.update(
            status="SUCCESS",
            progress="100%",
            imageUrl="" if action == "SHORTEN" else image_url(self.art, prompt, finish, self.ttl_s),
            buttons=buttons_for(action, self.art.job),
            properties=properties,
        )
        return task


def playing_task(
    task_id: str,
    action: str,
    prompt: str,
    *,
    now: float,
    duration: float,
    fail_reason: str | None,
    ttl_s: int,
    art: Art,
    modal: bool = False,
    custom_id: str = "",
    state: str = "",
    properties: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> SimTask:
    """A task whose life starts at ``now`` (or waits in MODAL when ``modal``)."""
    base: Json = {
        "id": task_id,
        "action": action,
        "customId": custom_id,
        "botType": "MID_JOURNEY",
        "prompt": prompt,
        "promptEn": prompt,
        "description": "Submit success",
        "state": state,
        "submitTime": int(now * 1000),
        "startTime": None,
        "finishTime": None,
        "imageUrl": "",
        "status": "MODAL" if modal else "NOT_START",
        "progress": "0%",
        "failReason": "",
        "buttons": [],
        "maskBase64": "",
        "properties": {"finalPrompt": prompt, "finalZhPrompt": "", **(properties or {})},
    }
    if extra:
        base.update((k, v) for k, v in extra.items() if k not in LIFE_FIELDS)
    return SimTask(
        base,
        art,
        start=None if modal else now,
        duration=max(duration, 0.0),
        fail_reason=fail_reason,
        ttl_s=ttl_s,
    )


def seeded_task(data: Mapping[str, Any], *, now: float, art: Art, ttl_s: int) -> SimTask:
    """A frozen task stored as given; standard fields it lacks get plausible defaults."""
    status = data.get("status", "SUCCESS")
    action = data.get("action", "IMAGINE")
    prompt = data.get("prompt", "a simulated task")
    now_ms = int(now * 1000)
    finish = data.get("finishTime", now_ms if status in TERMINAL else None)
    known_finish = isinstance(finish, int) and not isinstance(finish, bool)
    submit = data.get("submitTime", finish - 8000 if known_finish else now_ms)
    started = status not in ("NOT_START", "MODAL") and isinstance(submit, int)
    image = ""
    if status == "SUCCESS" and known_finish:
        image = image_url(art, str(prompt), finish, ttl_s)
    progress = {"SUCCESS": "100%", "IN_PROGRESS": "50%", "FAILURE": "", "CANCEL": ""}
    defaults: Json = {
        "id": data.get("id"),
        "action": action,
        "customId": "",
        "botType": "MID_JOURNEY",
        "prompt": prompt,
        "promptEn": prompt,
        "description": "Submit success",
        "state": "",
        "submitTime": submit,
        "startTime": submit + 400 if started else None,
        "finishTime": finish,
        "imageUrl": image,
        "status": status,
        "progress": progress.get(str(status), "0%"),
        "failReason": "",
        "buttons": buttons_for(str(action), art.job) if status == "SUCCESS" else [],
        "maskBase64": "",
        "properties": {"finalPrompt": prompt, "finalZhPrompt": ""},
    }
    task = {**defaults, **data}
    return SimTask(task, art, start=now, duration=0.0, fail_reason=None, ttl_s=ttl_s, frozen=True)


class TaskStore:
    """Tasks by id, oldest first, plus the set that may still change (for queue counts)."""

    def __init__(self) -> None:
        self.tasks: dict[str, SimTask] = {}
        self.active: dict[str, SimTask] = {}

    def new_id(self, rng: random.Random, now: float) -> str:
        """A fresh id shaped like the real ones: epoch milliseconds plus three random digits."""
        millis = int(now * 1000)
        while True:
            task_id = f"{millis}{rng.randrange(1000):03d}"
            if task_id not in self.tasks:
                return task_id
            millis += 1

    def add(self, task: SimTask, now: float) -> None:
        task_id = task.task_id
        self.tasks.pop(task_id, None)
        self.active.pop(task_id, None)
        self.tasks[task_id] = task
        if task.status(now) not in TERMINAL:
            self.active[task_id] = task
        while len(self.tasks) > MAX_TASKS:
            oldest = next(iter(self.tasks))
            del self.tasks[oldest]
            self.active.pop(oldest, None)

    def get(self, task_id: str) -> SimTask | None:
        return self.tasks.get(task_id)

    def clear(self) -> None:
        self.tasks.clear()
        self.active.clear()

    def unfinished(self, now: float) -> list[SimTask]:
        """Tasks not terminal at ``now``, oldest first; prunes the finished ones."""
        done = [tid for tid, task in self.active.items() if task.status(now) in TERMINAL]
        for task_id in done:
            del self.active[task_id]
        return list(self.active.values())

    def busy(self, now: float) -> int:
        """Tasks that occupy the queue: not terminal and not waiting in MODAL."""
        return sum(1 for task in self.unfinished(now) if task.status(now) != "MODAL")

    def views(self, now: float) -> list[Json]:
        return [task.view(now) for task in self.tasks.values()]


def scrambled(tasks: Iterable[SimTask], asked: list[str]) -> list[SimTask]:
    """Tasks in an order that differs from ``asked`` whenever there are two or more.

    Real upstreams answer list lookups in no particular order; a fixed, always-different
    order makes a caller that forgets to reorder fail every time instead of sometimes.
    """
    ordered = sorted(tasks, key=lambda task: task.task_id, reverse=True)
    if [task.task_id for task in ordered] == asked:
        ordered.reverse()
    return ordered


_EXACT_FILTERS = ("id", "status", "action", "state")
_TEXT_FILTERS = ("prompt", "promptEn", "description", "failReason")


def _as_int(value: Any, default: int) -> int:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return default


def _matches(task: Json, body: Mapping[str, Any]) -> bool:
    for name in _EXACT_FILTERS:
        wanted = body.get(name)
        if wanted not in (None, "") and str(task.get(name)) != str(wanted):
            return False
    for name in _TEXT_FILTERS:
        wanted = body.get(name)
        if isinstance(wanted, str) and wanted:
            value = task.get(name)
            if not isinstance(value, str) or wanted.casefold() not in value.casefold():
                return False
    for name, field in (("ids", "id"), ("statusSet", "status")):
        wanted = body.get(name)
        if isinstance(wanted, list) and wanted and str(task.get(field)) not in map(str, wanted):
            return False
    return True


def _sort_key(value: Any) -> tuple[int, float, str]:
    if value is None:
        return (0, 0.0, "")
    if isinstance(value, bool | int | float):
        return (1, float(value), "")
    if isinstance(value, str):
        return (2, 0.0, value)
    return (3, 0.0, orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode())


def _parse_sort(raw: Any) -> list[tuple[str, bool]]:
    specs = raw if isinstance(raw, list) else [raw]
    orders: list[tuple[str, bool]] = []
    for spec in specs:
        if not isinstance(spec, str) or not spec.strip():
            continue
        field, _, direction = spec.partition(",")
        orders.append((field.strip(), direction.strip().lower() == "desc"))
    return orders or [("submitTime", True)]


def query_page(views: list[Json], body: Mapping[str, Any]) -> Json:
    """``/task/query``: filter, sort (ties by id, in the first order's direction), page."""
    rows = [task for task in views if _matches(task, body)]
    orders = _parse_sort(body.get("sort"))
    rows.sort(key=lambda task: str(task.get("id")), reverse=orders[0][1])
    for field, descending in reversed(orders):
        rows.sort(key=lambda task: _sort_key(task.get(field)), reverse=descending)
    number = max(0, _as_int(body.get("pageNumber"), 0))
    size = _as_int(body.get("pageSize"), 10)
    size = 10 if size < 1 else min(size, 10_000)
    content = rows[number * size : (number + 1) * size]
    total_pages = math.ceil(len(rows) / size)
    sort = {"empty": False, "sorted": True, "unsorted": False}
    return {
        "content": content,
        "pageable": {
            "sort": sort,
            "offset": number * size,
            "pageNumber": number,
            "pageSize": size,
            "paged": True,
            "unpaged": False,
        },
        "last": number >= total_pages - 1,
        "totalPages": total_pages,
        "totalElements": len(rows),
        "size": size,
        "number": number,
        "sort": sort,
        "first": number == 0,
        "numberOfElements": len(content),
        "empty": not content,
    }


class Knobs(Protocol):
    """The settings the task side reads; ``gateway.sim.SimSettings`` provides them."""

    @property
    def flavor(self) -> str: ...
    @property
    def task_seconds(self) -> float: ...
    @property
    def failure_rate(self) -> float: ...
    @property
    def image_ttl_s(self) -> int: ...
    @property
    def queue_full_rate(self) -> float: ...


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

    def __init__(self, knobs: Callable[[], Knobs], rng: random.Random, not_found: Reply) -> None:
        self.knobs = knobs  # a getter: the settings may be replaced at run time
        self.rng = rng
        self.not_found = not_found
        self.store = TaskStore()
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
        knobs = self.knobs()
        failing = knobs.failure_rate > 0 and self.rng.random() < knobs.failure_rate
        return playing_task(
            task_id or self.store.new_id(self.rng, now),
            action,
            prompt,
            now=now,
            duration=knobs.task_seconds,
            fail_reason=self.rng.choice(FAIL_REASONS) if failing else None,
            ttl_s=knobs.image_ttl_s,
            art=Art(self.rng),
            modal=modal,
            custom_id=custom_id,
            state=_text(body, "state"),
            properties=properties,
            extra=extra,
        )

    def _refused(self, prompt: str) -> Reply | None:
        """Banned prompt or full queue: the submit is not accepted."""
        if _BANNED.search(prompt):
            return envelope(
                24, "May contain sensitive words", None, promptEn=prompt, bannedWord="banned"
            )
        knobs = self.knobs()
        if knobs.queue_full_rate > 0 and self.rng.random() < knobs.queue_full_rate:
            if knobs.flavor == "csharp":  # the C# upstream reports a full queue as code 9
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
            task.frozen, task.duration = False, self.knobs().task_seconds
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
