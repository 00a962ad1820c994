"""The durable delivery queue: task callbacks, signed, retried, then dead-lettered.

A callback is a record in the store (``Delivery``), an index entry while it is pending or
dead, and an entry on the store's queue (a Redis Stream read through one consumer group by
every worker). A worker that reads an entry calls the destination; on success the record
goes, on failure it is scheduled again after an exponential backoff with jitter, and after
``webhooks.max_attempts`` it is a dead letter, until an admin retries it. The queue entry is
acknowledged only after the record says what happens next, so a worker dying mid-delivery
leaves the entry to be claimed by another: callbacks arrive at least once, and the receiver
tells repeats by their ``webhook-id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import aiohttp
import orjson
import structlog

from gateway.config import Config
from gateway.errors import StoreError
from gateway.metrics import WEBHOOK_DELIVERIES, WEBHOOK_DURATION, WEBHOOK_QUEUE
from gateway.store import KeySpace, Store
from gateway.webhooks.destinations import Destinations, GuardedResolver
from gateway.webhooks.signing import message_id, webhook_headers

__all__ = ["Deliveries", "Delivery", "State"]

log = structlog.get_logger("mjgate.webhooks")

State = Literal["pending", "dead"]
RECORD_TTL_S = 7 * 86400  # a dead letter, or a task's hook, is kept this long
BATCH = 16
IDLE_POLL_S = 0.5  # the local wake makes this worker's own enqueues prompt
RECLAIM_EVERY_S = 15.0
GAUGE_EVERY_S = 5.0
STORE_RETRY_S = 2.0
_USER_AGENT = "mjgate-webhooks"


@dataclass(slots=True)
class Delivery:
    """One callback: a task's JSON for one URL, with its attempts so far."""

    id: str  # the webhook-id, the same on every attempt
    task_id: str
    client: str
    url: str
    body: str
    created_at: float
    next_at: float
    attempts: int = 0
    state: State = "pending"
    last_error: str = ""

    def public(self) -> dict[str, Any]:
        """The admin view: everything but the body."""
        view = asdict(self)
        del view["body"]
        return view


class Deliveries:
    """Task callbacks: registering a task's hook, queueing, delivering, and the admin view."""

    def __init__(self, config: Config, store: Store, keys: KeySpace) -> None:
        self.config = config.webhooks
        self.store = store
        self.keys = keys
        self.consumer = f"{os.uname().nodename}:{os.getpid()}:{os.urandom(4).hex()}"
        self.destinations = Destinations(self.config.allow)
        self._secrets = {c.name: c.webhook.secret.reveal() for c in config.clients}
        self._queue = keys.webhooks("queue")
        self._retry = keys.webhooks("retry")
        self._wake = asyncio.Event()
        self._reclaim_at = self._gauges_at = 0.0

    def _index(self, state: State) -> str:
        return self.keys.webhooks(state)

    def _record(self, delivery_id: str) -> str:
        return self.keys.webhooks(f"d:{delivery_id}")

    # -- hooks and queueing -----------------------------------------------------------------

    async def register(self, task_id: str, client: str, url: str) -> str | None:
        """Keep ``url`` as the task's callback; the reason when it may not be called."""
        refusal = self.destinations.refusal(url)
        if refusal is not None:
            WEBHOOK_DELIVERIES.labels("refused").inc()
            log.warning("webhook_refused", task_id=task_id, client=client, reason=refusal)
            return refusal
        hook = orjson.dumps({"url": url, "client": client})
        await self.store.set_many({self.keys.task_hook(task_id): hook}, RECORD_TTL_S * 1000)
        return None

    async def status_changed(self, changes: Sequence[tuple[str, bytes, bool]]) -> None:
        """Queue a callback for each changed task ``(id, body, terminal)`` that has a hook;
        a terminal change is a task's last callback."""
        keys = [self.keys.task_hook(task_id) for task_id, _, _ in changes]
        hooks = await self.store.mget(keys)
        done: list[str] = []
        for (task_id, body, terminal), hook in zip(changes, hooks, strict=True):
            if hook is None:
                continue
            target = orjson.loads(hook)
            await self.enqueue(task_id, target["client"], target["url"], body)
            if terminal:
                done.append(self.keys.task_hook(task_id))
        await self.store.delete(done)

    async def enqueue(self, task_id: str, client: str, url: str, body: bytes) -> Delivery:
        now = time.time()
        delivery = Delivery(message_id(), task_id, client, url, body.decode(), now, now)
        await self._save(delivery)
        await self.store.schedule(self._index("pending"), {delivery.id: now})
        await self.store.queue_add(self._queue, delivery.id.encode())
        self._wake.set()
        return delivery

    async def _save(self, delivery: Delivery) -> None:
        record = orjson.dumps(asdict(delivery))
        await self.store.set_many({self._record(delivery.id): record}, RECORD_TTL_S * 1000)

    async def _load(self, delivery_ids: Sequence[str]) -> list[Delivery | None]:
        records = await self.store.mget([self._record(i) for i in delivery_ids])
        return [Delivery(**orjson.loads(r)) if r is not None else None for r in records]

    # -- the admin view ---------------------------------------------------------------------

    async def listing(self, state: State, limit: int) -> list[Delivery]:
        """Pending deliveries (oldest first) or dead letters (oldest death first)."""
        members = await self.store.scheduled(self._index(state), limit)
        found = await self._load([member for member, _ in members])
        return [d for d in found if d is not None and d.state == state]

    async def retry(self, delivery_id: str) -> Delivery | None:
        """A dead letter queued again with a fresh count of attempts; None if no such one."""
        (delivery,) = await self._load([delivery_id])
        if delivery is None or delivery.state != "dead":
            return None
        delivery.state, delivery.attempts, delivery.next_at = "pending", 0, time.time()
        await self._save(delivery)
        await self.store.unschedule(self._index("dead"), [delivery.id])
        await self.store.schedule(self._index("pending"), {delivery.id: delivery.created_at})
        await self.store.queue_add(self._queue, delivery.id.encode())
        self._wake.set()
        return delivery

    # -- delivering -------------------------------------------------------------------------

    async def run(self) -> None:
        """Deliver until cancelled: due retries onto the queue, then what the queue holds."""
        resolver = GuardedResolver(self.destinations)
        connector = aiohttp.TCPConnector(resolver=resolver, limit=BATCH * 4)
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_s)
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, headers={"user-agent": _USER_AGENT}
        ) as session:
            while True:
                # A round that started finishes even when the worker stops: the entries it
                # read are delivered and their outcome recorded, instead of waiting for
                # another worker to claim them.
                round_ = asyncio.ensure_future(self._round(session))
                try:
                    read = await asyncio.shield(round_)
                except asyncio.CancelledError:
                    await round_
                    raise
                await self._refresh_gauges()
                if read is None:
                    await asyncio.sleep(STORE_RETRY_S)
                elif read == 0:
                    await self._idle()

    async def _round(self, session: aiohttp.ClientSession) -> int | None:
        """Read what is due and deliver it; how many entries were read (None: the store
        failed)."""
        try:
            entries = await self._next_entries()
        except StoreError as exc:
            log.warning("store_error", purpose="webhooks", error=str(exc))
            return None
        await asyncio.gather(*(self._handle(session, entry) for entry in entries))
        return len(entries)

    async def _next_entries(self) -> list[tuple[str, bytes]]:
        await self.store.release_due(self._retry, self._queue, time.time(), BATCH * 4)
        entries = await self.store.queue_read(self._queue, self.consumer, BATCH)
        if time.monotonic() >= self._reclaim_at:
            idle_ms = int(max(60.0, 3 * self.config.timeout_s) * 1000)
            entries += await self.store.queue_reclaim(self._queue, self.consumer, idle_ms, BATCH)
            self._reclaim_at = time.monotonic() + RECLAIM_EVERY_S
        return entries

    async def _idle(self) -> None:
        """Nothing to deliver: wait a moment, or until this worker queues something."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(IDLE_POLL_S):
                await self._wake.wait()

    async def _refresh_gauges(self) -> None:
        """The queue's depth, every few seconds (every worker reads the same fleet-wide
        numbers; the gauge keeps the highest)."""
        if time.monotonic() < self._gauges_at:
            return
        self._gauges_at = time.monotonic() + GAUGE_EVERY_S
        with contextlib.suppress(StoreError):
            for state in ("pending", "dead"):
                size = await self.store.schedule_size(self._index(state))
                WEBHOOK_QUEUE.labels(state).set(size)

    async def _handle(self, session: aiohttp.ClientSession, entry: tuple[str, bytes]) -> None:
        entry_id, data = entry
        try:
            (delivery,) = await self._load([data.decode()])
            if delivery is not None and delivery.state == "pending":
                error = await self._attempt(session, delivery)
                await self._settle(delivery, error)
            await self.store.queue_ack(self._queue, [entry_id])
        except StoreError as exc:
            # Not acknowledged: another worker claims the entry once it has sat idle.
            log.warning("store_error", purpose="webhook_delivery", error=str(exc))

    async def _attempt(self, session: aiohttp.ClientSession, delivery: Delivery) -> str | None:
        """POST the task once; the error, or None when the destination took it (2xx)."""
        refusal = self.destinations.refusal(delivery.url)
        if refusal is not None:
            return f"destination refused: {refusal}"
        body = delivery.body.encode()
        secret = self._secrets.get(delivery.client, "")
        headers = webhook_headers(secret, delivery.id, int(time.time()), body)
        started = time.perf_counter()
        try:
            async with session.post(
                delivery.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                await response.read()
                status = response.status
        except TimeoutError:
            return "timed out"
        except (aiohttp.ClientError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"[:300]
        finally:
            WEBHOOK_DURATION.observe(time.perf_counter() - started)
        return None if 200 <= status < 300 else f"answered HTTP {status}"

    async def _settle(self, delivery: Delivery, error: str | None) -> None:
        """Record what the attempt means: done, tried again later, or dead."""
        pending = self._index("pending")
        if error is None:
            WEBHOOK_DELIVERIES.labels("delivered").inc()
            await self.store.unschedule(pending, [delivery.id])
            await self.store.delete([self._record(delivery.id)])
            return
        delivery.attempts += 1
        delivery.last_error = error
        now = time.time()
        refused = error.startswith("destination refused")
        if refused or delivery.attempts >= self.config.max_attempts:
            WEBHOOK_DELIVERIES.labels("refused" if refused else "dead").inc()
            delivery.state = "dead"
            await self._save(delivery)
            await self.store.schedule(self._index("dead"), {delivery.id: now})
            await self.store.unschedule(pending, [delivery.id])
            log.warning("webhook_dead", delivery=delivery.id, task_id=delivery.task_id, error=error)
            return
        WEBHOOK_DELIVERIES.labels("failed").inc()
        delivery.next_at = now + self.backoff_s(delivery.attempts)
        await self._save(delivery)
        await self.store.schedule(self._retry, {delivery.id: delivery.next_at})

    def backoff_s(self, attempts: int) -> float:
        """Seconds before the next attempt after ``attempts`` failures: doubling from
        ``backoff_s``, jittered by a quarter either way, never above ``backoff_max_s``."""
        base = self.config.backoff_s * 2.0 ** min(attempts - 1, 60)
        return min(self.config.backoff_max_s, base * random.uniform(0.75, 1.25))
