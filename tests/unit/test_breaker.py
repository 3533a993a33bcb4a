"""Tests for proxy.breaker.CircuitBreaker driven by a fake clock."""

from __future__ import annotations

import pytest

from proxy.breaker import BreakerState, CircuitBreaker

FAILURES = 3
COOLDOWN = 5.0
EPS = 0.25  # exact in binary, so clock arithmetic lands exactly on boundaries


class FakeTime:
    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> FakeTime:
    return FakeTime()


@pytest.fixture
def breaker(clock: FakeTime) -> CircuitBreaker:
    return CircuitBreaker(FAILURES, COOLDOWN, clock)


def state(breaker: CircuitBreaker) -> BreakerState:
    """Read the state through a call, so mypy does not narrow it across transitions."""
    return breaker.state


def trip(breaker: CircuitBreaker) -> None:
    for _ in range(FAILURES):
        assert breaker.allow()
        breaker.failure()
    assert state(breaker) is BreakerState.OPEN


def test_starts_closed_and_allows(breaker: CircuitBreaker) -> None:
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.allow()
    assert breaker.allow()


def test_opens_after_consecutive_failures(breaker: CircuitBreaker) -> None:
    for _ in range(FAILURES - 1):
        breaker.failure()
        assert state(breaker) is BreakerState.CLOSED
        assert breaker.allow()
    breaker.failure()
    assert state(breaker) is BreakerState.OPEN
    assert not breaker.allow()


def test_threshold_of_one_opens_on_first_failure(clock: FakeTime) -> None:
    breaker = CircuitBreaker(1, COOLDOWN, clock)
    breaker.failure()
    assert state(breaker) is BreakerState.OPEN


def test_success_resets_failure_count(breaker: CircuitBreaker) -> None:
    for _ in range(FAILURES - 1):
        breaker.failure()
    breaker.success()
    for _ in range(FAILURES - 1):
        breaker.failure()
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.allow()
    breaker.failure()
    assert state(breaker) is BreakerState.OPEN


def test_refuses_throughout_cooldown(breaker: CircuitBreaker, clock: FakeTime) -> None:
    trip(breaker)
    assert not breaker.allow()
    clock.advance(COOLDOWN / 2)
    assert not breaker.allow()
    clock.advance(COOLDOWN / 2 - EPS)
    assert not breaker.allow()
    assert state(breaker) is BreakerState.OPEN


def test_half_open_after_cooldown_lets_exactly_one_probe(
    breaker: CircuitBreaker, clock: FakeTime
) -> None:
    trip(breaker)
    clock.advance(COOLDOWN)
    assert breaker.allow()
    assert state(breaker) is BreakerState.HALF_OPEN
    assert not breaker.allow()
    clock.advance(COOLDOWN / 2)
    assert not breaker.allow()
    assert state(breaker) is BreakerState.HALF_OPEN


def test_probe_success_closes(breaker: CircuitBreaker, clock: FakeTime) -> None:
    trip(breaker)
    clock.advance(COOLDOWN)
    assert breaker.allow()
    breaker.success()
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.allow()
    assert breaker.allow()
    # The count starts over: one failure does not reopen it.
    breaker.failure()
    assert state(breaker) is BreakerState.CLOSED


def test_probe_failure_reopens_immediately(breaker: CircuitBreaker, clock: FakeTime) -> None:
    trip(breaker)
    clock.advance(COOLDOWN + 1)
    assert breaker.allow()
    breaker.failure()
    assert state(breaker) is BreakerState.OPEN
    assert not breaker.allow()
    # The new cooldown counts from the failed probe.
    clock.advance(COOLDOWN - EPS)
    assert not breaker.allow()
    clock.advance(EPS)
    assert breaker.allow()
    assert state(breaker) is BreakerState.HALF_OPEN


def test_lost_probe_allows_another_after_cooldown(breaker: CircuitBreaker, clock: FakeTime) -> None:
    trip(breaker)
    clock.advance(COOLDOWN)
    assert breaker.allow()  # the probe is then cancelled: no success(), no failure()
    clock.advance(COOLDOWN - EPS)
    assert not breaker.allow()
    clock.advance(EPS)
    assert breaker.allow()
    assert state(breaker) is BreakerState.HALF_OPEN
    assert not breaker.allow()
    breaker.success()
    assert state(breaker) is BreakerState.CLOSED
