"""Shared fixtures: one redis-server and three `mjgate sim` upstreams per test session."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from gateway.config import RedisConfig, Secret
from gateway.store import MemoryStore, RedisStore, Store
from tests.support import RedisProcess, SimProcess, standard_sims


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    server = RedisProcess()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def session_sims() -> Iterator[list[SimProcess]]:
    sims = standard_sims()
    for sim in sims:
        sim.start()
    yield sims
    for sim in sims:
        sim.stop()


@pytest.fixture
def sims(session_sims: list[SimProcess]) -> list[SimProcess]:
    """The three sims with their tasks, counters and faults reset for this test."""
    for sim in session_sims:
        sim.reset()
    return session_sims


@pytest.fixture(params=["memory", "redis"])
def store_url(request: pytest.FixtureRequest) -> str:
    """Runs a test once on the embedded store and once on a real Redis."""
    if request.param == "memory":
        return ""
    redis: RedisProcess = request.getfixturevalue("redis_server")
    return redis.url


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """Each behavior test runs on the embedded store and on the session's real Redis."""
    if request.param == "memory":
        memory = MemoryStore()
        yield memory
        await memory.close()
        return
    server: RedisProcess = request.getfixturevalue("redis_server")
    redis_store = RedisStore(RedisConfig(url=Secret(server.url)))
    yield redis_store
    await redis_store.close()


@pytest.fixture
def own_redis() -> Iterator[RedisProcess]:
    """A redis-server of the test's own, which it may stop, freeze or reconfigure."""
    server = RedisProcess()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: RedisProcess) -> Iterator[redis.Redis]:
    """A plain client of the session's redis-server, to look at what the gateway wrote."""
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()
