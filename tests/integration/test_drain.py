"""The drainer against the strict Stripe fake: exactly-once delivery through faults."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog

from proxy.clock import ManualClock, SystemClock
from proxy.config import BillingConfig, DrainConfig, SpoolConfig
from proxy.usage.drainer import Drainer
from proxy.usage.meter import StripeMeterClient
from proxy.usage.sink import UsageEvent
from proxy.usage.spool import Spool
from tests.fakes.stripe_fake import Fault, StripeFake, run_stripe_fake

KEY = "sk_test_drainer_0123456789"
METER = "mcp_tool_calls"
TOKENS = "mcp_tokens"


@dataclass
class Rig:
    fake: StripeFake
    spool: Spool
    drainer: Drainer
    customers: list[str]

    async def append(
        self, customer: str, units: int = 1, tokens: int | None = None, ts: float | None = None
    ) -> None:
        await self.spool.append(
            UsageEvent(
                tenant_id=customer.removeprefix("cus_"),
                stripe_customer=customer,
                plan="pro",
                method="tools/call",
                tool="add",
                units=units,
                timestamp=self.fake.now() if ts is None else ts,
                request_id="r",
                rpc_id="1",
                session_id=None,
                outcome="ok",
                degraded=False,
                tokens=tokens,
                billable=True,
            )
        )


async def _rig(fake: StripeFake, tmp_path: Path, **drain: object) -> AsyncIterator[Rig]:
    fake.add_meter(METER)
    fake.add_meter(TOKENS)
    customers = [fake.add_customer(name=f"c{i}")["id"] for i in range(3)]
    spool = Spool(tmp_path / "u.db", synchronous="normal", replica_id="pod-a")
    await spool.open()
    client = StripeMeterClient(KEY, fake.url)
    drainer = Drainer(
        spool,
        client,
        drain=DrainConfig(**{"max_calls_per_second": 1000.0, **drain}),  # type: ignore[arg-type]
        billing=BillingConfig(
            meter_event_name=METER, token_meter_event_name=TOKENS, token_meta_key="tokens"
        ),
        spool_config=SpoolConfig(),
        clock=SystemClock(),
    )
    try:
        yield Rig(fake, spool, drainer, customers)
    finally:
        await client.close()
        await spool.close()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    async with run_stripe_fake() as fake:
        async for r in _rig(fake, tmp_path):
            yield r


async def test_clean_drain_aggregates_per_customer_and_meter(rig: Rig) -> None:
    a, b, _ = rig.customers
    for _ in range(500):
        await rig.append(a)
    for _ in range(300):
        await rig.append(b, units=2, tokens=10)
    report = await rig.drainer.cycle()
    assert (report.sent, report.retries, report.rejected, report.finished_batches) == (3, 0, 0, 1)
    assert rig.fake.total(a, METER) == 500
    assert rig.fake.total(b, METER) == 600
    assert rig.fake.total(b, TOKENS) == 3000
    assert rig.fake.total(a, TOKENS) == 0  # a zero total is not sent
    meter_calls = [c for c in rig.fake.calls if c == ("POST", "/v1/billing/meter_events")]
    assert len(meter_calls) == 3  # 800 events -> 3 calls
    assert (await rig.spool.backlog()).unreported == 0
    assert rig.drainer.last_success is not None


async def test_accepted_then_dropped_is_resent_and_counted_once(rig: Rig) -> None:
    a = rig.customers[0]
    for _ in range(7):
        await rig.append(a)
    rig.fake.inject(Fault("POST /v1/billing/meter_events", "accept_then_drop"))
    first = await rig.drainer.cycle()
    assert (first.sent, first.retries) == (0, 1)
    assert rig.fake.total(a) == 7  # Stripe has it, the drainer does not know yet
    assert (await rig.spool.backlog()).unreported == 7
    second = await rig.drainer.cycle()
    assert second.sent + second.duplicates == 1 and second.retries == 0
    assert rig.fake.total(a) == 7
    assert len(rig.fake.identifiers()) == len(set(rig.fake.identifiers())) == 1
    assert (await rig.spool.backlog()).unreported == 0


async def test_a_resend_after_stripe_forgot_its_idempotency_key_counts_as_delivered(
    rig: Rig,
) -> None:
    """A day later the idempotency key is gone but the identifier is not: Stripe answers
    "already exists", which means delivered, not rejected."""
    a = rig.customers[0]
    for _ in range(7):
        await rig.append(a)
    rig.fake.inject(Fault("POST /v1/billing/meter_events", "accept_then_drop"))
    assert (await rig.drainer.cycle()).retries == 1
    rig.fake.forget_idempotency_keys()
    second = await rig.drainer.cycle()
    assert (second.sent, second.duplicates, second.rejected, second.retries) == (0, 1, 0, 0)
    assert rig.fake.total(a) == 7
    backlog = await rig.spool.backlog()
    assert (backlog.unreported, backlog.rejected_groups) == (0, 0)


async def test_a_500_saved_under_an_idempotency_key_does_not_block_the_next_attempt(
    rig: Rig,
) -> None:
    """Stripe replays a saved 500 to every retry with the same idempotency key for ~24 h:
    the next attempt must go out under a new key, and the identifier still dedups."""
    a = rig.customers[0]
    for _ in range(3):
        await rig.append(a)
    rig.fake.inject(Fault("POST /v1/billing/meter_events", "saved_500"))
    assert (await rig.drainer.cycle()).retries == 1
    second = await rig.drainer.cycle()
    assert (second.sent, second.retries, second.rejected) == (1, 0, 0)
    assert rig.fake.total(a) == 3
    assert (await rig.spool.backlog()).unreported == 0


@pytest.mark.parametrize("stripe_forgot_keys", [False, True])
async def test_usage_after_retention_pruned_every_batch_is_billed(
    rig: Rig, stripe_forgot_keys: bool
) -> None:
    """Pruning the newest batch must not free its id: a reused id is a reused identifier,
    which Stripe answers with an idempotency mismatch or "already exists", and either way
    the new usage would never be billed."""
    a = rig.customers[0]
    for _ in range(5):
        await rig.append(a)
    assert (await rig.drainer.cycle()).sent == 1
    assert await rig.spool.prune(before=rig.fake.now() + 1) == 5  # retention has passed
    if stripe_forgot_keys:
        rig.fake.forget_idempotency_keys()
    for _ in range(7):
        await rig.append(a)
    second = await rig.drainer.cycle()
    assert (second.sent, second.duplicates, second.rejected) == (1, 0, 0)
    assert rig.fake.total(a) == 12
    assert len(set(rig.fake.identifiers())) == 2


async def test_stripe_down_backlog_grows_then_drains_without_duplicates(rig: Rig) -> None:
    a, b, _ = rig.customers
    rig.fake.set_down(True)
    for round_ in range(3):
        for _ in range(10):
            await rig.append(a)
            await rig.append(b)
        report = await rig.drainer.cycle()
        assert report.retries >= 1 and report.sent == 0
        assert (await rig.spool.backlog()).unreported == 20 * (round_ + 1)
    assert rig.drainer.failures == 3
    assert rig.drainer.next_delay() > 0
    rig.fake.set_down(False)
    report = await rig.drainer.cycle()
    assert report.retries == 0
    assert (await rig.spool.backlog()).unreported == 0
    assert rig.fake.total(a, METER) == rig.fake.total(b, METER) == 30
    assert len(rig.fake.identifiers()) == len(set(rig.fake.identifiers()))
    assert rig.drainer.failures == 0


@pytest.mark.parametrize("kind", ["status_500", "status_429", "drop"])
async def test_transient_errors_back_off_then_deliver(rig: Rig, kind: str) -> None:
    a = rig.customers[0]
    await rig.append(a, units=4)
    rig.fake.inject(Fault("POST /v1/billing/meter_events", kind))  # type: ignore[arg-type]
    first = await rig.drainer.cycle()
    assert first.retries == 1 and sum(first.errors.values()) == 1
    assert rig.fake.total(a) == 0
    second = await rig.drainer.cycle()
    assert second.sent == 1
    assert rig.fake.total(a) == 4


async def test_rejected_usage_is_kept_and_others_still_delivered(rig: Rig) -> None:
    a = rig.customers[0]
    await rig.append(a, units=2)
    await rig.append("cus_doesnotexist", units=5)
    with structlog.testing.capture_logs() as logs:
        report = await rig.drainer.cycle()
    assert (report.sent, report.rejected) == (1, 1)
    assert rig.fake.total(a) == 2
    backlog = await rig.spool.backlog()
    assert (backlog.unreported, backlog.rejected_groups) == (1, 1)
    (rejected,) = [e for e in logs if e["event"] == "meter_event_rejected"]
    assert rejected["customer"] == "cus_doesnotexist" and rejected["value"] == 5


async def test_one_call_in_flight_per_customer_and_meter(tmp_path: Path) -> None:
    async with run_stripe_fake() as fake:
        fake.meter_event_delay = 0.02  # long enough that an overlap would be refused with 429
        async for rig in _rig(fake, tmp_path, max_batch=3):
            a, b, c = rig.customers
            for _ in range(12):
                for customer in (a, b, c):
                    await rig.append(customer)
            report = await rig.drainer.cycle()
            assert report.claimed_batches == 12
            assert report.retries == 0, report.errors  # the fake 429s any overlap
            assert [fake.total(x) for x in (a, b, c)] == [12, 12, 12]


async def test_age_alarm_fires_before_stripes_limit(rig: Rig) -> None:
    day = 86400
    old = rig.fake.now() - 29 * day
    await rig.append(rig.customers[0], ts=old)
    rig.fake.set_down(True)
    with structlog.testing.capture_logs() as logs:
        await rig.drainer.cycle()
    (alarm,) = [e for e in logs if e["event"] == "usage_nearing_stripe_limit"]
    assert alarm["oldest_age_days"] >= 29 and alarm["unreported"] == 1


def test_pacing_spaces_calls() -> None:
    from proxy.usage.retry import Pacer

    clock = ManualClock()
    pacer = Pacer(4.0, clock.monotonic)
    delays = [pacer.delay() for _ in range(5)]
    assert delays == [0.0, 0.25, 0.5, 0.75, 1.0]
    clock.advance(10)
    assert pacer.delay() == 0.0
