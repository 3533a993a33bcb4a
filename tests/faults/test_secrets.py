"""Secrets stay secret: API keys are compared in constant time on the auth path, and a whole
run of a real `serve` (billing on, against the Stripe fake, with webhooks, good and bad keys in
both headers, Stripe failures) leaves no key, pepper, Stripe key or webhook secret in its logs,
its /metrics, /health or /readyz."""

from __future__ import annotations

import hmac
import inspect
import json
import secrets
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import stripe

import proxy.auth
from proxy.auth import hash_key, keys_match
from tests.conftest import PEPPER, ConfigFactory
from tests.fakes.stripe_fake import Fault
from tests.fakes.upstream import ScriptedUpstream
from tests.ops_support import serving, stripe_serve_stack, until
from tests.proxy_harness import run_proxy
from tests.rpc import ACCEPT, bearer, call

pytestmark = pytest.mark.timeout(120)

STRIPE_KEY = "sk_test_secretsSECRET_0123456789abcdef"
WEBHOOK_SECRET = "whsec_secretsSECRET_0123456789abcdef"
METER = "mcp_tool_calls"


# --- constant-time comparison ----------------------------------------------------------------


def test_keys_match_is_hmac_compare_digest() -> None:
    source = inspect.getsource(keys_match)
    assert "hmac.compare_digest(" in source
    assert "==" not in source and "!=" not in source
    assert keys_match("a" * 64, "a" * 64) and not keys_match("a" * 64, "a" * 63 + "b")
    assert not keys_match("a" * 64, "a" * 63)  # lengths differ: no exception, just False


async def test_the_auth_path_compares_key_hashes_with_compare_digest(
    make_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    # proxy.auth uses the hmac module's attribute at call time: patch it where proxy.auth sees it.
    monkeypatch.setattr(proxy.auth.hmac, "compare_digest", spy)
    async with run_proxy(make_config()) as running, aiohttp.ClientSession() as http:
        c = running.components
        key = await running.tenant_with_key("acme")
        digest = hash_key(key, c.pepper)

        # 1. The directory, as every request uses it (a fresh key: not in the cache).
        tenant, _ = await c.directory.authenticate(key)
        assert tenant is not None and tenant.id == "acme"
        assert calls == [(digest.encode(), digest.encode())]

        # 2. Over HTTP with another fresh key: the comparison is on the request path.
        calls.clear()
        other = await running.tenant_with_key("acme")
        async with http.post(running.url, data=b"{}", headers=bearer(other)) as r:
            assert r.status == 400  # authenticated, then the body is refused
        other_digest = hash_key(other, c.pepper).encode()
        assert calls == [(other_digest, other_digest)]

        # 3. A half-revoked key (index entry left behind, key record changed): the constant-time
        # comparison is what refuses it.
        calls.clear()
        third = await running.tenant_with_key("acme")
        third_digest = hash_key(third, c.pepper)
        main, keys = c.stores.main, c.keys
        key_id = (await main.get(keys.api_key(third_digest))).partition(":")[2]
        blob = json.loads(await main.hget(keys.tenant_keys("acme"), key_id))
        blob["hash"] = "0" * 64
        await main.hset(keys.tenant_keys("acme"), key_id, json.dumps(blob))
        async with http.post(running.url, data=b"{}", headers=bearer(third)) as r:
            assert r.status == 401
        assert calls == [(b"0" * 64, third_digest.encode())]


def test_stored_hashes_are_keyed_by_the_pepper() -> None:
    key = "mqp_0123456789ab_" + "s" * 43
    assert hash_key(key, PEPPER) != hash_key(key, PEPPER + "x")  # a dump alone checks nothing
    assert key not in hash_key(key, PEPPER)
    assert len(hash_key(key, PEPPER)) == 64


# --- a whole run: nothing secret in logs, metrics or health -----------------------------------


def _subscription_event(evt_id: str, customer: str) -> bytes:
    return json.dumps(
        {
            "id": evt_id,
            "object": "event",
            "type": "customer.subscription.updated",
            "created": 100,
            "api_version": "2026-10-28.endive",
            "data": {
                "object": {
                    "id": "sub_s1",
                    "object": "subscription",
                    "customer": customer,
                    "status": "active",
                    "metadata": {},
                    "items": {
                        "object": "list",
                        "data": [
                            {
                                "id": "si_s1",
                                "price": {"id": "price_s1", "lookup_key": "mqp_pro"},
                                "current_period_start": int(time.time()) - 3600,
                                "current_period_end": int(time.time()) + 30 * 86400,
                            }
                        ],
                    },
                }
            },
        }
    ).encode()


@pytest.mark.redis
async def test_a_whole_serve_run_leaks_no_secret(
    tmp_path: Path, redis_url: str, key_prefix: str, scripted: tuple[ScriptedUpstream, str]
) -> None:
    upstream, upstream_url = scripted
    stderr = tmp_path / "serve.stderr"
    async with stripe_serve_stack(
        tmp_path,
        redis_url=redis_url,
        key_prefix=key_prefix,
        upstream_url=upstream_url,
        stripe_key=STRIPE_KEY,
        meter=METER,
        tenant="acme-secrets",
        plans={
            "pro": {
                "included_units": 1_000_000,
                "overage": "bill",
                "stripe_lookup_keys": ["mqp_pro"],
            }
        },
        ops={"readiness_delay_s": 0},
        drain={"interval_s": 0.2},
        log_level="debug",  # the most a process will ever say
    ) as (fake, stack):
        customer = stack.customer
        stack.env["STRIPE_WEBHOOK_SECRET"] = WEBHOOK_SECRET
        key = stack.key
        key_id, _, secret = key.removeprefix("mqp_").partition("_")
        assert len(secret) >= 40
        wrong = f"mqp_{key_id}_{secrets.token_urlsafe(32)}"  # the right id, a wrong secret
        unknown = f"mqp_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"
        # Two Stripe failures first: the drainer's error paths log too.
        fake.inject(Fault("POST /v1/billing/meter_events", "status_500", count=1))
        fake.inject(Fault("POST /v1/billing/meter_events", "status_429", count=1))

        texts: dict[str, str] = {}
        async with serving(stack, stderr=stderr) as serve, aiohttp.ClientSession() as http:
            await serve.wait_healthy(http)

            async def post(body: Any, headers: dict[str, str], url: str = stack.url) -> int:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                async with http.post(url, data=data, headers=headers) as r:
                    await r.read()
                    return r.status

            statuses = [
                await post(call(1, "add"), bearer(key)),
                await post(call(2, "add"), {**ACCEPT, "X-API-Key": key}),
                await post(call(3, "add"), {**ACCEPT, "Authorization": f"bearer  {key} "}),
                await post(call(4, "echo", note=key), bearer(key)),  # the key in a body
                await post(call(5, "sse_ok"), bearer(key)),
                await post(call(6, "add"), bearer(wrong)),
                await post(call(7, "add"), {**ACCEPT, "X-API-Key": wrong}),
                await post(call(8, "add"), bearer(unknown)),
                await post(call(9, "add"), {**ACCEPT, "Authorization": f"Basic {key}"}),
                await post(call(10, "add"), ACCEPT, f"{stack.url}?api_key={key}"),
                await post(b'{"jsonrpc": "2.0", "id": 11, "method": ', bearer(key)),
                await post(call(12, "add"), bearer(key + "x" * 300)),  # over MAX_KEY_LEN
            ]
            assert statuses == [200] * 5 + [401] * 5 + [400, 401], statuses
            for headers, want in ((bearer(key), 200), (bearer(wrong), 401)):
                async with http.get(f"{stack.base}/api/billing/usage", headers=headers) as r:
                    assert r.status == want, await r.text()

            hook = f"{stack.base}/stripe/webhook"
            body = _subscription_event("evt_secrets", customer)
            good = stripe.WebhookSignature.generate_signature_header(body.decode(), WEBHOOK_SECRET)
            for header, want in (
                (good, 200),
                (good, 200),  # duplicate
                (stripe.WebhookSignature.generate_signature_header(body.decode(), "whsec_x"), 400),
                (
                    stripe.WebhookSignature.generate_signature_header(
                        body.decode(), WEBHOOK_SECRET, timestamp=int(time.time()) - 3600
                    ),
                    400,
                ),
            ):
                async with http.post(hook, data=body, headers={"Stripe-Signature": header}) as r:
                    assert r.status == want, await r.text()

            await until(lambda: stack.unreported() == 0, 30, "the drainer to deliver")
            for path in ("/metrics", "/health", "/readyz", "/healthz"):
                async with http.get(stack.base + path) as r:
                    texts[path] = await r.text()
            assert await serve.terminate() == 0
        assert fake.total(customer, METER) == 5
        assert len(upstream.calls()) == 5

    logs = stderr.read_text()
    assert "tool_call" in logs and "webhook" in logs, "the run logged nothing useful"
    assert "meter_event_retry" in logs, "the Stripe failures were not exercised"
    texts["logs"] = logs
    needles = {
        "api key": key,
        "api key secret part": secret,
        "wrong key": wrong,
        "wrong key secret part": wrong.removeprefix("mqp_").partition("_")[2],
        "unknown key": unknown,
        "pepper": PEPPER,
        "stripe secret key": STRIPE_KEY,
        "stripe secret key tail": STRIPE_KEY.removeprefix("sk_test_"),
        "webhook secret": WEBHOOK_SECRET,
        "webhook secret tail": WEBHOOK_SECRET.removeprefix("whsec_"),
    }
    assert all(len(n) >= 20 for n in needles.values()), "a needle too short to mean anything"
    leaks = [
        f"{what} in {where}"
        for where, text in texts.items()
        for what, needle in needles.items()
        if needle in text
    ]
    assert leaks == [], leaks
