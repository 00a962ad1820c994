"""The task cache: finished tasks as exact bytes in two tiers, running tasks for a moment.

Tiers: an in-process LRU (``L1``, no network hop) and the shared store. A finished task
(SUCCESS, FAILURE, CANCEL) never changes upstream, so it is kept until
``min(terminal_ttl_s, image expiry - margin)``. A running task's answer is kept
``inflight_ttl_ms`` so repeated polls from every worker share one upstream call. "Not found"
is kept ``not_found_ttl_ms``, because a task just submitted can be briefly invisible.

Store keys are hash-tagged by task id, so every key of one task shares a Redis Cluster slot
and one MGET reads a task's owner, not-found mark and bodies in a single round trip.
"""

from __future__ import annotations

import re
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from prometheus_client import Counter, Histogram

from gateway.config import CacheConfig
from gateway.errors import StoreError
from gateway.lru import LRU
from gateway.metrics import TASK_DURATION, TASKS_FINISHED
from gateway.owners import OwnerMap
from gateway.protocol import TERMINAL
from gateway.store import KeySpace, Store

__all__ = [
    "CachedTask",
    "ImageHook",
    "StoreView",
    "TaskCache",
    "encode_task",
    "image_expiry",
    "terminal_ttl_s",
]


# A stored value is: mark (T terminal, R running), 8-byte big-endian expiry in Unix ms, body.
# The expiry travels with the body so that a worker copying it into L1 never keeps it longer
# than the store would.
_TERMINAL_MARK = b"T"
_RUNNING_MARK = b"R"
_HEADER = struct.Struct(">cQ")
_EXPIRY = re.compile(r"[?&]ex=([0-9a-fA-F]{1,16})(?:&|$)")


@dataclass(frozen=True, slots=True)
class CachedTask:
    """A task answer held by the cache: the upstream's bytes and whether it is final."""

    upstream: str
    body: bytes
    terminal: bool
    expires_at: float  # time.monotonic() deadline in this process


@dataclass(slots=True)
class StoreView:
    """What one store round trip knew about a task id."""

    owner: str | None = None
    not_found_on: frozenset[str] = frozenset()
    task: CachedTask | None = None


def image_expiry(task: dict[str, Any]) -> int | None:
    """Unix time at which the task's signed image URL (Discord's hex ``ex=``) stops working."""
    url = task.get("imageUrl")
    if not isinstance(url, str) or "ex=" not in url:
        return None
    match = _EXPIRY.search(url)
    return int(match.group(1), 16) if match else None


def terminal_ttl_s(task: dict[str, Any], config: CacheConfig, now: float) -> float:
    """How long a finished task may be served from cache; <= 0 means not at all."""
    return _ttl_until(image_expiry(task), config, now)


def _ttl_until(expiry: int | None, config: CacheConfig, now: float) -> float:
    """The terminal TTL for an answer whose links stop working at ``expiry``."""
    ttl = float(config.terminal_ttl_s)
    if expiry is not None:
        ttl = min(ttl, expiry - now - config.image_expiry_margin_s)
    return ttl


class ImageHook(Protocol):
    """What the image service (``gateway.images``) does to every fresh upstream answer."""

    def rewrite(self, task: dict[str, Any]) -> bool:
        """Point the task's image links at mjgate, in place; True when anything changed."""
        ...

    def admit(self, upstream: str, task: dict[str, Any]) -> int | None:
        """Told of each fresh answer before it is cached (it may keep the image); the Unix
        time the links in the (rewritten) task stop working, None when they outlive it."""
        ...


class _NoImages:
    """Without the image service: links as the upstream gave them, expiring by ``ex=``."""

    def rewrite(self, task: dict[str, Any]) -> bool:
        return False

    def admit(self, upstream: str, task: dict[str, Any]) -> int | None:
        return image_expiry(task)


class TaskCache:
    """Reads and writes both tiers. Store failures are logged and count as misses."""

    def __init__(self, store: Store, keys: KeySpace, config: CacheConfig, owners: OwnerMap) -> None:
        self.store = store
        self.keys = keys
        self.config = config
        self.owners = owners
        self.l1: LRU[tuple[str, str], CachedTask] = LRU(
            config.l1_max_entries, config.l1_max_bytes, lambda entry: len(entry.body)
        )
        # Finished tasks already counted here: one that cannot be cached (its image link
        # expired) comes back from upstream on every fetch, and must not count again.
        self._counted: LRU[tuple[str, str], bool] = LRU(config.l1_max_entries)
        # Told ``(upstream, task)`` of every fresh upstream answer (the ledger follows
        # statuses this way); they must not block.
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self.images: ImageHook = _NoImages()

    def local(self, upstream: str, task_id: str) -> CachedTask | None:
        """The L1 entry, if fresh. No I/O: this is the hot path of a cached fetch."""
        entry = self.l1.get((upstream, task_id))
        if entry is not None and entry.expires_at <= time.monotonic():
            self.l1.pop((upstream, task_id))
            return None
        return entry

    async def read(self, task_ids: Sequence[str], upstreams: Sequence[str]) -> dict[str, StoreView]:
        """One store round trip for many ids: owner, not-found mark and cached body of each.

        Found bodies are copied into L1, bounded by ``l1_ttl_s`` so that an entry dropped
        from the store (``image-seed``, ``cancel``, purge) stops being served by every worker
        within that time.
        """
        if not task_ids:
            return {}
        width = 2 + len(upstreams)
        keys: list[str] = []
        for task_id in task_ids:
            keys += [self.keys.owner(task_id), self.keys.not_found(task_id)]
            keys += [self.keys.task(u, task_id) for u in upstreams]
        try:
            values = await self.store.mget(keys)
        except StoreError:  # logged and counted by the store
            return {}
        now, now_wall = time.monotonic(), time.time()
        views: dict[str, StoreView] = {}
        for index, task_id in enumerate(task_ids):
            row = values[index * width : (index + 1) * width]
            view = StoreView()
            if row[0] is not None:
                view.owner = self.owners.remember(task_id, row[0].decode())
            if row[1] is not None:
                view.not_found_on = frozenset(row[1].decode().split(","))
            for upstream, value in zip(upstreams, row[2:], strict=True):
                if value is not None and (view.owner is None or view.owner == upstream):
                    view.task = self._from_store(upstream, task_id, value, now, now_wall)
                    break
            views[task_id] = view
        return views

    def _from_store(
        self, upstream: str, task_id: str, value: bytes, now: float, now_wall: float
    ) -> CachedTask | None:
        if len(value) < _HEADER.size:
            return None
        mark, expires_ms = _HEADER.unpack_from(value)
        left_s = expires_ms / 1000 - now_wall
        if left_s <= 0:
            return None
        terminal = mark == _TERMINAL_MARK
        # A running task the watcher keeps in the store changes there: another worker's copy
        # lives no longer than a lookup's own answer would.
        running_s = self.config.inflight_ttl_ms / 1000
        ttl_s = min(left_s, self.config.l1_ttl_s if terminal else running_s)
        entry = CachedTask(upstream, value[_HEADER.size :], terminal, now + ttl_s)
        self.l1.set((entry.upstream, task_id), entry)
        return entry

    async def put_tasks(
        self,
        answers: Iterable[tuple[str, dict[str, Any], bytes]],
        running_ttl_ms: int | None = None,
    ) -> list[bytes]:
        """Cache fresh upstream answers ``(upstream, task, exact body)`` in L1 now and in the
        store off the request path (``Store.write_later``); the
        bodies to answer with, in order: the upstream's bytes, or the task re-encoded when the
        image hook rewrote it (so every later hit is served these bytes as they are).

        A running task is kept ``inflight_ttl_ms``, or ``running_ttl_ms`` when the watcher,
        which refreshes it before then, writes it."""
        now_wall, now = time.time(), time.monotonic()
        by_ttl: dict[int, dict[str, bytes]] = {}
        bodies: list[bytes] = []
        for upstream, task, body in answers:
            # Rewritten first: listeners (events, callbacks) pass the task on as answered.
            if self.images.rewrite(task):
                body = orjson.dumps(task)
            for listener in self.listeners:
                listener(upstream, task)
            bodies.append(body)
            links_expire = self.images.admit(upstream, task)
            task_id = task["id"]
            if task.get("status") in TERMINAL:
                if (upstream, task_id) not in self._counted:
                    self._counted.set((upstream, task_id), True)
                    _count_finished(upstream, task)
                ttl_s = _ttl_until(links_expire, self.config, now_wall)
                if ttl_s <= 0:
                    continue
                mark, l1_ttl = _TERMINAL_MARK, min(ttl_s, self.config.l1_ttl_s)
            else:
                ttl_s = (running_ttl_ms or self.config.inflight_ttl_ms) / 1000
                mark, l1_ttl = _RUNNING_MARK, ttl_s
            if ttl_s <= 0 or len(body) > self.config.max_value_bytes:
                continue
            entry = CachedTask(upstream, body, mark == _TERMINAL_MARK, now + l1_ttl)
            self.l1.set((upstream, task_id), entry)
            header = _HEADER.pack(mark, int((now_wall + ttl_s) * 1000))
            by_ttl.setdefault(int(ttl_s * 1000), {})[self.keys.task(upstream, task_id)] = (
                header + body
            )
        self._write(by_ttl)
        return bodies

    async def put_not_found(self, missing: Mapping[str, Iterable[str]]) -> None:
        """Remember for ``not_found_ttl_ms`` which upstreams said they have no such task."""
        items = {
            self.keys.not_found(task_id): ",".join(sorted(upstreams)).encode()
            for task_id, upstreams in missing.items()
        }
        self._write({self.config.not_found_ttl_ms: items})

    def _write(self, by_ttl: dict[int, dict[str, bytes]]) -> None:
        """Off the request path: L1 already answers this worker's next request, and a
        single flight covers the ones waiting meanwhile."""
        for ttl_ms, items in by_ttl.items():
            if ttl_ms > 0 and items:
                self.store.write_later(items, ttl_ms)

    async def invalidate(self, task_ids: Iterable[str], upstreams: Sequence[str]) -> bool:
        """Drop ids from this process's L1 and from the store (hence from every worker's L1
        within ``l1_ttl_s``). False when the store could not be reached."""
        keys: list[str] = []
        for task_id in task_ids:
            for upstream in upstreams:
                self.l1.pop((upstream, task_id))
                keys.append(self.keys.task(upstream, task_id))
            keys.append(self.keys.not_found(task_id))
        try:
            await self.store.delete(keys)
        except StoreError:  # logged and counted by the store
            return False
        return True


# Metric children by label values: ``labels()`` costs tens of microseconds, and a list
# answer may finish dozens of tasks at once.
_FINISHED: dict[tuple[str, str], Counter] = {}
_DURATIONS: dict[str, Histogram] = {}


def _count_finished(upstream: str, task: dict[str, Any]) -> None:
    """A task this worker sees finished for the first time (it is cached from now on)."""
    status = str(task["status"])
    finished_count = _FINISHED.get((upstream, status))
    if finished_count is None:
        finished_count = _FINISHED[upstream, status] = TASKS_FINISHED.labels(upstream, status)
    finished_count.inc()
    submitted, finished = task.get("submitTime"), task.get("finishTime")
    if isinstance(submitted, int) and isinstance(finished, int) and finished >= submitted > 0:
        duration = _DURATIONS.get(upstream)
        if duration is None:
            duration = _DURATIONS[upstream] = TASK_DURATION.labels(upstream)
        duration.observe((finished - submitted) / 1000)


def encode_task(task: dict[str, Any]) -> bytes:
    """A task from a list answer, as bytes to cache (list answers carry no per-task bytes)."""
    return orjson.dumps(task)
