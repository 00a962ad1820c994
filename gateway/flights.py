"""Single flight: concurrent callers asking for the same thing share one run of the work.

The first caller with a key runs the work in its own task and the others wait for its
outcome. A task per flight would cost every miss a task's creation, its scheduling and a
shield (about 3% of a miss's CPU) to serve callers who are nearly always alone. The price is that
the leader's cancellation ends the flight: its waiters then start it again themselves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["Flights"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Flights(Generic[K, V]):
    """The flights in progress, by key."""

    def __init__(self) -> None:
        self._running: dict[K, asyncio.Future[V]] = {}

    def __len__(self) -> int:
        return len(self._running)

    async def join(self, key: K, work: Callable[[], Awaitable[V]]) -> tuple[V, bool]:
        """The outcome of ``work()`` (its value, or its exception raised), and whether it
        came from another caller's flight. A waiter that is cancelled leaves the flight to
        the others."""
        while True:
            flight = self._running.get(key)
            if flight is None:
                return await self._lead(key, work), False
            try:
                return await asyncio.shield(flight), True
            except asyncio.CancelledError:
                if not flight.cancelled() or _being_cancelled():
                    raise
                # The leader was cancelled, not this caller: fly again.

    async def _lead(self, key: K, work: Callable[[], Awaitable[V]]) -> V:
        flight: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._running[key] = flight
        try:
            value = await work()
        except Exception as exc:
            flight.set_exception(exc)
            flight.exception()  # retrieved, so a flight no one joined logs no warning
            raise
        except BaseException:
            flight.cancel()
            raise
        finally:
            del self._running[key]
        flight.set_result(value)
        return value


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
