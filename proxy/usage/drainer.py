"""The drainer: claims spooled usage into batches and sends each batch to Stripe exactly once
in effect.

Order of durable steps, so a crash anywhere is safe:
1. claim: events -> batch + its meter events (with deterministic identifiers), one commit;
2. send each meter event; Stripe's "already exists" for a re-sent identifier means delivered;
3. mark the meter event sent; when all of a batch's are, mark the batch and its events reported.
A crash between 2 and 3 re-sends the same identifiers: Stripe deduplicates them.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from ..clock import Clock
from ..config import BillingConfig, DrainConfig, SpoolConfig
from .meter import MeterClient, Outcome, SendResult
from .retry import Pacer, backoff
from .spool import Group, Spool

log = structlog.get_logger(__name__)

DAY_S = 86400
STRIPE_TIMESTAMP_LIMIT_DAYS = 35
MAX_BATCHES_PER_CYCLE = 100
SEND_CONCURRENCY = 8

Sleep = Callable[[float], Awaitable[None]]


@dataclass(slots=True)
class CycleReport:
    claimed_batches: int = 0
    sent: int = 0
    duplicates: int = 0
    rejected: int = 0
    retries: int = 0
    finished_batches: int = 0
    pruned: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def transient_failure(self) -> bool:
        return self.retries > 0


class Drainer:
    def __init__(
        self,
        spool: Spool,
        client: MeterClient,
        *,
        drain: DrainConfig,
        billing: BillingConfig,
        spool_config: SpoolConfig,
        clock: Clock,
        sleep: Sleep = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        probe_interval_s: float = 300.0,
    ) -> None:
        self._spool = spool
        self._client = client
        self._drain = drain
        self._retention_s = spool_config.retention_days * DAY_S
        self._clock = clock
        self._sleep = sleep
        self._rand = rand
        self._pacer = Pacer(drain.max_calls_per_second, clock.monotonic)
        self._meters: list[tuple[str, str]] = [(billing.meter_event_name, "units")]
        if billing.token_meter_event_name:
            self._meters.append((billing.token_meter_event_name, "tokens"))
        self._probe_interval = probe_interval_s
        self.failures = 0  # consecutive cycles with a transient failure
        self.last_success: float | None = None  # wall time of Stripe's last acceptance

    async def cycle(self) -> CycleReport:
        report = CycleReport()
        now = self._clock.time()
        while report.claimed_batches < MAX_BATCHES_PER_CYCLE:
            batch = await self._spool.claim_batch(now, self._drain.max_batch, self._meters)
            if batch is None:
                break
            report.claimed_batches += 1
        await self._send_open(report)
        report.finished_batches = await self._spool.finish_batches(self._clock.time())
        report.pruned = await self._spool.prune(self._clock.time() - self._retention_s)
        await self._check_age()
        await self._probe_if_idle(report)
        self.failures = self.failures + 1 if report.transient_failure else 0
        await self._persist(report)
        return report

    async def _probe_if_idle(self, report: CycleReport) -> None:
        """With nothing to send, still find out now and then whether Stripe answers, so
        /health can tell an outage from a quiet day."""
        if report.sent or report.duplicates or report.retries or report.rejected:
            return
        now = self._clock.time()
        if self.last_success is not None and now - self.last_success < self._probe_interval:
            return
        result = await self._client.probe()
        if result.accepted:
            self.last_success = now
        else:
            report.retries += 1
            report.errors[result.kind] = report.errors.get(result.kind, 0) + 1

    async def _persist(self, report: CycleReport) -> None:
        increments: dict[str, float] = {
            "batches": report.finished_batches,
            "events": report.sent + report.duplicates,
            "calls": report.sent + report.duplicates + report.rejected + report.retries,
        }
        increments.update({f"errors:{k}": v for k, v in report.errors.items()})
        values = {"failures": float(self.failures), "last_cycle_ts": self._clock.time()}
        if self.last_success is not None:
            values["last_success_ts"] = self.last_success
        await self._spool.record_drain(increments, values)

    async def _send_open(self, report: CycleReport) -> None:
        groups = await self._spool.open_groups()
        if not groups:
            return
        gate = asyncio.Semaphore(SEND_CONCURRENCY)
        stop = asyncio.Event()  # a transient failure ends the cycle: back off, do not hammer

        async def one(group: Group) -> None:
            async with gate:
                if stop.is_set():
                    return
                wait = self._pacer.delay()
                if wait > 0:
                    await self._sleep(wait)
                result = await self._client.send(group)
                await self._record(group, result, report)
                if result.outcome is Outcome.RETRY:
                    stop.set()

        # Groups of one batch have distinct (customer, meter) pairs; sending batches in order
        # keeps a customer's meter to one call in flight.
        for batch_id in sorted({g.batch_id for g in groups}):
            if stop.is_set():
                break
            await asyncio.gather(*(one(g) for g in groups if g.batch_id == batch_id))

    async def _record(self, group: Group, result: SendResult, report: CycleReport) -> None:
        now = self._clock.time()
        if result.accepted:
            await self._spool.mark_group(group, state="sent", now=now)
            self.last_success = now
            if result.outcome is Outcome.DUPLICATE:
                report.duplicates += 1
            else:
                report.sent += 1
            return
        report.errors[result.kind] = report.errors.get(result.kind, 0) + 1
        if result.outcome is Outcome.REJECTED:
            report.rejected += 1
            await self._spool.mark_group(group, state="rejected", now=now, error=result.detail)
            log.error(
                "meter_event_rejected",
                identifier=group.identifier,
                customer=group.stripe_customer,
                event_name=group.event_name,
                value=group.value,
                error=result.detail,
                message="Stripe refused this usage; it stays in the spool. Fix the cause "
                "(customer, meter) and re-queue it.",
            )
            return
        report.retries += 1
        await self._spool.note_attempt(group, result.detail)
        log.warning(
            "meter_event_retry", identifier=group.identifier, kind=result.kind, error=result.detail
        )

    async def _check_age(self) -> None:
        backlog = await self._spool.backlog()
        if backlog.oldest_unreported_ts is None:
            return
        age_days = (self._clock.time() - backlog.oldest_unreported_ts) / DAY_S
        if age_days >= self._drain.age_alarm_days:
            log.error(
                "usage_nearing_stripe_limit",
                oldest_age_days=round(age_days, 2),
                unreported=backlog.unreported,
                message=f"Stripe rejects meter events older than {STRIPE_TIMESTAMP_LIMIT_DAYS} "
                "days: fix delivery now or this usage can no longer be billed.",
            )

    def next_delay(self) -> float:
        """Seconds until the next cycle: the interval, or a jittered backoff after failures."""
        if self.failures:
            return max(backoff(self.failures, self._rand), 0.05)
        return self._drain.interval_s

    async def run(self, stop: asyncio.Event) -> None:
        """Cycle until `stop` is set, then make one final attempt (shutdown drains)."""
        while not stop.is_set():
            report = await self.cycle()
            if report.claimed_batches or report.sent or report.retries:
                log.info("drain_cycle", **_fields(report))
            try:
                async with asyncio.timeout(self.next_delay()):
                    await stop.wait()
            except TimeoutError:
                pass
        await self.cycle()


def _fields(report: CycleReport) -> dict[str, object]:
    return {
        "claimed_batches": report.claimed_batches,
        "sent": report.sent,
        "duplicates": report.duplicates,
        "rejected": report.rejected,
        "retries": report.retries,
        "finished_batches": report.finished_batches,
    }
