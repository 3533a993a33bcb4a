"""POST /stripe/webhook: verify on the raw body, then apply the event to its tenant once."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import stripe
import structlog
from aiohttp import web
from redis.asyncio import Redis

from ..clock import Clock
from ..config import Config
from ..keys import KeySpace
from ..metrics import Metrics
from ..store import StoreGuard, StoreUnavailable
from .plansync import Change, EventError, interpret

log = structlog.get_logger(__name__)

MAX_WEBHOOK_BYTES = 1024 * 1024
LEDGER_TTL_S = 30 * 86400  # Stripe retries a delivery for up to 3 days


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int
    result: str


def _reply(outcome: Outcome, message: str = "") -> web.Response:
    body: dict[str, Any] = {"received": outcome.status < 300, "result": outcome.result}
    if message:
        body["message"] = message
    return web.json_response(body, status=outcome.status)


class WebhookReceiver:
    def __init__(
        self,
        config: Config,
        redis: Redis,
        keys: KeySpace,
        guard: StoreGuard,
        clock: Clock,
        stripe_client: stripe.StripeClient | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics
        self._cfg = config
        self._r = redis
        self._k = keys
        self._guard = guard
        self._clock = clock
        self._stripe = stripe_client
        script = files("proxy.billing").joinpath("lua", "apply_event.lua").read_text("utf-8")
        self._apply = redis.register_script(script)

    async def handle(self, request: web.Request) -> web.Response:
        outcome, kind, message = await self._receive(request)
        if self._metrics is not None:
            self._metrics.webhooks.labels(kind, outcome.result).inc()
        return _reply(outcome, message)

    async def _receive(self, request: web.Request) -> tuple[Outcome, str, str]:
        """(outcome, event type for metrics: only verified events name theirs, message)."""
        secret = self._cfg.billing.webhook_secret
        if not secret:
            return (
                Outcome(503, "not_configured"),
                "-",
                "STRIPE_WEBHOOK_SECRET is not set on this proxy; set it so events can be verified",
            )
        if (request.content_length or 0) > MAX_WEBHOOK_BYTES:
            return Outcome(413, "too_large"), "-", ""
        raw = await request.read()
        header = request.headers.get("Stripe-Signature", "")
        try:
            # Verified on the exact bytes received, before anything is parsed.
            stripe.WebhookSignature.verify_header(
                raw.decode("utf-8"), header, secret, self._cfg.billing.webhook_tolerance_s
            )
        # TypeError/ValueError: the SDK's compare_digest refuses non-ASCII signatures.
        except (stripe.SignatureVerificationError, UnicodeDecodeError, TypeError, ValueError):
            return Outcome(400, "bad_signature"), "-", "signature verification failed"
        try:
            event = json.loads(raw)
            if not isinstance(event, dict) or not isinstance(event.get("id"), str):
                raise EventError("not a Stripe event")
            change = interpret(event, self._cfg)
        except (ValueError, EventError) as exc:
            return Outcome(400, "bad_event"), "-", str(exc)
        kind = str(event.get("type"))
        try:
            now_ms = int(self._clock.time() * 1000)
            await self._guard.run(lambda: self._r.set(self._k.webhook_last(), now_ms))
            outcome = await self._apply_change(event, change)
        except StoreUnavailable:
            # 5xx: Stripe retries the delivery later.
            return Outcome(503, "store_unavailable"), kind, "tenant store unreachable; retry"
        log.info("webhook", event_id=event["id"], type=kind, result=outcome.result)
        return outcome, kind, ""

    async def _apply_change(self, event: dict[str, Any], change: Change | None) -> Outcome:
        if change is None:
            return Outcome(200, "ignored")
        if self._cfg.billing.refetch_subscriptions and change.subscription and self._stripe:
            change = await self._refetched(event, change)
        tenant_id = await self._tenant_for(change)
        if tenant_id is None:
            log.warning(
                "webhook_unknown_tenant",
                event_id=event["id"],
                customer=change.customer,
                message="No tenant has this Stripe customer: create the tenant with "
                "--stripe-customer, or set subscription metadata tenant_id.",
            )
            return Outcome(200, "unknown_tenant")
        args: list[str | int] = [
            event["id"],
            change.created,
            change.subscription or "",
            int(change.terminal),
            change.mode,
            LEDGER_TTL_S,
            self._k.invalidations(),
            tenant_id,
        ]
        for name, value in change.fields.items():
            args += [name, value]

        async def apply() -> str:
            result = await self._apply(
                keys=[self._k.tenant(tenant_id), self._k.webhook_event(tenant_id, event["id"])],
                args=args,
            )
            if change.customer and change.mode in ("checkout", "subscription"):
                await self._r.set(self._k.customer(change.customer), tenant_id)
            return str(result)

        return Outcome(200, await self._guard.run(apply))

    async def _tenant_for(self, change: Change) -> str | None:
        if change.tenant_hint:
            hint = change.tenant_hint
            exists = await self._guard.run(lambda: self._r.exists(self._k.tenant(hint)))
            if exists:
                return hint
        if change.customer:
            customer = change.customer
            found = await self._guard.run(lambda: self._r.get(self._k.customer(customer)))
            return None if found is None else str(found)
        return None

    async def _refetched(self, event: dict[str, Any], change: Change) -> Change:
        """Replace the event's snapshot with the subscription as Stripe has it now."""
        assert self._stripe is not None and change.subscription is not None
        try:
            sub = await self._stripe.v1.subscriptions.retrieve_async(change.subscription)
        except stripe.StripeError as exc:
            log.warning("webhook_refetch_failed", event_id=event["id"], error=str(exc))
            return change
        fresh = dict(event, data={"object": sub.to_dict()})
        refreshed = interpret(fresh, self._cfg)
        return refreshed if refreshed is not None else change
