"""A circuit breaker (pure state machine, injected clock) so a dead Redis costs nothing per call."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum


class BreakerState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Opens after `failures` consecutive failures; after `cooldown` s lets one probe through."""

    def __init__(self, failures: int, cooldown: float, now: Callable[[], float]) -> None:
        self._threshold = failures
        self._cooldown = cooldown
        self._now = now
        self._failures = 0
        self._state = BreakerState.CLOSED
        self._since = 0.0

    @property
    def state(self) -> BreakerState:
        return self._state

    def allow(self) -> bool:
        if self._state is BreakerState.CLOSED:
            return True
        if self._now() - self._since < self._cooldown:
            return False
        # Cooldown over (or a probe was lost to cancellation): let one request probe.
        self._state = BreakerState.HALF_OPEN
        self._since = self._now()
        return True

    def success(self) -> None:
        self._failures = 0
        self._state = BreakerState.CLOSED

    def failure(self) -> None:
        self._failures += 1
        if self._state is BreakerState.HALF_OPEN or self._failures >= self._threshold:
            self._state = BreakerState.OPEN
            self._since = self._now()
