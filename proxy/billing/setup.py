"""`billing setup`: create or find, idempotently, the meters, product and prices this proxy
bills with, then print the settings to paste into config.yaml.

Idempotent by construction: meters are found by event name, the product by a fixed id and
prices by lookup key, so a second run creates nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import stripe

from ..config import Config

PRODUCT_ID = "mcp_quota_proxy"
LOOKUP_FREE = "mqp_free"
LOOKUP_PRO_BASE = "mqp_pro_base"
LOOKUP_PRO_OVERAGE = "mqp_pro_overage"
LOOKUP_TOKENS = "mqp_tokens"


@dataclass(frozen=True, slots=True)
class PriceSpec:
    currency: str = "usd"
    pro_plan: str = "pro"
    pro_base_cents: int = 2900
    overage_cents_per_unit: Decimal = Decimal("0.5")
    token_cents_per_unit: Decimal = Decimal("0.001")
    graduated: bool = True  # included units free in the overage price's first tier


@dataclass(slots=True)
class SetupResult:
    meters: dict[str, str] = field(default_factory=dict)  # event name -> meter id
    product: str = ""
    prices: dict[str, str] = field(default_factory=dict)  # lookup key -> price id
    created: list[str] = field(default_factory=list)


async def _meter(client: stripe.StripeClient, event_name: str, result: SetupResult) -> str:
    meters = await client.v1.billing.meters.list_async({"status": "active", "limit": 100})
    async for meter in meters.auto_paging_iter():
        if meter.event_name == event_name:
            return meter.id
    meter = await client.v1.billing.meters.create_async(
        {
            "display_name": f"MCP {event_name}",
            "event_name": event_name,
            "default_aggregation": {"formula": "sum"},
            "customer_mapping": {"type": "by_id", "event_payload_key": "stripe_customer_id"},
            "value_settings": {"event_payload_key": "value"},
        }
    )
    result.created.append(f"meter {meter.id} ({event_name})")
    return meter.id


async def _product(client: stripe.StripeClient, result: SetupResult) -> str:
    try:
        product = await client.v1.products.retrieve_async(PRODUCT_ID)
    except stripe.InvalidRequestError as exc:
        if exc.http_status != 404:
            raise
        product = await client.v1.products.create_async(
            {
                "id": PRODUCT_ID,
                "name": "MCP tool calls",
                "metadata": {"managed_by": "mcp-quota-proxy"},
            }
        )
        result.created.append(f"product {product.id}")
    return product.id


async def _price(
    client: stripe.StripeClient, lookup_key: str, params: dict[str, Any], result: SetupResult
) -> str:
    found = await client.v1.prices.list_async({"lookup_keys": [lookup_key], "active": True})
    if found.data:
        return found.data[0].id
    create: Any = {**params, "lookup_key": lookup_key}  # built from plain dicts above
    price = await client.v1.prices.create_async(create)
    result.created.append(f"price {price.id} ({lookup_key})")
    return price.id


async def setup_billing(
    client: stripe.StripeClient, config: Config, spec: PriceSpec
) -> SetupResult:
    billing = config.billing
    result = SetupResult()
    for name in billing.meter_names():
        result.meters[name] = await _meter(client, name, result)
    product = result.product = await _product(client, result)
    monthly = {"interval": "month"}
    result.prices[LOOKUP_FREE] = await _price(
        client,
        LOOKUP_FREE,
        {
            "product": product,
            "currency": spec.currency,
            "unit_amount": 0,
            "recurring": {**monthly, "usage_type": "licensed"},
            "nickname": "Free",
            "metadata": {"mqp_plan": config.default_plan},
        },
        result,
    )
    result.prices[LOOKUP_PRO_BASE] = await _price(
        client,
        LOOKUP_PRO_BASE,
        {
            "product": product,
            "currency": spec.currency,
            "unit_amount": spec.pro_base_cents,
            "recurring": {**monthly, "usage_type": "licensed"},
            "nickname": "Pro base",
            "metadata": {"mqp_plan": spec.pro_plan},
        },
        result,
    )
    metered = {**monthly, "usage_type": "metered", "meter": result.meters[billing.meter_event_name]}
    pro = config.plans.get(spec.pro_plan)
    included = pro.included_units if pro is not None else None
    overage: dict[str, Any] = {
        "product": product,
        "currency": spec.currency,
        "recurring": metered,
        "nickname": "Pro tool calls",
        "metadata": {"mqp_plan": spec.pro_plan},
    }
    if spec.graduated and included:
        # Included units cost nothing; every unit after them is billed (the guide's FAQ).
        overage.update(
            billing_scheme="tiered",
            tiers_mode="graduated",
            tiers=[
                {"up_to": included, "unit_amount": 0},
                {"up_to": "inf", "unit_amount_decimal": str(spec.overage_cents_per_unit)},
            ],
        )
    else:
        overage["unit_amount_decimal"] = str(spec.overage_cents_per_unit)
    result.prices[LOOKUP_PRO_OVERAGE] = await _price(client, LOOKUP_PRO_OVERAGE, overage, result)
    if billing.token_meter_event_name:
        result.prices[LOOKUP_TOKENS] = await _price(
            client,
            LOOKUP_TOKENS,
            {
                "product": product,
                "currency": spec.currency,
                "recurring": {
                    **monthly,
                    "usage_type": "metered",
                    "meter": result.meters[billing.token_meter_event_name],
                },
                "unit_amount_decimal": str(spec.token_cents_per_unit),
                "nickname": "LLM tokens",
                "metadata": {"mqp_plan": spec.pro_plan},
            },
            result,
        )
    return result


def config_block(config: Config, result: SetupResult) -> str:
    """The YAML to paste into config.yaml."""
    b = config.billing
    lines = [
        "billing:",
        "  enabled: true",
        f"  meter_event_name: {b.meter_event_name}  # meter {result.meters[b.meter_event_name]}",
    ]
    if b.token_meter_event_name:
        lines += [
            f"  token_meter_event_name: {b.token_meter_event_name}  "
            f"# meter {result.meters[b.token_meter_event_name]}",
            f"  token_meta_key: {b.token_meta_key}",
        ]
    lines.append("# prices (lookup key: id), for Checkout and plan mapping:")
    lines += [f"#   {key}: {pid}" for key, pid in result.prices.items()]
    return "\n".join(lines)
