"""Outbound caps per upstream: ``max_rps`` and ``max_concurrency``, shared by every worker.

Providers ban IPs that call too fast (the C# midjourney-proxy blocks an IP for a day after 30
requests a second), so what the whole fleet sends one upstream is capped through the store.
A request over a cap waits up to ``queue_timeout_s``, then fails as saturated. While the
store is unreachable each worker caps itself with the same numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid

import structlog

from gateway.config import UpstreamConfig
from gateway.errors import Saturated, StoreError
from gateway.store import KeySpace, MemoryStore, Store

__all__ = ["OutboundCaps"]

log = structlog.get_logger("mjgate.outbound")

_MIN_WAIT_S = 0.005


class OutboundCaps:
    def __init__(self, store: Store, keys: KeySpace, config: UpstreamConfig) -> None:
        self.store = store
        self.config = config
        self._bucket = keys.upstream_bucket(config.name)
        self._slots = keys.upstream_slots(config.name)
        # A holder that dies without releasing (a killed worker) frees its slot after this.
        self._slot_ttl_ms = int((config.timeout_s + 5) * 1000)
        self._local = MemoryStore(max_keys=0)
        self._store_down = False

    async def acquire(self, deadline: float | None = None) -> str:
        """A slot holder id to pass to ``release``; raises Saturated after the wait.

        The wait ends after ``queue_timeout_s`` or at ``deadline`` (``time.monotonic()``),
        whichever comes first: a fan-out's deadline covers its wait for the caps too.
        """
        holder = uuid.uuid4().hex
        waited = time.monotonic() + self.config.queue_timeout_s
        deadline = waited if deadline is None else min(deadline, waited)
        while True:
            wait_ms = await self._try(holder)
            if wait_ms == 0:
                return holder
            left = deadline - time.monotonic()
            if left <= 0:
                raise Saturated()
            wait_s = max(_MIN_WAIT_S, wait_ms / 1000) * random.uniform(1.0, 1.5)
            await asyncio.sleep(min(wait_s, left))

    async def release(self, holder: str) -> None:
        with contextlib.suppress(StoreError):  # if it fails, the slot expires on its own
            await self.store.release_slot(self._slots, holder)
        await self._local.release_slot(self._slots, holder)

    async def _try(self, holder: str) -> int:
        args = (self._bucket, self._slots, self.config.max_rps, holder)
        limits = (self.config.max_concurrency, self._slot_ttl_ms)
        try:
            wait_ms = await self.store.acquire_outbound(*args, *limits)
        except StoreError as exc:
            if not self._store_down:
                self._store_down = True
                log.warning(
                    "store_error",
                    operation="outbound_caps",
                    upstream=self.config.name,
                    error=str(exc),
                    fallback="per-worker caps",
                )
            return await self._local.acquire_outbound(*args, *limits)
        if self._store_down:
            self._store_down = False
            log.info("store_back", operation="outbound_caps", upstream=self.config.name)
        return wait_ms
