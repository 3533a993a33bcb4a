"""The quota contract, run unchanged on a real Redis and on the embedded (fakeredis) store.

Every figure below is exact. The rate limit is GCRA with interval I = 1e6 / per_second us and
tolerance (burst - 1) * I; a call at `now` is refused when TAT - now > tolerance, and then
retry_after_ms = ceil((TAT - tolerance - now) / 1000).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError

from proxy.breaker import BreakerState, CircuitBreaker
from proxy.clock import SystemClock
from proxy.config import Plan
from proxy.keys import KeySpace
from proxy.quota.engine import COUNTER_RETENTION_S, QuotaEngine
from proxy.quota.policy import Decision, Outcome, Period, calendar_month
from proxy.quota.storage import QuotaStorage, Reservation
from proxy.store import StoreGuard, StoreUnavailable
from tests.contract.conftest import (
    BREAKER_COOLDOWN_S,
    BREAKER_FAILURES,
    GUARD_TIMEOUT_S,
    Rig,
    aligned_clock,
    build_engine,
    make_plan,
)

TENANT = "acme"


async def reserve(
    engine: QuotaEngine,
    plan: Plan,
    period: Period,
    *,
    tenant: str = TENANT,
    weight: int = 1,
    tool: str | None = None,
) -> tuple[Decision, Reservation | None]:
    return await engine.reserve(tenant, plan, period, weight, tool)


def assert_allowed(
    decision: Decision, res: Reservation | None, *, used: int, limit: int | None, cost: int = 1
) -> Reservation:
    assert decision.outcome is Outcome.ALLOWED, decision
    assert decision.allowed is True
    assert (decision.used, decision.limit, decision.cost) == (used, limit, cost)
    assert decision.retry_after_ms == 0
    assert res is not None
    assert res.cost == cost
    assert decision.reservation_id == res.reservation_id
    return res


def assert_refused(
    decision: Decision,
    res: Reservation | None,
    outcome: Outcome,
    *,
    used: int,
    limit: int | None,
    cost: int = 1,
    retry_after_ms: int = 0,
) -> None:
    assert decision.outcome is outcome, decision
    assert decision.allowed is False
    assert (decision.used, decision.limit, decision.cost) == (used, limit, cost)
    assert decision.retry_after_ms == retry_after_ms
    assert decision.reservation_id is None
    assert res is None


# 1. Block plan ----------------------------------------------------------------------------


async def test_block_plan_allows_included_units_then_refuses_without_side_effects(
    rig: Rig,
) -> None:
    plan = make_plan(included=5, overage="block")
    period = rig.engine.period(None, None)
    held: list[Reservation] = []
    for n in range(1, 6):
        decision, res = await reserve(rig.engine, plan, period)
        held.append(assert_allowed(decision, res, used=n, limit=5))
    assert await rig.storage.used(TENANT, period.start) == 5
    assert await rig.storage.held(TENANT) == 5

    before = await rig.snapshot()
    decision, res = await reserve(rig.engine, plan, period)
    assert_refused(decision, res, Outcome.REFUSED_QUOTA, used=5, limit=5)
    assert await rig.snapshot() == before  # not one byte written by a refusal
    assert await rig.storage.used(TENANT, period.start) == 5
    assert await rig.storage.held(TENANT) == 5

    for r in held:
        await rig.engine.settle(r, commit=True)
    assert await rig.storage.used(TENANT, period.start) == 5
    assert await rig.storage.held(TENANT) == 0
    for _ in range(3):
        decision, res = await reserve(rig.engine, plan, period)
        assert_refused(decision, res, Outcome.REFUSED_QUOTA, used=5, limit=5)
    assert await rig.storage.used(TENANT, period.start) == 5
    assert await rig.storage.held(TENANT) == 0  # refusals hold nothing
    assert await rig.engine.used(TENANT, period) == 5


# 2. Exactness under concurrency -------------------------------------------------------------


@pytest.mark.parametrize(
    ("tool", "cost", "admitted"),
    [(None, 1, 5), ("pair", 2, 2)],
    ids=["cost1", "cost2"],
)
async def test_concurrent_reserves_admit_exactly_the_limit(
    rig: Rig, tool: str | None, cost: int, admitted: int
) -> None:
    plan = make_plan(included=5, weights={"pair": 2})
    period = rig.engine.period(None, None)
    results = await asyncio.gather(
        *(reserve(rig.engine, plan, period, tool=tool) for _ in range(40))
    )
    outcomes = Counter(d.outcome for d, _ in results)
    assert outcomes == {Outcome.ALLOWED: admitted, Outcome.REFUSED_QUOTA: 40 - admitted}
    allowed = [(d, r) for d, r in results if d.outcome is Outcome.ALLOWED]
    # Each admitted call saw a distinct counter value: the script is one atomic step.
    assert sorted(d.used for d, _ in allowed) == [cost * n for n in range(1, admitted + 1)]
    assert {d.used for d, _ in results if not d.allowed} == {cost * admitted}
    assert len({d.reservation_id for d, _ in allowed}) == admitted
    assert await rig.storage.held(TENANT) == admitted

    await asyncio.gather(*(rig.engine.settle(r, commit=True) for _, r in allowed if r))
    assert await rig.storage.used(TENANT, period.start) == cost * admitted
    assert await rig.storage.held(TENANT) == 0


# 3. Settlement: refund, idempotency ----------------------------------------------------------


async def test_refund_gives_units_back(rig: Rig) -> None:
    plan = make_plan(included=5, weights={"big": 3})
    period = rig.engine.period(None, None)
    d, r = await reserve(rig.engine, plan, period)
    await rig.engine.settle(assert_allowed(d, r, used=1, limit=5), commit=True)
    d, r = await reserve(rig.engine, plan, period, tool="big")
    res = assert_allowed(d, r, used=4, limit=5, cost=3)
    assert await rig.storage.held(TENANT) == 1

    assert await rig.storage.settle(res, commit=False) is True  # was held
    assert await rig.storage.used(TENANT, period.start) == 1
    assert await rig.storage.held(TENANT) == 0
    # The refunded units are usable again: 1 + 3 + 1 = 5 fits exactly.
    d, r = await reserve(rig.engine, plan, period, tool="big")
    assert_allowed(d, r, used=4, limit=5, cost=3)
    d, r = await reserve(rig.engine, plan, period)
    assert_allowed(d, r, used=5, limit=5)


async def test_refund_twice_counts_once(rig: Rig) -> None:
    plan = make_plan(included=5)
    period = rig.engine.period(None, None)
    d, r = await reserve(rig.engine, plan, period)
    res = assert_allowed(d, r, used=1, limit=5)
    assert await rig.storage.settle(res, commit=False) is True
    assert await rig.storage.settle(res, commit=False) is False  # nothing held: no-op
    await rig.engine.settle(res, commit=False)
    assert await rig.storage.used(TENANT, period.start) == 0  # not -1, not -2
    assert await rig.storage.held(TENANT) == 0


async def test_refund_after_commit_does_nothing(rig: Rig) -> None:
    """settle.lua ZREMs the member first; after a commit nothing is held, so a refund finds
    held == 0 and leaves the counter alone (the committed unit stays charged)."""
    plan = make_plan(included=5)
    period = rig.engine.period(None, None)
    d, r = await reserve(rig.engine, plan, period)
    res = assert_allowed(d, r, used=1, limit=5)
    assert await rig.storage.settle(res, commit=True) is True
    assert await rig.storage.used(TENANT, period.start) == 1
    assert await rig.storage.settle(res, commit=False) is False
    assert await rig.storage.used(TENANT, period.start) == 1
    assert await rig.storage.held(TENANT) == 0


async def test_commit_twice_counts_once(rig: Rig) -> None:
    plan = make_plan(included=5)
    period = rig.engine.period(None, None)
    d, r = await reserve(rig.engine, plan, period)
    res = assert_allowed(d, r, used=1, limit=5)
    assert await rig.storage.settle(res, commit=True) is True
    assert await rig.storage.used(TENANT, period.start) == 1
    await rig.storage.settle(res, commit=True)  # e.g. a retry after a settle that timed out
    assert await rig.storage.used(TENANT, period.start) == 1  # actual: 2


# 4. Tool weights -------------------------------------------------------------------------


async def test_tool_weights_consume_their_units(rig: Rig) -> None:
    plan = make_plan(included=5, weights={"big": 3})
    period = rig.engine.period(None, None)
    d, r = await reserve(rig.engine, plan, period, tool="big", weight=1)
    assert_allowed(d, r, used=3, limit=5, cost=3)
    assert await rig.storage.used(TENANT, period.start) == 3
    # 3 + 3 > 5: refused, and the refusal is not partially charged.
    d, r = await reserve(rig.engine, plan, period, tool="big")
    assert_refused(d, r, Outcome.REFUSED_QUOTA, used=3, limit=5, cost=3)
    # A method weight of 2 without a tool weight: 3 + 2 = 5 fits exactly.
    d, r = await reserve(rig.engine, plan, period, tool="small", weight=2)
    assert_allowed(d, r, used=5, limit=5, cost=2)
    d, r = await reserve(rig.engine, plan, period, tool="small")
    assert_refused(d, r, Outcome.REFUSED_QUOTA, used=5, limit=5)
    assert await rig.storage.used(TENANT, period.start) == 5


async def test_expensive_call_refused_while_cheaper_one_fits(rig: Rig) -> None:
    plan = make_plan(included=5, weights={"big": 3})
    period = rig.engine.period(None, None)
    for n in (1, 2, 3):
        d, r = await reserve(rig.engine, plan, period, tool="small")
        assert_allowed(d, r, used=n, limit=5)
    d, r = await reserve(rig.engine, plan, period, tool="big", weight=2)  # tool weight wins
    assert_refused(d, r, Outcome.REFUSED_QUOTA, used=3, limit=5, cost=3)
    d, r = await reserve(rig.engine, plan, period, tool="small")
    assert_allowed(d, r, used=4, limit=5)
    d, r = await reserve(rig.engine, plan, period, tool="small")
    assert_allowed(d, r, used=5, limit=5)
    assert await rig.storage.used(TENANT, period.start) == 5
    assert await rig.storage.held(TENANT) == 5


# 5. Overage -------------------------------------------------------------------------------


async def test_bill_overage_runs_past_included_up_to_hard_cap(rig: Rig) -> None:
    plan = make_plan(included=5, overage="bill", hard_cap=8)
    period = rig.engine.period(None, None)
    for n in range(1, 9):
        d, r = await reserve(rig.engine, plan, period)
        assert_allowed(d, r, used=n, limit=8)
    d, r = await reserve(rig.engine, plan, period)
    assert_refused(d, r, Outcome.REFUSED_QUOTA, used=8, limit=8)
    assert await rig.storage.used(TENANT, period.start) == 8


@pytest.mark.parametrize(
    ("included", "overage"),
    [(5, "bill"), (None, "block"), (None, "bill")],
    ids=["bill-no-cap", "unlimited-block", "unlimited-bill"],
)
async def test_uncapped_plans_never_refuse_on_quota(
    rig: Rig, included: int | None, overage: str
) -> None:
    plan = make_plan(included=included, overage=overage, hard_cap=None, weights={"big": 1000})
    period = rig.engine.period(None, None)
    for n in range(1, 51):
        d, r = await reserve(rig.engine, plan, period)
        assert_allowed(d, r, used=n, limit=None)
    d, r = await reserve(rig.engine, plan, period, tool="big")
    assert_allowed(d, r, used=1050, limit=None, cost=1000)
    assert await rig.storage.used(TENANT, period.start) == 1050


async def test_unlimited_included_with_hard_cap_is_capped(rig: Rig) -> None:
    """policy.allowed_total: included_units None means 'no included allowance', but a
    hard_cap still bounds the period."""
    plan = make_plan(included=None, overage="block", hard_cap=3)
    period = rig.engine.period(None, None)
    for n in (1, 2, 3):
        d, r = await reserve(rig.engine, plan, period)
        assert_allowed(d, r, used=n, limit=3)
    d, r = await reserve(rig.engine, plan, period)
    assert_refused(d, r, Outcome.REFUSED_QUOTA, used=3, limit=3)


# 6. Rate limit (GCRA) ----------------------------------------------------------------------


async def test_gcra_burst_retry_after_and_steady_state(rig: Rig) -> None:
    """per_second=2, burst=3: I = 500_000 us, tolerance = 1_000_000 us.
    t0: TAT goes t0 -> +0.5 -> +1.0 -> +1.5 s; 4th call: 1.5 - 1.0 = 0.5 s -> retry 500 ms.
    t0+0.499: TAT - now = 1.001 s > 1 s -> refused, retry ceil(1 ms) = 1 ms.
    t0+0.500: TAT - now = 1.000 s == tolerance -> allowed (TAT = t0 + 2.0 s)."""
    plan = make_plan(included=100, rate=(2, 3))
    period = rig.engine.period(None, None)
    t0_us = int(rig.clock.now) * 1_000_000
    for n in (1, 2, 3):
        d, r = await reserve(rig.engine, plan, period)
        assert_allowed(d, r, used=n, limit=100)
    assert await rig.client.get(rig.keys.rate(TENANT)) == str(t0_us + 1_500_000)
    # The rate state expires 1 s after TAT stops mattering: ceil(1.5 s) + 1 s from now.
    assert 2_000 < await rig.client.pttl(rig.keys.rate(TENANT)) <= 2_500
    before = await rig.snapshot()
    d, r = await reserve(rig.engine, plan, period)
    assert_refused(d, r, Outcome.REFUSED_RATE, used=3, limit=100, retry_after_ms=500)
    assert await rig.snapshot() == before  # a rate refusal writes nothing, charges nothing

    rig.clock.advance(0.499)
    d, r = await reserve(rig.engine, plan, period)
    assert_refused(d, r, Outcome.REFUSED_RATE, used=3, limit=100, retry_after_ms=1)
    rig.clock.advance(0.001)
    d, r = await reserve(rig.engine, plan, period)
    assert_allowed(d, r, used=4, limit=100)
    d, r = await reserve(rig.engine, plan, period)
    assert_refused(d, r, Outcome.REFUSED_RATE, used=4, limit=100, retry_after_ms=500)

    for n in range(5, 25):  # one call per 0.5 s is sustained indefinitely
        rig.clock.advance(0.5)
        d, r = await reserve(rig.engine, plan, period)
        assert_allowed(d, r, used=n, limit=100)
        d, r = await reserve(rig.engine, plan, period)
        assert_refused(d, r, Outcome.REFUSED_RATE, used=n, limit=100, retry_after_ms=500)
    # 24 admitted; the 22 rate refusals consumed nothing.
    assert await rig.storage.used(TENANT, period.start) == 24
    assert await rig.storage.held(TENANT) == 24
    now_us = int(rig.clock.now * 1_000_000)
    assert now_us == t0_us + 10_500_000
    assert await rig.client.get(rig.keys.rate(TENANT)) == str(now_us + 1_500_000)

    rig.clock.advance(10)  # idle: the full burst of 3 is back, not more
    for n in (25, 26, 27):
        d, r = await reserve(rig.engine, plan, period)
        assert_allowed(d, r, used=n, limit=100)
    d, r = await reserve(rig.engine, plan, period)
    assert_refused(d, r, Outcome.REFUSED_RATE, used=27, limit=100, retry_after_ms=500)


async def test_gcra_half_call_per_second(rig: Rig) -> None:
    """per_second=0.5, burst=1: I = 2_000_000 us, tolerance 0 -> one call per 2 s."""
    plan = make_plan(included=None, rate=(0.5, 1))
    period = rig.engine.period(None, None)
    d, r = await reserve(rig.engine, plan, period)
    assert_allowed(d, r, used=1, limit=None)
    d, r = await reserve(rig.engine, plan, period)
    assert_refused(d, r, Outcome.REFUSED_RATE, used=1, limit=None, retry_after_ms=2000)
    rig.clock.advance(1.999)
    d, r = await reserve(rig.engine, plan, period)
    assert_refused(d, r, Outcome.REFUSED_RATE, used=1, limit=None, retry_after_ms=1)
    rig.clock.advance(0.001)
    d, r = await reserve(rig.engine, plan, period)
    assert_allowed(d, r, used=2, limit=None)
    for n in range(3, 13):
        rig.clock.advance(1.0)
        d, r = await reserve(rig.engine, plan, period)
        assert_refused(d, r, Outcome.REFUSED_RATE, used=n - 1, limit=None, retry_after_ms=1000)
        rig.clock.advance(1.0)
        d, r = await reserve(rig.engine, plan, period)
        assert_allowed(d, r, used=n, limit=None)
    assert await rig.storage.used(TENANT, period.start) == 12


async def test_gcra_non_integral_interval_rounds_to_the_microsecond(rig: Rig) -> None:
    """per_second=3, burst=1: I = round(333_333.3) = 333_333 us; retry = ceil(333.333) = 334."""
    plan = make_plan(included=None, rate=(3, 1))
    period = rig.engine.period(None, None)
    d, r = await reserve(rig.engine, plan, period)
    assert_allowed(d, r, used=1, limit=None)
    d, r = await reserve(rig.engine, plan, period)
    assert_refused(d, r, Outcome.REFUSED_RATE, used=1, limit=None, retry_after_ms=334)
    rig.clock.advance(0.333)  # 333 us short of the interval
    d, r = await reserve(rig.engine, plan, period)
    assert_refused(d, r, Outcome.REFUSED_RATE, used=1, limit=None, retry_after_ms=1)
    rig.clock.advance(0.001)
    d, r = await reserve(rig.engine, plan, period)
    assert_allowed(d, r, used=2, limit=None)


async def test_gcra_concurrent_burst_is_exact(rig: Rig) -> None:
    plan = make_plan(included=None, rate=(2, 3))
    period = rig.engine.period(None, None)
    results = await asyncio.gather(*(reserve(rig.engine, plan, period) for _ in range(40)))
    assert Counter(d.outcome for d, _ in results) == {
        Outcome.ALLOWED: 3,
        Outcome.REFUSED_RATE: 37,
    }
    assert {d.retry_after_ms for d, _ in results if not d.allowed} == {500}
    assert {d.used for d, _ in results if not d.allowed} == {3}
    assert await rig.storage.used(TENANT, period.start) == 3


async def test_quota_refusal_does_not_spend_a_rate_token(rig: Rig) -> None:
    """included 1, per_second 1, burst 1: the quota refusal at t0+1 must leave TAT at t0+1;
    after a refund a call at t0+1 is then admitted (TAT - now = 0 <= tolerance 0)."""
    plan = make_plan(included=1, rate=(1, 1))
    period = rig.engine.period(None, None)
    d, r = await reserve(rig.engine, plan, period)
    first = assert_allowed(d, r, used=1, limit=1)
    rig.clock.advance(1.0)
    d, r = await reserve(rig.engine, plan, period)
    assert_refused(d, r, Outcome.REFUSED_QUOTA, used=1, limit=1)
    await rig.engine.settle(first, commit=False)
    d, r = await reserve(rig.engine, plan, period)
    assert_allowed(d, r, used=1, limit=1)


# 7. Reservation reaping --------------------------------------------------------------------


async def test_overdue_reservations_are_reaped_and_late_settles_are_safe(rig: Rig) -> None:
    engine, storage = rig.engine_with(reservation_ttl_s=60)
    plan = make_plan(included=10, weights={"big": 3})
    period = engine.period(None, None)
    d, r = await reserve(engine, plan, period)
    await engine.settle(assert_allowed(d, r, used=1, limit=10), commit=True)
    d, r = await reserve(engine, plan, period)
    dead_small = assert_allowed(d, r, used=2, limit=10)  # holder dies, never settles
    d, r = await reserve(engine, plan, period, tool="big")
    dead_big = assert_allowed(d, r, used=5, limit=10, cost=3)  # likewise
    assert await storage.held(TENANT) == 2

    rig.clock.advance(59.999)  # deadline is t0 + 60.000 s: not yet overdue
    d, r = await reserve(engine, plan, period)
    live = assert_allowed(d, r, used=6, limit=10)
    await engine.settle(live, commit=False)
    assert await storage.used(TENANT, period.start) == 5
    assert await storage.held(TENANT) == 2

    rig.clock.advance(1.001)  # t0 + 61 s
    d, r = await reserve(engine, plan, period)
    # 5 - (1 + 3) reaped + 1 new = 2
    live = assert_allowed(d, r, used=2, limit=10)
    assert await storage.used(TENANT, period.start) == 2
    assert await storage.held(TENANT) == 1  # only the new, live reservation

    # A late commit of a reaped reservation charges it again (the work was done) ...
    assert await storage.settle(dead_small, commit=True) is False
    assert await storage.used(TENANT, period.start) == 3
    # ... and a late refund of a reaped one does nothing (it was already given back).
    assert await storage.settle(dead_big, commit=False) is False
    assert await storage.used(TENANT, period.start) == 3
    assert await storage.held(TENANT) == 1
    await engine.settle(live, commit=True)
    assert await storage.used(TENANT, period.start) == 3
    assert await storage.held(TENANT) == 0


async def test_reaping_also_happens_on_a_refused_reserve(rig: Rig) -> None:
    """The reaper runs before the limit check, so an exhausted tenant whose units are stuck in
    dead reservations gets them back on its next attempt."""
    engine, storage = rig.engine_with(reservation_ttl_s=60)
    plan = make_plan(included=2)
    period = engine.period(None, None)
    for n in (1, 2):
        d, r = await reserve(engine, plan, period)
        assert_allowed(d, r, used=n, limit=2)
    d, r = await reserve(engine, plan, period)
    assert_refused(d, r, Outcome.REFUSED_QUOTA, used=2, limit=2)
    rig.clock.advance(60)  # score <= now_ms is overdue: exactly at the deadline
    d, r = await reserve(engine, plan, period)
    assert_allowed(d, r, used=1, limit=2)
    assert await storage.held(TENANT) == 1


async def test_dead_reservation_is_refunded_when_the_store_clock_passes_its_deadline(
    rig: Rig,
) -> None:
    """Same as the reaping test but with production's clock, which the store shares: once
    the deadline passes on the wall clock, the zset key has expired on the server."""
    engine, storage = rig.engine_with(reservation_ttl_s=1, clock=SystemClock())
    plan = make_plan(included=10)
    period = engine.period(None, None)
    d, r = await reserve(engine, plan, period)
    dead = assert_allowed(d, r, used=1, limit=10)
    await asyncio.sleep(1.1)  # the store's own clock must pass the 1 s deadline
    d, r = await reserve(engine, plan, period)
    assert await storage.settle(dead, commit=True) is False
    # Expected: reaped (1 - 1) + new 1 + late commit re-charge 1 = 2; actual 3.
    assert (d.used, await storage.used(TENANT, period.start)) == (1, 2)


async def test_reaping_refunds_into_the_reservations_own_period(rig: Rig) -> None:
    engine, storage = rig.engine_with(reservation_ttl_s=60)
    plan = make_plan(included=5, weights={"big": 3})
    old = engine.period(None, None)
    new = Period(old.end, old.end + 30 * 86400)
    d, r = await reserve(engine, plan, old, tool="big")
    assert_allowed(d, r, used=3, limit=5, cost=3)  # dies at the end of the old period
    d, r = await reserve(engine, plan, new)
    await engine.settle(assert_allowed(d, r, used=1, limit=5), commit=True)
    rig.clock.advance(61)
    d, r = await reserve(engine, plan, new)
    # Expected: the new period is untouched by the old one's reservation: 1 + 1 = 2.
    # Actual: 1 - 3 + 1 = -1, and the tenant now has 6 free units this period.
    assert (d.used, await storage.used(TENANT, new.start)) == (2, 2)


async def test_an_orphan_of_an_earlier_period_is_refunded_into_that_period(rig: Rig) -> None:
    """The tenant's period moved (a webhook put it on its subscription period) while a call
    of the old one was held by a dead replica: a reserve in the new period reaps the orphan
    and gives its units back to the old period, which nothing may reserve in again."""
    engine, storage = rig.engine_with(reservation_ttl_s=60)
    plan = make_plan(included=5, weights={"big": 3})
    old = engine.period(None, None)
    new = Period(old.end, old.end + 30 * 86400)
    d, r = await reserve(engine, plan, old)
    await engine.settle(assert_allowed(d, r, used=1, limit=5), commit=True)
    d, r = await reserve(engine, plan, old, tool="big")
    dead_big = assert_allowed(d, r, used=4, limit=5, cost=3)
    d, r = await reserve(engine, plan, old)
    dead_small = assert_allowed(d, r, used=5, limit=5)
    rig.clock.advance(61)
    d, r = await reserve(engine, plan, new)
    live = assert_allowed(d, r, used=1, limit=5)
    assert await storage.used(TENANT, old.start) == 1  # only the committed call
    assert await storage.held(TENANT) == 1  # only the live one
    # A late commit charges the orphan again in its own period, once; a late refund of the
    # other does nothing (the reaper gave it back already).
    assert await storage.settle(dead_small, commit=True) is False
    assert await storage.settle(dead_small, commit=True) is False
    assert await storage.settle(dead_big, commit=False) is False
    assert await storage.used(TENANT, old.start) == 2
    assert await storage.used(TENANT, new.start) == 1
    await engine.settle(live, commit=True)
    assert (await storage.used(TENANT, new.start), await storage.held(TENANT)) == (1, 0)


async def test_reaping_an_orphan_whose_counter_expired_creates_nothing(rig: Rig) -> None:
    """A period's counter outlives the period by the retention only: an orphan reaped after
    that has no counter to give back to, and must not leave a negative one behind."""
    engine, storage = rig.engine_with(reservation_ttl_s=60)
    plan = make_plan(included=5)
    old = engine.period(None, None)
    new = Period(old.end, old.end + 30 * 86400)
    d, r = await reserve(engine, plan, old)
    assert_allowed(d, r, used=1, limit=5)
    await rig.client.delete(rig.keys.used(TENANT, old.start))  # as if expired
    rig.clock.advance(61)
    d, r = await reserve(engine, plan, new)
    assert_allowed(d, r, used=1, limit=5)
    assert not await rig.client.exists(rig.keys.used(TENANT, old.start))
    assert await storage.held(TENANT) == 1


# 8. Periods ------------------------------------------------------------------------------


async def test_each_period_has_its_own_counter(rig: Rig) -> None:
    plan = make_plan(included=5)
    first = rig.engine.period(None, None)
    second = Period(first.end, first.end + 31 * 86400)
    for n in range(1, 6):
        d, r = await reserve(rig.engine, plan, first)
        await rig.engine.settle(assert_allowed(d, r, used=n, limit=5), commit=True)
    d, r = await reserve(rig.engine, plan, first)
    assert_refused(d, r, Outcome.REFUSED_QUOTA, used=5, limit=5)
    d, r = await reserve(rig.engine, plan, second)  # a new period starts at zero
    await rig.engine.settle(assert_allowed(d, r, used=1, limit=5), commit=True)
    assert await rig.storage.used(TENANT, first.start) == 5
    assert await rig.storage.used(TENANT, second.start) == 1
    assert await rig.engine.used(TENANT, second) == 1
    assert rig.keys.used(TENANT, first.start) != rig.keys.used(TENANT, second.start)


async def test_current_period_is_the_tenants_own_else_the_calendar_month(rig: Rig) -> None:
    now = rig.clock.now
    month = calendar_month(now)
    assert month.start <= now < month.end
    assert rig.engine.period(None, None) == month
    own = (int(now) - 86400, int(now) + 86400)
    assert rig.engine.period(*own) == Period(*own)
    assert rig.engine.period(int(now) - 86400, int(now)) == month  # stale: end is exclusive


async def test_counter_expires_retention_after_the_period_ends(rig: Rig) -> None:
    """The counter outlives its period by COUNTER_RETENTION_S (usage reports). Measured as
    PTTL against the engine clock, which starts on the current whole second: the bound holds
    whether the scripts set the expiry absolute (PEXPIREAT) or relative (PEXPIRE)."""
    plan = make_plan(included=5)
    period = rig.engine.period(None, None)
    counter = rig.keys.used(TENANT, period.start)
    expected_ms = int((period.end + COUNTER_RETENTION_S - rig.clock.now) * 1000)
    assert expected_ms > COUNTER_RETENTION_S * 1000

    def assert_ttl(pttl: int) -> None:
        # 1 s for the clock's truncation to the whole second, 1 s slack for the test itself.
        assert expected_ms - 2_000 < pttl <= expected_ms

    d, r = await reserve(rig.engine, plan, period)
    res = assert_allowed(d, r, used=1, limit=5)
    assert_ttl(await rig.client.pttl(counter))
    if rig.backend.startswith("redis"):
        assert abs(await rig.client.ttl(counter) - expected_ms / 1000) <= 2
    assert await rig.storage.settle(res, commit=True) is True
    # The reservation set lives as long as the counter (it must outlast every deadline it
    # holds, or overdue reservations could never be reaped); settled, it is empty and gone.
    assert await rig.client.pttl(rig.keys.reservations(TENANT)) == -2
    d, r = await reserve(rig.engine, plan, period)
    assert_allowed(d, r, used=2, limit=5)
    assert_ttl(await rig.client.pttl(rig.keys.reservations(TENANT)))


# 9. Hash tags ----------------------------------------------------------------------------


async def test_every_key_of_a_tenant_shares_its_hash_tag(rig: Rig) -> None:
    plan = make_plan(included=5, rate=(10, 5))
    p1 = rig.engine.period(None, None)
    p2 = Period(p1.end, p1.end + 30 * 86400)
    for tenant in ("acme", "globex"):
        for period in (p1, p2):
            d, r = await reserve(rig.engine, plan, period, tenant=tenant)
            assert_allowed(d, r, used=1, limit=5)
            assert r is not None
            await rig.engine.settle(r, commit=True)
        d, r = await reserve(rig.engine, plan, p1, tenant=tenant)  # left held
        assert_allowed(d, r, used=2, limit=5)

    keys = await rig.all_keys()
    for tenant in ("acme", "globex"):
        mine = sorted(k for k in keys if f"{{{tenant}}}" in k)
        ks = KeySpace(rig.prefix)
        assert mine == sorted(
            [
                ks.used(tenant, p1.start),
                ks.used(tenant, p2.start),
                ks.rate(tenant),
                ks.reservations(tenant),
            ]
        )
        assert all(k.count("{") == 1 and k.count("}") == 1 for k in mine)
        assert {key_slot(k.encode()) for k in mine} == {key_slot(tenant.encode())}
    assert len(keys) == 8  # nothing outside the two tenants' tags


# 10. Degraded / fail modes (no backend needed) ----------------------------------------------


class CountingRedis(Redis):
    """Counts commands handed to the client: zero new ones means the network was not used."""

    commands = 0

    async def execute_command(self, *args: object, **options: object) -> object:
        self.commands += 1
        return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


def dead_client() -> CountingRedis:
    client = CountingRedis.from_url(
        "redis://127.0.0.1:1",
        decode_responses=True,
        socket_connect_timeout=0.2,
        socket_timeout=0.2,
        retry=Retry(NoBackoff(), 0),
    )
    assert isinstance(client, CountingRedis)
    return client


async def test_unreachable_store_fail_open_degrades_then_breaker_short_circuits() -> None:
    clock = aligned_clock()
    client = dead_client()
    try:
        engine, _, guard = build_engine(client, "mqpt-dead", clock, fail_open=True)
        plan = make_plan(included=5)
        period = engine.period(None, None)
        for n in range(1, BREAKER_FAILURES + 1):
            d, r = await reserve(engine, plan, period)
            assert d.outcome is Outcome.DEGRADED
            assert d.allowed is True
            assert (d.used, d.limit, d.cost, d.reservation_id) == (-1, 5, 1, None)
            assert r is None
            assert client.commands == n
            expected = BreakerState.OPEN if n == BREAKER_FAILURES else BreakerState.CLOSED
            assert guard.state is expected

        started = time.monotonic()
        d, r = await reserve(engine, plan, period)
        elapsed = time.monotonic() - started
        assert (d.outcome, r) == (Outcome.DEGRADED, None)
        assert elapsed < 0.050
        assert client.commands == BREAKER_FAILURES  # not sent: the breaker answered

        with pytest.raises(StoreUnavailable):
            await engine.used(TENANT, period)
        dead = Reservation(TENANT, period.start, "0123456789abcdef", 1, period.end * 1000)
        await engine.settle(dead, commit=True)  # logged, not raised
        assert client.commands == BREAKER_FAILURES

        clock.advance(BREAKER_COOLDOWN_S)  # one probe goes out, fails, and re-opens
        d, r = await reserve(engine, plan, period)
        assert (d.outcome, r) == (Outcome.DEGRADED, None)
        assert client.commands == BREAKER_FAILURES + 1
        assert guard.state is BreakerState.OPEN
        d, r = await reserve(engine, plan, period)
        assert client.commands == BREAKER_FAILURES + 1
    finally:
        await client.aclose()


async def test_unreachable_store_fail_closed_is_unavailable() -> None:
    clock = aligned_clock()
    client = dead_client()
    try:
        engine, _, guard = build_engine(client, "mqpt-dead", clock, fail_open=False)
        plan = make_plan(included=5, weights={"big": 3})
        period = engine.period(None, None)
        for n in range(1, BREAKER_FAILURES + 2):
            started = time.monotonic()
            d, r = await reserve(engine, plan, period, tool="big")
            elapsed = time.monotonic() - started
            assert d.outcome is Outcome.UNAVAILABLE
            assert d.allowed is False
            assert (d.used, d.limit, d.cost, d.reservation_id) == (-1, 5, 3, None)
            assert r is None
            assert client.commands == min(n, BREAKER_FAILURES)
            if n > BREAKER_FAILURES:
                assert elapsed < 0.050
        assert guard.state is BreakerState.OPEN
    finally:
        await client.aclose()


# 11. Batched commits ---------------------------------------------------------------------


async def test_batched_commits_release_reservations_without_recounting(rig: Rig) -> None:
    plan = make_plan(included=10)
    period = rig.engine.period(None, None)
    held = []
    for n in (1, 2, 3):
        d, r = await reserve(rig.engine, plan, period)
        held.append(assert_allowed(d, r, used=n, limit=10))
    for res in held:
        rig.engine.commit_later(res)
    assert await rig.storage.held(TENANT) <= 3  # queued, maybe not sent yet
    await rig.engine.flush()
    assert await rig.storage.held(TENANT) == 0
    assert await rig.storage.used(TENANT, period.start) == 3
    # A commit queued again (e.g. a retried settle) changes nothing.
    rig.engine.commit_later(held[0])
    await rig.engine.flush()
    assert await rig.storage.used(TENANT, period.start) == 3


class FlakyCommits(QuotaStorage):
    """Commits fail while `down` is set, as when the store went away after the reserve.

    Once up, each commit goes as its own settle script: what is tested is the engine's retry,
    not the batch transport (test_batched_commits_release_reservations_without_recounting)."""

    down = True

    def __init__(self, rig: Rig) -> None:
        super().__init__(rig.client, rig.keys, rig.pipelined)
        self.failed = asyncio.Event()
        self.landed = asyncio.Event()

    async def commit_many(self, reservations: list[Reservation]) -> None:
        if self.down:
            self.failed.set()
            raise RedisConnectionError("the store is away")
        for res in reservations:
            await self.settle(res, commit=True)
        self.landed.set()


def flaky_engine(rig: Rig) -> tuple[QuotaEngine, FlakyCommits]:
    """An engine whose failed commits back off for 30 s: within a test, only a wake-up (a
    reserve that reaches the store, a flush) can make them land."""
    storage = FlakyCommits(rig)
    guard = StoreGuard(
        CircuitBreaker(BREAKER_FAILURES, BREAKER_COOLDOWN_S, rig.clock.monotonic),
        timeout=GUARD_TIMEOUT_S,
    )
    engine = QuotaEngine(
        storage,
        guard,
        rig.clock,
        fail_open=True,
        reservation_ttl_s=60,
        commit_retry_s=(30.0, 30.0),
    )
    return engine, storage


async def test_a_failed_commit_is_retried_when_the_store_answers_again(rig: Rig) -> None:
    engine, storage = flaky_engine(rig)
    plan = make_plan(included=10)
    period = engine.period(None, None)
    d, r = await reserve(engine, plan, period)
    engine.commit_later(assert_allowed(d, r, used=1, limit=10))
    await asyncio.wait_for(storage.failed.wait(), 2)
    assert await storage.held(TENANT) == 1  # kept, not dropped

    storage.down = False
    d, r = await reserve(engine, plan, period)  # the store answers: the retry goes now
    live = assert_allowed(d, r, used=2, limit=10)
    await asyncio.wait_for(storage.landed.wait(), 2)
    assert await storage.held(TENANT) == 1  # only the live call
    assert await storage.used(TENANT, period.start) == 2  # committed units stay counted, once

    storage.down, storage.failed, storage.landed = True, asyncio.Event(), asyncio.Event()
    engine.commit_later(live)
    await asyncio.wait_for(storage.failed.wait(), 2)
    storage.down = False
    await engine.flush(limit=2)  # shutdown does not wait out the back-off either
    assert storage.landed.is_set()
    assert (await storage.held(TENANT), await storage.used(TENANT, period.start)) == (0, 2)


async def test_a_commit_retried_after_its_deadline_is_charged_once(rig: Rig) -> None:
    """The outage outlasted the reservation: the reaper gave its units back, so the retried
    commit charges them again, exactly once (the call was made and billed)."""
    engine, storage = flaky_engine(rig)
    plan = make_plan(included=10)
    period = engine.period(None, None)
    d, r = await reserve(engine, plan, period)
    engine.commit_later(assert_allowed(d, r, used=1, limit=10))
    await asyncio.wait_for(storage.failed.wait(), 2)
    rig.clock.advance(61)
    storage.down = False
    d, r = await reserve(engine, plan, period)  # reaps the first (refund), then wakes the retry
    live = assert_allowed(d, r, used=1, limit=10)
    await asyncio.wait_for(storage.landed.wait(), 2)
    assert await storage.used(TENANT, period.start) == 2
    engine.commit_later(live)
    engine.commit_later(live)
    await engine.flush(limit=2)
    assert (await storage.held(TENANT), await storage.used(TENANT, period.start)) == (0, 2)
