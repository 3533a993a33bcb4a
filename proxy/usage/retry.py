"""Backoff for the drainer (pure): exponential with full jitter, capped."""

from __future__ import annotations

from collections.abc import Callable

BASE_S = 0.5
CAP_S = 60.0


def backoff(
    failures: int, rand: Callable[[], float], base: float = BASE_S, cap: float = CAP_S
) -> float:
    """Seconds to wait after `failures` consecutive failures (>= 1): uniform in
    [0, min(cap, base * 2 ** (failures - 1))], so replicas that failed together spread out."""
    if failures <= 0:
        return 0.0
    ceiling = min(cap, base * 2.0 ** min(failures - 1, 30))
    return float(rand() * ceiling)


class Pacer:
    """At most `per_second` calls per second: `delay()` says how long to wait before the next."""

    def __init__(self, per_second: float, now: Callable[[], float]) -> None:
        self._interval = 1.0 / per_second
        self._now = now
        self._next = 0.0

    def delay(self) -> float:
        now = self._now()
        start = max(now, self._next)
        self._next = start + self._interval
        return start - now
