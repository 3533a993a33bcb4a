"""Redis killed (SIGKILL) and restarted under a running `serve`, with invariants 1 (every
result the client received is spooled, and billed exactly once) and 2 (quota exact, no
counter leak) checked at the end.

(a) Redis WITH persistence (appendonly yes, appendfsync always): nothing acknowledged is
    lost. While it is down, known tenants are served DEGRADED (fail_mode open: spooled with
    degraded=1, billed, not counted against the quota); every request still answers within
    two store deadlines (key check + reserve) plus 100 ms. After the restart the counter holds
    every unit reserved before the kill, and the quota is exact again: exactly
    `limit - counter` further calls succeed.

(b) Redis WITHOUT persistence (save "", appendonly no): the restart empties the store. What
    an operator sees, and what this module asserts:
    - while Redis is down, a key this replica has already seen is served degraded from its
      cache; a key it has not seen gets 503 "The tenant store is unreachable...";
    - once Redis answers again (empty), every old key gets 401 "Missing or invalid API
      key..." (as soon as the breaker lets a look-up through, and in any case when the
      invalidation channel re-subscribes and clears the cache);
    - the running `serve` logs `invalidation_channel_lost`, then, once the channel is
      re-subscribed and the tenant index is found empty, `tenant_store_empty` ("Redis answers
      again but holds no tenants ... every request will get 401", with what to do). A `serve`
      started afterwards logs `tenant_store_empty` at start-up ("No tenants yet: ...");
    - billing stays right: the spool holds exactly the calls that succeeded, all attributed
      to the tenant (and Stripe customer) that made them; nothing is spooled for the 401s;
    - the quota of the current period restarts at zero: the units used before the restart
      are billed but forgotten by the quota.
    What the operator must do: restore Redis from its AOF/RDB if there is one (tenants, keys
    and counters come back as they were), else re-create every tenant
    (`mcp-quota-proxy tenant create ID --plan P --stripe-customer cus_...`) and issue new
    keys (`mcp-quota-proxy key issue ID`; the old key strings cannot be re-issued, clients
    need the new ones), and accept that this period's quota starts again from zero. Run Redis
    with `appendonly yes` to avoid all of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.keys import KeySpace
from proxy.quota.policy import calendar_month
from proxy.replies import INVALID_KEY_HELP
from tests.fakes.stripe_fake import StripeFake
from tests.fakes.upstream import ScriptedUpstream
from tests.faults.conftest import (
    METER,
    Reply,
    ServeFactory,
    serve_config,
    serve_env,
    tool_call,
    until,
)
from tests.ops_support import RedisProcess, Serve, create_tenant, spool_rows, unreported

pytestmark = [pytest.mark.redis, pytest.mark.timeout(240)]

TENANT = "acme"
TIMEOUT_MS = 200
# A tools/call makes at most two store calls in line (key look-up, reserve), each cut at
# the deadline; the breaker then answers at once. 100 ms covers the rest of the request.
BOUND_S = 2 * TIMEOUT_MS / 1000 + 0.1
LIMIT = 400
STORE_DOWN = "The tenant store is unreachable"


@dataclass
class Rig:
    redis: RedisProcess
    serve: Serve
    fake: StripeFake
    upstream: ScriptedUpstream
    customer: str
    key: str
    prefix: str

    @property
    def keys(self) -> KeySpace:
        return KeySpace(self.prefix)

    def counter(self) -> int:
        client = self.redis.client()
        try:
            period = calendar_month(time.time())
            return int(client.get(self.keys.used(TENANT, period.start)) or 0)
        finally:
            client.close()

    def held(self) -> int:
        client = self.redis.client()
        try:
            return int(client.zcard(self.keys.reservations(TENANT)))
        finally:
            client.close()

    def all_keys(self) -> list[str]:
        client = self.redis.client()
        try:
            return sorted(client.scan_iter(match=f"{self.prefix}:*"))
        finally:
            client.close()


async def _rig(
    redis_factory: Callable[..., RedisProcess],
    serves: ServeFactory,
    scripted: tuple[ScriptedUpstream, str],
    fake: StripeFake,
    *,
    persistent: bool,
) -> Rig:
    server = redis_factory(persistent=persistent)
    prefix = f"mqpr{uuid.uuid4().hex[:12]}"
    customer = fake.add_customer(name=TENANT)["id"]
    key = await create_tenant(server.url, prefix, TENANT, plan="metered", customer=customer)
    config = serve_config(
        upstream_url=scripted[1],
        key_prefix=prefix,
        plans={"metered": {"included_units": LIMIT, "overage": "block"}},
        redis_section={
            "timeout_ms": TIMEOUT_MS,
            "fail_mode": "open",
            "breaker_failures": 3,
            "breaker_cooldown_s": 0.5,
        },
    )
    serve = serves("serve", config, serve_env(server.url, fake))
    serve.start()
    return Rig(server, serve, fake, scripted[0], customer, key, prefix)


async def _redis_ok(rig: Rig, http: aiohttp.ClientSession) -> bool:
    doc = await rig.serve.readyz(http)
    return bool(doc["components"]["redis"] == "ok")


async def _drain_and_stop(rig: Rig) -> None:
    await until(lambda: unreported(rig.serve.spool) == 0, 60, "the drainer to deliver", 0.1)
    assert await rig.serve.stop() == 0


def _assert_billed_exactly_once(rig: Rig) -> int:
    rows = spool_rows(rig.serve.spool)
    units = sum(r.units for r in rows)
    ids = rig.fake.identifiers()
    assert rig.fake.total(rig.customer, METER) == units
    assert len(ids) == len(set(ids))
    return units


# --- (a) persistent Redis ------------------------------------------------------------------------


async def test_persistent_redis_killed_mid_traffic_loses_nothing(
    redis_factory: Callable[..., RedisProcess],
    serves: ServeFactory,
    scripted: tuple[ScriptedUpstream, str],
    stripe_fake: StripeFake,
) -> None:
    rig = await _rig(redis_factory, serves, scripted, stripe_fake, persistent=True)
    replies: list[Reply] = []
    marks: dict[str, float] = {}
    stop = asyncio.Event()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        await rig.serve.ready(http)
        await until(lambda: _redis_ok(rig, http), 10, "serve to reach Redis")

        async def worker(w: int) -> None:
            for i in itertools.count():
                if stop.is_set():
                    return
                replies.append(await tool_call(http, rig.serve.url, rig.key, f"a{w}-{i}"))

        def ok_since(mark: str) -> int:
            return sum(1 for r in replies if r.ok and r.started > marks[mark])

        traffic = asyncio.gather(*(worker(w) for w in range(8)))
        try:
            await until(lambda: sum(r.ok for r in replies) >= 60, 30, "60 calls before the kill")
            marks["killing"] = time.monotonic()  # a reply may land before kill() returns
            await asyncio.to_thread(rig.redis.kill)
            marks["killed"] = time.monotonic()
            await until(
                lambda: ok_since("killed") >= 150 and time.monotonic() - marks["killed"] > 1.0,
                30,
                "150 calls and 1 s (two breaker cool-downs) of outage",
            )
            marks["restarting"] = time.monotonic()
            await asyncio.to_thread(rig.redis.start)  # same port, same dir: replays the AOF
            marks["restarted"] = time.monotonic()
            replayed = rig.counter()
            # Recovered: serve reserves in Redis again. (Not polled on /readyz: see
            # test_readiness_probes_during_traffic_lose_no_spooled_call.)
            await until(lambda: rig.counter() > replayed, 30, "serve to reserve in Redis again")
            marks["recovered"] = time.monotonic()
            await until(lambda: ok_since("recovered") >= 40, 30, "40 calls after recovery")
        finally:
            stop.set()
            await traffic
        # Connections pooled before the kill are dead, and each fails once when first used
        # (the main client has no health check): a wide burst uses them all up here, so the
        # exactness phase below starts on a clean pool. Its calls may be degraded.
        replies += await asyncio.gather(
            *(tool_call(http, rig.serve.url, rig.key, f"flush-{i}") for i in range(64))
        )

        phase1 = list(replies)
        # GAP (see test_known_key_is_served_while_the_breaker_is_still_open): once Redis is
        # back, the re-subscribed channel empties the key cache while the breaker may still
        # be open, so a known key can get 503 in that window. Nothing else may fail.
        gap_503 = [r for r in phase1 if r.status == 503 and r.started >= marks["restarting"]]
        assert all(STORE_DOWN in r.message for r in gap_503)
        # GAP (proxy/quota/pipelined.py PipelinedRedis._send): a call whose reserve writes on
        # the connection the kill just closed gets RuntimeError from uvloop ("the handler is
        # closed"), which the StoreGuard does not catch: HTTP 500, not a degraded call. Seen
        # in about 1 run in 15; no result was released, so nothing is owed to the spool.
        gap_500 = [
            r
            for r in phase1
            if r.status == 500
            and "Internal Server Error" in r.error
            and abs(r.started - marks["killed"]) < 1.0
        ]
        errors = [e.get("exception", "") for e in rig.serve.logs() if e.get("level") == "error"]
        assert all("the handler is closed" in e for e in errors), errors[:1]
        others = [r for r in phase1 if not r.ok and r not in gap_503 and r not in gap_500]
        assert others == [], (
            Counter((r.status, r.error, r.message) for r in others),
            [e for e in rig.serve.logs() if e.get("level") == "error"][:1],
        )
        counter_after_restart = rig.counter()

        # Quota exact after the restart: exactly LIMIT - counter more calls succeed.
        phase2: list[Reply] = []

        async def until_refused(c: int) -> None:
            for i in itertools.count():
                reply = await tool_call(http, rig.serve.url, rig.key, f"b{c}-{i}")
                phase2.append(reply)
                if not reply.ok:
                    return

        await asyncio.gather(*(until_refused(c) for c in range(50)))
        assert [r for r in phase2 if not r.ok and not r.refused] == []
        ok2 = sum(r.ok for r in phase2)
        await _drain_and_stop(rig)  # serve flushes its queued commits on the way out
    counter_final = rig.counter()
    held_final = rig.held()
    # The store came back with its data: no false alarm about an empty one.
    assert rig.serve.events("tenant_store_empty") == []

    rows = spool_rows(rig.serve.spool)
    by_rid = {r.request_id: r for r in rows}
    received = [r for r in phase1 + phase2 if r.ok]
    assert not any(r.rid in by_rid for r in gap_500)  # refused before forwarding
    in_doubt = [r for r in phase1 + phase2 if r.status == 0]
    outage = [r for r in phase1 if r.started > marks["killed"]]
    inside = [r for r in outage if r.started + r.elapsed < marks["restarting"]]
    before = [r for r in phase1 if r.started + r.elapsed < marks["killing"]]
    degraded_units = sum(r.units for r in rows if r.degraded)
    counted_units = sum(r.units for r in rows if not r.degraded)
    commit_retries = sum(e.get("reservations", 0) for e in rig.serve.events("quota_commit_retry"))
    latency = max(r.elapsed for r in phase1)
    figures = (
        f"received={len(received)} in_doubt={len(in_doubt)} spooled={len(rows)} "
        f"degraded={degraded_units} counted={counted_units} "
        f"counter_after_restart={counter_after_restart} "
        f"phase2_ok={ok2} counter_final={counter_final} held_final={held_final} "
        f"503_after_restart={len(gap_503)} 500_at_kill={len(gap_500)} "
        f"commit_retries_logged={commit_retries} "
        f"max_latency_ms={latency * 1000:.0f} "
        f"outage_calls={len(outage)} outage_s={marks['restarting'] - marks['killed']:.2f} "
        f"recovery_s={marks['recovered'] - marks['restarting']:.2f}"
    )
    print(figures)

    # Invariant 1: every received result is spooled; only calls cut off could add to it.
    assert len(received) <= sum(r.units for r in rows) <= len(received) + len(in_doubt), figures
    assert all(r.rid in by_rid for r in received), figures
    assert _assert_billed_exactly_once(rig) == sum(r.units for r in rows), figures
    # Served degraded while Redis was down, counted normally before it.
    assert inside and all(by_rid[r.rid].degraded for r in inside), figures
    assert before and not any(by_rid[r.rid].degraded for r in before), figures
    assert not any(by_rid[r.rid].degraded for r in phase2 if r.ok), figures
    assert latency < BOUND_S, figures
    # Invariant 2: the AOF kept every counted unit (the counter never fell below what the
    # spool counted), and after the restart exactly LIMIT - counter more calls succeeded.
    assert ok2 == LIMIT - counter_after_restart, figures
    assert counter_final == LIMIT, figures
    # Units the counter holds beyond the spool's counted ones belong to reservations the
    # proxy never heard back from (reply lost in the kill): they are still held, so the
    # reaper gives them back at their deadline. Nothing else leaks.
    orphans = counter_final - counted_units
    assert 0 <= orphans <= held_final, figures


# --- (b) Redis without persistence ---------------------------------------------------------------


async def _old_key_until_401(
    rig: Rig, http: aiohttp.ClientSession, replies: list[Reply], limit: float = 15.0
) -> Reply:
    """Call with the old key until the proxy answers 401; every answer is kept."""
    deadline = time.monotonic() + limit
    for i in itertools.count():
        reply = await tool_call(http, rig.serve.url, rig.key, f"r-{i}")
        replies.append(reply)
        if reply.status == 401:
            return reply
        assert reply.ok, (reply.status, reply.error, reply.message)
        assert time.monotonic() < deadline, "the old key was never refused"
        await asyncio.sleep(0.05)
    raise AssertionError("unreachable")


async def test_redis_without_persistence_restarts_empty(
    redis_factory: Callable[..., RedisProcess],
    serves: ServeFactory,
    scripted: tuple[ScriptedUpstream, str],
    stripe_fake: StripeFake,
) -> None:
    rig = await _rig(redis_factory, serves, scripted, stripe_fake, persistent=False)
    calls: dict[str, list[Reply]] = {"before": [], "outage": [], "restart": [], "after": []}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        await rig.serve.ready(http)
        for i in range(20):
            calls["before"].append(await tool_call(http, rig.serve.url, rig.key, f"p-{i}"))
        assert all(r.ok for r in calls["before"])
        assert rig.counter() == 20

        await asyncio.to_thread(rig.redis.kill)
        for i in range(10):  # a key this replica knows: served from its cache, degraded
            calls["outage"].append(await tool_call(http, rig.serve.url, rig.key, f"o-{i}"))
        assert all(r.ok and r.elapsed < BOUND_S for r in calls["outage"])
        unknown = await tool_call(http, rig.serve.url, "mqp_neverseen0123456789", "u-0")
        assert unknown.status == 503, (unknown.status, unknown.doc)
        assert "tenant store is unreachable" in unknown.message
        assert unknown.elapsed < BOUND_S

        await asyncio.to_thread(rig.redis.start)  # same port, empty
        assert rig.all_keys() == []
        first_401 = await _old_key_until_401(rig, http, calls["restart"])
        assert first_401.message == INVALID_KEY_HELP
        for i in range(20):
            calls["after"].append(await tool_call(http, rig.serve.url, rig.key, f"z-{i}"))
        assert {r.status for r in calls["after"]} == {401}
        assert {r.message for r in calls["after"]} == {INVALID_KEY_HELP}
        await until(lambda: _redis_ok(rig, http), 10, "serve to report Redis ok")

        # What the running serve said about it: the channel was lost, the store came back empty.
        events = Counter(e["event"] for e in rig.serve.logs())
        assert events["invalidation_channel_lost"] >= 1, events
        await until(lambda: bool(rig.serve.events("tenant_store_empty")), 5, "the warning")
        said = rig.serve.events("tenant_store_empty")
        assert all("every request will get 401" in e["message"] for e in said), said
        assert rig.all_keys() == []  # refused calls wrote nothing; no orphan counter

        # Billing is right: exactly the successful calls, all of this tenant's customer.
        await until(lambda: unreported(rig.serve.spool) == 0, 60, "the drainer", 0.1)
        ok = [r for group in calls.values() for r in group if r.ok]
        rows = spool_rows(rig.serve.spool)
        assert sorted(r.request_id for r in rows) == sorted(r.rid for r in ok)
        assert {(r.tenant_id, r.stripe_customer) for r in rows} == {(TENANT, rig.customer)}
        degraded = {r.request_id for r in rows if r.degraded}
        served_while_restarting = [r.rid for r in calls["restart"] if r.ok]
        assert degraded == {r.rid for r in calls["outage"]} | set(served_while_restarting)
        assert rig.fake.total(rig.customer, METER) == len(ok)

        # A serve started now says what is wrong, at start-up.
        assert await rig.serve.stop() == 0
        rig.serve.start()
        await rig.serve.ready(http)
        await until(
            lambda: len(rig.serve.events("tenant_store_empty")) > len(said),
            10,
            "tenant_store_empty at start-up",
        )
        (warning,) = rig.serve.events("tenant_store_empty")[len(said) :]
        assert "every request will get 401" in warning["message"]
        again = await tool_call(http, rig.serve.url, rig.key, "s-0")
        assert again.status == 401

        # The operator re-creates the tenant and issues a new key: it works at once, the old
        # key stays refused, and this period's quota has restarted from zero.
        new_key = await create_tenant(
            rig.redis.url, rig.prefix, TENANT, plan="metered", customer=rig.customer
        )
        fresh = await tool_call(http, rig.serve.url, new_key, "n-0")
        assert fresh.ok
        old = await tool_call(http, rig.serve.url, rig.key, "n-1")
        assert old.status == 401
        assert rig.counter() == 1  # the 20 + 10 units used before are billed, not counted
        await _drain_and_stop(rig)

    billed = _assert_billed_exactly_once(rig)
    figures = (
        f"before={len(calls['before'])} outage={len(calls['outage'])} "
        f"served_while_restarting={len(served_while_restarting)} after_401={len(calls['after'])} "
        f"billed={billed}"
    )
    print(figures)
    assert billed == len(ok) + 1, figures


async def test_running_serve_warns_when_redis_comes_back_empty(
    redis_factory: Callable[..., RedisProcess],
    serves: ServeFactory,
    scripted: tuple[ScriptedUpstream, str],
    stripe_fake: StripeFake,
) -> None:
    rig = await _rig(redis_factory, serves, scripted, stripe_fake, persistent=False)
    replies: list[Reply] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        await rig.serve.ready(http)
        assert (await tool_call(http, rig.serve.url, rig.key, "p-0")).ok
        await asyncio.to_thread(rig.redis.kill)
        await asyncio.to_thread(rig.redis.start)
        await _old_key_until_401(rig, http, replies)
        await until(lambda: _redis_ok(rig, http), 10, "serve to report Redis ok")
        found: list[dict[str, Any]] = []

        def warned() -> bool:
            found[:] = rig.serve.events("tenant_store_empty")
            return bool(found)

        try:
            await until(warned, 5, "the running serve to log tenant_store_empty")
        finally:
            await _drain_and_stop(rig)
    (warning,) = found  # once per reconnect, not per request
    assert warning["level"] == "warning"
    for advice in ("every request will get 401", "tenant create", "key issue", "appendonly"):
        assert advice in warning["message"], warning


# --- gaps found on the way ---------------------------------------------------------------------


async def test_commit_that_fails_during_an_outage_is_retried(
    redis_factory: Callable[..., RedisProcess],
    serves: ServeFactory,
    scripted: tuple[ScriptedUpstream, str],
    stripe_fake: StripeFake,
) -> None:
    """A call reserved before the kill whose result comes back while Redis is away: its commit
    fails, is kept (quota_commit_retry) and lands once Redis is back, so its unit stays
    counted and its reservation is not left for the deadline to refund (invariant 2); the
    call itself is spooled and billed exactly once (invariant 1)."""
    rig = await _rig(redis_factory, serves, scripted, stripe_fake, persistent=True)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        await rig.serve.ready(http)
        slow = asyncio.ensure_future(tool_call(http, rig.serve.url, rig.key, "slow", "sse_wait"))
        try:
            await until(lambda: len(rig.upstream.calls()) == 1, 10, "the call to reach upstream")
            assert rig.counter() == 1 and rig.held() == 1  # reserved before the outage
            await asyncio.to_thread(rig.redis.kill)
            rig.upstream.release.set()  # the result comes back while Redis is away
            reply = await slow
        finally:
            rig.upstream.release.set()
            await asyncio.wait_for(slow, 30)
        assert reply.ok
        await until(lambda: bool(rig.serve.events("quota_commit_retry")), 10, "the failed commit")
        await asyncio.to_thread(rig.redis.start)
        # The AOF kept the reservation; the retry may already have committed it (its back-off
        # timer can fire first), but it was never refunded.
        assert (rig.counter(), rig.held()) in ((1, 1), (1, 0))
        after = [await tool_call(http, rig.serve.url, rig.key, f"after-{i}") for i in range(50)]
        assert all(r.ok for r in after)
        # The first call after recovery wakes the retry (no waiting out the back-off).
        await until(lambda: rig.held() == 0, 5, "the failed commit to be retried")
        assert rig.counter() == 51  # the slow call's unit was kept, not refunded
        await _drain_and_stop(rig)
    rows = {r.request_id: r for r in spool_rows(rig.serve.spool)}
    assert set(rows) == {"slow"} | {r.rid for r in after}
    assert not rows["slow"].degraded
    assert _assert_billed_exactly_once(rig) == 51
    assert (rig.counter(), rig.held()) == (51, 0)


async def test_known_key_is_served_while_the_breaker_is_still_open(
    redis_factory: Callable[..., RedisProcess],
    serves: ServeFactory,
    scripted: tuple[ScriptedUpstream, str],
    stripe_fake: StripeFake,
) -> None:
    rig = await _rig(redis_factory, serves, scripted, stripe_fake, persistent=True)
    config = yaml.safe_load(rig.serve.config_path.read_text())
    config["redis"]["breaker_cooldown_s"] = 3.0  # a window long enough to hit every time
    rig.serve.config_path.write_text(yaml.safe_dump(config))
    rig.serve.kill()
    rig.serve.start()
    replies: list[Reply] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        await rig.serve.ready(http)
        assert (await tool_call(http, rig.serve.url, rig.key, "warm")).ok
        await asyncio.to_thread(rig.redis.kill)
        for i in range(4):  # three failures open the breaker
            replies.append(await tool_call(http, rig.serve.url, rig.key, f"down-{i}"))
        await asyncio.to_thread(rig.redis.start)
        restarted = time.monotonic()
        i = 0
        while time.monotonic() - restarted < 2.0:  # inside the 3 s cool-down
            replies.append(await tool_call(http, rig.serve.url, rig.key, f"back-{i}"))
            i += 1
            await asyncio.sleep(0.05)
        await _drain_and_stop(rig)
    statuses = Counter(r.status for r in replies)
    assert statuses == {200: len(replies)}, statuses


async def test_readiness_probes_during_traffic_lose_no_spooled_call(
    serves: ServeFactory,
    scripted: tuple[ScriptedUpstream, str],
    stripe_fake: StripeFake,
    redis_url: str,
    key_prefix: str,
) -> None:
    """Invariant 1 under what Kubernetes does all day: probing /readyz while traffic flows."""
    customer = stripe_fake.add_customer(name=TENANT)["id"]
    key = await create_tenant(redis_url, key_prefix, TENANT, plan="metered", customer=customer)
    config = serve_config(
        upstream_url=scripted[1],
        key_prefix=key_prefix,
        plans={"metered": {"included_units": None, "overage": "block"}},
        redis_section={"timeout_ms": 2000},
    )
    serve = serves("serve", config, serve_env(redis_url, stripe_fake))
    serve.start()
    replies: list[Reply] = []
    stop = asyncio.Event()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        await serve.ready(http)

        async def worker(w: int) -> None:
            for i in itertools.count():
                if stop.is_set():
                    return
                replies.append(await tool_call(http, serve.url, key, f"t{w}-{i}"))

        async def prober() -> None:
            while not stop.is_set():
                await serve.readyz(http)

        def lost() -> set[str]:
            spooled = {r.request_id for r in spool_rows(serve.spool)}
            return {r.rid for r in replies if r.ok} - spooled

        tasks = asyncio.gather(*(worker(w) for w in range(8)), prober(), prober())
        try:
            # Up to 5 s of traffic, checked as it goes: stop at the first lost result.
            with contextlib.suppress(AssertionError):
                await until(lambda: bool(lost()), 5, "a lost result", every=0.2)
        finally:
            stop.set()
            await tasks
        assert all(r.ok for r in replies)
        missing = lost()
        await until(lambda: unreported(serve.spool) == 0, 60, "the drainer", 0.1)
        assert await serve.stop() == 0
    assert missing == set(), f"{len(missing)} of {len(replies)} received results not spooled"
