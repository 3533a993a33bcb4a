"""The tenant billing API (usage, portal, checkout) through a running proxy, against the
scripted MCP upstream and the strict Stripe fake.

Every answer is checked whole: a tenant's key reaches only that tenant's usage and billing,
whatever else the request names."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import stripe

from proxy.clock import ManualClock
from proxy.config import Config, parse_config
from proxy.jsonrpc import UNAUTHORIZED
from proxy.replies import AUTH_HELP, INVALID_KEY_HELP
from tests.conftest import PEPPER
from tests.fakes.stripe_fake import Fault, StripeFake, run_stripe_fake
from tests.fakes.upstream import ScriptedUpstream
from tests.proxy_harness import RunningProxy, run_proxy
from tests.rpc import bearer, call

STRIPE_KEY = "sk_test_billing_api_0123456789"
NOW = 1_773_576_000.0  # 2026-03-15T12:00:00Z
MARCH = ("2026-03-01T00:00:00Z", "2026-04-01T00:00:00Z")
DAY = 86_400

RETURN_URL = "https://app.example.test/account"
SUCCESS_URL = "https://app.example.test/welcome?session={CHECKOUT_SESSION_ID}"
CANCEL_URL = "https://app.example.test/pricing"
BILLING = {
    "portal_return_url": RETURN_URL,
    "checkout_success_url": SUCCESS_URL,
    "checkout_cancel_url": CANCEL_URL,
}
PLANS: dict[str, Any] = {
    "free": {"included_units": 100, "overage": "block"},
    "pro": {
        "included_units": 1000,
        "overage": "bill",
        "hard_cap": 5000,
        "stripe_lookup_keys": ["mqp_pro_base", "mqp_pro_overage"],
    },
    "metered": {"included_units": 3, "overage": "bill"},
}

USAGE = "/api/billing/usage"
PORTAL = "/api/billing/portal"
CHECKOUT = "/api/billing/checkout"
# (challenge, body) of a 401: no usable key offered, or one this service does not know.
MISSING = (
    'Bearer realm="mcp", error="invalid_token", error_description="API key required"',
    {"jsonrpc": "2.0", "id": None, "error": {"code": UNAUTHORIZED, "message": AUTH_HELP}},
)
INVALID = (
    'Bearer realm="mcp", error="invalid_token", error_description="invalid API key"',
    {"jsonrpc": "2.0", "id": None, "error": {"code": UNAUTHORIZED, "message": INVALID_KEY_HELP}},
)
PORTAL_502 = {"error": "Stripe could not create a billing portal session; retry."}
CHECKOUT_502 = {"error": "Stripe could not create a checkout session; retry."}
CHECKOUT_503 = {"error": "Checkout is not configured on this proxy (billing.checkout_success_url)."}
BAD_BODY = {"error": 'Expected a JSON body like {"plan": "pro"}, or none.'}


def _config(
    upstream: str,
    stripe_base: str | None,
    *,
    billing: dict[str, Any] | None = None,
) -> Config:
    env = {"MQP_KEY_PEPPER": PEPPER}
    if stripe_base is not None:
        env |= {"STRIPE_SECRET_KEY": STRIPE_KEY, "STRIPE_API_BASE": stripe_base}
    data = {
        "upstream": {"url": upstream},
        "redis": {"url": "memory://"},
        "plans": PLANS,
        "default_plan": "free",
        "billing": BILLING if billing is None else billing,
    }
    return parse_config(data, env)


@dataclass
class Prices:
    base: str  # licensed, lookup key mqp_pro_base
    overage: str  # metered, lookup key mqp_pro_overage


@pytest.fixture
async def fake() -> AsyncIterator[StripeFake]:
    async with run_stripe_fake() as running:
        yield running


@pytest.fixture
async def prices(fake: StripeFake) -> Prices:
    """The pro plan's two prices, created through the official SDK as `billing setup` would."""
    meter = fake.add_meter("mcp_tool_calls")
    async with aiohttp.ClientSession() as http:
        client = stripe.StripeClient(
            STRIPE_KEY,
            base_addresses={"api": fake.url},
            http_client=stripe.AIOHTTPClient(session=http),
            max_network_retries=0,
        )
        product = await client.v1.products.create_async({"name": "Pro"})
        base = await client.v1.prices.create_async(
            {
                "currency": "usd",
                "product": product.id,
                "unit_amount": 2900,
                "recurring": {"interval": "month"},
                "lookup_key": "mqp_pro_base",
            }
        )
        overage = await client.v1.prices.create_async(
            {
                "currency": "usd",
                "product": product.id,
                "unit_amount_decimal": "0.5",  # type: ignore[typeddict-item]
                "recurring": {"interval": "month", "usage_type": "metered", "meter": meter["id"]},
                "lookup_key": "mqp_pro_overage",
            }
        )
    assert base.recurring is not None and base.recurring.usage_type == "licensed"
    assert overage.recurring is not None and overage.recurring.usage_type == "metered"
    fake.calls.clear()  # from here on, fake.calls holds only what the proxy sent
    return Prices(base=base.id, overage=overage.id)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(now=NOW)


@asynccontextmanager
async def _proxy(
    scripted: tuple[ScriptedUpstream, str],
    fake: StripeFake | None,
    clock: ManualClock,
    *,
    billing: dict[str, Any] | None = None,
) -> AsyncIterator[RunningProxy]:
    config = _config(scripted[1], None if fake is None else fake.url, billing=billing)
    async with run_proxy(config, clock=clock) as running:
        yield running


@pytest.fixture
async def proxy(
    scripted: tuple[ScriptedUpstream, str], fake: StripeFake, clock: ManualClock
) -> AsyncIterator[RunningProxy]:
    async with _proxy(scripted, fake, clock) as running:
        yield running


# --- helpers ---------------------------------------------------------------------------------


def key_headers(key: str, style: str = "bearer") -> dict[str, str]:
    if style == "bearer":
        return {"Authorization": f"Bearer {key}"}
    return {"X-API-Key": key}


async def request(
    method: str,
    url: str,
    headers: dict[str, str] | None = None,
    *,
    data: bytes | None = None,
    json_body: Any = None,
) -> tuple[int, dict[str, str], Any]:
    async with aiohttp.ClientSession() as http:
        kwargs: dict[str, Any] = {"headers": headers or {}}
        if json_body is not None:
            kwargs["json"] = json_body
        elif data is not None:
            kwargs["data"] = data
        async with http.request(method, url, **kwargs) as r:
            return r.status, dict(r.headers), await r.json(content_type=None)


async def usage(proxy: RunningProxy, key: str, query: str = "") -> tuple[int, Any]:
    status, _, body = await request("GET", proxy.base + USAGE + query, key_headers(key))
    return status, body


async def tool_calls(proxy: RunningProxy, key: str, n: int) -> None:
    async with aiohttp.ClientSession() as http:
        for i in range(n):
            async with http.post(proxy.url, json=call(i + 1, "add", a=i), headers=bearer(key)) as r:
                assert r.status == 200
                doc = await r.json()
            assert doc["id"] == i + 1
            assert doc["result"]["isError"] is False


async def wait_for_tenant(proxy: RunningProxy, key: str, **expected: Any) -> None:
    """Until the hot path's cached tenant shows ``expected`` (pub/sub invalidation landed)."""
    directory = proxy.components.directory
    for _ in range(200):
        tenant, _ = await directory.authenticate(key)
        assert tenant is not None
        if all(getattr(tenant, k) == v for k, v in expected.items()):
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"the directory never saw {expected}")


async def wait_for_revocation(proxy: RunningProxy, key: str) -> None:
    directory = proxy.components.directory
    for _ in range(200):
        if (await directory.authenticate(key))[0] is None:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the revoked key still authenticates")


def usage_doc(tenant: str, plan: str, used: int, **over: Any) -> dict[str, Any]:
    plan_cfg = PLANS[plan]
    included = plan_cfg["included_units"]
    limit = plan_cfg.get("hard_cap") if plan_cfg["overage"] == "bill" else included
    doc = {
        "tenant": tenant,
        "plan": plan,
        "status": "active",
        "period_start": MARCH[0],
        "period_end": MARCH[1],
        "units_used": used,
        "limit": limit,
        "included_units": included,
        "overage_units": max(0, used - included),
        "trial_end": None,
    }
    doc.update(over)
    return doc


def stripe_posts(fake: StripeFake) -> list[tuple[str, str]]:
    return [c for c in fake.calls if c[0] == "POST"]


# --- 1. usage --------------------------------------------------------------------------------


async def test_usage_reports_each_tenants_own_calls(proxy: RunningProxy) -> None:
    key_a = await proxy.tenant_with_key("acme", plan="pro")
    key_b = await proxy.tenant_with_key("bravo", plan="free")
    await tool_calls(proxy, key_a, 4)
    await tool_calls(proxy, key_b, 2)
    await tool_calls(proxy, key_a, 1)

    assert await usage(proxy, key_a) == (
        200,
        {
            "tenant": "acme",
            "plan": "pro",
            "status": "active",
            "period_start": "2026-03-01T00:00:00Z",
            "period_end": "2026-04-01T00:00:00Z",
            "units_used": 5,
            "limit": 5000,
            "included_units": 1000,
            "overage_units": 0,
            "trial_end": None,
        },
    )
    assert await usage(proxy, key_b) == (200, usage_doc("bravo", "free", 2))
    status, _, body = await request("GET", proxy.base + USAGE, key_headers(key_b, "x-api-key"))
    assert (status, body) == (200, usage_doc("bravo", "free", 2))
    assert usage_doc("bravo", "free", 2)["limit"] == 100  # block plan: limit = included


async def test_usage_of_a_fresh_tenant_is_zero(proxy: RunningProxy) -> None:
    key = await proxy.tenant_with_key("quiet", plan="free")
    assert await usage(proxy, key) == (200, usage_doc("quiet", "free", 0))


async def test_usage_counts_overage_on_a_bill_plan(proxy: RunningProxy) -> None:
    key = await proxy.tenant_with_key("heavy", plan="metered")
    await tool_calls(proxy, key, 3)
    assert await usage(proxy, key) == (200, usage_doc("heavy", "metered", 3, overage_units=0))
    await tool_calls(proxy, key, 2)
    expected = usage_doc("heavy", "metered", 5, limit=None, included_units=3, overage_units=2)
    assert await usage(proxy, key) == (200, expected)


async def test_usage_follows_the_stripe_period_then_the_calendar_month(
    proxy: RunningProxy, clock: ManualClock
) -> None:
    key = await proxy.tenant_with_key("subbed", plan="pro")
    await tool_calls(proxy, key, 2)  # counted in the calendar month (March)
    assert await usage(proxy, key) == (200, usage_doc("subbed", "pro", 2))

    start, end = int(NOW) - 5 * DAY, int(NOW) + 25 * DAY  # 2026-03-10T12:00 .. 04-09T12:00
    await proxy.components.tenants.update("subbed", period_start=start, period_end=end)
    await wait_for_tenant(proxy, key, period_start=start, period_end=end)
    stripe_period = {"period_start": "2026-03-10T12:00:00Z", "period_end": "2026-04-09T12:00:00Z"}
    assert await usage(proxy, key) == (200, usage_doc("subbed", "pro", 0, **stripe_period))
    await tool_calls(proxy, key, 3)
    assert await usage(proxy, key) == (200, usage_doc("subbed", "pro", 3, **stripe_period))

    # The Stripe period is over and no renewal arrived: back to the calendar month (April).
    clock.advance(26 * DAY)  # 2026-04-10T12:00:00Z
    april = {"period_start": "2026-04-01T00:00:00Z", "period_end": "2026-05-01T00:00:00Z"}
    assert await usage(proxy, key) == (200, usage_doc("subbed", "pro", 0, **april))


# --- 2. authentication -----------------------------------------------------------------------


ENDPOINTS = [("GET", USAGE), ("POST", PORTAL), ("POST", CHECKOUT)]


async def _assert_all_refused(
    proxy: RunningProxy,
    fake: StripeFake,
    headers: dict[str, str],
    secrets: list[str],
    refusal: tuple[str, dict[str, Any]] = MISSING,
) -> None:
    challenge, refused_body = refusal
    for method, path in ENDPOINTS:
        for query in ("", "?tenant=acme"):
            status, hdrs, body = await request(
                method, proxy.base + path + query, headers, json_body={"tenant": "acme"}
            )
            assert (status, body) == (401, refused_body), (method, path)
            assert hdrs["WWW-Authenticate"] == challenge
            assert not any(s in str(body) for s in secrets)
    assert fake.calls == []
    assert fake.portal_sessions == {} and fake.checkout_sessions == {}


@pytest.mark.parametrize(
    ("headers", "refusal"),
    [
        ({}, MISSING),
        ({"Authorization": "Bearer mqp_000000000000_unknownsecret"}, INVALID),
        ({"X-API-Key": "mqp_000000000000_unknownsecret"}, INVALID),
        ({"X-API-Key": "not a key at all"}, INVALID),
        ({"Authorization": "Bearer "}, MISSING),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, MISSING),
        (
            {"Authorization": "Token something", "X-API-Key": "mqp_000000000000_unknownsecret"},
            MISSING,
        ),
    ],
    ids=[
        "missing",
        "unknown-bearer",
        "unknown-x-api-key",
        "malformed-x-api-key",
        "empty-bearer",
        "basic",
        "other",
    ],
)
async def test_no_valid_key_is_401_and_leaks_nothing(
    proxy: RunningProxy,
    fake: StripeFake,
    prices: Prices,
    headers: dict[str, str],
    refusal: tuple[str, dict[str, Any]],
) -> None:
    customer = fake.add_customer(name="Acme")["id"]
    key = await proxy.tenant_with_key("acme", plan="pro", stripe_customer=customer)
    await tool_calls(proxy, key, 1)
    await _assert_all_refused(proxy, fake, headers, ["acme", customer], refusal)


async def test_a_valid_key_in_a_non_bearer_authorization_is_401(
    proxy: RunningProxy, fake: StripeFake
) -> None:
    customer = fake.add_customer(name="Acme")["id"]
    key = await proxy.tenant_with_key("acme", plan="pro", stripe_customer=customer)
    # Authorization wins over X-API-Key, and only the Bearer scheme carries a key.
    await _assert_all_refused(
        proxy, fake, {"Authorization": f"Token {key}", "X-API-Key": key}, ["acme", customer]
    )


async def test_revoked_key_is_401(proxy: RunningProxy, fake: StripeFake, prices: Prices) -> None:
    customer = fake.add_customer(name="Acme")["id"]
    key = await proxy.tenant_with_key("acme", plan="pro", stripe_customer=customer)
    assert await usage(proxy, key) == (200, usage_doc("acme", "pro", 0))  # cached now
    tenants = proxy.components.tenants
    (info,) = await tenants.list_keys("acme")
    await tenants.revoke_key("acme", info.key_id)
    await wait_for_revocation(proxy, key)
    for headers in (key_headers(key), key_headers(key, "x-api-key")):
        await _assert_all_refused(proxy, fake, headers, ["acme", customer], INVALID)
    # The tenant's other key still works.
    other, _ = await tenants.issue_key("acme", label="second", now=0)
    assert await usage(proxy, other) == (200, usage_doc("acme", "pro", 0))


# --- 3. portal -------------------------------------------------------------------------------


async def test_portal_without_a_stripe_customer_is_400(
    proxy: RunningProxy, fake: StripeFake
) -> None:
    key = await proxy.tenant_with_key("nocust", plan="free")
    status, _, body = await request("POST", proxy.base + PORTAL, key_headers(key))
    assert (status, body) == (400, {"error": "No billing account found"})
    assert fake.portal_sessions == {}
    assert fake.calls == []


async def test_portal_session_is_for_the_callers_own_customer(
    proxy: RunningProxy, fake: StripeFake
) -> None:
    cus_a = fake.add_customer(name="A")["id"]
    cus_b = fake.add_customer(name="B")["id"]
    key_a = await proxy.tenant_with_key("acme", plan="pro", stripe_customer=cus_a)
    key_b = await proxy.tenant_with_key("bravo", plan="pro", stripe_customer=cus_b)

    status, _, body = await request("POST", proxy.base + PORTAL, key_headers(key_a))
    assert status == 200
    (session,) = fake.portal_sessions.values()
    assert body == {"url": session["url"]}
    assert body["url"] == f"https://billing.stripe.test/session/{session['id']}"
    assert (session["customer"], session["return_url"]) == (cus_a, RETURN_URL)

    status, _, body = await request("POST", proxy.base + PORTAL, key_headers(key_b, "x-api-key"))
    assert status == 200
    sessions = list(fake.portal_sessions.values())
    assert len(sessions) == 2
    assert body == {"url": sessions[1]["url"]}
    assert (sessions[1]["customer"], sessions[1]["return_url"]) == (cus_b, RETURN_URL)
    assert stripe_posts(fake) == [("POST", "/v1/billing_portal/sessions")] * 2


async def test_portal_follows_a_customer_set_after_the_key_was_cached(
    proxy: RunningProxy, fake: StripeFake
) -> None:
    key = await proxy.tenant_with_key("late", plan="free")
    status, _, body = await request("POST", proxy.base + PORTAL, key_headers(key))
    assert (status, body) == (400, {"error": "No billing account found"})
    customer = fake.add_customer(name="Late")["id"]
    await proxy.components.tenants.update("late", stripe_customer=customer)
    status, _, body = await request("POST", proxy.base + PORTAL, key_headers(key))
    assert status == 200
    (session,) = fake.portal_sessions.values()
    assert body == {"url": session["url"]}
    assert session["customer"] == customer


async def test_portal_without_a_return_url_sends_none(
    scripted: tuple[ScriptedUpstream, str], fake: StripeFake, clock: ManualClock
) -> None:
    customer = fake.add_customer(name="A")["id"]
    async with _proxy(scripted, fake, clock, billing={}) as proxy:
        key = await proxy.tenant_with_key("acme", plan="pro", stripe_customer=customer)
        status, _, body = await request("POST", proxy.base + PORTAL, key_headers(key))
    assert status == 200
    (session,) = fake.portal_sessions.values()
    assert body == {"url": session["url"]}
    assert (session["customer"], session["return_url"]) == (customer, None)


async def test_portal_without_stripe_configured_is_503(
    scripted: tuple[ScriptedUpstream, str], clock: ManualClock
) -> None:
    async with _proxy(scripted, None, clock) as proxy:
        key = await proxy.tenant_with_key("acme", plan="pro", stripe_customer="cus_abc123")
        status, _, body = await request("POST", proxy.base + PORTAL, key_headers(key))
        assert (status, body) == (
            503,
            {"error": "Billing is not configured on this proxy (STRIPE_SECRET_KEY)."},
        )
        nocust = await proxy.tenant_with_key("nocust", plan="free")
        status, _, body = await request("POST", proxy.base + PORTAL, key_headers(nocust))
        assert (status, body) == (400, {"error": "No billing account found"})


# --- 4. checkout -----------------------------------------------------------------------------


def _lines(fake: StripeFake, session_id: str) -> tuple[dict[str, str], dict[str, int | None]]:
    """(subscription metadata, price id -> quantity) of the subscription the session makes."""
    completed = fake.complete_checkout(session_id)
    subscription = fake.subscriptions[completed["subscription"]]
    items = {i["price"]["id"]: i["quantity"] for i in subscription["items"]["data"]}
    return subscription["metadata"], items


async def test_checkout_for_a_tenant_with_a_customer(
    proxy: RunningProxy, fake: StripeFake, prices: Prices
) -> None:
    customer = fake.add_customer(name="A")["id"]
    key = await proxy.tenant_with_key("acme", plan="free", stripe_customer=customer)
    status, _, body = await request("POST", proxy.base + CHECKOUT, key_headers(key))
    assert status == 200
    (session,) = fake.checkout_sessions.values()
    assert body == {"url": session["url"], "plan": "pro"}
    assert body["url"] == f"https://checkout.stripe.test/c/pay/{session['id']}"
    assert {
        k: session[k]
        for k in ("mode", "client_reference_id", "customer", "success_url", "cancel_url")
    } == {
        "mode": "subscription",
        "client_reference_id": "acme",
        "customer": customer,
        "success_url": SUCCESS_URL,
        "cancel_url": CANCEL_URL,
    }
    # The fake refuses a quantity on a metered price, so the 200 alone proves it was left out.
    assert _lines(fake, session["id"]) == (
        {"tenant_id": "acme"},
        {prices.base: 1, prices.overage: None},
    )
    assert stripe_posts(fake) == [("POST", "/v1/checkout/sessions")]
    assert ("GET", "/v1/prices") in fake.calls


async def test_checkout_for_a_tenant_without_a_customer(
    proxy: RunningProxy, fake: StripeFake, prices: Prices
) -> None:
    key = await proxy.tenant_with_key("newbie", plan="free")
    status, _, body = await request(
        "POST", proxy.base + CHECKOUT, key_headers(key, "x-api-key"), json_body={"plan": "pro"}
    )
    assert status == 200
    (session,) = fake.checkout_sessions.values()
    assert body == {"url": session["url"], "plan": "pro"}
    assert (session["client_reference_id"], session["customer"]) == ("newbie", None)
    assert session["customer_email"] is None
    assert _lines(fake, session["id"]) == (
        {"tenant_id": "newbie"},
        {prices.base: 1, prices.overage: None},
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"plan": "free"}, "Plan 'free' cannot be bought; choose one of ['pro']."),
        ({"plan": "metered"}, "Plan 'metered' cannot be bought; choose one of ['pro']."),
        ({"plan": "gold"}, "Plan 'gold' cannot be bought; choose one of ['pro']."),
    ],
    ids=["free", "metered", "unknown"],
)
async def test_checkout_of_an_unsellable_plan_is_400(
    proxy: RunningProxy, fake: StripeFake, prices: Prices, body: Any, message: str
) -> None:
    key = await proxy.tenant_with_key("acme", plan="free")
    status, _, answer = await request(
        "POST", proxy.base + CHECKOUT, key_headers(key), json_body=body
    )
    assert (status, answer) == (400, {"error": message})
    assert fake.checkout_sessions == {}
    assert fake.calls == []


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b'{"plan": "pro"', b"[1, 2]", b'"pro"', b'{"plan": 7}', b'{"plan": null}'],
    ids=["garbage", "truncated", "array", "string", "number-plan", "null-plan"],
)
async def test_checkout_with_a_malformed_body_is_400(
    proxy: RunningProxy, fake: StripeFake, prices: Prices, raw: bytes
) -> None:
    key = await proxy.tenant_with_key("acme", plan="free")
    headers = {**key_headers(key), "Content-Type": "application/json"}
    status, _, body = await request("POST", proxy.base + CHECKOUT, headers, data=raw)
    assert (status, body) == (400, BAD_BODY)
    assert fake.checkout_sessions == {}
    assert fake.calls == []


async def test_checkout_not_configured_is_503(
    scripted: tuple[ScriptedUpstream, str], fake: StripeFake, prices: Prices, clock: ManualClock
) -> None:
    customer = fake.add_customer(name="A")["id"]
    async with _proxy(scripted, fake, clock, billing={"portal_return_url": RETURN_URL}) as proxy:
        key = await proxy.tenant_with_key("acme", plan="free", stripe_customer=customer)
        for body in (None, {"plan": "pro"}):
            status, _, answer = await request(
                "POST", proxy.base + CHECKOUT, key_headers(key), json_body=body
            )
            assert (status, answer) == (503, CHECKOUT_503)
    async with _proxy(scripted, None, clock) as proxy:  # no STRIPE_SECRET_KEY at all
        key = await proxy.tenant_with_key("acme", plan="free", stripe_customer=customer)
        status, _, answer = await request("POST", proxy.base + CHECKOUT, key_headers(key))
        assert (status, answer) == (503, CHECKOUT_503)
    assert fake.checkout_sessions == {}
    assert fake.calls == []


# --- 5. isolation ----------------------------------------------------------------------------


async def test_no_parameter_lets_a_key_reach_another_tenant(
    proxy: RunningProxy, fake: StripeFake, prices: Prices
) -> None:
    cus_a = fake.add_customer(name="A")["id"]
    cus_b = fake.add_customer(name="B")["id"]
    key_a = await proxy.tenant_with_key("acme", plan="pro", stripe_customer=cus_a)
    key_b = await proxy.tenant_with_key("bravo", plan="free", stripe_customer=cus_b)
    await tool_calls(proxy, key_a, 1)
    await tool_calls(proxy, key_b, 3)
    steer = {"X-MCP-Tenant": "bravo", "Stripe-Account": cus_b}
    hostile = {
        "tenant": "bravo",
        "tenant_id": "bravo",
        "customer": cus_b,
        "client_reference_id": "bravo",
        "plan": "pro",
    }
    queries = ["?tenant=bravo", f"?tenant_id=bravo&customer={cus_b}"]

    for query in queries:
        status, _, body = await request(
            "GET", proxy.base + USAGE + query, {**key_headers(key_a), **steer}
        )
        assert (status, body) == (200, usage_doc("acme", "pro", 1))

        status, _, body = await request(
            "POST", proxy.base + PORTAL + query, {**key_headers(key_a), **steer}, json_body=hostile
        )
        assert status == 200
        assert body == {"url": list(fake.portal_sessions.values())[-1]["url"]}

        status, _, body = await request(
            "POST",
            proxy.base + CHECKOUT + query,
            {**key_headers(key_a), **steer},
            json_body=hostile,
        )
        assert status == 200
        assert body == {"url": list(fake.checkout_sessions.values())[-1]["url"], "plan": "pro"}

    assert [s["customer"] for s in fake.portal_sessions.values()] == [cus_a, cus_a]
    sessions = list(fake.checkout_sessions.values())
    assert [(s["client_reference_id"], s["customer"]) for s in sessions] == [("acme", cus_a)] * 2
    for session in sessions:
        assert _lines(fake, session["id"])[0] == {"tenant_id": "acme"}
    # B's usage is untouched and only B's key reads it.
    assert await usage(proxy, key_b) == (200, usage_doc("bravo", "free", 3))


# --- 6. Stripe unavailable -------------------------------------------------------------------


@pytest.mark.parametrize("failure", ["down", "status_500", "status_429"])
async def test_stripe_unavailable_is_502_never_500(
    proxy: RunningProxy, fake: StripeFake, prices: Prices, failure: str
) -> None:
    customer = fake.add_customer(name="A")["id"]
    key = await proxy.tenant_with_key("acme", plan="pro", stripe_customer=customer)
    if failure == "down":
        fake.set_down(True)
    else:
        fake.inject(
            Fault("* /v1/", "status_500" if failure == "status_500" else "status_429", None)
        )

    status, _, body = await request("POST", proxy.base + PORTAL, key_headers(key))
    assert (status, body) == (502, PORTAL_502)
    status, _, body = await request("POST", proxy.base + CHECKOUT, key_headers(key))
    assert (status, body) == (502, CHECKOUT_502)
    assert fake.portal_sessions == {} and fake.checkout_sessions == {}
    # Usage never needs Stripe.
    assert await usage(proxy, key) == (200, usage_doc("acme", "pro", 0))

    fake.set_down(False)
    fake.clear_faults()
    status, _, body = await request("POST", proxy.base + PORTAL, key_headers(key))
    assert status == 200
    assert body == {"url": next(iter(fake.portal_sessions.values()))["url"]}
    status, _, body = await request("POST", proxy.base + CHECKOUT, key_headers(key))
    assert status == 200
    assert body == {"url": next(iter(fake.checkout_sessions.values()))["url"], "plan": "pro"}
    assert fake.internal_errors == []
