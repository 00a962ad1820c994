"""Shared fixtures: one redis-server and three `mjgate sim` upstreams per test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

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
