"""Injected time sources: production uses the real clocks, tests pass their own."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock seconds since the epoch (periods, timestamps)."""

    def monotonic(self) -> float:
        """Seconds on a monotonic clock (rate limits, timeouts, breakers)."""


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


@dataclass
class ManualClock:
    """A clock that moves only when a test tells it to."""

    now: float = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    mono: float = 1000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.mono += seconds
