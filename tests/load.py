"""A steady mixed load (fetches, lists, submits) that counts every answer, and the figures of
a fault taken under it.

``MixedLoad`` runs callers in a thread of its own until stopped. Every request opens a new
connection, so the workers of a multi-process gateway all get a share, and a killed worker
costs only the requests it was serving. Every answer is judged on the spot (``Answer``):
a fetch must return the task asked for, a list only tasks asked for, a submit an accepted
envelope; a 5xx must be the gateway's JSON error with a 502, 503 or 504. ``Figures`` sums a
fault up: answers lost, errors by kind, worst latency during the fault, time to recover.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

__all__ = ["HEADER", "Answer", "Figures", "MixedLoad", "figures", "is_error_envelope", "judge"]

ERROR_KEYS = {"code", "description", "result", "request_id"}
ACCEPTED = (1, 21, 22)
CLEAN_5XX = (502, 503, 504)


@dataclass(frozen=True, slots=True)
class Answer:
    """One request: what it was, when, how long, and the verdict on its answer: ``ok``,
    ``partial`` (a list that named missing upstreams), ``lost`` (no HTTP answer), ``502`` /
    ``503`` / ``504`` (the gateway's clean JSON error), or what was wrong with it."""

    kind: str
    started: float
    seconds: float
    status: int
    verdict: str

    @property
    def ended(self) -> float:
        return self.started + self.seconds

    @property
    def good(self) -> bool:
        return self.verdict in ("ok", "partial")


def judge(kind: str, asked: Sequence[str], response: httpx.Response) -> str:
    """The verdict on one answer (see ``Answer``)."""
    status = response.status_code
    try:
        body: Any = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return f"not-json-{status}"
    if status >= 400:
        if not is_error_envelope(body, response.headers.get("x-request-id")):
            return f"not-envelope-{status}"
        if kind == "fetch-missing" and status == 404:
            return "ok"
        return str(status) if status in CLEAN_5XX else f"error-{status}"
    if kind in ("fetch", "fetch-missing"):
        return "ok" if isinstance(body, dict) and body.get("id") == asked[0] else "wrong-task"
    if kind == "list":
        if not isinstance(body, list) or any(
            not isinstance(t, dict) or t.get("id") not in asked for t in body
        ):
            return "wrong-task"
        return "partial" if response.headers.get("x-gateway-partial") else "ok"
    code = body.get("code") if isinstance(body, dict) else None
    return "ok" if code in ACCEPTED else f"refused-{code}"


def is_error_envelope(body: Any, request_id: str | None) -> bool:
    """The gateway's own error: ``{code, description, result: null, request_id}``, quoting
    the request id its ``X-Request-Id`` header gives."""
    return (
        isinstance(body, dict)
        and set(body) >= ERROR_KEYS
        and isinstance(body["code"], int)
        and isinstance(body["description"], str)
        and body["result"] is None
        and body["request_id"] == request_id
    )


@dataclass
class MixedLoad:
    """``callers`` callers fetching and listing ``ids`` (and now and then fetching one of
    ``missing``, ids no upstream has, whose answer is due to be 404) and one caller submitting
    new work (``submits_per_s``), each pausing ``pause_s`` between requests."""

    url: str
    headers: dict[str, str]
    ids: Sequence[str]
    missing: Sequence[str] = ()
    callers: int = 4
    submits_per_s: float = 8.0
    pause_s: float = 0.01
    list_size: int = 10
    prompt_prefix: str = "load"
    timeout_s: float = 30.0
    answers: list[Answer] = field(default_factory=list)
    submitted: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._prompts = itertools.count(1)

    def __enter__(self) -> MixedLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.timeout_s + 10)

    def since(self, moment: float) -> list[Answer]:
        return [a for a in list(self.answers) if a.started >= moment]

    async def _run(self) -> None:
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(
            base_url=self.url, headers=self.headers, timeout=self.timeout_s, limits=limits
        ) as client:
            rng = random.Random(7)
            tasks = [self._reader(client, random.Random(rng.random())) for _ in range(self.callers)]
            if self.submits_per_s > 0:
                tasks.append(self._submitter(client))
            await asyncio.gather(*tasks)

    async def _reader(self, client: httpx.AsyncClient, rng: random.Random) -> None:
        while not self._stop.is_set():
            draw = rng.random()
            if draw < 0.1 and self.missing:
                task_id = rng.choice(self.missing)
                path = f"/mj/task/{task_id}/fetch"
                await self._one(client, "fetch-missing", [task_id], "GET", path)
            elif draw < 0.7:
                task_id = rng.choice(self.ids)
                await self._one(client, "fetch", [task_id], "GET", f"/mj/task/{task_id}/fetch")
            else:
                ids = rng.sample(list(self.ids), min(self.list_size, len(self.ids)))
                await self._one(client, "list", ids, "POST", "/mj/task/list-by-ids", {"ids": ids})
            await asyncio.sleep(self.pause_s)

    async def _submitter(self, client: httpx.AsyncClient) -> None:
        while not self._stop.is_set():
            prompt = f"{self.prompt_prefix}-{next(self._prompts)}"
            self.submitted.append(prompt)
            body = {"prompt": prompt}
            await self._one(client, "submit", [], "POST", "/mj/submit/imagine", body)
            await asyncio.sleep(1 / self.submits_per_s)

    async def _one(
        self,
        client: httpx.AsyncClient,
        kind: str,
        asked: Sequence[str],
        method: str,
        path: str,
        body: Any = None,
    ) -> None:
        started = time.monotonic()
        try:
            response = await client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            verdict, status = f"lost:{type(exc).__name__}", 0
        else:
            verdict, status = judge(kind, asked, response), response.status_code
        self.answers.append(Answer(kind, started, time.monotonic() - started, status, verdict))


@dataclass
class Figures:
    """One fault under load: ``lost`` answers, ``errors`` by kind (everything not ``ok``),
    the worst latency of a request sent during the fault, and the seconds from the fault's
    end until the last answer that was not good."""

    name: str
    answers: int
    lost: int
    cut: int  # of those lost, requests in flight on a worker the fault killed
    errors: Counter[str]
    worst_s: float
    recover_s: float
    rss_before_mb: float = 0.0
    rss_after_mb: float = 0.0
    notes: list[str] = field(default_factory=list)

    def row(self) -> list[str]:
        errors = ", ".join(f"{k} {n}" for k, n in sorted(self.errors.items())) or "-"
        return [
            self.name,
            str(self.answers),
            f"{self.lost} ({self.cut} cut)" if self.cut else str(self.lost),
            errors,
            f"{self.worst_s * 1000:.0f}",
            f"{self.recover_s:.2f}",
            f"{self.rss_before_mb:.0f} -> {self.rss_after_mb:.0f}",
        ]


HEADER = ["fault", "answers", "lost", "errors by kind", "worst ms", "recover s", "RSS MB"]


def figures(
    name: str,
    answers: Sequence[Answer],
    fault_at: float,
    cleared_at: float,
    killed_at: float | None = None,
) -> Figures:
    """The figures of a fault from ``fault_at`` to ``cleared_at`` (monotonic seconds);
    ``killed_at``: when a worker was killed (its requests in flight count as cut)."""
    during = [a for a in answers if fault_at <= a.started < cleared_at]
    bad_after = [a.ended - cleared_at for a in answers if not a.good and a.ended > cleared_at]
    lost = [a for a in answers if a.verdict.startswith("lost")]
    return Figures(
        name,
        len(answers),
        len(lost),
        sum(1 for a in lost if killed_at is not None and a.started <= killed_at <= a.ended),
        Counter(a.verdict for a in answers if a.verdict != "ok"),
        max((a.seconds for a in during), default=0.0),
        max(bad_after, default=0.0),
    )
