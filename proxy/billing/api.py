"""The tenant's own billing API, authenticated by the tenant's API key: a key only ever
reaches its own tenant, so one tenant can never see or act on another's billing."""

from __future__ import annotations

import json
from typing import Any

import stripe
import structlog
from aiohttp import web

from ..auth import extract_key, key_offered
from ..clock import Clock
from ..config import Config
from ..directory import Directory
from ..jsonrpc import UNAUTHORIZED
from ..quota.engine import QuotaEngine
from ..quota.policy import allowed_total, iso
from ..replies import unauthorized
from ..store import StoreUnavailable
from ..tenants import Tenant
from .plansync import effective_plan

log = structlog.get_logger(__name__)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class BillingApi:
    def __init__(
        self,
        config: Config,
        directory: Directory,
        engine: QuotaEngine,
        clock: Clock,
        stripe_client: stripe.StripeClient | None,
    ) -> None:
        self._cfg = config
        self._directory = directory
        self._engine = engine
        self._clock = clock
        self._stripe = stripe_client

    async def _tenant(self, request: web.Request) -> Tenant | web.Response:
        key = extract_key(request.headers)
        if key is None:
            return unauthorized(None, UNAUTHORIZED, key_offered=key_offered(request.headers))
        try:
            tenant, _ = await self._directory.authenticate(key)
            if tenant is None:
                return unauthorized(None, UNAUTHORIZED, key_offered=True)
            # Billing answers use the record as it is now, not a cached copy.
            return await self._directory.refresh_tenant(tenant.id) or tenant
        except StoreUnavailable:
            return _error(503, "The tenant store is unreachable; retry shortly.")

    async def usage(self, request: web.Request) -> web.Response:
        tenant = await self._tenant(request)
        if isinstance(tenant, web.Response):
            return tenant
        plan = effective_plan(tenant, self._clock.time(), self._cfg)
        period = self._engine.period(tenant.period_start, tenant.period_end)
        try:
            used = await self._engine.used(tenant.id, period)
        except StoreUnavailable:
            return _error(503, "The quota store is unreachable; retry shortly.")
        included = plan.included_units
        return web.json_response(
            {
                "tenant": tenant.id,
                "plan": plan.name,
                "status": tenant.status,
                "period_start": iso(period.start),
                "period_end": iso(period.end),
                "units_used": used,
                "limit": allowed_total(plan),
                "included_units": included,
                "overage_units": max(0, used - included) if included is not None else 0,
                "trial_end": iso(tenant.trial_end) if tenant.trial_end else None,
            }
        )

    async def portal(self, request: web.Request) -> web.Response:
        tenant = await self._tenant(request)
        if isinstance(tenant, web.Response):
            return tenant
        if tenant.stripe_customer is None:
            return _error(400, "No billing account found")
        if self._stripe is None:
            return _error(503, "Billing is not configured on this proxy (STRIPE_SECRET_KEY).")
        params: dict[str, Any] = {"customer": tenant.stripe_customer}
        if self._cfg.billing.portal_return_url:
            params["return_url"] = self._cfg.billing.portal_return_url
        try:
            session = await self._stripe.v1.billing_portal.sessions.create_async(params)  # type: ignore[arg-type]
        except stripe.StripeError as exc:
            log.warning("portal_failed", tenant=tenant.id, error=str(exc.user_message or exc))
            return _error(502, "Stripe could not create a billing portal session; retry.")
        return web.json_response({"url": session.url})

    async def checkout(self, request: web.Request) -> web.Response:
        tenant = await self._tenant(request)
        if isinstance(tenant, web.Response):
            return tenant
        billing = self._cfg.billing
        if self._stripe is None or not billing.checkout_success_url:
            return _error(
                503, "Checkout is not configured on this proxy (billing.checkout_success_url)."
            )
        sellable = [p.name for p in self._cfg.plans.values() if p.stripe_lookup_keys]
        plan_name = billing.checkout_plan or (sellable[0] if sellable else "")
        raw = await request.read()
        if raw.strip():
            try:
                body = json.loads(raw)
            except ValueError:
                return _error(400, 'Expected a JSON body like {"plan": "pro"}, or none.')
            if not isinstance(body, dict) or not isinstance(body.get("plan", plan_name), str):
                return _error(400, 'Expected a JSON body like {"plan": "pro"}, or none.')
            plan_name = body.get("plan", plan_name)
        plan = self._cfg.plans.get(plan_name)
        if plan is None or not plan.stripe_lookup_keys:
            return _error(400, f"Plan {plan_name!r} cannot be bought; choose one of {sellable}.")
        try:
            prices = await self._stripe.v1.prices.list_async(
                {"lookup_keys": list(plan.stripe_lookup_keys), "active": True}
            )
            missing = set(plan.stripe_lookup_keys) - {p.lookup_key for p in prices.data}
            if missing:
                log.error("checkout_prices_missing", plan=plan.name, lookup_keys=sorted(missing))
                return _error(
                    503,
                    f"Plan {plan.name!r} is not set up in Stripe yet (no active price for "
                    f"{', '.join(sorted(missing))}); the operator runs `billing setup`.",
                )
            # Metered prices take no quantity (Stripe refuses one); licensed ones take 1.
            items: list[dict[str, Any]] = [
                {"price": p.id}
                if p.recurring is not None and p.recurring.usage_type == "metered"
                else {"price": p.id, "quantity": 1}
                for p in prices.data
            ]
            params: dict[str, Any] = {
                "mode": "subscription",
                "line_items": items,
                "success_url": billing.checkout_success_url,
                "client_reference_id": tenant.id,
                "subscription_data": {"metadata": {"tenant_id": tenant.id}},
            }
            if billing.checkout_cancel_url:
                params["cancel_url"] = billing.checkout_cancel_url
            if tenant.stripe_customer:
                params["customer"] = tenant.stripe_customer
            session = await self._stripe.v1.checkout.sessions.create_async(params)  # type: ignore[arg-type]
        except stripe.StripeError as exc:
            log.warning("checkout_failed", tenant=tenant.id, error=str(exc.user_message or exc))
            return _error(502, "Stripe could not create a checkout session; retry.")
        return web.json_response({"url": session.url, "plan": plan.name})
