"""Settler.final returns only once the usage event is durable: the result is released after."""

from __future__ import annotations

import asyncio

import fakeredis

from proxy.breaker import CircuitBreaker
from proxy.clock import ManualClock
from proxy.keys import KeySpace
from proxy.quota.engine import QuotaEngine
from proxy.quota.policy import Decision, Outcome, Period
from proxy.quota.storage import QuotaStorage
from proxy.settle import PendingCall, Settler
from proxy.store import StoreGuard
from proxy.tenants import Tenant
from proxy.usage.sink import UsageEvent


class GatedSink:
    """Takes each event at once, then holds the caller until the test says it is durable."""

    def __init__(self) -> None:
        self.events: list[UsageEvent] = []
        self.durable = asyncio.Event()

    async def append(self, event: UsageEvent) -> None:
        self.events.append(event)
        await self.durable.wait()


async def test_final_waits_for_the_sink_before_it_returns() -> None:
    clock = ManualClock()
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(), decode_responses=True)
    guard = StoreGuard(CircuitBreaker(3, 1.0, clock.monotonic), timeout=1.0)
    engine = QuotaEngine(
        QuotaStorage(client, KeySpace("t")), guard, clock, fail_open=True, reservation_ttl_s=60
    )
    sink = GatedSink()
    settler = Settler(engine, sink, clock, bill_tool_errors=False)
    call = PendingCall(
        rpc_id=1,
        method="tools/call",
        tool="add",
        decision=Decision(Outcome.DEGRADED, "free", 1, 1, 10, Period(0, 1)),
        reservation=None,  # decided while Redis was away: nothing to commit, still billed
        tenant=Tenant(id="acme", name="Acme", plan="free"),
        request_id="r1",
        session_id=None,
    )
    settled = asyncio.create_task(settler.final(call, {"jsonrpc": "2.0", "id": 1, "result": {}}))
    for _ in range(50):  # every step final() can take without the sink: none may finish it
        await asyncio.sleep(0)
    assert [(e.rpc_id, e.period_end) for e in sink.events] == [("1", 1)]  # the quota period's
    assert not settled.done(), "final() returned before the usage event was durable"
    sink.durable.set()
    assert await settled == (True, "ok")
    await client.aclose()
