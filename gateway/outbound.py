"""Outbound caps per upstream: ``max_rps`` and ``max_concurrency``, shared by every worker.

Providers ban IPs that call too fast (the C# midjourney-proxy blocks an IP for a day after 30
requests a second), so what the whole fleet sends one upstream is capped through the store, in
leases, as the callers' rate limits are: a worker takes several rate tokens or in-flight slots
in one round trip and spends them locally, and leases shrink to one as the fleet's budget
empties. A request over a cap waits up to ``queue_timeout_s``, then fails as saturated. While
the store is unreachable each worker caps itself with the same numbers.

Rate: a token bucket (``gateway.buckets.TAKE_LUA``) of ``burst`` b refilling at r a second,
whose tokens are spent within ``RATE_LEASE_S`` of being taken or never. Any second then sees
at most b + r (1 + RATE_LEASE_S) requests from the fleet; r = (max_rps - b) / (1 + RATE_LEASE_S)
makes that ``max_rps`` (for ``max_rps`` >= 2): the exact cap costs a tenth of ``max_rps`` in
sustained throughput.

In-flight slots: a sorted set in the store (``gateway.buckets.SLOTS_LEASE_LUA``). A worker
leases a block of named slots, uses each for request after request for ``SLOT_LEASE_S``, then
gives it back; a slot left idle ``IDLE_RETURN_S`` goes back at once for other workers. Slots
expire in the store after the longest a request could hold one, so a killed worker's slots free
themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import structlog

from gateway.buckets import Grant
from gateway.config import UpstreamConfig
from gateway.errors import Saturated, StoreError
from gateway.store import KeySpace, MemoryStore, Store

__all__ = ["IDLE_RETURN_S", "RATE_LEASE_S", "SLOT_LEASE_S", "OutboundCaps", "Slot"]

log = structlog.get_logger("mjgate.outbound")

RATE_LEASE_S = 0.1
SLOT_LEASE_S = 5.0
IDLE_RETURN_S = 0.25
MAX_TOKENS = 64
MAX_SLOTS = 64
_RETRY_S = 0.01


@dataclass(slots=True)
class Slot:
    """One in-flight slot this worker holds: its name in the store (or in the worker's own
    fallback store, ``local``) and until when it may start a request."""

    name: str
    local: bool
    usable_until: float
    idle_since: float = 0.0


class OutboundCaps:
    """One upstream's caps, as this worker spends its leases of them."""

    def __init__(self, store: Store, keys: KeySpace, config: UpstreamConfig) -> None:
        self.store = store
        self.config = config
        self._bucket = keys.upstream_bucket(config.name)
        self._slots_key = keys.upstream_slots(config.name)
        self._burst = max(1, int(config.max_rps // 16))
        spare = max(config.max_rps - self._burst, config.max_rps / 2)
        self._rate = spare / (1 + RATE_LEASE_S)
        # The longest a slot can be held: leased, waiting for a token, then one exchange.
        hold_s = SLOT_LEASE_S + config.queue_timeout_s + config.timeout_s + 2.0
        self._slot_ttl_ms = int(hold_s * 1000)
        self._holder = uuid.uuid4().hex
        self._next_slot = 0
        self._local = MemoryStore(max_keys=0)
        self._store_down = False
        self._tokens: deque[list[float]] = deque()  # [expires_at, tokens] chunks, oldest first
        self._last_grant = 0
        self._taker: asyncio.Task[None] | None = None
        self._idle: list[Slot] = []
        self._waiters: deque[asyncio.Future[Slot]] = deque()
        self._leaser: asyncio.Task[None] | None = None
        self._returns: list[Slot] = []
        self._keeper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._asking: set[str] = set()  # "rate", "slots": a store call not answered yet

    async def acquire(self, deadline: float | None = None) -> Slot:
        """An in-flight slot to pass to ``release``, after a rate token; raises Saturated
        after the wait.

        The wait ends after ``queue_timeout_s`` or at ``deadline`` (``time.monotonic()``),
        whichever comes first: a fan-out's deadline covers its wait for the caps too.
        """
        waited = time.monotonic() + self.config.queue_timeout_s
        deadline = waited if deadline is None else min(deadline, waited)
        slot = self._take_idle(time.monotonic())
        if slot is None:
            if self._taker is None and not self._tokens:
                # Ask for tokens meanwhile: on a slow store both answers come in one wait.
                self._taker = self._spawn(self._take_tokens(wait=True))
            slot = await self._wait_slot(deadline)
        try:
            if not self._spend(time.monotonic()):
                await self._wait_token(deadline)
        except BaseException:
            await self.release(slot)
            raise
        return slot

    def prepare(self) -> None:
        """A request here is likely soon: when this worker holds no slot or no token, start
        leasing them now, beside what the caller does first (its cache read), not after."""
        now = time.monotonic()
        if self._taker is None and not any(t > now and n >= 1 for t, n in self._tokens):
            self._taker = self._spawn(self._take_tokens(wait=False))
        if self._leaser is None and not any(s.usable_until > now for s in self._idle):
            self._leaser = self._spawn(self._lease_slots(ahead=1))

    async def release(self, slot: Slot) -> None:
        """Done with a slot: it serves the next request, or goes back when it is too old."""
        now = time.monotonic()
        if slot.usable_until > now:
            self._give(slot, now)
        else:
            self._give_back(slot)

    async def aclose(self) -> None:
        """Stop the background work and give every held slot back."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._returns += self._idle
        self._idle = []
        await self._return_slots()

    # -- rate -------------------------------------------------------------------------------

    def _spend(self, now: float) -> bool:
        """Spend a leased token if one is left; when a quarter of the last lease is left,
        lease more off the path."""
        tokens = self._tokens
        while tokens and (tokens[0][0] <= now or tokens[0][1] < 1):
            tokens.popleft()
        if not tokens:
            return False
        tokens[0][1] -= 1
        # Top up off the path: the next request should find a token here, not ask the store.
        if self._taker is None and sum(chunk[1] for chunk in tokens) * 4 < self._last_grant:
            self._taker = self._spawn(self._take_tokens(wait=False))
        return True

    async def _wait_token(self, deadline: float) -> None:
        while True:
            if self._taker is None:
                self._taker = self._spawn(self._take_tokens(wait=True))
            taker = self._taker
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await asyncio.shield(taker)
            except TimeoutError:
                if "rate" not in self._asking:
                    raise Saturated() from None
                await asyncio.shield(taker)  # no answer yet: the store's timeout bounds it
            if self._spend(time.monotonic()):
                return
            if time.monotonic() >= deadline:
                raise Saturated()

    async def _take_tokens(self, wait: bool) -> None:
        """One lease of rate tokens; when refused and ``wait``, sleep until the next token."""
        try:
            started = time.monotonic()
            args = (self._bucket, self._rate, self._burst, MAX_TOKENS, 0)
            grant = await self._call("rate", self.store.take_tokens, self._local.take_tokens, args)
            if self._store_down:
                started = time.monotonic()  # granted just now by the worker's own bucket
            if grant.granted > 0:
                self._tokens.append([started + RATE_LEASE_S, float(grant.granted)])
                self._last_grant = grant.granted
            elif wait:
                await asyncio.sleep(_retry_s(grant, self._rate))
        finally:
            self._taker = None

    # -- in-flight slots --------------------------------------------------------------------

    def _take_idle(self, now: float) -> Slot | None:
        # Most recently used first: the others stay idle long enough to go back.
        while self._idle:
            slot = self._idle.pop()
            if slot.usable_until > now:
                return slot
            self._give_back(slot)
        return None

    async def _wait_slot(self, deadline: float) -> Slot:
        waiter: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        if self._leaser is None:
            self._leaser = self._spawn(self._lease_slots())
        try:
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    return await asyncio.shield(waiter)
            except TimeoutError:
                if "slots" not in self._asking:
                    raise Saturated() from None
                return await asyncio.shield(waiter)  # no answer yet: the store's timeout bounds it
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._give(waiter.result(), time.monotonic())  # handed over as we gave up
            waiter.cancel()
            raise

    async def _lease_slots(self, ahead: int = 0) -> None:
        """Lease slots from the store for as long as requests here wait for one (and
        ``ahead`` more the first time)."""
        try:
            while waiting := self._waiting() + ahead:
                ahead = 0
                want = min(MAX_SLOTS, waiting)
                first, self._next_slot = self._next_slot, self._next_slot + want
                started = time.monotonic()
                limits = (self.config.max_concurrency, self._slot_ttl_ms)
                args = (self._slots_key, self._holder, first, want, *limits)
                granted = await self._call(
                    "slots", self.store.lease_slots, self._local.lease_slots, args
                )
                local = self._store_down
                if local:
                    started = time.monotonic()
                for seq in range(first, first + granted):
                    slot = Slot(f"{self._holder}:{seq}", local, started + SLOT_LEASE_S)
                    self._give(slot, time.monotonic())
                if granted == 0:
                    await asyncio.sleep(_RETRY_S * random.uniform(1.0, 1.5))
        finally:
            self._leaser = None

    def _waiting(self) -> int:
        """Requests waiting for a slot; those that gave up leave the queue."""
        self._waiters = deque(w for w in self._waiters if not w.done())
        return len(self._waiters)

    def _give(self, slot: Slot, now: float) -> None:
        """A free slot: to the first request still waiting, else idle."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(slot)
                return
        slot.idle_since = now
        self._idle.append(slot)
        self._keep()

    def _give_back(self, slot: Slot) -> None:
        self._returns.append(slot)
        self._keep()

    def _keep(self) -> None:
        if self._keeper is None:
            self._keeper = self._spawn(self._keep_slots())

    async def _keep_slots(self) -> None:
        """Off the path: give back slots too old to use or idle too long."""
        try:
            while self._returns or self._idle:
                await self._return_slots()
                await asyncio.sleep(IDLE_RETURN_S / 2)
                now = time.monotonic()
                keep = [s for s in self._idle if now - s.idle_since < IDLE_RETURN_S]
                if len(keep) < len(self._idle):
                    self._returns += [s for s in self._idle if s not in keep]
                    self._idle = keep
        finally:
            self._keeper = None

    async def _return_slots(self) -> None:
        returns, self._returns = self._returns, []
        shared = [s.name for s in returns if not s.local]
        with contextlib.suppress(StoreError):  # if it fails, the slots expire on their own
            await self.store.release_slots(self._slots_key, shared)
        await self._local.release_slots(self._slots_key, [s.name for s in returns if s.local])

    # -- plumbing ---------------------------------------------------------------------------

    async def _call(self, operation: str, shared: Any, local: Any, args: tuple[Any, ...]) -> Any:
        """``shared(*args)`` on the store; on a store failure ``local(*args)`` on this
        worker's own store, so that the worker caps itself until the store is back."""
        self._asking.add(operation)
        try:
            result = await shared(*args)
        except StoreError as exc:
            if not self._store_down:
                self._store_down = True
                log.warning(
                    "store_error",
                    purpose=f"outbound_{operation}",
                    upstream=self.config.name,
                    error=str(exc),
                    fallback="per-worker caps",
                )
            return await local(*args)
        finally:
            self._asking.discard(operation)
        if self._store_down:
            self._store_down = False
            log.info("store_back", operation="outbound_caps", upstream=self.config.name)
        return result

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _retry_s(grant: Grant, rate: float) -> float:
    """How long a refused taker sleeps: until the next token, spread a little so that the
    fleet's workers do not all ask at once."""
    return max(_RETRY_S, grant.retry_after_s(rate)) * random.uniform(1.0, 1.2)
