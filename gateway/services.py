"""The gateway's long-lived services, built once in the lifespan and closed in one place.

``open_services(config)`` opens the store, the upstream clients and everything that sits on
them, yields one frozen ``Services``, and on the way out cancels and awaits the background
work it tracked before closing clients. Routes and the front middleware receive it through
Starlette's lifespan state (``request.state.services``), never through globals, so the app
may be built before a fork (gunicorn ``preload_app``) without sharing sockets.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import structlog
from starlette.types import Scope

from gateway.auth import ClientRegistry
from gateway.cache import TaskCache
from gateway.circuit import CircuitBreaker
from gateway.config import Config, UpstreamConfig
from gateway.lookup import TaskLookup
from gateway.metrics import CIRCUIT_STATE, CIRCUIT_VALUES
from gateway.outbound import OutboundCaps
from gateway.owners import OwnerMap
from gateway.query import TaskSearch
from gateway.ratelimit import CallerLimiter
from gateway.store import KeySpace, Store, open_store
from gateway.upstreams import Upstream, UpstreamPool

__all__ = ["Background", "Services", "open_services", "services_of"]

log = structlog.get_logger("mjgate.services")

STATE_KEY = "services"


class Background:
    """Fire-and-forget work that must still end with the process: tracked, so that closing
    the services cancels and awaits it instead of leaving it to die with the loop."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass(frozen=True, slots=True)
class Services:
    """Everything a request may use, opened before the first request."""

    config: Config
    registry: ClientRegistry
    store: Store
    keys: KeySpace
    pool: UpstreamPool
    limiter: CallerLimiter
    owners: OwnerMap
    cache: TaskCache
    lookup: TaskLookup
    search: TaskSearch
    background: Background


def services_of(scope: Scope) -> Services:
    """The services of the app serving this request."""
    services: Services = scope["state"][STATE_KEY]
    return services


@asynccontextmanager
async def open_services(config: Config) -> AsyncIterator[Services]:
    """Open every service for ``config``; close them all, background work first, on exit."""
    store = open_store(config.redis)
    await store.open()
    keys = KeySpace(config.redis.key_prefix)
    pool = UpstreamPool([_upstream(config, u, store, keys) for u in config.upstreams])
    owners = OwnerMap(store, keys, config.cache.owner_ttl_s, config.cache.l1_max_entries)
    cache = TaskCache(store, keys, config.cache, owners)
    lookup = TaskLookup(owners, cache, config.fanout)
    services = Services(
        config=config,
        registry=ClientRegistry(config),
        store=store,
        keys=keys,
        pool=pool,
        limiter=CallerLimiter(store, keys, config.rate_limit),
        owners=owners,
        cache=cache,
        lookup=lookup,
        search=TaskSearch(lookup, config.fanout.deadline_s),
        background=Background(),
    )
    try:
        yield services
    finally:
        await services.background.aclose()
        await pool.aclose()
        await store.close()


def _upstream(config: Config, upstream: UpstreamConfig, store: Store, keys: KeySpace) -> Upstream:
    def changed(old: str, new: str) -> None:
        log.warning("circuit_change", upstream=upstream.name, old=old, new=new)
        CIRCUIT_STATE.labels(upstream.name).set(CIRCUIT_VALUES[new])

    CIRCUIT_STATE.labels(upstream.name).set(0)
    circuit = config.circuit
    breaker = CircuitBreaker(circuit.failure_threshold, circuit.cooldown_s, changed)
    return Upstream(upstream, OutboundCaps(store, keys, upstream), breaker)
