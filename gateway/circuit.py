"""A circuit breaker per upstream (per worker).

Consecutive connection errors, timeouts or 5xx answers open the circuit for a cool-down,
during which calls fail fast instead of piling onto a provider that is down. After the
cool-down one probe request is let through: success closes the circuit, failure opens it
for another cool-down.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

__all__ = ["CircuitBreaker", "CircuitState"]

CircuitState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    def __init__(
        self,
        threshold: int,
        cooldown_s: float,
        on_change: Callable[[CircuitState, CircuitState], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.state: CircuitState = "closed"
        self.failures = 0
        self._opened_at = 0.0
        self._probe_out = False
        self._on_change = on_change
        self._clock = clock

    @property
    def is_open(self) -> bool:
        """Open and still cooling down: callers should skip this upstream."""
        return self.state == "open" and self._clock() - self._opened_at < self.cooldown_s

    def allow(self) -> bool:
        """May a request go out now? In half-open state only one probe at a time."""
        if self.state == "closed":
            return True
        if self.state == "open":
            if self._clock() - self._opened_at < self.cooldown_s:
                return False
            self._move("half_open")
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
            if self.state != "open":
                self._move("open")

    def release_probe(self) -> None:
        """The probe ended without telling anything about health (e.g. it was cancelled)."""
        self._probe_out = False

    def _move(self, new: CircuitState) -> None:
        old, self.state = self.state, new
        if self._on_change is not None:
            self._on_change(old, new)
