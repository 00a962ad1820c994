"""Dropping task ids from every cache tier: ``purge_ids`` for the admin route, and
``purge`` for ``mjgate cache purge`` from outside the gateway."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.cache import TaskCache
from gateway.config import Config
from gateway.errors import StoreError
from gateway.owners import OwnerMap
from gateway.store import KeySpace, RedisStore, Store
from gateway.tasks import valid_task_id

__all__ = ["Purged", "purge", "purge_ids"]


@dataclass(frozen=True, slots=True)
class Purged:
    """What a purge did, id by id, each id once and in the order given."""

    purged: list[str]  # the store held an answer for these (a task or "not found"): now gone
    absent: list[str]  # the store held nothing for these: there was nothing to drop


async def purge(config: Config, task_ids: Sequence[str]) -> Purged:
    """Delete every cached answer for these ids. Workers' in-process copies follow within
    ``cache.l1_ttl_s``. Raises ValueError for a bad id or an unreachable store."""
    for task_id in task_ids:
        if not valid_task_id(task_id):
            raise ValueError(f"not a task id: {task_id!r}")
    upstreams = [u.name for u in config.upstreams]
    store = RedisStore(config.redis)
    try:
        await store.ping()
        keys = KeySpace(config.redis.key_prefix)
        owners = OwnerMap(store, keys, config.cache.owner_ttl_s, 0)
        cache = TaskCache(store, keys, config.cache, owners)
        return await purge_ids(store, keys, cache, task_ids, upstreams)
    except StoreError as exc:
        raise ValueError(f"cannot reach the store, or it refused the delete: {exc}") from None
    finally:
        await store.close()


async def purge_ids(
    store: Store,
    keys: KeySpace,
    cache: TaskCache,
    task_ids: Sequence[str],
    upstreams: Sequence[str],
) -> Purged:
    """Delete every cached answer for these (valid) ids; say which the store held.
    Raises StoreError when the store refused or failed the delete."""
    ids = list(dict.fromkeys(task_ids))
    held = await _held(store, keys, ids, upstreams)
    # Every named id is deleted, held or not: one cached between the read above and this
    # delete is dropped too (and reported absent), so no id survives the purge.
    if not await cache.invalidate(ids, upstreams):
        raise StoreError("the store refused or failed the delete")
    return Purged(purged=[i for i in ids if i in held], absent=[i for i in ids if i not in held])


async def _held(
    store: Store, keys: KeySpace, ids: Sequence[str], upstreams: Sequence[str]
) -> set[str]:
    """The ids the store holds any answer for: a task body from an upstream, or "not found"."""
    wanted = [(i, keys.task(u, i)) for i in ids for u in upstreams]
    wanted += [(i, keys.not_found(i)) for i in ids]
    values = await store.mget([key for _, key in wanted])
    return {i for (i, _), value in zip(wanted, values, strict=True) if value is not None}
