"""Plan sync end to end with real, signed Stripe deliveries: localstripe (a stateful Stripe
emulator, run as a subprocess on 127.0.0.1) posts `customer.subscription.created` and
`.deleted` to the proxy's /stripe/webhook, and the tenant record follows.

What localstripe 1.15 sends (events say ``api_version: 2017-08-15``): subscription items carry
the legacy ``plan`` object (``items.data[].plan.metadata``; there is no Price API, so no
``price`` and no ``lookup_key``), and the billing period sits on the subscription
(``current_period_start/end``), not on the items. The proxy reads both shapes, so the live
subscription maps to the `pro` plan through the plan's metadata and its period becomes the
tenant's quota period; deletion ends it on the default plan.
localstripe never emits ``customer.subscription.updated``, so plan changes are not covered.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import stripe
from aiohttp import web

from proxy.billing.plansync import effective_plan
from proxy.config import Config, parse_config
from proxy.tenants import Tenant
from tests.conftest import PEPPER
from tests.proxy_harness import RunningProxy, run_proxy

INSTALL = "pip install 'localstripe>=1.15'  (or: pip install -e '.[test]')"
pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        importlib.util.find_spec("localstripe") is None,
        reason=f"localstripe is not installed; install it with: {INSTALL}",
    ),
]

WRAPPER = Path(__file__).resolve().parents[1] / "fakes" / "localstripe_server.py"
WEBHOOK_SECRET = "whsec_localstripe_e2e_0123456789"
STRIPE_KEY = "sk_test_localstripe"
TENANT = "acme"
START_TIMEOUT_S = 20.0
DELIVERY_TIMEOUT_S = 10.0  # localstripe posts ~1 s after the action, once, never retried


@dataclass
class LocalStripe:
    url: str
    log: Path

    def log_tail(self) -> str:
        return _read(self.log)


@pytest.fixture
def localstripe() -> Iterator[LocalStripe]:
    """localstripe on a free 127.0.0.1 port, with its pickle in a private temp dir."""
    workdir = Path(tempfile.mkdtemp(prefix="localstripe-"))
    log = workdir / "localstripe.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        with log.open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, str(WRAPPER), str(workdir / "localstripe.pickle")],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=workdir,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        assert proc.stdout is not None
        port = _read_port(proc, proc.stdout, log)
        yield LocalStripe(f"http://127.0.0.1:{port}", log)
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def _read_port(proc: subprocess.Popen[bytes], stdout: Any, log: Path) -> int:
    """The port the wrapper announces as `PORT <n>` once it listens."""
    deadline = time.monotonic() + START_TIMEOUT_S
    buffer = b""
    with selectors.DefaultSelector() as sel:
        sel.register(stdout, selectors.EVENT_READ)
        while b"\n" not in buffer:
            left = deadline - time.monotonic()
            if left <= 0 or proc.poll() is not None:
                why = "did not start in time" if left <= 0 else f"exited with {proc.returncode}"
                pytest.fail(f"localstripe {why}; its log:\n{_read(log)}")
            if sel.select(timeout=min(left, 0.2)):
                chunk = os.read(stdout.fileno(), 4096)
                if not chunk:
                    pytest.fail(f"localstripe closed stdout; its log:\n{_read(log)}")
                buffer += chunk
    line = buffer.split(b"\n", 1)[0].decode()
    assert line.startswith("PORT "), f"unexpected first line from localstripe: {line!r}"
    return int(line.split()[1])


def _read(log: Path) -> str:
    try:
        return log.read_text("utf-8", errors="replace")[-3000:]
    except OSError as exc:
        return f"<no log: {exc}>"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    if proc.stdout is not None:
        proc.stdout.close()


def _config() -> Config:
    data: dict[str, Any] = {
        "upstream": {"url": "http://127.0.0.1:9"},
        "redis": {"url": "memory://"},
        "plans": {
            "free": {"included_units": 5, "overage": "block"},
            "pro": {
                "included_units": 1000,
                "overage": "bill",
                "hard_cap": 5000,
                "stripe_lookup_keys": ["pro_monthly"],
            },
        },
        "default_plan": "free",
        "billing": {"webhook_tolerance_s": 300},
    }
    env = {"MQP_KEY_PEPPER": PEPPER, "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET}
    return parse_config(data, env)


@dataclass
class Delivery:
    event_id: str
    type: str
    status: int
    result: str


def _record_deliveries(running: RunningProxy) -> list[Delivery]:
    """Every webhook POST the proxy answers, with its answer (wraps the live receiver)."""
    started = running.components.started
    assert started is not None
    receiver = started.webhooks
    handle = receiver.handle
    seen: list[Delivery] = []

    async def recording(request: web.Request) -> web.Response:
        raw = await request.read()  # aiohttp keeps the body, so handle() reads it again
        response = await handle(request)
        try:
            event = json.loads(raw)
        except ValueError:
            event = {}
        body = json.loads(response.text or "{}")
        seen.append(
            Delivery(str(event.get("id")), str(event.get("type")), response.status, body["result"])
        )
        return response

    receiver.handle = recording  # type: ignore[method-assign]
    return seen


async def _wait_for_tenant(
    running: RunningProxy,
    ready: Callable[[Tenant], bool],
    what: str,
    seen: list[Delivery],
    ls: LocalStripe,
) -> Tenant:
    deadline = time.monotonic() + DELIVERY_TIMEOUT_S
    tenant = None
    while time.monotonic() < deadline:
        tenant = await running.components.tenants.get(TENANT)
        if tenant is not None and ready(tenant):
            return tenant
        await asyncio.sleep(0.05)
    pytest.fail(
        f"{what}: not applied within {DELIVERY_TIMEOUT_S}s.\ntenant: {tenant}\n"
        f"deliveries: {seen}\nlocalstripe log:\n{ls.log_tail()}"
    )


async def _events(client: stripe.StripeClient, kind: str) -> list[dict[str, Any]]:
    page = await client.v1.events.list_async(params={"type": kind})
    return [e.to_dict() for e in page.data]


async def test_subscription_lifecycle_from_localstripe(localstripe: LocalStripe) -> None:
    config = _config()
    http = stripe.AIOHTTPClient()
    client = stripe.StripeClient(
        STRIPE_KEY,
        base_addresses={"api": localstripe.url},
        http_client=http,
        max_network_retries=0,
    )
    try:
        async with run_proxy(config) as running:
            seen = _record_deliveries(running)
            hook = f"{running.base}{config.billing.webhook_path}"
            async with aiohttp.ClientSession() as session:
                # Private and empty already; flushing also shows it answers.
                async with session.delete(f"{localstripe.url}/_config/data") as r:
                    assert r.status == 200, await r.text()
                form = {"url": hook, "secret": WEBHOOK_SECRET}
                async with session.post(f"{localstripe.url}/_config/webhooks/mqp", data=form) as r:
                    assert r.status == 200, await r.text()

            customer = await client.v1.customers.create_async(params={"email": "billing@acme.test"})
            card = await client.v1.payment_methods.attach_async(
                "pm_card_visa", params={"customer": customer.id}
            )
            await client.v1.customers.update_async(
                customer.id, params={"invoice_settings": {"default_payment_method": card.id}}
            )
            await running.components.tenants.create(
                TENANT, name="Acme", plan="free", stripe_customer=customer.id, now=0
            )
            product = await client.v1.products.create_async(params={"name": "MCP Pro"})
            plan = await client.v1.plans.create_async(
                params={
                    "product": product.id,
                    "amount": 2000,
                    "currency": "usd",
                    "interval": "month",
                    "nickname": "pro",
                    "metadata": {"mqp_plan": "pro"},
                }
            )
            sub = await client.v1.subscriptions.create_async(
                params={
                    "customer": customer.id,
                    "items": [{"plan": plan.id}],
                    "metadata": {"tenant_id": TENANT},
                }
            )
            assert sub.status == "active"

            tenant = await _wait_for_tenant(
                running,
                lambda t: t.subscription_id == sub.id,
                "customer.subscription.created",
                seen,
                localstripe,
            )
            assert tenant.status == "active"
            assert tenant.stripe_customer == customer.id

            # localstripe's shape: the plan (and our mqp_plan) on items[].plan, no price.
            (created,) = await _events(client, "customer.subscription.created")
            (item,) = created["data"]["object"]["items"]["data"]
            assert "price" not in item
            assert item["plan"]["metadata"] == {"mqp_plan": "pro"}
            assert tenant.plan == "pro"
            period = created["data"]["object"]
            assert (tenant.period_start, tenant.period_end) == (
                period["current_period_start"],
                period["current_period_end"],
            )

            await client.v1.subscriptions.cancel_async(sub.id)
            tenant = await _wait_for_tenant(
                running,
                lambda t: t.status == "canceled",
                "customer.subscription.deleted",
                seen,
                localstripe,
            )
            assert tenant.plan == config.default_plan
            assert tenant.subscription_id == sub.id
            assert effective_plan(tenant, time.time(), config).name == config.default_plan

            (deleted,) = await _events(client, "customer.subscription.deleted")
            main, keys = running.components.stores.main, running.components.keys
            # Verified deliveries: the proxy stamped the last webhook, and both subscription
            # events are in the tenant's ledger; the subscription is marked finished.
            assert await main.get(keys.webhook_last()) is not None
            for event in (created, deleted):
                assert await main.exists(keys.webhook_event(TENANT, event["id"])) == 1
            assert await main.hexists(keys.tenant(TENANT), f"sub_done:{sub.id}")

            by_id = {d.event_id: d for d in seen}
            assert by_id[created["id"]].result == "applied", seen
            assert by_id[deleted["id"]].result == "applied", seen
            bad = [d for d in seen if d.status != 200]
            assert not bad, f"deliveries the proxy refused: {bad}"
    finally:
        await http.close_async()
