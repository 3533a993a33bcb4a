"""Operability acceptance: /metrics (linted by promtool), drainer state in the proxy's scrape,
/health on an injected clock, /readyz per component, graceful SIGTERM of a real `serve`
during a streaming call, and JSON logs without secrets that carry request ids."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.breaker import CircuitBreaker
from proxy.clock import ManualClock
from proxy.health import Lifecycle, readiness
from proxy.store import StoreGuard, connect
from proxy.usage.sink import MemorySink
from tests.conftest import PEPPER, ConfigFactory
from tests.fakes.stripe_fake import run_stripe_fake
from tests.fakes.upstream import ScriptedUpstream
from tests.ops_support import (
    AppServer,
    assert_promtool_accepts,
    catches,
    children,
    drainer_for,
    family_names,
    get_json,
    label_values,
    pending,
    poll,
    promtool,
    sample,
    scrape,
    scraped,
    serve_app,
    serving,
    stripe_serve_stack,
    until,
)
from tests.proxy_harness import local_server, run_proxy
from tests.redis_server import RedisServer
from tests.rpc import ACCEPT, bearer, call

pytestmark = pytest.mark.timeout(120)

STRIPE_KEY = "sk_test_opsSECRET0123456789abcdef"
METER = "mcp_tool_calls"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def _stripe_env(url: str) -> dict[str, str]:
    return {"STRIPE_SECRET_KEY": STRIPE_KEY, "STRIPE_API_BASE": url}


async def _post(
    http: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str]
) -> tuple[int, bytes]:
    async with http.post(url, json=body, headers=headers) as r:
        return r.status, await r.read()


async def _tool(http: aiohttp.ClientSession, app: Any, key: str, rpc_id: int, tool: str) -> None:
    status, raw = await _post(http, app.url, call(rpc_id, tool), bearer(key))
    assert status == 200, raw
    assert b'"isError": false' in raw, raw


# --- 1. /metrics ----------------------------------------------------------------------------


async def test_metrics_scrape_passes_promtool_and_moves_with_traffic(
    make_config: ConfigFactory, scripted: tuple[ScriptedUpstream, str]
) -> None:
    promtool()
    tenant = "tenant-7f3a9c"
    config = make_config(upstream={"url": scripted[1]})  # plan free: 5 units, then blocked
    async with run_proxy(config) as proxy, aiohttp.ClientSession() as http:
        reg = proxy.components.metrics.registry
        key = await proxy.tenant_with_key(tenant, plan="free")
        assert sample(reg, "mqp_requests_total", method="tools/call", outcome="ok") == 0
        assert sample(reg, "mqp_tool_calls_total", tool="add", outcome="ok") == 0

        def post(body: Any, headers: dict[str, str]) -> Any:
            return _post(http, proxy.url, body, headers)

        init = {"jsonrpc": "2.0", "id": "i", "method": "initialize", "params": {}}
        listing = {"jsonrpc": "2.0", "id": "l", "method": "tools/list"}
        for body in (init, listing):
            status, raw = await post(body, bearer(key))
            assert status == 200, raw
        for i, tool in enumerate(["add", "add", "rpc_error", "sse_ok", "add", "add"]):
            status, raw = await post(call(i, tool), bearer(key))
            assert status == 200, raw
        assert sample(reg, "mqp_tool_calls_total", tool="add", outcome="ok") == 4
        status, raw = await post(call(9, "add"), bearer(key))  # the 6th unit: refused
        assert status == 200 and b"Quota exhausted" in raw, raw
        assert (await post(call(10, "add"), ACCEPT))[0] == 401  # no key
        text = await scrape(http, proxy.base)

        await assert_promtool_accepts(text)
        assert sample(reg, "mqp_requests_total", method="initialize", outcome="ok") == 1
        assert sample(reg, "mqp_requests_total", method="tools/list", outcome="ok") == 1
        assert sample(reg, "mqp_requests_total", method="tools/call", outcome="ok") == 6
        assert sample(reg, "mqp_requests_total", method="tools/call", outcome="answered_here") == 1
        unauthorized = [
            s
            for f in reg.collect()
            if f.name == "mqp_requests"
            for s in f.samples
            if s.name == "mqp_requests_total" and s.labels["outcome"] == "unauthorized"
        ]
        assert sum(s.value for s in unauthorized) == 1
        assert sample(reg, "mqp_tool_calls_total", tool="add", outcome="ok") == 4
        assert sample(reg, "mqp_tool_calls_total", tool="sse_ok", outcome="ok") == 1
        assert sample(reg, "mqp_tool_calls_total", tool="rpc_error", outcome="rpc_error") == 1
        assert sample(reg, "mqp_tool_calls_total", tool="add", outcome="refused_quota") == 1
        assert sample(reg, "mqp_quota_decisions_total", plan="free", result="allowed") == 6
        assert sample(reg, "mqp_quota_decisions_total", plan="free", result="refused_quota") == 1
        assert sample(reg, "mqp_request_duration_seconds_count", method="tools/call") == 7
        assert sample(reg, "mqp_upstream_duration_seconds_count", method="tools/call") == 6
        assert sample(reg, "mqp_proxy_overhead_seconds_count") == 8  # forwarded requests
        assert sample(reg, "mqp_request_duration_seconds_sum", method="tools/call") > 0
        assert reg.get_sample_value("mqp_inflight_requests") == 0
        assert reg.get_sample_value("mqp_open_streams") == 0
        assert reg.get_sample_value("mqp_redis_breaker_state") == 0
        # What the registry says is what the scrape served.
        assert scraped(text, "mqp_tool_calls_total", tool="add", outcome="refused_quota") == 1
        assert scraped(text, "mqp_inflight_requests") == 0
        # No tenant id in any label by default, and no per-tenant family.
        assert tenant not in label_values(reg)
        assert tenant not in text
        assert "mqp_tenant_units" not in family_names(reg)
        assert "mqp_tenant_units" not in text


async def test_per_tenant_units_gauge_is_opt_in(
    make_config: ConfigFactory, scripted: tuple[ScriptedUpstream, str]
) -> None:
    promtool()
    config = make_config(upstream={"url": scripted[1]}, ops={"per_tenant_metrics": True})
    async with run_proxy(config) as proxy, aiohttp.ClientSession() as http:
        key = await proxy.tenant_with_key("tenant-b2", plan="free")
        for i in range(3):
            await _tool(http, proxy, key, i, "add")
        text = await scrape(http, proxy.base)
        await assert_promtool_accepts(text)
        reg = proxy.components.metrics.registry
        assert sample(reg, "mqp_tenant_units", tenant="tenant-b2") == 3
        assert scraped(text, "mqp_tenant_units", tenant="tenant-b2") == 3


# --- 2. drainer state in the proxy's scrape -------------------------------------------------


async def test_drainer_metrics_reach_the_proxy_scrape(
    make_config: ConfigFactory, scripted: tuple[ScriptedUpstream, str], tmp_path: Path
) -> None:
    promtool()
    clock = ManualClock(now=float(int(time.time())))  # the fake checks event timestamps
    async with run_stripe_fake(now=clock.time) as fake:
        fake.add_meter(METER)
        customers = [fake.add_customer(name=n)["id"] for n in ("acme", "beta")]
        config = make_config(
            env=_stripe_env(fake.url),
            upstream={"url": scripted[1]},
            spool={"path": str(tmp_path / "usage.db")},
            billing={"enabled": True, "meter_event_name": METER},
            drain={"max_calls_per_second": 1000},
        )
        async with (
            serve_app(config, clock=clock) as app,
            drainer_for(config, clock) as drainer,
            aiohttp.ClientSession() as http,
        ):
            acme = await app.tenant_with_key("acme", plan="pro", stripe_customer=customers[0])
            beta = await app.tenant_with_key("beta", plan="pro", stripe_customer=customers[1])
            for i in range(3):
                await _tool(http, app, acme, i, "add")
            for i in range(2):
                await _tool(http, app, beta, i, "add")

            text = await scrape(http, app.base)
            assert scraped(text, "mqp_spool_backlog_events") == 5
            assert scraped(text, "mqp_drain_batches_total") == 0
            assert scraped(text, "mqp_drain_events_total") == 0
            assert scraped(text, "mqp_drain_calls_total") == 0
            assert scraped(text, "mqp_stripe_last_success_age_seconds") == -1  # never

            fake.set_down(True)
            failed = await drainer.cycle()
            assert failed.retries >= 1 and failed.sent == 0, failed
            assert failed.errors == {"connection": failed.retries}, failed
            clock.advance(3)
            text = await scrape(http, app.base)
            assert scraped(text, "mqp_drain_consecutive_failures") == 1
            assert scraped(text, "mqp_spool_oldest_unreported_age_seconds") == 3
            for kind, count in failed.errors.items():
                assert scraped(text, "mqp_drain_errors_total", kind=kind) == count
            assert scraped(text, "mqp_drain_calls_total") == failed.retries

            fake.set_down(False)
            report = await drainer.cycle()
            assert report.sent == 2 and report.finished_batches == 1, report
            clock.advance(7)
            text = await scrape(http, app.base)

        assert fake.total(customers[0], METER) == 3
        assert fake.total(customers[1], METER) == 2
    await assert_promtool_accepts(text)
    assert scraped(text, "mqp_drain_batches_total") == 1  # one batch ...
    assert scraped(text, "mqp_drain_events_total") == 2  # ... of two meter events
    assert scraped(text, "mqp_drain_calls_total") == 2 + failed.retries
    assert scraped(text, "mqp_stripe_last_success_age_seconds") == 7
    assert scraped(text, "mqp_spool_backlog_events") == 0
    assert scraped(text, "mqp_spool_oldest_unreported_age_seconds") == 0
    assert scraped(text, "mqp_drain_consecutive_failures") == 0
    assert scraped(text, "mqp_drain_rejected_groups") == 0


# --- 3. /health -----------------------------------------------------------------------------


async def _health(http: aiohttp.ClientSession, app: AppServer) -> dict[str, Any]:
    status, body = await get_json(http, f"{app.base}/health")
    assert status == 200, body
    return body


async def test_health_follows_stripe_on_an_injected_clock(
    make_config: ConfigFactory, scripted: tuple[ScriptedUpstream, str], tmp_path: Path
) -> None:
    clock = ManualClock(now=float(int(time.time())))
    async with run_stripe_fake(now=clock.time) as fake:
        fake.add_meter(METER)
        customer = fake.add_customer(name="acme")["id"]
        config = make_config(
            env=_stripe_env(fake.url),
            upstream={"url": scripted[1]},
            spool={"path": str(tmp_path / "usage.db")},
            billing={"enabled": True, "meter_event_name": METER},
            drain={"max_calls_per_second": 1000},
            ops={"stripe_max_age_s": 2, "webhook_max_age_s": 0},
        )
        stale = "no successful Stripe call in 2 s"
        async with (
            serve_app(config, clock=clock) as app,
            drainer_for(config, clock) as drainer,
            aiohttp.ClientSession() as http,
        ):
            key = await app.tenant_with_key("acme", plan="pro", stripe_customer=customer)
            body = await _health(http, app)
            assert body["billing_enabled"] is True
            assert body["status"] == "degraded" and body["reasons"] == [stale], body
            assert body["stripe_api_last_success_ms_ago"] is None

            await drainer.cycle()  # idle: probes Stripe
            body = await _health(http, app)
            assert body["status"] == "ok" and body["reasons"] == [], body
            assert body["stripe_api_last_success_ms_ago"] == 0
            clock.advance(1.5)
            assert (await _health(http, app))["status"] == "ok"

            fake.set_down(True)
            await _tool(http, app, key, 1, "add")
            clock.advance(1.0)  # 2.5 s since Stripe last answered
            failed = await drainer.cycle()
            assert failed.retries == 1 and failed.sent == 0, failed
            body = await _health(http, app)
            assert body["status"] == "degraded" and body["reasons"] == [stale], body
            assert body["stripe_api_last_success_ms_ago"] == 2500
            assert body["drain_backlog"] == 1

            fake.set_down(False)
            report = await drainer.cycle()
            assert report.sent == 1, report
            body = await _health(http, app)
            assert body["status"] == "ok" and body["reasons"] == [], body
            assert body["stripe_api_last_success_ms_ago"] == 0
            assert body["drain_backlog"] == 0
        assert fake.total(customer, METER) == 1


async def test_health_counts_and_judges_events_unreported_for_ten_minutes(
    make_config: ConfigFactory, scripted: tuple[ScriptedUpstream, str], tmp_path: Path
) -> None:
    clock = ManualClock(now=float(int(time.time())))
    async with run_stripe_fake(now=clock.time) as fake:
        fake.add_meter(METER)
        customer = fake.add_customer(name="acme")["id"]
        config = make_config(
            env=_stripe_env(fake.url),
            upstream={"url": scripted[1]},
            spool={"path": str(tmp_path / "usage.db")},
            billing={"enabled": True, "meter_event_name": METER},
            drain={"max_calls_per_second": 1000},
            ops={"stripe_max_age_s": 86400, "webhook_max_age_s": 0, "unreported_max": 1},
        )
        async with (
            serve_app(config, clock=clock) as app,
            drainer_for(config, clock) as drainer,
            aiohttp.ClientSession() as http,
        ):
            key = await app.tenant_with_key("acme", plan="pro", stripe_customer=customer)
            await drainer.cycle()  # Stripe answered once: only the backlog is judged below
            fake.set_down(True)
            await _tool(http, app, key, 1, "add")  # at t0
            clock.advance(100)
            await _tool(http, app, key, 2, "add")  # at t0 + 100
            assert (await drainer.cycle()).retries == 1
            clock.advance(500)  # t0 + 600: nothing is *older* than 10 minutes yet
            body = await _health(http, app)
            assert body["unreported_events_over_10m"] == 0
            assert body["status"] == "ok", body
            clock.advance(1)  # t0 + 601: one event, not above unreported_max
            body = await _health(http, app)
            assert body["unreported_events_over_10m"] == 1
            assert body["status"] == "ok", body
            clock.advance(100)  # t0 + 701: two, above unreported_max
            body = await _health(http, app)
            assert body["unreported_events_over_10m"] == 2
            assert body["drain_backlog"] == 2
            assert body["oldest_unreported_age_ms"] == 701_000
            assert body["status"] == "degraded", body
            assert body["reasons"] == ["2 events unreported for over 10 minutes"]

            fake.set_down(False)
            assert (await drainer.cycle()).sent == 1
            body = await _health(http, app)
            assert body["unreported_events_over_10m"] == 0
            assert body["status"] == "ok" and body["reasons"] == [], body
        assert fake.total(customer, METER) == 2


# --- 4. /readyz -----------------------------------------------------------------------------


@pytest.mark.redis
async def test_readyz_names_each_component_and_fails_without_the_upstream(
    make_config: ConfigFactory, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    upstream = TestServer(ScriptedUpstream().app(), host="127.0.0.1", port=0)
    await upstream.start_server()
    try:
        config = make_config(
            upstream={"url": str(upstream.make_url("")).rstrip("/")},
            redis={"url": redis_url, "key_prefix": key_prefix},
            spool={"path": str(tmp_path / "usage.db")},
        )
        async with serve_app(config) as app, aiohttp.ClientSession() as http:
            status, body = await get_json(http, f"{app.base}/readyz")
            assert status == 200, body
            assert body == {
                "status": "ready",
                "components": {
                    "redis": "ok",
                    "spool": "ok",
                    "upstream": "ok",
                    "lifecycle": "serving",
                },
            }
            await upstream.close()
            status, body = await get_json(http, f"{app.base}/readyz")
            assert status == 503, body
            assert body["status"] == "not_ready"
            assert body["components"] == {
                "redis": "ok",
                "spool": "ok",
                "upstream": "unreachable",
                "lifecycle": "serving",
            }
            status, _ = await get_json(http, f"{app.base}/healthz")
            assert status == 200  # alive, just not ready
    finally:
        await upstream.close()


@pytest.mark.redis
@pytest.mark.parametrize(
    ("fail_mode", "code", "state"), [("open", 200, "degraded"), ("closed", 503, "down")]
)
async def test_readyz_when_redis_stops(
    make_config: ConfigFactory,
    scripted: tuple[ScriptedUpstream, str],
    private_redis: RedisServer,
    tmp_path: Path,
    fail_mode: str,
    code: int,
    state: str,
) -> None:
    config = make_config(
        upstream={"url": scripted[1]},
        redis={"url": private_redis.url, "fail_mode": fail_mode, "timeout_ms": 200},
        spool={"path": str(tmp_path / "usage.db")},
    )
    async with serve_app(config) as app, aiohttp.ClientSession() as http:
        status, body = await get_json(http, f"{app.base}/readyz")
        assert status == 200 and body["components"]["redis"] == "ok", body
        # A tenant this replica knows: what fail_mode open can keep serving without Redis.
        key = await app.tenant_with_key("acme")
        async with http.post(app.url, json=call(1, "add"), headers=bearer(key)) as r:
            assert r.status == 200
        private_redis.stop()
        for _ in range(3):  # enough failures to open the breaker
            status, body = await get_json(http, f"{app.base}/readyz")
            assert status == code, body
            assert body["status"] == ("ready" if code == 200 else "not_ready")
            assert body["components"] == {
                "redis": state,
                "spool": "ok",
                "upstream": "ok",
                "lifecycle": "serving",
            }
        text = await scrape(http, app.base)
        assert scraped(text, "mqp_redis_breaker_state") == 2  # open
        assert (scraped(text, "mqp_redis_errors_total") or 0) >= 3


@pytest.mark.parametrize(
    ("fail_mode", "knows_tenants", "ready", "state"),
    [
        ("open", True, True, "degraded"),
        ("open", False, False, "down"),
        ("closed", True, False, "down"),
    ],
)
async def test_readiness_under_fail_open_needs_someone_to_serve(
    make_config: ConfigFactory,
    scripted: tuple[ScriptedUpstream, str],
    fail_mode: str,
    knows_tenants: bool,
    ready: bool,
    state: str,
) -> None:
    """fail_mode open serves known tenants while Redis is away; a replica that knows none
    (a fresh start in the outage) would answer every request 503, so it is not ready."""
    async with local_server(web.Application()) as gone:
        pass  # closed again: nothing listens on its port now
    port = gone.rsplit(":", 1)[1]
    config = make_config(
        upstream={"url": scripted[1]},
        redis={"url": f"redis://127.0.0.1:{port}/0", "fail_mode": fail_mode, "timeout_ms": 200},
    )
    stores = connect(config.redis)
    guard = StoreGuard(CircuitBreaker(3, 60.0, ManualClock().monotonic), timeout=0.2)
    try:
        got = await readiness(
            config, stores, guard, MemorySink(), Lifecycle(), knows_tenants=knows_tenants
        )
    finally:
        await stores.close()
    assert got == (ready, {"redis": state, "upstream": "ok", "lifecycle": "serving"})


async def test_a_cold_start_during_a_redis_outage_is_not_ready(
    make_config: ConfigFactory, scripted: tuple[ScriptedUpstream, str], tmp_path: Path
) -> None:
    """The whole app, fail_mode open, Redis never reachable: it knows no tenant, so every call
    would be refused; /readyz says so instead of drawing traffic."""
    async with local_server(web.Application()) as gone:
        pass  # closed again: nothing listens on its port now
    port = gone.rsplit(":", 1)[1]
    config = make_config(
        upstream={"url": scripted[1]},
        redis={"url": f"redis://127.0.0.1:{port}/0", "fail_mode": "open", "timeout_ms": 200},
        spool={"path": str(tmp_path / "usage.db")},
    )
    async with serve_app(config) as app, aiohttp.ClientSession() as http:
        status, body = await get_json(http, f"{app.base}/readyz")
        assert (status, body["components"]["redis"]) == (503, "down"), body
        async with http.post(app.url, json=call(1, "add"), headers=bearer("mqp_x_y")) as r:
            assert r.status == 503  # what a ready answer would have sent traffic to


# --- 5. SIGTERM during a streaming call -----------------------------------------------------


@pytest.mark.redis
async def test_sigterm_lets_a_streaming_call_finish_then_bills_it(
    tmp_path: Path, redis_url: str, key_prefix: str, scripted: tuple[ScriptedUpstream, str]
) -> None:
    upstream, upstream_url = scripted
    async with stripe_serve_stack(
        tmp_path,
        redis_url=redis_url,
        key_prefix=key_prefix,
        upstream_url=upstream_url,
        stripe_key=STRIPE_KEY,
        meter=METER,
        ops={"readiness_delay_s": 1.5, "shutdown_grace_s": 20},
        # Long enough that only the drainer's final attempt can deliver the call below.
        drain={"interval_s": 30},
        log_level="warning",
    ) as (fake, stack):
        customer = stack.customer
        probes = aiohttp.TCPConnector(force_close=True)
        async with (
            serving(stack) as serve,
            aiohttp.ClientSession() as http,
            aiohttp.ClientSession(connector=probes) as probe,
        ):
            await serve.wait_healthy(probe)
            status, body = await get_json(probe, f"{stack.base}/readyz")
            assert status == 200 and body["components"]["lifecycle"] == "serving", body

            resp = await http.post(stack.url, json=call(41, "sse_wait"), headers=bearer(stack.key))
            assert resp.status == 200
            seen = b""
            async with asyncio.timeout(10):
                # Both progress notes (the upstream writes them at once; they may arrive
                # apart), so that nothing more is due until the upstream is released.
                while b'"progress": 2' not in seen:
                    seen += await resp.content.readany()

            signalled = time.monotonic()
            serve.proc.send_signal(signal.SIGTERM)

            async def not_ready() -> bool:
                status, body = await get_json(probe, f"{stack.base}/readyz")
                if status == 503:
                    assert body["components"]["lifecycle"] == "shutting_down", body
                    return True
                return False

            await until(not_ready, 1.4, "/readyz to turn 503 within the readiness delay")
            answers: list[int] = []

            async def listener_closed() -> bool:
                try:
                    async with probe.get(f"{stack.base}/readyz") as r:
                        answers.append(r.status)
                        return False
                except aiohttp.ClientConnectionError:
                    return True

            await until(listener_closed, 10, "serve to stop listening")
            # Not ready for the whole readiness delay (1.5 s) before the listener closed.
            assert time.monotonic() - signalled >= 1.2
            assert answers and set(answers) == {503}, answers
            # The listener is gone; the call stays open (the grace is 20 s, not a moment).
            try:
                async with asyncio.timeout(2.0):
                    chunk = await resp.content.readany()
                pytest.fail(f"the stream ended during the shutdown grace: {chunk!r}")
            except TimeoutError:
                pass
            assert serve.proc.returncode is None
            assert not resp.content.at_eof()
            assert upstream.cancelled == []
            assert stack.billable_units() == 0

            upstream.release.set()
            async with asyncio.timeout(15):
                seen += await resp.read()
            resp.release()
            events = [
                json.loads(line[len("data:") :])
                for line in seen.decode().splitlines()
                if line.startswith("data:") and line[len("data:") :].strip()
            ]
            final = [e for e in events if e.get("id") == 41]
            assert len(final) == 1 and final[0]["result"]["isError"] is False, seen

            assert await asyncio.wait_for(serve.proc.wait(), 40) == 0
        assert stack.billable_units() == 1
        assert stack.unreported() == 0
        assert fake.total(customer, METER) == 1


@pytest.mark.redis
async def test_sigterm_while_the_drainer_child_starts_still_makes_the_final_attempt(
    tmp_path: Path, redis_url: str, key_prefix: str, scripted: tuple[ScriptedUpstream, str]
) -> None:
    async with stripe_serve_stack(
        tmp_path,
        redis_url=redis_url,
        key_prefix=key_prefix,
        upstream_url=scripted[1],
        stripe_key=STRIPE_KEY,
        meter=METER,
        ops={"readiness_delay_s": 0, "shutdown_grace_s": 5},
        drain={"interval_s": 30},
        log_level="warning",
    ) as (fake, stack):
        customer = stack.customer
        async with serving(stack) as serve, aiohttp.ClientSession() as http:
            await serve.wait_healthy(http)
            await until(lambda: bool(children(serve.proc.pid)), 10, "the drainer child")
            (child,) = children(serve.proc.pid)
            # Freeze the child mid-start-up: what a slow start (imports) looks like to serve.
            os.kill(child, signal.SIGSTOP)
            try:
                if catches(child, signal.SIGTERM):
                    pytest.skip("the drainer child was ready before the test could freeze it")
                await _tool(http, stack, stack.key, 1, "add")
                assert stack.billable_units() == 1
                serve.proc.send_signal(signal.SIGTERM)
                # Bounded: a serve that waits for its child's readiness never sends it.
                await poll(lambda: pending(child, signal.SIGTERM), 5)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGCONT)
            assert await asyncio.wait_for(serve.proc.wait(), 40) == 0
        assert stack.unreported() == 0, "serve exited with usage still in the spool"
        assert fake.total(customer, METER) == 1


# --- 6. logs --------------------------------------------------------------------------------


@pytest.mark.redis
async def test_logs_are_json_without_secrets_and_carry_request_ids(
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
        tenant="acme-logs",
        ops={"readiness_delay_s": 0},
        drain={"interval_s": 0.2},
        log_level="info",
    ) as (_, stack):
        key = stack.key
        secret = key.removeprefix("mqp_").partition("_")[2]
        assert len(secret) >= 20
        wrong = key[: -len(secret)] + "x" * len(secret)  # the right key id, a wrong secret
        async with serving(stack, stderr=stderr) as serve, aiohttp.ClientSession() as http:
            await serve.wait_healthy(http)
            assert (await _post(http, stack.url, call(1, "add"), bearer(key)))[0] == 200
            as_header = {**ACCEPT, "X-API-Key": key}
            assert (await _post(http, stack.url, call(2, "add"), as_header))[0] == 200
            assert (await _post(http, stack.url, call(3, "add"), bearer(wrong)))[0] == 401
            async with http.post(
                stack.url, data=b'{"jsonrpc": "2.0", "id": 4, "method": ', headers=bearer(key)
            ) as r:
                assert r.status == 400
            tagged = {**bearer(key), "X-Request-Id": "abc-123"}
            assert (await _post(http, stack.url, call(5, "add"), tagged))[0] == 200
            traced = {**bearer(key), "traceparent": TRACEPARENT}
            assert (await _post(http, stack.url, call(6, "add"), traced))[0] == 200
            await until(lambda: stack.unreported() == 0, 30, "the drainer to deliver")
            assert await serve.terminate() == 0

    lines = [line for line in stderr.read_text().splitlines() if line.strip()]
    assert lines, "serve wrote nothing to stderr"
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"a stderr line is not JSON: {line!r}")
    for needle in (key, secret, wrong, PEPPER, STRIPE_KEY):
        leaks = [line for line in lines if needle in line]
        assert not leaks, f"a secret reached the logs: {leaks}"
    assert any(r.get("event") == "drainer_started" for r in records)  # the child's lines too

    calls = [r for r in records if r.get("event") == "tool_call"]
    assert [r["tenant"] for r in calls if r["outcome"] == "ok"] == ["acme-logs"] * 4
    (tagged_line,) = [r for r in calls if r["request_id"] == "abc-123"]
    assert tagged_line["tenant"] == "acme-logs"
    assert tagged_line["tool"] == "add"
    assert tagged_line["units"] == 1
    assert tagged_line["outcome"] == "ok"
    assert tagged_line["upstream_status"] == 200
    assert isinstance(tagged_line["duration_ms"], int | float)
    (traced_line,) = [r for r in calls if r["request_id"] == TRACE_ID]
    assert traced_line["outcome"] == "ok"

    seen_ids = [
        {k.lower(): v for k, v in seen.headers.items()}.get("x-request-id")
        for seen in upstream.calls()
    ]
    assert "abc-123" in seen_ids
    assert TRACE_ID in seen_ids
    assert len(seen_ids) == 4 and all(seen_ids), seen_ids  # every forwarded call carries one


async def test_an_invalid_all_zero_traceparent_is_not_a_request_id(
    make_config: ConfigFactory, scripted: tuple[ScriptedUpstream, str]
) -> None:
    upstream, url = scripted
    zero = f"00-{'0' * 32}-00f067aa0ba902b7-01"
    async with (
        run_proxy(make_config(upstream={"url": url})) as proxy,
        aiohttp.ClientSession() as http,
    ):
        key = await proxy.tenant_with_key("acme")
        for i in range(2):
            status, _ = await _post(
                http, proxy.url, call(i, "add"), {**bearer(key), "traceparent": zero}
            )
            assert status == 200
    ids = [{k.lower(): v for k, v in r.headers.items()}["x-request-id"] for r in upstream.calls()]
    assert len(ids) == 2
    assert "0" * 32 not in ids
    assert ids[0] != ids[1]
