"""What a Stripe event means for a tenant (pure: no I/O), and which plan a tenant gets now."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import Config, Plan
from ..tenants import Tenant

Mode = Literal["subscription", "invoice_failed", "invoice_paid", "checkout"]

SUBSCRIPTION_EVENTS = frozenset(
    {
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "customer.subscription.paused",
        "customer.subscription.resumed",
        "customer.subscription.trial_will_end",
    }
)
PAID_STATUSES = frozenset({"active", "trialing", "past_due"})
FREE_STATUSES = frozenset({"unpaid", "canceled", "incomplete_expired", "paused", "incomplete"})


@dataclass(frozen=True, slots=True)
class Change:
    mode: Mode
    created: int
    tenant_hint: str | None  # subscription metadata tenant_id or Checkout client_reference_id
    customer: str | None
    subscription: str | None
    fields: dict[str, str] = field(default_factory=dict)
    terminal: bool = False  # the subscription is over: later events for it are stale


class EventError(ValueError):
    """The event is not shaped like a Stripe event; answered 400."""


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def plan_of_items(sub: dict[str, Any], config: Config) -> str | None:
    """The plan named by a subscription's prices: price metadata `mqp_plan`, else lookup key."""
    items = sub.get("items")
    data = items.get("data") if isinstance(items, dict) else None
    for item in data if isinstance(data, list) else []:
        # `plan` is the item's price in event shapes older than API 2020-08-27.
        price = (item.get("price") or item.get("plan")) if isinstance(item, dict) else None
        if not isinstance(price, dict):
            continue
        meta = price.get("metadata")
        named = meta.get("mqp_plan") if isinstance(meta, dict) else None
        if isinstance(named, str) and named in config.plans:
            return named
        lookup = _str(price.get("lookup_key"))
        if lookup is not None and (plan := config.plan_for_lookup_key(lookup)) is not None:
            return plan
    return None


def period_of_items(sub: dict[str, Any]) -> tuple[int, int] | None:
    """Since API 2025-03-31.basil the billing period lives on the subscription items."""
    items = sub.get("items")
    data = items.get("data") if isinstance(items, dict) else None
    starts, ends = [], []
    for item in data if isinstance(data, list) else []:
        if isinstance(item, dict):
            start, end = (
                _int(item.get("current_period_start")),
                _int(item.get("current_period_end")),
            )
            if start is not None and end is not None:
                starts.append(start)
                ends.append(end)
    if not starts:
        # Before API 2025-03-31.basil the period lived on the subscription itself.
        start, end = _int(sub.get("current_period_start")), _int(sub.get("current_period_end"))
        return (start, end) if start is not None and end is not None else None
    return min(starts), max(ends)


def subscription_fields(sub: dict[str, Any], config: Config) -> dict[str, str]:
    status = _str(sub.get("status")) or "incomplete"
    fields = {"status": status, "subscription_id": _str(sub.get("id")) or ""}
    if status in PAID_STATUSES:
        fields["plan"] = plan_of_items(sub, config) or config.default_plan
    else:
        fields["plan"] = config.default_plan
    period = period_of_items(sub)
    if period is not None and status in PAID_STATUSES:
        fields["period_start"], fields["period_end"] = str(period[0]), str(period[1])
    else:  # back to calendar months
        fields["period_start"] = fields["period_end"] = ""
    trial_end = _int(sub.get("trial_end"))
    fields["trial_end"] = str(trial_end) if trial_end is not None and status == "trialing" else ""
    customer = _str(sub.get("customer"))
    if customer is not None:
        fields["stripe_customer"] = customer
    return fields


def _invoice_subscription(invoice: dict[str, Any]) -> str | None:
    parent = invoice.get("parent")
    details = parent.get("subscription_details") if isinstance(parent, dict) else None
    if isinstance(details, dict) and _str(details.get("subscription")):
        return _str(details.get("subscription"))
    return _str(invoice.get("subscription"))  # before API 2025-03-31.basil


def interpret(event: dict[str, Any], config: Config) -> Change | None:
    """The tenant change an event asks for, or None for events this proxy does not act on."""
    kind = event.get("type")
    created = _int(event.get("created"))
    data = event.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if not isinstance(kind, str) or created is None or not isinstance(obj, dict):
        raise EventError("not a Stripe event: expected type, created and data.object")
    if kind in SUBSCRIPTION_EVENTS:
        meta = obj.get("metadata")
        hint = _str(meta.get("tenant_id")) if isinstance(meta, dict) else None
        return Change(
            mode="subscription",
            created=created,
            tenant_hint=hint,
            customer=_str(obj.get("customer")),
            subscription=_str(obj.get("id")),
            fields=subscription_fields(obj, config),
            terminal=kind == "customer.subscription.deleted",
        )
    if kind in ("invoice.payment_failed", "invoice.paid", "invoice.payment_succeeded"):
        return Change(
            mode="invoice_failed" if kind == "invoice.payment_failed" else "invoice_paid",
            created=created,
            tenant_hint=None,
            customer=_str(obj.get("customer")),
            subscription=_invoice_subscription(obj),
        )
    if kind == "checkout.session.completed":
        customer = _str(obj.get("customer"))
        return Change(
            mode="checkout",
            created=created,
            tenant_hint=_str(obj.get("client_reference_id")),
            customer=customer,
            subscription=None,
            fields={"stripe_customer": customer} if customer else {},
        )
    return None


def effective_plan(tenant: Tenant, now: float, config: Config) -> Plan:
    """The plan enforced right now: past_due keeps the plan through the grace period, then
    drops to the restricted plan."""
    grace_over = (
        tenant.past_due_since is not None
        and now >= tenant.past_due_since + config.billing.past_due_grace_s
    )
    if tenant.status == "past_due" and grace_over:
        return config.plan(config.billing.restricted_plan or config.default_plan)
    if tenant.status in FREE_STATUSES:
        return config.plan(config.default_plan)
    return config.plan(tenant.plan)
