"""The gateway's long-lived services, built once in the lifespan and closed in one place.

``open_services(config)`` opens the store, the upstream clients and everything that sits on
them, yields one frozen ``Services``, and on the way out cancels and awaits the background
work it tracked before closing clients. Routes and the front middleware receive it through
Starlette's lifespan state (``request.state.services``), never through globals, so the app
may be built before a fork (gunicorn ``preload_app``) without sharing sockets.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import structlog
from starlette.types import Scope

from gateway.auth import ClientRegistry
from gateway.cache import TaskCache
from gateway.circuit import CircuitBreaker
from gateway.config import Config, UpstreamConfig
from gateway.dedup import Dedup
from gateway.events import EventHub, StreamTokens, TaskEvents
from gateway.images.service import ImageService
from gateway.ledger import Ledger
from gateway.lookup import TaskLookup
from gateway.metrics import CIRCUIT_STATE, CIRCUIT_VALUES
from gateway.outbound import OutboundCaps
from gateway.owners import OwnerMap
from gateway.push import Pushes
from gateway.query import TaskSearch
from gateway.quota import Quotas
from gateway.ratelimit import CallerLimiter
from gateway.store import KeySpace, Store, open_store
from gateway.upstreams import Upstream, UpstreamPool
from gateway.visibility import Visibility
from gateway.watcher import Watcher
from gateway.webhooks import Deliveries

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
    visibility: Visibility
    quotas: Quotas
    ledger: Ledger
    dedup: Dedup
    deliveries: Deliveries
    events: TaskEvents
    hub: EventHub
    stream_tokens: StreamTokens
    pushes: Pushes
    images: ImageService | None = None  # images.enabled


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
    background = Background()
    quotas = Quotas(store, keys, config)
    ledger = Ledger(store, keys, config, owners, quotas, background.spawn)
    cache.listeners.append(ledger.saw)
    deliveries = Deliveries(config, store, keys)
    events = TaskEvents(store, keys, deliveries, background.spawn)
    cache.listeners.append(events.saw)
    images = await _open_images(config, pool, cache, background)
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
        background=background,
        visibility=Visibility(owners),
        quotas=quotas,
        ledger=ledger,
        dedup=Dedup(store, keys, config.submit.dedup_window_s, _submit_lease_s(config)),
        deliveries=deliveries,
        events=events,
        hub=EventHub(store, events.channel),
        stream_tokens=StreamTokens(config.server.secret_key.reveal(), config.clients),
        pushes=Pushes(config, store, keys, owners),
        images=images,
    )
    background.spawn(ledger.watch_stuck())
    _start_watching(services)
    try:
        yield services
    finally:
        await services.background.aclose()
        if images is not None:
            await images.aclose()
        await pool.aclose()
        await store.close()


async def _open_images(
    config: Config, pool: UpstreamPool, cache: TaskCache, background: Background
) -> ImageService | None:
    """The image service (with ``images.enabled``), opened and hooked into the task cache."""
    if not config.images.enabled:
        return None
    images = ImageService(config, pool, cache, background.spawn)
    await images.open()
    cache.images = images
    return images


def _start_watching(services: Services) -> None:
    """The loops every worker runs: its event subscription, its share of the webhook
    deliveries, and a bid for the watcher's lease."""
    spawn = services.background.spawn
    spawn(_forever("events", services.hub.run))
    spawn(_forever("webhooks", services.deliveries.run))
    if services.config.watcher.enabled:
        s = services
        watcher = Watcher(s.config, s.store, s.keys, s.pool, s.cache, s.owners, s.ledger)
        spawn(_forever("watcher", watcher.run))


async def _forever(name: str, loop: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a loop meant to last until cancelled; a bug that ends it is logged and the loop
    started again a moment later."""
    while True:
        try:
            await loop()
        except Exception:
            log.exception("background_loop_failed", loop=name)
        await asyncio.sleep(1.0)


def _submit_lease_s(config: Config) -> float:
    """The longest one submit may take: every upstream tried in turn, each waited for."""
    return sum(u.queue_timeout_s + u.timeout_s for u in config.upstreams) + 5.0


def _upstream(config: Config, upstream: UpstreamConfig, store: Store, keys: KeySpace) -> Upstream:
    def changed(old: str, new: str) -> None:
        log.warning("circuit_change", upstream=upstream.name, old=old, new=new)
        CIRCUIT_STATE.labels(upstream.name).set(CIRCUIT_VALUES[new])

    CIRCUIT_STATE.labels(upstream.name).set(0)
    circuit = config.circuit
    # The breaker wakes itself when its cool-down ends, so the state metric turns on time.
    schedule = asyncio.get_running_loop().call_later
    breaker = CircuitBreaker(
        circuit.failure_threshold, circuit.cooldown_s, changed, schedule=schedule
    )
    caps = OutboundCaps(store, keys, upstream)
    return Upstream(upstream, caps, breaker, [u.key.reveal() for u in config.upstreams])
