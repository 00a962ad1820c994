"""Single flight: one run of the work per key, whatever happens to the callers."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from gateway.flights import Flights


class Work:
    """Work that counts its runs and finishes (or fails) when the test says so."""

    def __init__(self) -> None:
        self.runs = 0
        self.release = asyncio.Event()
        self.error: Exception | None = None

    async def __call__(self) -> str:
        self.runs += 1
        run = self.runs
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return f"run {run}"


async def callers(flights: Flights[str, str], work: Work, count: int) -> list[asyncio.Task[Any]]:
    """``count`` callers of one key, all started and waiting (the first one leads)."""
    tasks = [asyncio.create_task(flights.join("task", work)) for _ in range(count)]
    await asyncio.sleep(0)
    assert not any(task.done() for task in tasks)
    return tasks


async def test_concurrent_callers_share_one_run() -> None:
    flights: Flights[str, str] = Flights()
    work = Work()
    five = await callers(flights, work, 5)
    assert len(flights) == 1
    work.release.set()
    outcomes = await asyncio.gather(*five)
    assert outcomes == [("run 1", False)] + [("run 1", True)] * 4
    assert work.runs == 1
    assert len(flights) == 0


async def test_keys_fly_apart_and_a_later_caller_runs_again() -> None:
    flights: Flights[str, str] = Flights()
    work = Work()
    work.release.set()
    together = await asyncio.gather(flights.join("a", work), flights.join("b", work))
    assert list(together) == [("run 1", False), ("run 2", False)]
    assert await flights.join("a", work) == ("run 3", False)


async def test_every_caller_gets_the_error_and_it_is_not_logged_as_unretrieved(
    caplog: pytest.LogCaptureFixture,
) -> None:
    flights: Flights[str, str] = Flights()
    work = Work()
    work.error = RuntimeError("upstream down")
    three = await callers(flights, work, 3)
    work.release.set()
    outcomes = await asyncio.gather(*three, return_exceptions=True)
    assert [str(outcome) for outcome in outcomes] == ["upstream down"] * 3
    # Alone in its flight, the error still reaches the caller, and nothing else.
    with pytest.raises(RuntimeError):
        await flights.join("alone", work)
    gc.collect()
    assert "never retrieved" not in caplog.text
    assert len(flights) == 0


async def test_a_cancelled_waiter_leaves_the_flight_to_the_others() -> None:
    flights: Flights[str, str] = Flights()
    work = Work()
    leader, *waiters = await callers(flights, work, 3)
    waiters[0].cancel()
    await asyncio.sleep(0)
    work.release.set()
    assert await leader == ("run 1", False)
    assert await waiters[1] == ("run 1", True)
    assert waiters[0].cancelled()
    assert work.runs == 1


async def test_a_cancelled_leader_hands_the_flight_to_a_waiter() -> None:
    flights: Flights[str, str] = Flights()
    work = Work()
    leader, *waiters = await callers(flights, work, 4)
    leader.cancel()
    for _ in range(3):
        await asyncio.sleep(0)
    assert leader.cancelled()
    assert work.runs == 2
    assert len(flights) == 1
    work.release.set()
    outcomes = await asyncio.gather(*waiters)
    # One waiter flew again; the others joined it.
    assert sorted(outcomes) == [("run 2", False), ("run 2", True), ("run 2", True)]
    assert work.runs == 2
