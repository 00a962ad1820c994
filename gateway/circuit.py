"""A circuit breaker per upstream (per worker).

Consecutive connection errors, timeouts or 5xx answers open the circuit for a cool-down,
during which calls fail fast instead of piling onto a provider that is down. After the
cool-down one probe request is let through: success closes the circuit, failure opens it
for another cool-down.

The state turns half-open when the cool-down ends, not when the next request happens to
come: given a ``schedule`` (the event loop's ``call_later``), the breaker wakes itself up then,
so the state metric and ``/readyz`` of a quiet gateway stop saying "open" on time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

__all__ = ["CircuitBreaker", "CircuitState", "Schedule"]

CircuitState = Literal["closed", "open", "half_open"]
# Run a callback after a delay in seconds, like ``loop.call_later``.
Schedule = Callable[[float, Callable[[], None]], object]


class CircuitBreaker:
    def __init__(
        self,
        threshold: int,
        cooldown_s: float,
        on_change: Callable[[CircuitState, CircuitState], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        schedule: Schedule | None = None,
    ) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.state: CircuitState = "closed"
        self.failures = 0
        self._opened_at = 0.0
        self._probe_out = False
        self._on_change = on_change
        self._clock = clock
        self._schedule = schedule

    @property
    def is_open(self) -> bool:
        """Open and still cooling down: callers should skip this upstream."""
        return self.state == "open" and self._cooling_left() > 0

    def allow(self) -> bool:
        """May a request go out now? In half-open state only one probe at a time."""
        if self.state == "closed":
            return True
        if self.state == "open":
            self.cool_down()
            if self.state == "open":
                return False
        if self._probe_out:
            return False
        self._probe_out = True
        return True

    def success(self) -> None:
        self.failures = 0
        self._probe_out = False
        if self.state != "closed":
            self._move("closed")

    def failure(self) -> None:
        self.failures += 1
        self._probe_out = False
        if self.state == "half_open" or self.failures >= self.threshold:
            self._opened_at = self._clock()
            if self._schedule is not None:
                self._schedule(self.cooldown_s, self._wake)
            if self.state != "open":
                self._move("open")

    def cool_down(self) -> None:
        """Turn half-open if the circuit is open and its cool-down has passed."""
        if self.state == "open" and self._cooling_left() <= 0:
            self._move("half_open")

    def _cooling_left(self) -> float:
        return self.cooldown_s - (self._clock() - self._opened_at)

    def _wake(self) -> None:
        left = self._cooling_left()
        if self.state == "open" and left > 0 and self._schedule is not None:
            # Woken a hair early (timer resolution) or the cool-down restarted: sleep again.
            self._schedule(left, self._wake)
        else:
            self.cool_down()

    def release_probe(self) -> None:
        """The probe ended without telling anything about health (e.g. it was cancelled)."""
        self._probe_out = False

    def _move(self, new: CircuitState) -> None:
        old, self.state = self.state, new
        if self._on_change is not None:
            self._on_change(old, new)
