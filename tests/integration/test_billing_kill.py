"""Invariant 1 with real processes: `serve` (with its drainer child) and `drain` killed with
SIGKILL at bad moments, restarted, drained; Stripe (the strict fake) ends up with exactly the
usage the spool recorded, every identifier accepted once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import yaml

from proxy.config import RedisConfig
from proxy.keys import KeySpace
from proxy.store import StoreClients, connect
from proxy.tenants import TenantStore
from tests.conftest import PEPPER
from tests.fakes.stripe_fake import Fault, StripeFake, run_stripe_fake
from tests.fakes.upstream import ScriptedUpstream
from tests.redis_server import free_port
from tests.rpc import bearer, call

pytestmark = [pytest.mark.redis, pytest.mark.timeout(180)]

STRIPE_KEY = "sk_test_kill_0123456789"
METER = "mcp_tool_calls"


@dataclass
class Stack:
    fake: StripeFake
    env: dict[str, str]
    port: int
    spool: Path
    customer: str
    key: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def spooled(self) -> int:
        with contextlib.closing(sqlite3.connect(self.spool)) as db:
            return int(db.execute("SELECT COALESCE(SUM(units), 0) FROM events").fetchone()[0])

    def unreported(self) -> int:
        with contextlib.closing(sqlite3.connect(self.spool)) as db:
            return int(
                db.execute(
                    "SELECT COUNT(*) FROM events WHERE billable = 1 AND reported_at IS NULL"
                ).fetchone()[0]
            )


@pytest.fixture
async def stack(
    tmp_path: Path, redis_url: str, key_prefix: str, scripted: tuple[ScriptedUpstream, str]
) -> AsyncIterator[Stack]:
    async with run_stripe_fake() as fake:
        fake.add_meter(METER)
        customer = fake.add_customer(name="acme")["id"]
        port = free_port()
        spool = tmp_path / "usage.db"
        config = {
            "listen": {"host": "127.0.0.1", "port": port},
            "upstream": {"url": scripted[1]},
            "redis": {"key_prefix": key_prefix},
            "plans": {"pro": {"included_units": 1_000_000, "overage": "bill"}},
            "spool": {"path": str(spool)},
            "drain": {"interval_s": 0.2, "max_batch": 50},
            "billing": {"enabled": True, "meter_event_name": METER},
            "ops": {"readiness_delay_s": 0.1},
            "log_level": "warning",
        }
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "MQP_KEY_PEPPER": PEPPER,
            "STRIPE_SECRET_KEY": STRIPE_KEY,
            "STRIPE_API_BASE": fake.url,
            "MQP_CONFIG": str(path),
        }
        stores: StoreClients = connect(RedisConfig(url=redis_url))
        tenants = TenantStore(stores.main, KeySpace(key_prefix), PEPPER, "mqp_")
        await tenants.create("acme", name=None, plan="pro", stripe_customer=customer, now=0)
        key, _ = await tenants.issue_key("acme", label="kill", now=0)
        await stores.close()
        yield Stack(fake, env, port, spool, customer, key)


async def _start(stack: Stack, *args: str) -> asyncio.subprocess.Process:
    # Its own process group: SIGKILL to the group takes the drainer child down too, as a
    # pod kill would.
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        env=stack.env,
        start_new_session=True,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def _until(predicate: object, limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def _ready(http: aiohttp.ClientSession, stack: Stack) -> None:
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(f"http://127.0.0.1:{stack.port}/healthz") as r:
                if r.status == 200:
                    return
        assert time.monotonic() < deadline, "serve did not become ready"
        await asyncio.sleep(0.05)


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


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
        serve = await _start(stack, "serve")
        try:
            await _ready(http, stack)
            stop = asyncio.Event()
            traffic = asyncio.create_task(_traffic(http, stack, tally, stop))
            await asyncio.sleep(rng.uniform(0.3, 1.2))  # the random moment of the kill
            _kill_group(serve)
            await serve.wait()
            stop.set()
            await traffic
            assert tally.received > 0
            serve = await _start(stack, "serve")
            await _ready(http, stack)
            stop = asyncio.Event()
            more = asyncio.create_task(_traffic(http, stack, tally, stop, workers=2))
            await asyncio.sleep(0.3)
            stop.set()
            await more
            await _until(lambda: stack.unreported() == 0, 60, "the drainer to empty the spool")
            serve.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(serve.wait(), 30) == 0
        finally:
            _kill_group(serve)
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
        serve = await _start(stack, "serve")
        try:
            await _ready(http, stack)
            for i in range(calls):
                async with http.post(
                    stack.url, json=call(i, "add"), headers=bearer(stack.key)
                ) as r:
                    assert r.status == 200
                    assert (await r.json())["result"]["isError"] is False
            serve.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(serve.wait(), 30) == 0
        finally:
            _kill_group(serve)


def _no_embedded_drainer(stack: Stack, tmp_path: Path) -> None:
    path = Path(stack.env["MQP_CONFIG"])
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
    drainer = await _start(stack, "drain")
    try:
        posts = lambda: [c for c in stack.fake.calls if c[1] == "/v1/billing/meter_events"]  # noqa: E731
        await _until(lambda: len(posts()) >= 1, 30, "the drainer's first meter event")
        _kill_group(drainer)  # after send, before the answer could be marked
        await drainer.wait()
    finally:
        _kill_group(drainer)
    await _until(lambda: len(stack.fake.meter_events) >= 1, 5, "the fake to finish that call")
    assert stack.unreported() == 120  # nothing was marked
    stack.fake.meter_event_delay = 0.0
    once = await _start(stack, "drain", "--once")
    assert await asyncio.wait_for(once.wait(), 60) == 0
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
    first = await _start(stack, "drain", "--once")
    assert await asyncio.wait_for(first.wait(), 60) == 1  # something is left to retry
    assert stack.fake.total(stack.customer, METER) == 30  # Stripe has it already
    assert stack.unreported() == 30
    second = await _start(stack, "drain", "--once")
    assert await asyncio.wait_for(second.wait(), 60) == 0
    assert stack.unreported() == 0
    assert stack.fake.total(stack.customer, METER) == 30
    assert len(stack.fake.identifiers()) == len(set(stack.fake.identifiers())) == 1


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


async def test_supervisor_restarts_a_killed_drainer(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        serve = await _start(stack, "serve")
        try:
            await _ready(http, stack)
            await _until(lambda: len(_children(serve.pid)) == 1, 20, "the drainer child")
            (first,) = _children(serve.pid)
            os.kill(first, signal.SIGKILL)
            await _until(
                lambda: _children(serve.pid) not in ([], [first]), 30, "a restarted drainer"
            )
            for i in range(5):
                async with http.post(
                    stack.url, json=call(i, "add"), headers=bearer(stack.key)
                ) as r:
                    assert (await r.json())["result"]["isError"] is False
            await _until(
                lambda: stack.fake.total(stack.customer, METER) == 5,
                30,
                "the new drainer to deliver",
            )
            serve.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(serve.wait(), 30) == 0
            assert stack.unreported() == 0
        finally:
            _kill_group(serve)
