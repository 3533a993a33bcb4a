"""Quota decisions for one call: plan maths from policy, state from storage, safety from the
guard (deadline + breaker), and the configured fail mode when the store is away."""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from ..clock import Clock
from ..config import Plan
from ..ids import IdSource
from ..store import StoreGuard, StoreUnavailable
from .policy import (
    Decision,
    Outcome,
    Period,
    allowed_total,
    calendar_month,
    call_cost,
    current_period,
)
from .storage import ALLOWED, OVER_QUOTA, QuotaStorage, Reservation

log = structlog.get_logger(__name__)

reservation_ids = IdSource()  # a zset member per held call: unique, no syscall each
COUNTER_RETENTION_S = 40 * 86400  # keep past periods' counters for usage reports
COMMIT_BATCH = 256
COMMIT_RETRY_MIN_S = 0.05
COMMIT_RETRY_MAX_S = 5.0
FLUSH_LIMIT_S = 5.0


class QuotaEngine:
    def __init__(
        self,
        storage: QuotaStorage,
        guard: StoreGuard,
        clock: Clock,
        *,
        fail_open: bool,
        reservation_ttl_s: int,
        commit_retry_s: tuple[float, float] = (COMMIT_RETRY_MIN_S, COMMIT_RETRY_MAX_S),
    ) -> None:
        self._storage = storage
        self._guard = guard
        self._clock = clock
        self._fail_open = fail_open
        self._ttl_ms = reservation_ttl_s * 1000
        self._commits: list[Reservation] = []
        self._month: Period | None = None
        self._committer: asyncio.Task[None] | None = None
        self._retry_min_s, self._retry_max_s = commit_retry_s
        self._retry_now = asyncio.Event()  # cuts a commit retry's back-off short

    def period(self, period_start: int | None, period_end: int | None) -> Period:
        now = self._clock.time()
        if period_start is None or period_end is None:
            month = self._month
            if month is None or not month.start <= now < month.end:
                month = self._month = calendar_month(now)  # computed once a month, not per call
            return month
        return current_period(now, period_start, period_end)

    async def reserve(
        self,
        tenant_id: str,
        plan: Plan,
        period: Period,
        method_weight: int,
        tool: str | None,
    ) -> tuple[Decision, Reservation | None]:
        cost = call_cost(plan, method_weight, tool)
        limit = allowed_total(plan)
        now = self._clock.time()
        res = Reservation(
            tenant_id=tenant_id,
            period_start=period.start,
            reservation_id=reservation_ids.next(),
            cost=cost,
            counter_ttl_ms=max(1, int((period.end + COUNTER_RETENTION_S - now) * 1000)),
        )
        interval_us = tolerance_us = 0
        if plan.rate is not None:
            interval_us = round(1_000_000 / plan.rate.per_second)
            tolerance_us = (plan.rate.burst - 1) * interval_us
        now_us = int(now * 1_000_000)
        try:
            result = await self._guard.run(
                lambda: self._storage.reserve(
                    res,
                    allowed_total=limit,
                    interval_us=interval_us,
                    tolerance_us=tolerance_us,
                    now_us=now_us,
                    deadline_ms=now_us // 1000 + self._ttl_ms,
                ),
                timed=not self._storage.reserve_has_deadline,
            )
        except StoreUnavailable:
            outcome = Outcome.DEGRADED if self._fail_open else Outcome.UNAVAILABLE
            return Decision(outcome, plan.name, cost, -1, limit, period), None
        if self._commits:
            self._retry_now.set()  # the store answers again: failed commits need not wait
        if result.status == ALLOWED:
            decision = Decision(
                Outcome.ALLOWED,
                plan.name,
                cost,
                result.used,
                limit,
                period,
                reservation_id=res.reservation_id,
            )
            return decision, res
        outcome = Outcome.REFUSED_QUOTA if result.status == OVER_QUOTA else Outcome.REFUSED_RATE
        return Decision(
            outcome,
            plan.name,
            cost,
            result.used,
            limit,
            period,
            retry_after_ms=result.retry_after_ms,
        ), None

    async def settle(self, res: Reservation, *, commit: bool) -> None:
        try:
            await self._guard.run(lambda: self._storage.settle(res, commit=commit))
        except StoreUnavailable:
            # The reservation's deadline refunds it later; usage itself is in the spool.
            log.warning("quota_settle_failed", tenant=res.tenant_id, commit=commit)

    def commit_later(self, res: Reservation) -> None:
        """Queue a commit: it only releases the reservation record (the units were counted
        at reserve time), so it leaves the request path and goes out in batches. If the
        process dies first, the reservation deadline refunds those units: the tenant's
        quota may gain a few calls, billing loses nothing (usage is in the spool)."""
        self._commits.append(res)
        if self._committer is None or self._committer.done():
            self._committer = asyncio.get_running_loop().create_task(
                self._commit_queued(), name="quota-commits"
            )

    async def _commit_queued(self) -> None:
        delay = self._retry_min_s
        while self._commits:
            batch, self._commits = self._commits[:COMMIT_BATCH], self._commits[COMMIT_BATCH:]
            try:
                await self._guard.run(lambda: self._storage.commit_many(batch))  # noqa: B023
            except StoreUnavailable:
                # Keep them: a dropped commit would let the reaper refund used units. The
                # settle script is idempotent, so a half-applied batch may be sent again.
                self._commits = batch + self._commits
                log.warning("quota_commit_retry", reservations=len(batch), in_s=delay)
                await self._back_off(delay)
                delay = min(delay * 2, self._retry_max_s)
            else:
                delay = self._retry_min_s

    async def _back_off(self, delay: float) -> None:
        """Wait before retrying, less if a reserve sees the store answer or a flush wants the
        commits out: a long outage must not leave them waiting out a long back-off."""
        self._retry_now.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._retry_now.wait()

    async def flush(self, limit: float = FLUSH_LIMIT_S) -> None:
        """Wait until every queued commit has been sent (shutdown, tests), at most `limit` s:
        what is left then is refunded by the reservation deadline."""
        self._retry_now.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                while self._committer is not None and not self._committer.done():
                    await asyncio.shield(self._committer)
        if self._commits:
            log.warning("quota_commits_abandoned", reservations=len(self._commits))

    async def used(self, tenant_id: str, period: Period) -> int:
        return await self._guard.run(lambda: self._storage.used(tenant_id, period.start))
