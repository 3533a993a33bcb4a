"""Attacks on POST /stripe/webhook: forged and foreign signatures, replays outside the
tolerance, captured signatures on altered bodies, malformed signature headers, and a flood of
concurrent copies of one genuine event against a real Redis (applied exactly once).

An unverified delivery must change nothing: not the tenant, not the event ledger, not even
the "last verified webhook" timestamp that billing health reads.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web
from redis.asyncio import Redis

from proxy.clock import ManualClock
from proxy.config import Config
from tests.conftest import ConfigFactory
from tests.ops_support import post_webhook, sign_webhook, stripe_event
from tests.proxy_harness import RunningProxy, local_server, run_proxy

pytestmark = pytest.mark.timeout(120)

SECRET = "whsec_attack_0123456789abcdef"
OTHER_SECRET = "whsec_someone_else_0123456789"
CUS = "cus_attack1"
TENANT = "acme"
TOLERANCE = 60  # billing.webhook_tolerance_s in these tests (the default is 300)
PERIOD_START = 1_767_225_600
DAY = 86400


def _config(make_config: ConfigFactory, upstream: str, **redis: Any) -> Config:
    return make_config(
        env={"STRIPE_WEBHOOK_SECRET": SECRET},
        upstream={"url": upstream},
        redis={"url": "memory://", **redis},
        plans={
            "free": {"included_units": 2},
            "pro": {"included_units": 100, "stripe_lookup_keys": ["mqp_pro_base"]},
        },
        default_plan="free",
        billing={"webhook_tolerance_s": TOLERANCE},
    )


def subscription_event(
    evt_id: str,
    created: int = 100,
    status: str = "active",
    period: tuple[int, int] = (PERIOD_START, PERIOD_START + 30 * DAY),
) -> bytes:
    sub = {
        "id": "sub_1",
        "object": "subscription",
        "customer": CUS,
        "status": status,
        "metadata": {},
        "trial_end": None,
        "items": {
            "object": "list",
            "data": [
                {
                    "id": "si_1",
                    "object": "subscription_item",
                    "price": {"id": "price_1", "lookup_key": "mqp_pro_base", "metadata": {}},
                    "current_period_start": period[0],
                    "current_period_end": period[1],
                }
            ],
        },
    }
    return stripe_event(evt_id, "customer.subscription.updated", created, sub)


sign = functools.partial(sign_webhook, secret=SECRET)


def hmac_v1(payload: bytes, key: str) -> str:
    return hmac.new(key.encode(), payload, hashlib.sha256).hexdigest()


async def deliver(
    http: aiohttp.ClientSession, proxy: RunningProxy, body: bytes, header: str | None
) -> tuple[int, dict[str, Any]]:
    return await post_webhook(http, proxy.base, body, header, content_type=None)


@pytest.fixture
async def upstream_url() -> AsyncIterator[str]:
    """Nothing is proxied to it here; the config needs an upstream."""
    async with local_server(web.Application()) as base:
        yield base


@pytest.fixture
async def proxy(make_config: ConfigFactory, upstream_url: str) -> AsyncIterator[RunningProxy]:
    async with run_proxy(_config(make_config, upstream_url)) as running:
        await running.components.tenants.create(
            TENANT, name=None, plan="free", stripe_customer=CUS, now=0
        )
        yield running


async def assert_unchanged(proxy: RunningProxy, *event_ids: str) -> None:
    t = await proxy.components.tenants.get(TENANT)
    assert t is not None
    assert (t.plan, t.status, t.subscription_id) == ("free", "active", None), t
    main, keys = proxy.components.stores.main, proxy.components.keys
    assert await main.get(keys.webhook_last()) is None, "an unverified delivery was recorded"
    for evt in event_ids:
        assert not await main.exists(keys.webhook_event(TENANT, evt)), f"{evt} is in the ledger"


def outcomes(proxy: RunningProxy) -> dict[tuple[str, str], float]:
    out = {}
    for family in proxy.components.metrics.registry.collect():
        if family.name == "mqp_webhook_events":
            for s in family.samples:
                if s.name == "mqp_webhook_events_total":
                    out[(s.labels["type"], s.labels["outcome"])] = s.value
    return out


# --- forged signatures ----------------------------------------------------------------------


async def test_forged_signatures_of_the_right_format_are_refused(proxy: RunningProxy) -> None:
    body = subscription_event("evt_forged")
    now = int(time.time())
    forged = {
        "zero-hmac": f"t={now},v1={'0' * 64}",
        "guessed-key": f"t={now},v1={hmac_v1(f'{now}.'.encode() + body, 'whsec_guess')}",
        "no-timestamp-in-mac": f"t={now},v1={hmac_v1(body, SECRET)}",  # the real secret, misused
        "other-timestamp-in-mac": f"t={now},v1={hmac_v1(f'{now - 1}.'.encode() + body, SECRET)}",
        "other-body": f"t={now},v1={hmac_v1(f'{now}.'.encode() + body + b' ', SECRET)}",
        "upper-case-hex": sign(body).upper().replace("T=", "t=").replace("V1=", "v1="),
        "v0-scheme-only": f"t={now},v0={hmac_v1(f'{now}.'.encode() + body, SECRET)}",
        "truncated-mac": sign(body)[:-2],
    }
    async with aiohttp.ClientSession() as http:
        for name, header in forged.items():
            status, reply = await deliver(http, proxy, body, header)
            assert (status, reply["result"]) == (400, "bad_signature"), name
    await assert_unchanged(proxy, "evt_forged")
    assert outcomes(proxy) == {("-", "bad_signature"): len(forged)}  # no type for unverified


async def test_a_signature_made_with_another_secret_is_refused(proxy: RunningProxy) -> None:
    body = subscription_event("evt_other")
    async with aiohttp.ClientSession() as http:
        status, reply = await deliver(http, proxy, body, sign(body, secret=OTHER_SECRET))
        # Both signatures listed: Stripe accepts any matching v1 (secret rotation), but an
        # attacker's own never counts for anything.
        both = f"{sign(body, secret=OTHER_SECRET)},v1={'f' * 64}"
        status2, reply2 = await deliver(http, proxy, body, both)
    assert (status, reply["result"]) == (400, "bad_signature")
    assert (status2, reply2["result"]) == (400, "bad_signature")
    await assert_unchanged(proxy, "evt_other")


@pytest.mark.parametrize(
    "header",
    ["", "garbage", "t=,v1=", "t=abc,v1=00", "v1=00", f"t={int(time.time())}", "t=1," * 2000],
    ids=["empty", "garbage", "empty-fields", "non-numeric-t", "no-t", "no-v1", "8k-header"],
)
async def test_malformed_signature_headers_are_400(proxy: RunningProxy, header: str) -> None:
    body = subscription_event("evt_malformed")
    async with aiohttp.ClientSession() as http:
        status, reply = await deliver(http, proxy, body, header or None)
    assert (status, reply["result"]) == (400, "bad_signature")
    await assert_unchanged(proxy, "evt_malformed")


@pytest.mark.parametrize("sig", ["\u00e9" * 64, "0" * 63 + "\u0661"], ids=["latin", "arabic-digit"])
async def test_a_non_ascii_signature_is_400_not_500(proxy: RunningProxy, sig: str) -> None:
    body = subscription_event("evt_unicode")
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{proxy.base}/stripe/webhook",
            data=body,
            headers={"Stripe-Signature": f"t={int(time.time())},v1={sig}"},
        ) as r,
    ):
        status = r.status
    assert status == 400
    await assert_unchanged(proxy, "evt_unicode")


# --- replays --------------------------------------------------------------------------------


async def test_a_genuine_event_replayed_outside_the_tolerance_is_refused(
    proxy: RunningProxy,
) -> None:
    body = subscription_event("evt_old")
    # The SDK judges the timestamp against time.time(), not the proxy's clock.
    stale = int(time.time()) - TOLERANCE - 5
    captured = sign(body, ts=stale)
    async with aiohttp.ClientSession() as http:
        status, reply = await deliver(http, proxy, body, captured)
        assert (status, reply["result"]) == (400, "bad_signature")
        # A fresh t= in front of the captured one: the MAC covers the timestamp.
        status, reply = await deliver(http, proxy, body, f"t={int(time.time())},{captured}")
        assert (status, reply["result"]) == (400, "bad_signature")
        old_mac = captured.split("v1=")[1]
        status, reply = await deliver(http, proxy, body, f"t={int(time.time())},v1={old_mac}")
        assert (status, reply["result"]) == (400, "bad_signature")
        await assert_unchanged(proxy, "evt_old")
        # Inside the (configured, non-default) tolerance the same event is accepted, once.
        recent = sign(body, ts=int(time.time()) - TOLERANCE + 20)
        assert (await deliver(http, proxy, body, recent))[1]["result"] == "applied"
        assert (await deliver(http, proxy, body, recent))[1]["result"] == "duplicate"
    t = await proxy.components.tenants.get(TENANT)
    assert t is not None and (t.plan, t.subscription_id) == ("pro", "sub_1")


async def test_a_captured_signature_on_an_altered_body_is_refused(proxy: RunningProxy) -> None:
    genuine = subscription_event("evt_genuine", status="canceled")
    header = sign(genuine)
    altered = {
        "status": genuine.replace(b'"canceled"', b'"active"'),
        "event-id": genuine.replace(b"evt_genuine", b"evt_genuinf"),  # to dodge the ledger
        "customer": genuine.replace(CUS.encode(), b"cus_victim"),
        "trailing-space": genuine + b" ",
        "trailing-newline": genuine + b"\n",
        "reserialised": json.dumps(json.loads(genuine), separators=(",", ":")).encode(),
        "bom": b"\xef\xbb\xbf" + genuine,
        "not-utf8": genuine.replace(b'"canceled"', b'"\xff\xfe"'),
        "empty": b"",
    }
    async with aiohttp.ClientSession() as http:
        for name, body in altered.items():
            status, reply = await deliver(http, proxy, body, header)
            assert (status, reply["result"]) == (400, "bad_signature"), name
        await assert_unchanged(proxy, "evt_genuine", "evt_genuinf")
        # The genuine delivery itself still verifies (the attacks did not poison anything).
        status, reply = await deliver(http, proxy, genuine, header)
    assert (status, reply["result"]) == (200, "applied")


async def test_an_oversized_delivery_is_refused_unread(proxy: RunningProxy) -> None:
    body = subscription_event("evt_big")[:-1] + b',"pad":"' + b"a" * (1024 * 1024) + b'"}'
    async with aiohttp.ClientSession() as http:
        status, reply = await deliver(http, proxy, body, sign(body))
    assert (status, reply["result"]) == (413, "too_large")
    await assert_unchanged(proxy, "evt_big")


# --- a flood of one genuine event -----------------------------------------------------------

COPIES = 1000


@dataclass
class Flood:
    replies: list[tuple[int, dict[str, Any]]]
    retried: list[tuple[int, dict[str, Any]]]  # the 503'd copies, redelivered as Stripe would
    published: list[str]  # invalidations on the tenant channel during the flood
    ledger: str | None
    ttl: int
    plan: str
    subscription: str | None
    metrics: dict[tuple[str, str], float]
    elapsed: float


async def flood(config: Config, redis_url: str) -> Flood:
    body = subscription_event("evt_flood")
    header = sign(body)
    watcher = Redis.from_url(redis_url, decode_responses=True)
    pubsub = watcher.pubsub()
    connector = aiohttp.TCPConnector(limit=COPIES)
    try:
        async with run_proxy(config) as proxy, aiohttp.ClientSession(connector=connector) as http:
            keys = proxy.components.keys
            await proxy.components.tenants.create(
                TENANT, name=None, plan="free", stripe_customer=CUS, now=0
            )
            channel = keys.invalidations()
            await pubsub.subscribe(channel)
            async with asyncio.timeout(5):
                while (await pubsub.get_message(timeout=1.0) or {}).get("type") != "subscribe":
                    pass

            started = time.monotonic()
            replies = await asyncio.gather(
                *(deliver(http, proxy, body, header) for _ in range(COPIES))
            )
            elapsed = time.monotonic() - started
            # What Stripe does with a 5xx: deliver again later (bounded here).
            retried: list[tuple[int, dict[str, Any]]] = []
            deadline = time.monotonic() + 20
            for first, _ in replies:
                status = first
                while status != 200:
                    assert time.monotonic() < deadline, "a redelivery kept failing"
                    status, reply = await deliver(http, proxy, body, header)
                    if status == 200:
                        retried.append((status, reply))
                    else:
                        await asyncio.sleep(0.1)  # Stripe's retry backoff, much shortened

            # Every invalidation published before the sentinel arrives before it (one channel).
            await watcher.publish(channel, "sentinel")
            published: list[str] = []
            async with asyncio.timeout(10):
                while not published or published[-1] != "sentinel":
                    message = await pubsub.get_message(timeout=1.0)
                    if message and message["type"] == "message":
                        published.append(str(message["data"]))
            ledger_key = keys.webhook_event(TENANT, "evt_flood")
            tenant = await proxy.components.tenants.get(TENANT)
            assert tenant is not None
            return Flood(
                replies=list(replies),
                retried=retried,
                published=published[:-1],
                ledger=cast(str | None, await watcher.get(ledger_key)),
                ttl=await watcher.ttl(ledger_key),
                plan=tenant.plan,
                subscription=tenant.subscription_id,
                metrics=outcomes(proxy),
                elapsed=elapsed,
            )
    finally:
        await pubsub.aclose()
        await watcher.aclose()


@pytest.mark.redis
async def test_one_thousand_concurrent_copies_apply_exactly_once(
    make_config: ConfigFactory, upstream_url: str, redis_url: str, key_prefix: str
) -> None:
    # A short breaker cooldown only so the redeliveries of 503'd copies (see the xfail below)
    # do not wait out the default 5 s.
    config = _config(
        make_config,
        upstream_url,
        url=redis_url,
        key_prefix=key_prefix,
        timeout_ms=5000,
        breaker_cooldown_s=0.2,
    )
    f = await flood(config, redis_url)
    statuses = Counter(status for status, _ in f.replies)
    results = Counter(reply["result"] for _, reply in f.replies + f.retried)
    print(f"{COPIES} concurrent deliveries in {f.elapsed:.2f} s: {dict(statuses)}; {dict(results)}")
    assert set(statuses) <= {200, 503}, statuses  # 503 asks Stripe to retry: never lost
    assert results["applied"] == 1, results
    assert results["duplicate"] == COPIES - 1, results
    assert f.published == [f"tenant:{TENANT}"], "the tenant changed more than once"
    assert f.ledger == "evt_flood" and 0 < f.ttl <= 30 * DAY
    assert (f.plan, f.subscription) == ("pro", "sub_1")
    kind = "customer.subscription.updated"
    assert f.metrics[(kind, "applied")] == 1, f.metrics
    assert f.metrics[(kind, "duplicate")] == COPIES - 1, f.metrics


@pytest.mark.redis
async def test_a_flood_on_a_healthy_redis_is_never_answered_503(
    make_config: ConfigFactory, upstream_url: str, redis_url: str, key_prefix: str
) -> None:
    config = _config(
        make_config, upstream_url, url=redis_url, key_prefix=key_prefix, timeout_ms=5000
    )
    f = await flood(config, redis_url)
    statuses = Counter(status for status, _ in f.replies)
    assert statuses == {200: COPIES}, statuses


# --- found by the soak (tests/soak.py) ------------------------------------------------------


async def test_a_webhook_that_moves_the_period_does_not_strand_an_orphaned_reservation(
    make_config: ConfigFactory, upstream_url: str
) -> None:
    clock = ManualClock(now=float(int(time.time())))
    config = _config(make_config, upstream_url, reservation_ttl_s=60)
    async with run_proxy(config, clock=clock) as proxy, aiohttp.ClientSession() as http:
        c = proxy.components
        await c.tenants.create(TENANT, name=None, plan="pro", stripe_customer=CUS, now=0)
        key = await proxy.tenant_with_key(TENANT)
        tenant = await c.tenants.get(TENANT)
        assert tenant is not None
        month = c.engine.period(tenant.period_start, tenant.period_end)  # no period yet
        # A call whose holder dies (a SIGKILLed replica): reserved, never settled.
        _, orphan = await c.engine.reserve(TENANT, config.plan("pro"), month, 1, "add")
        assert orphan is not None and await c.storage.used(TENANT, month.start) == 1

        now = int(clock.time())
        body = subscription_event("evt_period", period=(now - 3600, now + 30 * DAY))
        assert (await deliver(http, proxy, body, sign(body)))[1]["result"] == "applied"
        tenant = await c.tenants.get(TENANT)
        assert tenant is not None and tenant.period_start == now - 3600

        clock.advance(61)  # past the orphan's deadline (reservation_ttl_s)
        # The tenant's next call reaps it (the upstream answers 404: refunded, no matter).
        async with http.post(
            proxy.url,
            json={"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "add"}},
            headers={
                "Authorization": f"Bearer {key}",
                "Accept": "application/json, text/event-stream",
            },
        ) as r:
            await r.read()
        await c.engine.flush()
        held = await c.storage.held(TENANT)
        stranded = await c.storage.used(TENANT, month.start)
    assert held == 0
    assert stranded == 0, "the orphaned unit stays counted in the earlier period"
