"""The watcher: one refresher of running tasks for the whole fleet.

Every worker runs ``Watcher.run``; the one holding the lease in the store (renewed every
second, lost three seconds after its holder stops renewing) polls, the others wait to take
over. In embedded mode the process is the fleet. Each cycle asks the ledger for the tasks not
final yet, and sends each upstream one list call per ``fanout.batch_size`` ids that are due:
a running task every ``watcher.interval_s``, a queued one (NOT_START, SUBMITTED) every
``watcher.queued_interval_s``. Calls pass the upstream's outbound caps like any other.

What it learns goes into the task cache, a running task kept until just after the next
refresh is due, so callers' polls are answered from the store and never reach the upstream;
a finished task is cached for good at once. The cache's listeners pass every state on to the
ledger and to task events. A task stops being watched when it is final, when its upstream no
longer knows it, or ``ledger.stuck_after_s`` after its submit (the ledger then lists it as
stuck instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import time
from dataclasses import dataclass

import orjson
import structlog

from gateway.cache import TaskCache, encode_task
from gateway.config import Config
from gateway.context import RequestInfo
from gateway.errors import StoreError, UpstreamError, UpstreamFailures
from gateway.ledger import Ledger
from gateway.metrics import WATCHED_TASKS, WATCHER_LEADER
from gateway.owners import OwnerMap
from gateway.protocol import TERMINAL
from gateway.store import KeySpace, Store
from gateway.tasks import is_not_found, parse_task_list
from gateway.upstreams import Upstream, UpstreamPool, call, failed_answer

__all__ = ["LEASE_TTL_S", "Lease", "Watcher"]

log = structlog.get_logger("mjgate.watcher")

LEASE_TTL_S = 3.0
RENEW_S = 1.0
QUEUED = frozenset({"NOT_START", "SUBMITTED"})
# An id missing from this many answers in a row is one the upstream no longer knows (a task
# just submitted can be briefly invisible).
MISSES_TO_FORGET = 3
MAX_TASKS_PER_UPSTREAM = 20_000
_REQUEST_IDS = itertools.count(1)


class Lease:
    """A lease in the store, held by this process while ``held`` is true."""

    def __init__(self, store: Store, key: str) -> None:
        self.store = store
        self.key = key
        self.holder = f"{os.uname().nodename}:{os.getpid()}:{os.urandom(4).hex()}"
        self.held = False

    async def keep(self) -> None:
        """Take or renew the lease every second until cancelled; a store failure means not
        holding it, so two processes never both believe they lead for long."""
        try:
            while True:
                try:
                    held = await self.store.acquire_lease(
                        self.key, self.holder, int(LEASE_TTL_S * 1000)
                    )
                except StoreError:
                    held = False
                if held != self.held:
                    log.info("watcher_lease", held=held, holder=self.holder, pid=os.getpid())
                self.held = held
                WATCHER_LEADER.set(int(held))
                await asyncio.sleep(RENEW_S)
        finally:
            WATCHER_LEADER.set(0)
            if self.held:
                self.held = False
                with contextlib.suppress(StoreError):
                    await self.store.release_lease(self.key, self.holder)


@dataclass(slots=True)
class _Watched:
    """What the leader remembers of one task between cycles."""

    status: str
    polled_at: float = -math.inf
    misses: int = 0
    done: bool = False  # final, or unknown upstream-side: not polled again


class Watcher:
    """Refreshes the ledger's running tasks, batched per upstream, while holding the lease."""

    def __init__(
        self,
        config: Config,
        store: Store,
        keys: KeySpace,
        pool: UpstreamPool,
        cache: TaskCache,
        owners: OwnerMap,
        ledger: Ledger,
    ) -> None:
        self.interval_s = config.watcher.interval_s
        self.queued_s = config.watcher.queued_every_s
        self.tick_s = min(self.interval_s, self.queued_s)
        self.batch_size = config.fanout.batch_size
        self.deadline_s = config.fanout.deadline_s
        # Kept until a little after the next refresh is due, whichever interval it is on.
        self.running_ttl_ms = int((2 * max(self.interval_s, self.queued_s) + 1) * 1000)
        self.pool = pool
        self.cache = cache
        self.owners = owners
        self.ledger = ledger
        self.lease = Lease(store, keys.lease("watcher"))
        self._watched: dict[tuple[str, str], _Watched] = {}

    async def run(self) -> None:
        """Lead when the lease is ours, until cancelled."""
        keeping = asyncio.create_task(self.lease.keep())
        try:
            while True:
                started = time.monotonic()
                if self.lease.held:
                    await self.cycle()
                else:
                    self._forget()
                await asyncio.sleep(max(0.05, self.tick_s - (time.monotonic() - started)))
        finally:
            keeping.cancel()
            await asyncio.gather(keeping, return_exceptions=True)
            self._forget()

    def _forget(self) -> None:
        """Not leading: another process polls, with its own memory."""
        self._watched.clear()
        for upstream in self.pool.all:
            WATCHED_TASKS.labels(upstream.name).set(0)

    async def cycle(self) -> None:
        """One round: every due task of every upstream polled, a list call per batch."""
        info = RequestInfo(request_id=f"watcher-{next(_REQUEST_IDS)}")
        batches: list[tuple[Upstream, str, list[str]]] = []
        for upstream in self.pool.all:
            try:
                due = await self._due(upstream)
            except StoreError as exc:
                log.warning("store_error", purpose="watcher_list", error=str(exc))
                continue
            for mode, ids in due.items():
                size = self.batch_size
                batches += [(upstream, mode, ids[i : i + size]) for i in range(0, len(ids), size)]
        await asyncio.gather(*(self._poll(u, mode, ids, info) for u, mode, ids in batches))

    async def _due(self, upstream: Upstream) -> dict[str, list[str]]:
        """The ids to poll now, by speed mode, from the ledger's unfinished tasks."""
        records = await self.ledger.unfinished(upstream.name, MAX_TASKS_PER_UPSTREAM)
        now = time.monotonic()
        slack = self.tick_s / 2  # a task due within half a tick rides along
        current: dict[tuple[str, str], _Watched] = {}
        due: dict[str, list[str]] = {}
        for record in records:
            key = (upstream.name, record["id"])
            watched = self._watched.get(key) or _Watched(record.get("status", ""))
            current[key] = watched
            every = self.queued_s if watched.status in QUEUED else self.interval_s
            if not watched.done and now >= watched.polled_at + every - slack:
                due.setdefault(record.get("mode", ""), []).append(record["id"])
        self._watched = {k: w for k, w in self._watched.items() if k[0] != upstream.name}
        self._watched.update(current)
        WATCHED_TASKS.labels(upstream.name).set(sum(not w.done for w in current.values()))
        # The ledger learns statuses through the cache only for submitters this worker holds.
        await self.owners.owners([i for ids in due.values() for i in ids], need_submitter=True)
        return due

    async def _poll(self, upstream: Upstream, mode: str, ids: list[str], info: RequestInfo) -> None:
        """One list call; the answers cached, the misses counted."""
        started = time.monotonic()
        path = f"{mode}{upstream.config.list_by_ids_path}"
        try:
            response = await call(
                upstream, info, "watch", "POST", path, orjson.dumps({"ids": ids}), self.deadline_s
            )
        except (UpstreamError, UpstreamFailures) as exc:
            log.warning("watcher_poll_failed", upstream=upstream.name, error=str(exc))
            return
        if error := failed_answer(response):
            log.warning("watcher_poll_failed", upstream=upstream.name, error=str(error))
            return
        if is_not_found(response.status, response.content):
            tasks: list[dict[str, object]] = []
        else:
            found = parse_task_list(response.content) if response.status == 200 else None
            if found is None:
                log.warning("watcher_poll_failed", upstream=upstream.name, error="not a list")
                return
            tasks = list(found)
        wanted = set(ids)
        fresh = [(upstream.name, t, encode_task(t)) for t in tasks if t.get("id") in wanted]
        self._learned(upstream.name, ids, fresh, started)
        await self.cache.put_tasks(fresh, running_ttl_ms=self.running_ttl_ms)

    def _learned(
        self,
        upstream: str,
        ids: list[str],
        fresh: list[tuple[str, dict[str, object], bytes]],
        polled_at: float,
    ) -> None:
        statuses = {str(task["id"]): str(task.get("status") or "") for _, task, _ in fresh}
        for task_id in ids:
            watched = self._watched.get((upstream, task_id))
            if watched is None:
                continue
            watched.polled_at = polled_at
            status = statuses.get(task_id)
            if status is None:
                watched.misses += 1
                watched.done = watched.misses >= MISSES_TO_FORGET
                continue
            watched.status, watched.misses = status, 0
            watched.done = status in TERMINAL
