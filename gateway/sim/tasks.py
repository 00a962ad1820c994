"""Tasks of the simulated upstream: the task model, its Discord-style output, and the store.

A playing task computes its phase lazily from the time its life started; there is no
background loop. The first read that finds it terminal freezes it: its JSON is stored, its
bytes are cached, and it never changes again except for image-seed. Seeded tasks are frozen
from the start and are served exactly as they were given.
"""

from __future__ import annotations

import hashlib
import random
import re
import uuid
from collections.abc import Mapping
from typing import Any

import orjson

from gateway.protocol import TERMINAL

__all__ = [
    "FAIL_REASONS",
    "MAX_TASKS",
    "Art",
    "Json",
    "SimTask",
    "TaskStore",
    "action_for_custom_id",
    "image_url",
    "playing_task",
    "seeded_task",
]

Json = dict[str, Any]

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
