"""Which upstream owns each task id.

Task ids are not unique across upstreams, so every call about a task must go to the upstream
that created it. Owners are written when a submit is accepted or a lookup finds a task, kept in
the shared store for weeks, and mirrored in a process-local LRU: an owner never changes in
practice, so the local copy saves a store round trip on every follow-up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import structlog

from gateway.errors import StoreError
from gateway.lru import LRU
from gateway.store import KeySpace, Store

__all__ = ["OwnerMap"]

log = structlog.get_logger("mjgate.owners")


class OwnerMap:
    def __init__(self, store: Store, keys: KeySpace, ttl_s: int, local_entries: int) -> None:
        self._store = store
        self._keys = keys
        self._ttl_ms = ttl_s * 1000
        self._local: LRU[str, str] = LRU(local_entries)

    def local(self, task_id: str) -> str | None:
        """The owner if this process already knows it: no I/O."""
        return self._local.get(task_id)

    def remember(self, task_id: str, upstream: str) -> None:
        """Keep an owner read from the store by someone else locally."""
        self._local.set(task_id, upstream)

    async def get(self, task_id: str) -> str | None:
        """The owner's name, or None when unknown (a store failure counts as unknown)."""
        return (await self.get_many([task_id])).get(task_id)

    async def get_many(self, task_ids: Sequence[str]) -> dict[str, str]:
        """Known owners of these ids, with one store round trip for the ones not held locally."""
        owners: dict[str, str] = {}
        missing: list[str] = []
        for task_id in task_ids:
            owner = self._local.get(task_id)
            if owner is None:
                missing.append(task_id)
            else:
                owners[task_id] = owner
        if not missing:
            return owners
        try:
            values = await self._store.mget([self._keys.owner(t) for t in missing])
        except StoreError as exc:
            log.warning("store_error", operation="owner_read", error=str(exc))
            return owners
        for task_id, value in zip(missing, values, strict=True):
            if value is not None:
                owner = value.decode()
                self._local.set(task_id, owner)
                owners[task_id] = owner
        return owners

    async def record(self, task_id: str, upstream: str) -> None:
        await self.record_many({task_id: upstream})

    async def record_many(self, owners: Mapping[str, str]) -> None:
        """Remember owners; a store failure is logged and the local copy still kept."""
        fresh = {t: u for t, u in owners.items() if self._local.get(t) != u}
        if not fresh:
            return
        for task_id, upstream in fresh.items():
            self._local.set(task_id, upstream)
        items = {self._keys.owner(t): u.encode() for t, u in fresh.items()}
        try:
            await self._store.set_many(items, self._ttl_ms)
        except StoreError as exc:
            log.warning("store_error", operation="owner_write", error=str(exc))
