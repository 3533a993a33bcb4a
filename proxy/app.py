"""Wiring only: build every component from the Config and hang them on the Application."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .billing.api import BillingApi
from .billing.stripe_client import make_client
from .billing.webhooks import WebhookReceiver
from .breaker import CircuitBreaker
from .clock import Clock, SystemClock
from .config import Config
from .directory import Directory
from .forward import McpProxy
from .health import Lifecycle, billing_health, drain_snapshot, readiness
from .keys import KeySpace
from .metrics import DrainSnapshot, Metrics, StateCollector
from .quota.engine import QuotaEngine
from .quota.storage import QuotaStorage
from .replies import not_found
from .sessions import Sessions
from .settle import Settler
from .store import StoreClients, StoreGuard, connect
from .tasks import TaskSet
from .tenants import TenantStore
from .upstream import UpstreamClient
from .usage.sink import UsageSink
from .usage.spool import Spool

log = structlog.get_logger(__name__)

REAP_INTERVAL_S = 5.0


@dataclass(slots=True)
class Components:
    config: Config
    clock: Clock
    stores: StoreClients
    keys: KeySpace
    guard: StoreGuard
    tenants: TenantStore
    directory: Directory
    engine: QuotaEngine
    storage: QuotaStorage
    sessions: Sessions
    sink: UsageSink
    tasks: TaskSet
    pepper: str
    metrics: Metrics
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    drain_snapshot: DrainSnapshot | None = None
    proxy: McpProxy | None = None
    started: Started | None = None


@dataclass(slots=True)
class Started:
    """What exists only while the app runs (it owns sessions and clients)."""

    webhooks: WebhookReceiver
    billing: BillingApi


COMPONENTS = web.AppKey("components", Components)


def build_components(
    config: Config,
    *,
    clock: Clock | None = None,
    sink: UsageSink | None = None,
    stores: StoreClients | None = None,
    registry: CollectorRegistry | None = None,
) -> Components:
    clock = clock or SystemClock()
    stores = stores or connect(config.redis)
    keys = KeySpace(config.redis.key_prefix)
    # The embedded store forgets everything at exit, so an ephemeral pepper is safe there.
    pepper = config.auth.pepper or secrets.token_urlsafe(32)
    # Each app has its own registry (tests run many apps in one process).
    metrics = Metrics(registry or CollectorRegistry(), per_tenant=config.ops.per_tenant_metrics)
    guard = StoreGuard(
        CircuitBreaker(
            config.redis.breaker_failures, config.redis.breaker_cooldown_s, clock.monotonic
        ),
        timeout=config.redis.timeout_ms / 1000,
        on_failure=metrics.redis_errors.inc,
    )
    storage = QuotaStorage(stores.main, keys, stores.quota)
    engine = QuotaEngine(
        storage,
        guard,
        clock,
        fail_open=config.redis.fail_mode == "open",
        reservation_ttl_s=config.redis.reservation_ttl_s,
    )
    if sink is None:
        from .usage.runner import open_spool

        sink = open_spool(config)
    return Components(
        config=config,
        clock=clock,
        stores=stores,
        keys=keys,
        guard=guard,
        tenants=TenantStore(stores.main, keys, pepper, config.auth.key_prefix),
        directory=Directory(stores.main, stores.listener, keys, pepper, guard),
        engine=engine,
        storage=storage,
        sessions=Sessions(stores.main, keys, guard),
        sink=sink,
        tasks=TaskSet(),
        pepper=pepper,
        metrics=metrics,
    )


def create_app(components: Components) -> web.Application:
    config = components.config
    # Leave headroom over the body limit so aiohttp's own check never pre-empts our 413.
    app = web.Application(client_max_size=config.proxy.max_body_bytes)
    app[COMPONENTS] = components
    app.cleanup_ctx.append(_lifecycle)
    for path in config.upstream.mcp_paths:
        app.router.add_route("*", path, _mcp)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    components.metrics.registry.register(
        StateCollector(lambda: components.guard.state.value, lambda: components.drain_snapshot)
    )
    app.router.add_post(config.billing.webhook_path, _webhook)
    app.router.add_get("/api/billing/usage", _usage)
    app.router.add_post("/api/billing/portal", _portal)
    app.router.add_post("/api/billing/checkout", _checkout)
    for prefix in ("/.well-known/", "/register"):
        # Clients probing for OAuth get a JSON 404, not an HTML page they cannot parse.
        app.router.add_route(
            "*", prefix + "{tail:.*}" if prefix.endswith("/") else prefix, _not_found
        )
    return app


async def _mcp(request: web.Request) -> web.StreamResponse:
    proxy = request.app[COMPONENTS].proxy
    assert proxy is not None, "the app is not started"
    return await proxy.handle(request)


def _started(request: web.Request) -> Started:
    started = request.app[COMPONENTS].started
    assert started is not None, "the app is not started"
    return started


async def _webhook(request: web.Request) -> web.Response:
    return await _started(request).webhooks.handle(request)


async def _usage(request: web.Request) -> web.Response:
    return await _started(request).billing.usage(request)


async def _portal(request: web.Request) -> web.Response:
    return await _started(request).billing.portal(request)


async def _checkout(request: web.Request) -> web.Response:
    return await _started(request).billing.checkout(request)


async def _not_found(_: web.Request) -> web.Response:
    return not_found()


async def _healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    c = request.app[COMPONENTS]
    ready, components = await readiness(
        c.config, c.stores, c.guard, c.sink, c.lifecycle, knows_tenants=c.directory.knows_tenants
    )
    return web.json_response(
        {"status": "ready" if ready else "not_ready", "components": components},
        status=200 if ready else 503,
    )


async def _health(request: web.Request) -> web.Response:
    c = request.app[COMPONENTS]
    body = await billing_health(c.config, c.stores, c.keys, c.guard, c.sink, c.clock)
    return web.json_response(body)


async def _metrics(request: web.Request) -> web.Response:
    c = request.app[COMPONENTS]
    if isinstance(c.sink, Spool):
        # The drainer process writes its state into the spool; read it once per scrape.
        c.drain_snapshot = await drain_snapshot(c.sink, c.clock.time())
    return web.Response(
        body=generate_latest(c.metrics.registry),
        headers={"Content-Type": CONTENT_TYPE_LATEST},
    )


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    c = app[COMPONENTS]
    # No read timeout: SSE streams and long tool calls run as long as the upstream wants.
    # It keeps no cookies: one client serves every tenant.
    upstream = UpstreamClient(c.config.upstream.url, c.config.upstream.connect_timeout_s)
    c.proxy = McpProxy(
        c.config,
        upstream,
        c.directory,
        c.sessions,
        Settler(
            c.engine,
            c.sink,
            c.clock,
            bill_tool_errors=c.config.proxy.bill_tool_errors,
            token_meta_key=c.config.billing.token_meta_key,
        ),
        c.engine,
        c.clock,
        c.tasks,
        c.metrics,
    )
    if isinstance(c.sink, Spool):
        await c.sink.open()
    stripe_client, stripe_http = None, None
    if c.config.billing.stripe_secret_key:
        stripe_client, stripe_http = make_client(c.config.billing, retries=2)
    c.started = Started(
        webhooks=WebhookReceiver(
            c.config, c.stores.main, c.keys, c.guard, c.clock, stripe_client, c.metrics
        ),
        billing=BillingApi(c.config, c.directory, c.engine, c.clock, stripe_client),
    )
    await c.directory.start()
    reaper = asyncio.create_task(_reap_forever(c.proxy), name="reap-deferred")
    try:
        yield
    finally:
        reaper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reaper
        await c.tasks.drain()
        await c.engine.flush()
        if isinstance(c.sink, Spool):
            await c.sink.close()
        await c.directory.stop()
        await upstream.close()
        if stripe_http is not None:
            await stripe_http.close_async()  # type: ignore[no-untyped-call]
        await c.stores.close()


async def _reap_forever(proxy: McpProxy) -> None:
    while True:
        await asyncio.sleep(REAP_INTERVAL_S)
        await proxy.reap_deferred()
