"""Task changes, fleet-wide: a log of each task's states in the store, one notification per
change on the store's pub/sub, and the callbacks that follow a change of status.

Whoever learns a task's state from its upstream (the watcher, a caller's lookup, an upstream
pushing to mjgate) hands it to ``TaskEvents.saw``. The task's log appends it only if it
differs from the last entry and is not older than it (a script in the store decides, so many
workers seeing the same state write one entry). Each appended entry is published by task id;
every worker's ``EventHub`` holds one subscription and wakes its local streams, which read
the log from where they are: any worker serves any subscriber, and a missed notification
costs a moment, never an event.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import re
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import structlog

from gateway.config import ClientConfig
from gateway.errors import StoreError
from gateway.lru import LRU
from gateway.protocol import TERMINAL
from gateway.store import KeySpace, Store
from gateway.webhooks import Deliveries

__all__ = [
    "EVENT_ID",
    "EventHub",
    "StreamTokens",
    "TaskEvent",
    "TaskEvents",
    "state_mark",
]

log = structlog.get_logger("mjgate.events")

LOG_ENTRIES = 256  # a task's life has far fewer states than this
LOG_TTL_MS = 2 * 86_400_000
CHANNEL = "task-events"
EVENT_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
_APPEND_BATCH = 32
_LOGGED_ENTRIES = 100_000  # tasks whose last logged state a worker remembers
_RESUBSCRIBE_S = 1.0
# Statuses in the order a task moves through them; a terminal status ranks highest.
_RANK = {"NOT_START": 0, "SUBMITTED": 1, "MODAL": 1, "IN_PROGRESS": 2}
_PERCENT = re.compile(r"([0-9]{1,3})")
_TOKEN_PURPOSE = b"mjgate event stream v1"


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """One state of a task, as its upstream answered it, with the log's id for it."""

    id: str
    body: bytes

    @property
    def terminal(self) -> bool:
        try:
            task = orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return False
        return isinstance(task, dict) and task.get("status") in TERMINAL


def state_mark(task: dict[str, Any]) -> tuple[bytes, int]:
    """What makes a state a change (status, progress, failure reason), and its place in a
    task's life: a state placed before the last one logged is stale and dropped."""
    status = str(task.get("status") or "")
    progress = str(task.get("progress") or "")
    mark = f"{status}|{progress}|{task.get('failReason') or ''}".encode()
    match = _PERCENT.match(progress)
    percent = min(int(match.group(1)), 100) if match else 0
    return mark, _RANK.get(status, 3) * 1000 + percent


class TaskEvents:
    """Records task states seen anywhere, and tells streams and callbacks about changes."""

    def __init__(
        self,
        store: Store,
        keys: KeySpace,
        deliveries: Deliveries,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self.store = store
        self.keys = keys
        self.deliveries = deliveries
        self.channel = keys.channel(CHANNEL)
        self._spawn = spawn
        self._seen: list[tuple[dict[str, Any], bytes]] = []
        # The last state this worker logged per task: a running task polled again and again
        # answers the same bytes, which need no store round trip to be found old news.
        self._logged: LRU[str, bytes] = LRU(_LOGGED_ENTRIES)

    def saw(self, upstream: str, task: dict[str, Any]) -> None:
        """A fresh upstream answer (a task cache listener): recorded in the background,
        many at a time."""
        task_id = task.get("id")
        if not isinstance(task_id, str):
            return
        body = orjson.dumps(task)
        if self._logged.get(task_id) == body:
            return
        if not self._seen:
            self._spawn(self._flush())
        self._seen.append((task, body))

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let the rest of this batch of answers arrive
        seen, self._seen = self._seen, []
        await self.record(seen)

    async def record(self, states: Sequence[tuple[dict[str, Any], bytes]]) -> list[str]:
        """Log each ``(task, body)`` that is news, publish the ids, queue the callbacks of
        status changes; the ids that changed. A store failure is logged, not raised."""
        try:
            return await self._record(states)
        except StoreError as exc:
            log.warning("store_error", purpose="task_events", error=str(exc))
            return []

    async def _record(self, states: Sequence[tuple[dict[str, Any], bytes]]) -> list[str]:
        previous: list[bytes | None] = []
        for start in range(0, len(states), _APPEND_BATCH):
            chunk = states[start : start + _APPEND_BATCH]
            previous += await asyncio.gather(*(self._append(t, body) for t, body in chunk))
        for task, body in states:
            self._logged.set(str(task["id"]), body)
        changed = [
            (t, body, p) for (t, body), p in zip(states, previous, strict=True) if p is not None
        ]
        if not changed:
            return []
        ids = [str(task["id"]) for task, _, _ in changed]
        await self.store.publish(self.channel, ",".join(ids).encode())
        callbacks = [
            (str(task["id"]), body, task.get("status") in TERMINAL)
            for task, body, mark in changed
            if mark.split(b"|", 1)[0].decode() != str(task.get("status") or "")
        ]
        if callbacks:
            await self.deliveries.status_changed(callbacks)
        return ids

    async def _append(self, task: dict[str, Any], body: bytes) -> bytes | None:
        """The mark of the state before this one, when this one was appended."""
        mark, order = state_mark(task)
        key = self.keys.task_events(str(task["id"]))
        appended = await self.store.log_append(key, mark, order, body, LOG_ENTRIES, LOG_TTL_MS)
        return None if appended is None else appended[1]

    async def after(self, task_id: str, after: str) -> list[TaskEvent]:
        """The task's logged states after the event id ``after`` (all when empty)."""
        found = await self.store.log_after(self.keys.task_events(task_id), after, LOG_ENTRIES)
        return [TaskEvent(entry_id, body) for entry_id, body in found]

    async def latest(self, task_id: str) -> TaskEvent | None:
        last = await self.store.log_last(self.keys.task_events(task_id))
        return TaskEvent(*last) if last is not None else None


class StreamTokens:
    """Tokens for a browser's ``EventSource``, which cannot send a key header: each names
    a caller and a task, signed with ``server.secret_key``, valid until its expiry."""

    def __init__(self, secret: str, clients: Sequence[ClientConfig]) -> None:
        self.enabled = bool(secret)
        self._key = hmac.new(secret.encode(), _TOKEN_PURPOSE, hashlib.sha256).digest()
        self._clients = {client.name: client for client in clients}

    def _signature(self, client: str, task_id: str, expires: int) -> str:
        signed = f"{client}\n{task_id}\n{expires}".encode()
        digest = hmac.new(self._key, signed, hashlib.sha256).digest()[:18]
        return base64.urlsafe_b64encode(digest).decode()

    def make(self, client: str, task_id: str, expires: int) -> str:
        name = base64.urlsafe_b64encode(client.encode()).decode().rstrip("=")
        return f"{expires}.{name}.{self._signature(client, task_id, expires)}"

    def client_of(self, token: str, task_id: str, now: float) -> ClientConfig | None:
        """The caller the token was made for, if it is valid for this task now."""
        expires, _, rest = token.partition(".")
        name, _, signature = rest.partition(".")
        if not self.enabled or not expires.isdigit() or len(expires) > 12:
            return None
        try:
            client = base64.urlsafe_b64decode(name + "=" * (-len(name) % 4)).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        expected = self._signature(client, task_id, int(expires))
        if not hmac.compare_digest(expected, signature) or int(expires) <= now:
            return None
        return self._clients.get(client)


class EventHub:
    """This worker's one subscription to the fleet's task changes, waking local streams."""

    def __init__(self, store: Store, channel: str) -> None:
        self.store = store
        self.channel = channel
        self._waiting: dict[str, set[asyncio.Event]] = {}

    @contextlib.contextmanager
    def watch(self, task_id: str) -> Iterator[asyncio.Event]:
        """An event set whenever the task may have changed; the caller clears it, then reads
        the log, then waits."""
        wake = asyncio.Event()
        self._waiting.setdefault(task_id, set()).add(wake)
        try:
            yield wake
        finally:
            waiting = self._waiting[task_id]
            waiting.discard(wake)
            if not waiting:
                del self._waiting[task_id]

    async def run(self) -> None:
        """Listen until cancelled. After a broken subscription every stream re-reads its
        log, since a change may have been published meanwhile."""
        while True:
            try:
                async with contextlib.aclosing(self.store.subscribe(self.channel)) as messages:
                    async for message in messages:
                        for task_id in message.decode().split(","):
                            for wake in self._waiting.get(task_id, ()):
                                wake.set()
            except StoreError as exc:
                log.warning("store_error", purpose="events_subscribe", error=str(exc))
            for waiting in self._waiting.values():
                for wake in waiting:
                    wake.set()
            await asyncio.sleep(_RESUBSCRIBE_S)
