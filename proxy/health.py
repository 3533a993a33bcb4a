"""Probes: /healthz (alive), /readyz (can serve), /health (is billing healthy)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .clock import Clock
from .config import Config
from .keys import KeySpace
from .metrics import DrainSnapshot
from .store import StoreClients, StoreGuard, StoreUnavailable
from .usage.sink import UsageSink
from .usage.spool import Spool

UNREPORTED_AGE_S = 600  # the guide's "unreported events older than 10 minutes"
UPSTREAM_CONNECT_TIMEOUT_S = 1.0


@dataclass
class Lifecycle:
    shutting_down: bool = False


async def upstream_reachable(url: str) -> bool:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        async with asyncio.timeout(UPSTREAM_CONNECT_TIMEOUT_S):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def readiness(
    config: Config,
    stores: StoreClients,
    guard: StoreGuard,
    sink: UsageSink,
    lifecycle: Lifecycle,
    *,
    knows_tenants: bool = True,
) -> tuple[bool, dict[str, str]]:
    """(ready, component -> state). Ready only when every component is fine; a Redis outage
    under fail_mode open is an explicit, still-ready `degraded` only while `knows_tenants`
    (the tenant cache can authenticate someone without Redis): a replica that knows nobody
    answers every request 503 then, so it is `down` and not ready."""
    components: dict[str, str] = {}
    if config.redis.embedded:
        components["redis"] = "embedded"
    else:
        try:
            await guard.run(stores.main.ping)
            components["redis"] = "ok"
        except StoreUnavailable:
            fail_open = config.redis.fail_mode == "open"
            components["redis"] = "degraded" if fail_open and knows_tenants else "down"
    if isinstance(sink, Spool):
        try:
            await sink.check_writable()
            components["spool"] = "ok"
        except Exception:  # any failure to take the write lock means "not writable"
            components["spool"] = "not_writable"
    upstream_ok = await upstream_reachable(config.upstream.url)
    components["upstream"] = "ok" if upstream_ok else "unreachable"
    components["lifecycle"] = "shutting_down" if lifecycle.shutting_down else "serving"
    ready = all(v in ("ok", "embedded", "degraded", "serving") for v in components.values())
    return ready, components


async def drain_snapshot(spool: Spool, now: float) -> DrainSnapshot:
    backlog = await spool.backlog()
    state = await spool.drain_state()
    last = state.get("last_success_ts")
    return DrainSnapshot(
        backlog=backlog.unreported,
        oldest_unreported_age_s=None
        if backlog.oldest_unreported_ts is None
        else max(0.0, now - backlog.oldest_unreported_ts),
        unbillable=backlog.unbillable,
        rejected_groups=backlog.rejected_groups,
        counters={
            k: v
            for k, v in state.items()
            if k in ("batches", "events", "calls") or k.startswith("errors:")
        },
        last_success_age_s=None if last is None else max(0.0, now - last),
        failures=int(state.get("failures", 0)),
    )


def _ms(age_s: float | None) -> int | None:
    return None if age_s is None else int(age_s * 1000)


async def billing_health(
    config: Config,
    stores: StoreClients,
    keys: KeySpace,
    guard: StoreGuard,
    sink: UsageSink,
    clock: Clock,
) -> dict[str, Any]:
    """The guide's billing health, with its thresholds (configurable under `ops`)."""
    now = clock.time()
    ops = config.ops
    reasons: list[str] = []
    webhook_age: float | None = None
    try:
        raw = await guard.run(lambda: stores.main.get(keys.webhook_last()))
        webhook_age = None if raw is None else max(0.0, now - int(raw) / 1000)
    except StoreUnavailable:
        reasons.append("the tenant store is unreachable")
    body: dict[str, Any] = {"webhook_last_received_ms_ago": _ms(webhook_age)}
    billing = config.billing
    judge_webhooks = billing.enabled and billing.webhook_secret and ops.webhook_max_age_s
    if judge_webhooks and (webhook_age is None or webhook_age > ops.webhook_max_age_s):
        reasons.append(f"no verified webhook in {ops.webhook_max_age_s} s")
    if isinstance(sink, Spool):
        snap = await drain_snapshot(sink, now)
        over = await sink.unreported_before(now - UNREPORTED_AGE_S)
        body.update(
            unreported_events_over_10m=over,
            stripe_api_last_success_ms_ago=_ms(snap.last_success_age_s),
            drain_backlog=snap.backlog,
            oldest_unreported_age_ms=_ms(snap.oldest_unreported_age_s),
            rejected_meter_events=snap.rejected_groups,
        )
        if billing.enabled:
            if over > ops.unreported_max:
                reasons.append(f"{over} events unreported for over 10 minutes")
            age = snap.last_success_age_s
            if age is None or age > ops.stripe_max_age_s:
                reasons.append(f"no successful Stripe call in {ops.stripe_max_age_s} s")
    body["billing_enabled"] = billing.enabled
    body["status"] = "degraded" if reasons else "ok"
    body["reasons"] = reasons
    return body
