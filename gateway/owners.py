"""Which upstream owns each task id, and who submitted it through mjgate.

Task ids are not unique across upstreams, so every call about a task must go to the upstream
that created it. Owners are written when a submit is accepted or a lookup finds a task, kept in
the shared store for weeks, and mirrored in a process-local LRU: an owner never changes in
practice, so the local copy saves a store round trip on every follow-up.

A submit accepted through mjgate also records its submitter (client and team) with the
owner, as ``upstream|client|team``: visibility checks read it from the same local copy as the
owner, so a cached fetch stays free of I/O. An owner found by a lookup has no submitter, and
is written only where the store holds none, so it never hides a submitter written meanwhile.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import structlog

from gateway.errors import StoreError
from gateway.lru import LRU
from gateway.store import KeySpace, Store

__all__ = ["Owner", "OwnerMap"]

log = structlog.get_logger("mjgate.owners")


class Owner(NamedTuple):
    """A task's upstream and, for a submit accepted through mjgate, its submitter."""

    upstream: str
    client: str | None = None  # None: not submitted through mjgate (or not known to be)
    team: str = ""

    def encode(self) -> bytes:
        if self.client is None:
            return self.upstream.encode()
        return f"{self.upstream}|{self.client}|{self.team}".encode()

    @staticmethod
    def decode(value: str) -> Owner:
        upstream, _, rest = value.partition("|")
        if not rest:
            return Owner(upstream)
        client, _, team = rest.partition("|")
        return Owner(upstream, client, team)


class OwnerMap:
    def __init__(self, store: Store, keys: KeySpace, ttl_s: int, local_entries: int) -> None:
        self._store = store
        self._keys = keys
        self._ttl_ms = ttl_s * 1000
        self._local: LRU[str, Owner] = LRU(local_entries)

    def local(self, task_id: str) -> str | None:
        """The owner if this process already knows it: no I/O."""
        entry = self._local.get(task_id)
        return entry.upstream if entry is not None else None

    def local_owner(self, task_id: str) -> Owner | None:
        """The owner with its submitter, if this process knows them: no I/O."""
        return self._local.get(task_id)

    def remember(self, task_id: str, value: str) -> str:
        """Keep an owner read from the store by someone else locally (the stored value, with
        or without a submitter); return the upstream's name."""
        owner = Owner.decode(value)
        self._local.set(task_id, owner)
        return owner.upstream

    async def get(self, task_id: str) -> str | None:
        """The owner's name, or None when unknown (a store failure counts as unknown)."""
        return (await self.get_many([task_id])).get(task_id)

    async def get_many(self, task_ids: Sequence[str]) -> dict[str, str]:
        """Known owners of these ids, with one store round trip for the ones not held locally."""
        return {t: o.upstream for t, o in (await self.owners(task_ids, False)).items()}

    async def owners(self, task_ids: Sequence[str], need_submitter: bool) -> dict[str, Owner]:
        """Known owners with their submitters. With ``need_submitter``, a local owner without
        one is read again from the store, where another worker may have recorded it."""
        owners: dict[str, Owner] = {}
        missing: list[str] = []
        for task_id in task_ids:
            owner = self._local.get(task_id)
            if owner is None or (need_submitter and owner.client is None):
                missing.append(task_id)
            else:
                owners[task_id] = owner
        if not missing:
            return owners
        try:
            values = await self._store.mget([self._keys.owner(t) for t in missing])
        except StoreError as exc:
            log.warning("store_error", purpose="owner_read", error=str(exc))
            values = [None] * len(missing)
        for task_id, value in zip(missing, values, strict=True):
            if value is not None:
                owner = Owner.decode(value.decode())
                self._local.set(task_id, owner)
                owners[task_id] = owner
            elif (held := self._local.get(task_id)) is not None:
                owners[task_id] = held
        return owners

    async def record(self, task_id: str, upstream: str) -> None:
        await self.record_many({task_id: upstream})

    async def record_many(self, owners: Mapping[str, str]) -> None:
        """Remember owners found by lookups: locally now, in the store off the request path
        (a failure there is logged by the store). Neither copy loses a submitter it holds."""
        fresh = {t: u for t, u in owners.items() if self.local(t) != u}
        if not fresh:
            return
        for task_id, upstream in fresh.items():
            self._local.set(task_id, Owner(upstream))
        items = {self._keys.owner(t): Owner(u).encode() for t, u in fresh.items()}
        self._store.write_later(items, self._ttl_ms, if_absent=True)

    async def record_submit(self, task_id: str, owner: Owner) -> None:
        """Remember the owner and submitter of a submit mjgate saw accepted."""
        self._local.set(task_id, owner)
        try:
            await self._store.set_many({self._keys.owner(task_id): owner.encode()}, self._ttl_ms)
        except StoreError as exc:
            log.warning("store_error", purpose="owner_write", error=str(exc))
