"""``mjgate cache purge``: drop task ids from the shared store, from outside the gateway."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.cache import TaskCache
from gateway.config import Config
from gateway.owners import OwnerMap
from gateway.store import KeySpace, RedisStore, StoreError
from gateway.tasks import valid_task_id

__all__ = ["purge"]


async def purge(config: Config, task_ids: Sequence[str]) -> None:
    """Delete every cached answer for these ids. Workers' in-process copies follow within
    ``cache.l1_ttl_s``. Raises ValueError for a bad id or an unreachable store."""
    for task_id in task_ids:
        if not valid_task_id(task_id):
            raise ValueError(f"not a task id: {task_id!r}")
    store = RedisStore(config.redis)
    try:
        await store.ping()
        keys = KeySpace(config.redis.key_prefix)
        owners = OwnerMap(store, keys, config.cache.owner_ttl_s, 0)
        cache = TaskCache(store, keys, config.cache, owners)
        if not await cache.invalidate(task_ids, [u.name for u in config.upstreams]):
            raise ValueError("the store refused or failed the delete; nothing was purged")
    except StoreError as exc:
        raise ValueError(f"cannot reach the store: {exc}") from None
    finally:
        await store.close()
