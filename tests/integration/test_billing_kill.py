"""Invariant 1 with real processes: `serve` (with its drainer child) and `drain` killed with
SIGKILL at bad moments, restarted, drained; Stripe (the strict fake) ends up with exactly the
usage the spool recorded, every identifier accepted once."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.fakes.stripe_fake import Fault, StripeFake
from tests.fakes.upstream import ScriptedUpstream
from tests.ops_support import (
    ServeStack,
    children,
    spooled_units,
    start_proxy,
    stripe_serve_stack,
    until,
)
from tests.rpc import bearer, call

pytestmark = [pytest.mark.redis, pytest.mark.timeout(180)]

STRIPE_KEY = "sk_test_kill_0123456789"
METER = "mcp_tool_calls"


@dataclass
class Stack:
    fake: StripeFake
    serve: ServeStack

    @property
    def url(self) -> str:
        return self.serve.url

    @property
    def customer(self) -> str:
        return self.serve.customer

    @property
    def key(self) -> str:
        return self.serve.key

    def spooled(self) -> int:
        return spooled_units(self.serve.spool)

    def unreported(self) -> int:
        return self.serve.unreported()


@pytest.fixture
async def stack(
    tmp_path: Path, redis_url: str, key_prefix: str, scripted: tuple[ScriptedUpstream, str]
) -> AsyncIterator[Stack]:
    async with stripe_serve_stack(
        tmp_path,
        redis_url=redis_url,
        key_prefix=key_prefix,
        upstream_url=scripted[1],
        stripe_key=STRIPE_KEY,
        meter=METER,
        key_label="kill",
        drain={"interval_s": 0.2, "max_batch": 50},
        ops={"readiness_delay_s": 0.1},
        log_level="warning",
    ) as (fake, serve):
        yield Stack(fake, serve)


@dataclass
class Tally:
    received: int = 0  # successful results the client got
    in_doubt: int = 0  # calls cut off by the kill: the client cannot know


async def _traffic(
    http: aiohttp.ClientSession, stack: Stack, tally: Tally, stop: asyncio.Event, workers: int = 8
) -> None:
    async def worker(w: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                async with http.post(
                    stack.url, json=call(f"{w}-{i}", "add", a=i), headers=bearer(stack.key)
                ) as r:
                    doc = await r.json()
                if r.status == 200 and doc["result"]["isError"] is False:
                    tally.received += 1
            except (TimeoutError, aiohttp.ClientError):
                tally.in_doubt += 1
                return

    await asyncio.gather(*(worker(w) for w in range(workers)))


async def test_serve_killed_mid_traffic_bills_exactly_what_was_received(stack: Stack) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    tally = Tally()
    async with aiohttp.ClientSession() as http:
        serve = await start_proxy(stack.serve, "serve")
        try:
            await serve.wait_healthy(http)
            stop = asyncio.Event()
            traffic = asyncio.create_task(_traffic(http, stack, tally, stop))
            await asyncio.sleep(rng.uniform(0.3, 1.2))  # the random moment of the kill
            serve.kill_group()
            await serve.proc.wait()
            stop.set()
            await traffic
            assert tally.received > 0
            serve = await start_proxy(stack.serve, "serve")
            await serve.wait_healthy(http)
            stop = asyncio.Event()
            more = asyncio.create_task(_traffic(http, stack, tally, stop, workers=2))
            await asyncio.sleep(0.3)
            stop.set()
            await more
            await until(lambda: stack.unreported() == 0, 60, "the drainer to empty the spool")
            assert await serve.terminate(30) == 0
        finally:
            serve.kill_group()
    billed = stack.fake.total(stack.customer, METER)
    note = f"seed={seed} received={tally.received} in_doubt={tally.in_doubt} billed={billed}"
    # Everything received is billed; a call cut off by the kill may have been spooled (and
    # so billed) without its reply getting out: that is the only possible excess.
    assert tally.received <= billed <= tally.received + tally.in_doubt, note
    assert billed == stack.spooled(), note  # the spool reached Stripe exactly once
    assert len(stack.fake.identifiers()) == len(set(stack.fake.identifiers())), note


async def _fill(stack: Stack, calls: int) -> None:
    """Make calls through a serve whose drainer is off, so the spool holds them all."""
    async with aiohttp.ClientSession() as http:
        serve = await start_proxy(stack.serve, "serve")
        try:
            await serve.wait_healthy(http)
            for i in range(calls):
                async with http.post(
                    stack.url, json=call(i, "add"), headers=bearer(stack.key)
                ) as r:
                    assert r.status == 200
                    assert (await r.json())["result"]["isError"] is False
            assert await serve.terminate(30) == 0
        finally:
            serve.kill_group()


def _no_embedded_drainer(stack: Stack, tmp_path: Path) -> None:
    path = Path(stack.serve.env["MQP_CONFIG"])
    config = yaml.safe_load(path.read_text())
    config["drain"]["embedded"] = False
    path.write_text(yaml.safe_dump(config))


async def test_drainer_killed_between_send_and_mark_resends_without_double_billing(
    stack: Stack, tmp_path: Path
) -> None:
    _no_embedded_drainer(stack, tmp_path)
    await _fill(stack, 120)  # max_batch 50: three batches
    assert stack.unreported() == 120
    stack.fake.meter_event_delay = 0.5  # the call is in flight long enough to kill the sender
    drainer = await start_proxy(stack.serve, "drain")
    try:
        posts = lambda: [c for c in stack.fake.calls if c[1] == "/v1/billing/meter_events"]  # noqa: E731
        await until(lambda: len(posts()) >= 1, 30, "the drainer's first meter event")
        drainer.kill_group()  # after send, before the answer could be marked
        await drainer.proc.wait()
    finally:
        drainer.kill_group()
    await until(lambda: len(stack.fake.meter_events) >= 1, 5, "the fake to finish that call")
    assert stack.unreported() == 120  # nothing was marked
    stack.fake.meter_event_delay = 0.0
    once = await start_proxy(stack.serve, "drain", "--once")
    assert await asyncio.wait_for(once.proc.wait(), 60) == 0
    assert stack.unreported() == 0
    assert stack.fake.total(stack.customer, METER) == 120
    ids = stack.fake.identifiers()
    assert len(ids) == len(set(ids)) == 3
    assert len(posts()) == 4  # the first batch was sent twice: the second was a duplicate


async def test_connection_dropped_after_stripe_accepted_is_not_billed_twice(
    stack: Stack, tmp_path: Path
) -> None:
    _no_embedded_drainer(stack, tmp_path)
    await _fill(stack, 30)
    assert stack.spooled() == 30
    stack.fake.inject(Fault("POST /v1/billing/meter_events", "accept_then_drop"))
    first = await start_proxy(stack.serve, "drain", "--once")
    assert await asyncio.wait_for(first.proc.wait(), 60) == 1  # something is left to retry
    assert stack.fake.total(stack.customer, METER) == 30  # Stripe has it already
    assert stack.unreported() == 30
    second = await start_proxy(stack.serve, "drain", "--once")
    assert await asyncio.wait_for(second.proc.wait(), 60) == 0
    assert stack.unreported() == 0
    assert stack.fake.total(stack.customer, METER) == 30
    assert len(stack.fake.identifiers()) == len(set(stack.fake.identifiers())) == 1


async def test_supervisor_restarts_a_killed_drainer(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        serve = await start_proxy(stack.serve, "serve")
        try:
            await serve.wait_healthy(http)
            pid = serve.proc.pid
            await until(lambda: len(children(pid)) == 1, 20, "the drainer child")
            (first,) = children(pid)
            os.kill(first, signal.SIGKILL)
            await until(lambda: children(pid) not in ([], [first]), 30, "a restarted drainer")
            for i in range(5):
                async with http.post(
                    stack.url, json=call(i, "add"), headers=bearer(stack.key)
                ) as r:
                    assert (await r.json())["result"]["isError"] is False
            await until(
                lambda: stack.fake.total(stack.customer, METER) == 5,
                30,
                "the new drainer to deliver",
            )
            assert await serve.terminate(30) == 0
            assert stack.unreported() == 0
        finally:
            serve.kill_group()
