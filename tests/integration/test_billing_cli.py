"""`billing setup` and `reconcile` as an operator runs them, against the strict Stripe fake."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import yaml

from proxy.clock import SystemClock
from proxy.config import BillingConfig, DrainConfig, SpoolConfig
from proxy.usage.drainer import Drainer
from proxy.usage.meter import StripeMeterClient
from proxy.usage.sink import UsageEvent
from proxy.usage.spool import Spool
from tests.fakes.stripe_fake import StripeFake, run_stripe_fake

KEY = "sk_test_cli_0123456789"


async def _cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _env(tmp_path: Path, api_base: str, **billing: object) -> dict[str, str]:
    config = {
        "plans": {
            "free": {"included_units": 100, "billed": False},
            "pro": {"included_units": 1000, "overage": "bill"},
        },
        "spool": {"path": str(tmp_path / "usage.db")},
        "billing": {"enabled": True, **billing},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STRIPE_", "MQP_", "REDIS_"))}
    return {**env, "STRIPE_SECRET_KEY": KEY, "STRIPE_API_BASE": api_base, "MQP_CONFIG": str(path)}


async def test_billing_setup_twice_creates_each_object_once(tmp_path: Path) -> None:
    async with run_stripe_fake() as fake:
        env = _env(tmp_path, fake.url, token_meter_event_name="mcp_tokens", token_meta_key="tokens")
        code, out, err = await _cli(env, "billing", "setup")
        assert code == 0, err
        assert out.count("created") == 7  # 2 meters, 1 product, 4 prices
        assert "enabled: true" in out and "meter_event_name: mcp_tool_calls" in out
        snapshot = (dict(fake.meters), dict(fake.products), dict(fake.prices))
        code, out, err = await _cli(env, "billing", "setup")
        assert code == 0, err
        assert "nothing created" in out
        assert (fake.meters, fake.products, fake.prices) == snapshot
        assert {m["event_name"] for m in fake.meters.values()} == {"mcp_tool_calls", "mcp_tokens"}
        overage = next(p for p in fake.prices.values() if p["lookup_key"] == "mqp_pro_overage")
        assert overage["recurring"]["usage_type"] == "metered"
        assert overage["tiers_mode"] == "graduated"
        assert overage["tiers"][0]["up_to"] == 1000  # the plan's included units are free


async def test_billing_setup_reports_a_bad_key_clearly(tmp_path: Path) -> None:
    async with run_stripe_fake(api_key="sk_test_the_right_one") as fake:
        code, _, err = await _cli(_env(tmp_path, fake.url), "billing", "setup")
    assert code == 2
    assert "STRIPE_SECRET_KEY" in err and "Traceback" not in err


async def test_reconcile_zero_drift_then_exact_drift(tmp_path: Path) -> None:
    async with run_stripe_fake() as fake:
        env = _env(tmp_path, fake.url)
        fake.add_meter("mcp_tool_calls")
        a, b = (fake.add_customer(name=n)["id"] for n in ("a", "b"))
        await _report(fake, tmp_path / "usage.db", "pod-a", {a: 12, b: 7}, max_batch=5)
        code, out, err = await _cli(env, "reconcile")
        assert code == 0, out + err
        assert f"{a:24} {'mcp_tool_calls':24} {12:>10} {12:>10} {0:>+8}" in out
        lost = next(e for e in fake.meter_events if e.customer == b)
        fake.lose_event(lost.identifier)
        code, out, err = await _cli(env, "reconcile")
        assert code == 1
        assert f"{b:24} {'mcp_tool_calls':24} {7:>10} {7 - lost.value:>10} {-lost.value:>+8}" in out
        assert f"drift {lost.value} is above the tolerance 0" in err
        code, _, _ = await _cli(env, "reconcile", "--tolerance", str(lost.value))
        assert code == 0
        code, _, err = await _cli(env, "reconcile", "--period", "November")
        assert code == 2 and "expected YYYY-MM" in err


async def _report(
    fake: StripeFake, path: Path, replica: str, counts: dict[str, int], max_batch: int = 10_000
) -> None:
    """Spool `counts` calls per customer in a spool of its own and drain it to the fake."""
    spool = Spool(path, synchronous="normal", replica_id=replica)
    await spool.open()
    client = StripeMeterClient(KEY, fake.url)
    drainer = Drainer(
        spool,
        client,
        drain=DrainConfig(max_batch=max_batch),
        billing=BillingConfig(),
        spool_config=SpoolConfig(),
        clock=SystemClock(),
    )
    try:
        for customer, n in counts.items():
            for _ in range(n):
                await spool.append(
                    UsageEvent(
                        tenant_id="t",
                        stripe_customer=customer,
                        plan="pro",
                        method="tools/call",
                        tool="add",
                        units=1,
                        timestamp=fake.now(),
                        request_id="r",
                        rpc_id="1",
                        session_id=None,
                        outcome="ok",
                        degraded=False,
                        billable=True,
                    )
                )
        await drainer.cycle()
        assert (await spool.backlog()).unreported == 0
    finally:
        await client.close()
        await spool.close()


async def test_reconcile_shared_counts_only_a_shortfall(tmp_path: Path) -> None:
    """Two replicas bill one customer: each spool holds part of Stripe's total. --shared
    passes that, and still catches usage Stripe lost."""
    async with run_stripe_fake() as fake:
        env = _env(tmp_path, fake.url)
        fake.add_meter("mcp_tool_calls")
        a = fake.add_customer(name="a")["id"]
        await _report(fake, tmp_path / "usage.db", "pod-a", {a: 5})  # the one reconciled
        await _report(fake, tmp_path / "other.db", "pod-b", {a: 3})
        code, out, _ = await _cli(env, "reconcile")
        assert code == 1 and f"{5:>10} {8:>10} {3:>+8}" in out
        code, out, err = await _cli(env, "reconcile", "--shared")
        assert code == 0, out + err
        ours = next(e for e in fake.meter_events if e.value == 5)  # pod-b's was 3
        fake.lose_event(ours.identifier)
        code, out, err = await _cli(env, "reconcile", "--shared")
        assert (code, f"{8 - ours.value:>10}" in out) == (1, True), out + err


async def test_usage_shows_the_local_ledger(tmp_path: Path) -> None:
    env = _env(tmp_path, "http://127.0.0.1:9")
    spool = Spool(tmp_path / "usage.db", synchronous="normal", replica_id="pod-a")
    await spool.open()
    import time

    for billable in (True, True, False):
        await spool.append(
            UsageEvent(
                tenant_id="acme",
                stripe_customer="cus_1" if billable else None,
                plan="pro",
                method="tools/call",
                tool="add",
                units=2,
                timestamp=time.time(),
                request_id="r",
                rpc_id="1",
                session_id=None,
                outcome="ok",
                degraded=False,
                billable=billable,
            )
        )
    await spool.close()
    code, out, err = await _cli(env, "usage", "acme")
    assert code == 0, err
    assert "units used   6" in out and "pending      4" in out and "not billed   2" in out
