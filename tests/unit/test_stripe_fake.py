"""The strict Stripe fake, driven only through the official SDK's async methods.

Each rule the billing code relies on is asserted twice: the happy path, and the rejection
(exception class, status and message) the SDK raises when the rule is broken.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, cast

import aiohttp
import pytest
import stripe

from tests.fakes.formdecode import FormError, as_list, decode_form, parse_pairs, unknown_keys
from tests.fakes.stripe_fake import (
    DAY,
    Fault,
    StripeFake,
    add_interval,
    run_stripe_fake,
)

DAY0 = 1_800_000_000 // DAY * DAY  # 2027-01-15T00:00:00Z
T0 = DAY0 + 10 * 3600 + 30 * 60  # 10:30 UTC that day
EVENT = "mcp_tool_call"
KEY = "sk_test_fake_0123456789"


class Clock:
    def __init__(self, start: float) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
async def fake(clock: Clock) -> AsyncIterator[StripeFake]:
    async with run_stripe_fake(now=clock) as running:
        yield running
        assert running.internal_errors == []


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def make_client(
    fake: StripeFake,
    http: aiohttp.ClientSession,
    *,
    key: str = KEY,
    retries: int = 0,
    timeout: float = 80,
) -> stripe.StripeClient:
    return stripe.StripeClient(
        key,
        base_addresses={"api": fake.url, "meter_events": fake.url},
        http_client=stripe.AIOHTTPClient(session=http, timeout=timeout),
        max_network_retries=retries,
    )


@pytest.fixture
def client(fake: StripeFake, http: aiohttp.ClientSession) -> stripe.StripeClient:
    return make_client(fake, http)


async def new_meter(
    client: stripe.StripeClient, event_name: str = EVENT, formula: str = "sum"
) -> stripe.billing.Meter:
    return await client.v1.billing.meters.create_async(
        {
            "display_name": f"{event_name} meter",
            "event_name": event_name,
            "default_aggregation": {"formula": formula},
        }
    )


async def new_customer(client: stripe.StripeClient, email: str = "a@example.com") -> str:
    return (await client.v1.customers.create_async({"email": email})).id


async def send(
    client: stripe.StripeClient,
    customer: str,
    value: str = "1",
    identifier: str | None = None,
    *,
    timestamp: int | None = None,
    event_name: str = EVENT,
) -> stripe.billing.MeterEvent:
    params: dict[str, Any] = {
        "event_name": event_name,
        "payload": {"stripe_customer_id": customer, "value": value},
    }
    if identifier is not None:
        params["identifier"] = identifier
    if timestamp is not None:
        params["timestamp"] = timestamp
    return await client.v1.billing.meter_events.create_async(cast(Any, params))


@pytest.fixture
async def metered(client: stripe.StripeClient) -> tuple[str, str]:
    """A sum meter for EVENT and a customer: (meter id, customer id)."""
    meter = await new_meter(client)
    return meter.id, await new_customer(client)


# ---- form decoding ---------------------------------------------------------------------------


def test_form_decoder_nests_brackets_and_arrays() -> None:
    pairs = parse_pairs(
        "event_name=x&payload[stripe_customer_id]=cus_1&payload[value]=3"
        "&items[0][price]=p1&items[1][price]=p2&items[1][quantity]=2&keys[]=a&keys[]=b"
        "&metadata[0]=zero&note=a+b%21"
    )
    form = decode_form(pairs)
    assert form["payload"] == {"stripe_customer_id": "cus_1", "value": "3"}
    assert as_list(form["items"], "items") == [{"price": "p1"}, {"price": "p2", "quantity": "2"}]
    assert as_list(form["keys"], "keys") == ["a", "b"]
    assert form["metadata"] == {"0": "zero"}  # a metadata key that looks like an index stays
    assert form["note"] == "a b!"


@pytest.mark.parametrize(
    "raw",
    ["a=1&a=2", "a=1&a[b]=2", "a[b]=2&a=1", "a]b=1", "a[b=1", "novalue"],
)
def test_form_decoder_rejects_ambiguous_input(raw: str) -> None:
    with pytest.raises(FormError):
        decode_form(parse_pairs(raw))


def test_form_arrays_must_be_contiguous_and_patterns_match() -> None:
    with pytest.raises(FormError):
        as_list({"0": "a", "2": "b"}, "x")
    with pytest.raises(FormError):
        as_list({"a": "b"}, "x")
    patterns = ("items[#][price]", "metadata[*]", "expand[#]")
    keys = ["items[0][price]", "items[][price]", "metadata[any]", "items[x][price]", "expand[0]"]
    assert unknown_keys(keys, patterns) == ["items[x][price]"]


def test_add_interval_uses_calendar_months() -> None:
    jan31 = int(datetime(2027, 1, 31, 12, tzinfo=UTC).timestamp())
    assert add_interval(jan31, "month", 1) == int(datetime(2027, 2, 28, 12, tzinfo=UTC).timestamp())
    assert add_interval(jan31, "year", 1) == int(datetime(2028, 1, 31, 12, tzinfo=UTC).timestamp())
    assert add_interval(jan31, "week", 2) == jan31 + 14 * DAY


# ---- authentication, versions, routing ---------------------------------------------------------


async def test_test_mode_secret_key_is_accepted_and_calls_are_recorded(
    client: stripe.StripeClient, fake: StripeFake
) -> None:
    customer = await client.v1.customers.create_async({"email": "x@example.com"})
    assert customer.object == "customer"
    assert customer.livemode is False
    assert customer.created == T0
    assert fake.calls == [("POST", "/v1/customers")]


@pytest.mark.parametrize("key", ["sk_live_0123456789abcdef", "pk_test_0123456789", "nonsense"])
async def test_invalid_api_keys_are_401(
    fake: StripeFake, http: aiohttp.ClientSession, key: str
) -> None:
    client = make_client(fake, http, key=key)
    with pytest.raises(stripe.AuthenticationError) as exc:
        await client.v1.customers.list_async()
    assert exc.value.http_status == 401
    assert (exc.value.user_message or "").startswith("Invalid API Key provided: ")
    assert key not in str(exc.value.user_message)  # masked


async def test_missing_authorization_is_401(client: stripe.StripeClient) -> None:
    with pytest.raises(stripe.AuthenticationError) as exc:
        await client.v1.customers.list_async(options={"headers": {"Authorization": ""}})
    assert "You did not provide an API key" in str(exc.value.user_message)


async def test_basic_auth_with_the_key_as_user_is_accepted(client: stripe.StripeClient) -> None:
    basic = base64.b64encode(f"{KEY}:".encode()).decode()
    page = await client.v1.customers.list_async(
        options={"headers": {"Authorization": f"Basic {basic}"}}
    )
    assert page.data == []


async def test_a_fixed_api_key_rejects_other_test_keys(http: aiohttp.ClientSession) -> None:
    async with run_stripe_fake(api_key="sk_test_expected") as fake:
        with pytest.raises(stripe.AuthenticationError):
            await make_client(fake, http, key="sk_test_other").v1.customers.list_async()
        await make_client(fake, http, key="sk_test_expected").v1.customers.list_async()


async def test_invalid_stripe_version_is_rejected(client: stripe.StripeClient) -> None:
    with pytest.raises(stripe.InvalidRequestError, match="Invalid Stripe API version"):
        await client.v1.customers.list_async(options={"stripe_version": "banana"})


async def test_unknown_route_is_404(client: stripe.StripeClient) -> None:
    with pytest.raises(stripe.InvalidRequestError) as exc:
        await client.raw_request_async("get", "/v1/usage_records")
    assert exc.value.http_status == 404
    assert str(exc.value.user_message).startswith(
        "Unrecognized request URL (GET: /v1/usage_records)"
    )


async def test_unknown_parameters_are_rejected(client: stripe.StripeClient) -> None:
    with pytest.raises(stripe.InvalidRequestError) as exc:
        await client.v1.customers.create_async(cast(Any, {"email": "a@b.c", "nickname": "x"}))
    assert exc.value.user_message == "Received unknown parameter: nickname"
    assert exc.value.param == "nickname"
    assert exc.value.code == "parameter_unknown"


async def test_expand_is_refused_where_the_fake_cannot_expand(client: stripe.StripeClient) -> None:
    customer = await new_customer(client)
    with pytest.raises(stripe.InvalidRequestError, match="cannot expand"):
        await client.v1.customers.retrieve_async(customer, {"expand": ["subscriptions"]})


# ---- idempotency -------------------------------------------------------------------------------


async def test_idempotency_key_replays_the_first_response(
    client: stripe.StripeClient, fake: StripeFake
) -> None:
    first = await client.v1.customers.create_async(
        {"email": "i@example.com"}, {"idempotency_key": "key-1"}
    )
    again = await client.v1.customers.create_async(
        {"email": "i@example.com"}, {"idempotency_key": "key-1"}
    )
    assert again.id == first.id
    assert len(fake.customers) == 1
    assert first.last_response is not None and again.last_response is not None
    assert "Idempotent-Replayed" not in first.last_response.headers
    assert again.last_response.headers["Idempotent-Replayed"] == "true"
    assert again.last_response.idempotency_key == "key-1"


async def test_idempotency_key_with_other_params_is_an_idempotency_error(
    client: stripe.StripeClient,
) -> None:
    await client.v1.customers.create_async({"email": "a@example.com"}, {"idempotency_key": "k"})
    with pytest.raises(stripe.IdempotencyError) as exc:
        await client.v1.customers.create_async({"email": "b@example.com"}, {"idempotency_key": "k"})
    assert exc.value.http_status == 400
    assert "same parameters" in str(exc.value.user_message)


async def test_failed_requests_are_not_saved_under_their_idempotency_key(
    client: stripe.StripeClient, metered: tuple[str, str]
) -> None:
    _, customer = metered
    params: Any = {"event_name": EVENT, "payload": {"stripe_customer_id": customer, "value": "x"}}
    with pytest.raises(stripe.InvalidRequestError):
        await client.v1.billing.meter_events.create_async(params, {"idempotency_key": "k"})
    params["payload"]["value"] = "4"
    event = await client.v1.billing.meter_events.create_async(params, {"idempotency_key": "k"})
    assert event.payload["value"] == "4"


async def test_concurrent_reuse_of_an_idempotency_key_is_409(
    client: stripe.StripeClient, fake: StripeFake, metered: tuple[str, str]
) -> None:
    _, customer = metered
    fake.meter_event_delay = 0.2
    params: Any = {"event_name": EVENT, "payload": {"stripe_customer_id": customer, "value": "1"}}
    results = await asyncio.gather(
        client.v1.billing.meter_events.create_async(params, {"idempotency_key": "same"}),
        client.v1.billing.meter_events.create_async(params, {"idempotency_key": "same"}),
        return_exceptions=True,
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1
    # A 409 is not in the SDK's 400/404 branch, so an idempotency_error 409 is an APIError.
    assert type(errors[0]) is stripe.APIError
    assert errors[0].http_status == 409
    assert fake.total() == 1


# ---- customers and products --------------------------------------------------------------------


async def test_customers_create_retrieve_update_list_delete(
    client: stripe.StripeClient, fake: StripeFake
) -> None:
    created = await client.v1.customers.create_async(
        {"email": "c@example.com", "name": "C", "metadata": {"tenant": "t1", "plan": "free"}}
    )
    assert created.id.startswith("cus_")
    fetched = await client.v1.customers.retrieve_async(created.id)
    assert (fetched.email, fetched.name) == ("c@example.com", "C")
    updated = await client.v1.customers.update_async(
        created.id, {"metadata": {"plan": "", "tier": "pro"}, "name": "C2"}
    )
    assert updated.metadata is not None
    assert updated.metadata.to_dict() == {"tenant": "t1", "tier": "pro"}
    assert updated.name == "C2"
    await new_customer(client, "other@example.com")
    found = await client.v1.customers.list_async({"email": "c@example.com"})
    assert [c.id for c in found.data] == [created.id]
    deleted = await client.v1.customers.delete_async(created.id)
    assert deleted.deleted is True
    again = await client.v1.customers.retrieve_async(created.id)
    assert again.deleted is True
    assert created.id not in [c.id for c in (await client.v1.customers.list_async()).data]
    assert fake.customers[created.id]["email"] == "c@example.com"


async def test_missing_customer_is_404(client: stripe.StripeClient) -> None:
    with pytest.raises(stripe.InvalidRequestError) as exc:
        await client.v1.customers.retrieve_async("cus_missing")
    assert exc.value.http_status == 404
    assert exc.value.user_message == "No such customer: 'cus_missing'"
    assert exc.value.code == "resource_missing"


async def test_lists_paginate_newest_first_and_auto_paginate(client: stripe.StripeClient) -> None:
    ids = [await new_customer(client, f"p{i}@example.com") for i in range(5)]
    first = await client.v1.customers.list_async({"limit": 2})
    assert [c.id for c in first.data] == ids[::-1][:2]
    assert first.has_more is True
    assert first.url == "/v1/customers"
    seen = [c.id async for c in first.auto_paging_iter()]
    assert seen == ids[::-1]
    with pytest.raises(stripe.InvalidRequestError):
        await client.v1.customers.list_async({"limit": 101})


async def test_products_create_with_id_retrieve_list(client: stripe.StripeClient) -> None:
    product = await client.v1.products.create_async(
        {"name": "MCP calls", "id": "prod_mcp", "metadata": {"k": "v"}}
    )
    assert (product.id, product.name, product.active) == ("prod_mcp", "MCP calls", True)
    assert (await client.v1.products.retrieve_async("prod_mcp")).name == "MCP calls"
    assert [p.id for p in (await client.v1.products.list_async()).data] == ["prod_mcp"]
    with pytest.raises(stripe.InvalidRequestError) as exc:
        await client.v1.products.create_async({"name": "again", "id": "prod_mcp"})
    assert exc.value.code == "resource_already_exists"
    with pytest.raises(stripe.InvalidRequestError) as missing:
        await client.v1.products.create_async(cast(Any, {"id": "prod_x"}))
    assert missing.value.user_message == "Missing required param: name."


# ---- meters --------------------------------------------------------------------------------------


async def test_meter_defaults_list_deactivate_reactivate(client: stripe.StripeClient) -> None:
    meter = await new_meter(client)
    assert meter.id.startswith("mtr_")
    assert meter.object == "billing.meter"
    assert meter.status == "active"
    assert meter.customer_mapping.type == "by_id"
    assert meter.customer_mapping.event_payload_key == "stripe_customer_id"
    assert meter.value_settings.event_payload_key == "value"
    assert meter.default_aggregation.formula == "sum"
    other = await new_meter(client, "other_event", "count")
    off = await client.v1.billing.meters.deactivate_async(other.id)
    assert off.status == "inactive"
    assert off.status_transitions.deactivated_at == T0
    active = await client.v1.billing.meters.list_async({"status": "active"})
    assert [m.id for m in active.data] == [meter.id]
    on = await client.v1.billing.meters.reactivate_async(other.id)
    assert on.status == "active"
    assert (await client.v1.billing.meters.retrieve_async(meter.id)).event_name == EVENT


async def test_meter_event_name_must_be_unique(client: stripe.StripeClient) -> None:
    await new_meter(client)
    with pytest.raises(stripe.InvalidRequestError) as exc:
        await new_meter(client)
    assert exc.value.param == "event_name"
    assert "already exists" in str(exc.value.user_message)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"event_name": "e", "default_aggregation": {"formula": "sum"}}, "display_name"),
        ({"display_name": "d", "default_aggregation": {"formula": "sum"}}, "event_name"),
        ({"display_name": "d", "event_name": "e"}, "default_aggregation"),
        (
            {"display_name": "d", "event_name": "e", "default_aggregation": {"formula": "max"}},
            "Invalid default_aggregation[formula]",
        ),
        (
            {
                "display_name": "d",
                "event_name": "e",
                "default_aggregation": {"formula": "sum"},
                "customer_mapping": {"type": "by_id"},
            },
            "customer_mapping[event_payload_key]",
        ),
    ],
)
async def test_meter_create_rejections(
    client: stripe.StripeClient, params: dict[str, Any], message: str
) -> None:
    with pytest.raises(stripe.InvalidRequestError, match=r"(?i)" + message.replace("[", r"\[")):
        await client.v1.billing.meters.create_async(cast(Any, params))


async def test_missing_meter_is_404(client: stripe.StripeClient) -> None:
    with pytest.raises(stripe.InvalidRequestError) as exc:
        await client.v1.billing.meters.retrieve_async("mtr_missing")
    assert exc.value.http_status == 404


# ---- prices --------------------------------------------------------------------------------------


async def test_licensed_and_metered_prices_and_lookup_keys(client: stripe.StripeClient) -> None:
    meter = await new_meter(client)
    product = await client.v1.products.create_async({"name": "Pro"})
    flat = await client.v1.prices.create_async(
        {
            "currency": "usd",
            "product": product.id,
            "unit_amount": 2900,
            "recurring": {"interval": "month"},
            "lookup_key": "pro_flat",
        }
    )
    assert (flat.type, flat.unit_amount, flat.unit_amount_decimal) == (
        "recurring",
        2900,
        Decimal("2900"),
    )
    assert flat.recurring is not None
    assert (flat.recurring.usage_type, flat.recurring.meter) == ("licensed", None)
    usage = await client.v1.prices.create_async(
        {
            "currency": "usd",
            "product": product.id,
            "unit_amount_decimal": Decimal("0.5"),
            "recurring": {"interval": "month", "usage_type": "metered", "meter": meter.id},
            "lookup_key": "pro_usage",
            "nickname": "per call",
        }
    )
    assert usage.recurring is not None
    assert (usage.recurring.usage_type, usage.recurring.meter) == ("metered", meter.id)
    assert (usage.unit_amount, usage.unit_amount_decimal) == (None, Decimal("0.5"))
    found = await client.v1.prices.list_async({"lookup_keys": ["pro_usage", "pro_flat", "none"]})
    assert {p.id for p in found.data} == {flat.id, usage.id}
    only_metered = await client.v1.prices.list_async({"recurring": {"usage_type": "metered"}})
    assert [p.id for p in only_metered.data] == [usage.id]
    assert (await client.v1.prices.retrieve_async(usage.id)).nickname == "per call"


async def test_lookup_key_is_unique_unless_transferred(client: stripe.StripeClient) -> None:
    product = await client.v1.products.create_async({"name": "P"})
    params: Any = {"currency": "usd", "product": product.id, "unit_amount": 1, "lookup_key": "k"}
    old = await client.v1.prices.create_async(params)
    with pytest.raises(stripe.InvalidRequestError) as exc:
        await client.v1.prices.create_async(params)
    assert exc.value.param == "lookup_key"
    assert old.id in str(exc.value.user_message)
    new = await client.v1.prices.create_async(cast(Any, {**params, "transfer_lookup_key": True}))
    assert (await client.v1.prices.retrieve_async(old.id)).lookup_key is None
    found = await client.v1.prices.list_async({"lookup_keys": ["k"]})
    assert [p.id for p in found.data] == [new.id]


async def test_metered_price_requires_an_existing_active_meter(
    client: stripe.StripeClient,
) -> None:
    product = await client.v1.products.create_async({"name": "P"})
    base: Any = {"currency": "usd", "product": product.id, "unit_amount": 1}
    with pytest.raises(stripe.InvalidRequestError) as exc:
        await client.v1.prices.create_async(
            cast(Any, {**base, "recurring": {"interval": "month", "usage_type": "metered"}})
        )
    assert exc.value.http_status == 400
    assert exc.value.param == "recurring[meter]"
    with pytest.raises(stripe.InvalidRequestError) as missing:
        await client.v1.prices.create_async(
            cast(
                Any,
                {
                    **base,
                    "recurring": {"interval": "month", "usage_type": "metered", "meter": "mtr_x"},
                },
            )
        )
    assert missing.value.param == "recurring[meter]"
    assert missing.value.code == "resource_missing"
    meter = await new_meter(client)
    await client.v1.billing.meters.deactivate_async(meter.id)
    with pytest.raises(stripe.InvalidRequestError, match="inactive"):
        await client.v1.prices.create_async(
            cast(
                Any,
                {
                    **base,
                    "recurring": {"interval": "month", "usage_type": "metered", "meter": meter.id},
                },
            )
        )
    with pytest.raises(stripe.InvalidRequestError) as licensed:
        await client.v1.prices.create_async(
            cast(Any, {**base, "recurring": {"interval": "month", "meter": meter.id}})
        )
    assert licensed.value.param == "recurring[meter]"
    with pytest.raises(stripe.InvalidRequestError) as removed:
        await client.v1.prices.create_async(
            cast(Any, {**base, "recurring": {"interval": "month", "aggregate_usage": "sum"}})
        )
    assert removed.value.user_message == "Received unknown parameter: recurring[aggregate_usage]"


async def test_tiered_price_and_expandable_tiers(client: stripe.StripeClient) -> None:
    meter = await new_meter(client)
    product = await client.v1.products.create_async({"name": "P"})
    price = await client.v1.prices.create_async(
        {
            "currency": "usd",
            "product": product.id,
            "billing_scheme": "tiered",
            "tiers_mode": "graduated",
            "tiers": [
                {"up_to": 1000, "unit_amount": 0},
                {"up_to": "inf", "unit_amount_decimal": Decimal("0.2")},
            ],
            "recurring": {"interval": "month", "usage_type": "metered", "meter": meter.id},
        }
    )
    assert (price.billing_scheme, price.tiers_mode, price.unit_amount) == (
        "tiered",
        "graduated",
        None,
    )
    assert "tiers" not in price  # Stripe includes tiers only when expanded
    expanded = await client.v1.prices.retrieve_async(price.id, {"expand": ["tiers"]})
    assert expanded.tiers is not None
    assert [(t.up_to, t.unit_amount_decimal) for t in expanded.tiers] == [
        (1000, Decimal("0")),
        (None, Decimal("0.2")),
    ]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({}, "unit_amount"),
        ({"unit_amount": 1, "unit_amount_decimal": Decimal("1")}, "unit_amount"),
        ({"unit_amount": -1}, "unit_amount"),
        ({"billing_scheme": "tiered", "tiers": [{"up_to": "inf", "unit_amount": 1}]}, "tiers_mode"),
        (
            {
                "billing_scheme": "tiered",
                "tiers_mode": "volume",
                "tiers": [{"up_to": 10, "unit_amount": 1}],
            },
            "tiers[0][up_to]",
        ),
        ({"unit_amount": 1, "recurring": {"interval": "fortnight"}}, "recurring[interval]"),
        ({"unit_amount": 1, "currency": "dollars"}, "currency"),
        ({"unit_amount": 1, "product": "prod_missing"}, "product"),
    ],
)
async def test_price_create_rejections(
    client: stripe.StripeClient, extra: dict[str, Any], param: str
) -> None:
    product = await client.v1.products.create_async({"name": "P"})
    params = {"currency": "usd", "product": product.id, "recurring": {"interval": "month"}, **extra}
    with pytest.raises(stripe.InvalidRequestError) as exc:
        await client.v1.prices.create_async(cast(Any, params))
    assert exc.value.http_status == 400
    assert exc.value.param == param


# ---- meter events --------------------------------------------------------------------------------


async def test_meter_event_is_accepted_recorded_and_echoed(
    client: stripe.StripeClient, fake: StripeFake, metered: tuple[str, str]
) -> None:
    meter_id, customer = metered
    event = await send(client, customer, "3", "evt-1", timestamp=T0 - 60)
    assert event.object == "billing.meter_event"
    assert (event.event_name, event.identifier, event.timestamp) == (EVENT, "evt-1", T0 - 60)
    assert event.created == T0
    assert event.livemode is False
    assert event.payload.to_dict() == {"stripe_customer_id": customer, "value": "3"}
    generated = await send(client, customer, "-3")  # negative whole numbers are allowed
    assert generated.identifier and generated.identifier != "evt-1"
    assert generated.timestamp == T0  # defaults to the fake's clock
    assert fake.identifiers() == ["evt-1", generated.identifier]
    assert fake.total() == 0
    assert fake.total(customer=customer, event_name=EVENT) == 0
    accepted = fake.meter_events[0]
    assert (accepted.customer, accepted.value, accepted.meter) == (customer, 3, meter_id)


@pytest.mark.parametrize(
    ("payload", "code", "fragment"),
    [
        ({"value": "1"}, "meter_event_no_customer_defined", "stripe_customer_id"),
        ({"stripe_customer_id": "cus_nobody", "value": "1"}, "meter_event_customer_not_found", ""),
        ({"stripe_customer_id": "@", "value": "1.5"}, "meter_event_invalid_value", "whole numbers"),
        ({"stripe_customer_id": "@", "value": "abc"}, "meter_event_invalid_value", "whole"),
        ({"stripe_customer_id": "@", "value": ""}, "meter_event_invalid_value", "whole"),
        ({"stripe_customer_id": "@", "value": " 3"}, "meter_event_invalid_value", "whole"),
        ({"stripe_customer_id": "@", "value": "1e3"}, "meter_event_invalid_value", "whole"),
        ({"stripe_customer_id": "@"}, "meter_event_invalid_value", "no `value`"),
    ],
)
async def test_meter_event_payload_rejections(
    client: stripe.StripeClient,
    fake: StripeFake,
    metered: tuple[str, str],
    payload: dict[str, str],
    code: str,
    fragment: str,
) -> None:
    _, customer = metered
    payload = {k: customer if v == "@" else v for k, v in payload.items()}
    with pytest.raises(stripe.InvalidRequestError) as exc:
        await client.v1.billing.meter_events.create_async(
            {"event_name": EVENT, "payload": payload, "identifier": "bad-1"}
        )
    assert exc.value.http_status == 400
    assert exc.value.code == code
    assert fragment in str(exc.value.user_message)
    assert fake.meter_events == []
    # A rejected event does not burn its identifier.
    await send(client, customer, "1", "bad-1")


async def test_meter_event_needs_an_active_meter(
    client: stripe.StripeClient, metered: tuple[str, str]
) -> None:
    meter_id, customer = metered
    with pytest.raises(stripe.InvalidRequestError) as exc:
        await send(client, customer, event_name="unknown_event")
    assert exc.value.code == "no_meter"
    await client.v1.billing.meters.deactivate_async(meter_id)
    with pytest.raises(stripe.InvalidRequestError) as inactive:
        await send(client, customer)
    assert inactive.value.code == "archived_meter"
    await client.v1.billing.meters.reactivate_async(meter_id)
    await send(client, customer)


async def test_meter_event_for_a_deleted_customer_is_rejected(
    client: stripe.StripeClient, metered: tuple[str, str]
) -> None:
    _, customer = metered
    await client.v1.customers.delete_async(customer)
    with pytest.raises(stripe.InvalidRequestError) as exc:
        await send(client, customer)
    assert exc.value.code == "meter_event_customer_not_found"


async def test_meter_event_uses_the_meters_payload_keys(
    client: stripe.StripeClient, fake: StripeFake
) -> None:
    await client.v1.billing.meters.create_async(
        {
            "display_name": "custom",
            "event_name": "custom_keys",
            "default_aggregation": {"formula": "sum"},
            "customer_mapping": {"type": "by_id", "event_payload_key": "tenant_customer"},
            "value_settings": {"event_payload_key": "units"},
        }
    )
    customer = await new_customer(client)
    with pytest.raises(stripe.InvalidRequestError) as exc:
        await send(client, customer, event_name="custom_keys")
    assert exc.value.param == "payload[tenant_customer]"
    await client.v1.billing.meter_events.create_async(
        {"event_name": "custom_keys", "payload": {"tenant_customer": customer, "units": "7"}}
    )
    assert fake.total(customer) == 7


async def test_meter_event_identifier_is_at_most_100_chars(
    client: stripe.StripeClient, metered: tuple[str, str]
) -> None:
    _, customer = metered
    await send(client, customer, identifier="x" * 100)
    with pytest.raises(stripe.InvalidRequestError) as exc:
        await send(client, customer, identifier="y" * 101)
    assert exc.value.param == "identifier"


@pytest.mark.parametrize(
    ("offset", "code"),
    [
        (-35 * DAY, None),
        (-35 * DAY - 1, "timestamp_too_far_in_past"),
        (300, None),
        (301, "timestamp_in_future"),
    ],
)
async def test_meter_event_timestamp_window(
    client: stripe.StripeClient, metered: tuple[str, str], offset: int, code: str | None
) -> None:
    _, customer = metered
    if code is None:
        event = await send(client, customer, timestamp=T0 + offset)
        assert event.timestamp == T0 + offset
        return
    with pytest.raises(stripe.InvalidRequestError) as exc:
        await send(client, customer, timestamp=T0 + offset)
    assert (exc.value.code, exc.value.param) == (code, "timestamp")


async def test_timestamp_window_follows_the_injected_clock(
    client: stripe.StripeClient, clock: Clock, metered: tuple[str, str]
) -> None:
    _, customer = metered
    clock.advance(40 * DAY)
    with pytest.raises(stripe.InvalidRequestError, match="35"):
        await send(client, customer, timestamp=T0)
    assert (await send(client, customer)).timestamp == T0 + 40 * DAY


async def test_duplicate_identifier_is_400_already_exists_do_not_retry(
    fake: StripeFake, http: aiohttp.ClientSession, metered: tuple[str, str]
) -> None:
    _, customer = metered
    client = make_client(fake, http, retries=2)
    await send(client, customer, "2", "batch-7")
    with pytest.raises(stripe.InvalidRequestError) as exc:
        await send(client, customer, "2", "batch-7")
    error = exc.value
    assert error.http_status == 400
    assert error.user_message == "An event already exists with identifier batch-7."
    assert "already exists" in str(error.user_message)
    assert error.code == "resource_already_exists"
    assert error.headers is not None
    assert error.headers.get("Stripe-Should-Retry") == "false"
    assert error.json_body == {
        "error": {
            "type": "invalid_request_error",
            "message": "An event already exists with identifier batch-7.",
            "code": "resource_already_exists",
        }
    }
    assert fake.total() == 2
    assert fake.calls.count(("POST", "/v1/billing/meter_events")) == 2  # no SDK retry


async def test_one_concurrent_call_per_customer_and_meter(
    fake: StripeFake, http: aiohttp.ClientSession, metered: tuple[str, str]
) -> None:
    _, customer = metered
    client = make_client(fake, http, retries=2)
    other = await new_customer(client, "b@example.com")
    fake.meter_event_delay = 0.2
    results = await asyncio.gather(
        send(client, customer, "1", "c-1"),
        send(client, customer, "1", "c-2"),
        send(client, other, "5", "o-1"),
        return_exceptions=True,
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1
    assert isinstance(errors[0], stripe.RateLimitError)
    assert errors[0].http_status == 429
    assert fake.total(customer) == 1
    assert fake.total(other) == 5
    assert fake.calls.count(("POST", "/v1/billing/meter_events")) == 3  # 429 is not retried
    fake.meter_event_delay = 0
    await send(client, customer, "1", "c-3")  # the slot is free again


async def test_different_meters_for_one_customer_may_overlap(
    client: stripe.StripeClient, fake: StripeFake, metered: tuple[str, str]
) -> None:
    _, customer = metered
    await new_meter(client, "second_event")
    fake.meter_event_delay = 0.1
    await asyncio.gather(
        send(client, customer, "1"), send(client, customer, "1", event_name="second_event")
    )
    assert fake.total(customer) == 2


async def test_meter_event_adjustment_cancels_within_24_hours(
    client: stripe.StripeClient, fake: StripeFake, clock: Clock, metered: tuple[str, str]
) -> None:
    meter_id, customer = metered
    await send(client, customer, "5", "keep")
    await send(client, customer, "7", "drop")
    adjustment = await client.v1.billing.meter_event_adjustments.create_async(
        {"event_name": EVENT, "type": "cancel", "cancel": {"identifier": "drop"}}
    )
    assert adjustment.object == "billing.meter_event_adjustment"
    assert (adjustment.status, adjustment.type) == ("pending", "cancel")
    assert adjustment.cancel is not None and adjustment.cancel.identifier == "drop"
    assert fake.total(customer) == 5
    summaries = await client.v1.billing.meters.event_summaries.list_async(
        meter_id, {"customer": customer, "start_time": DAY0, "end_time": DAY0 + DAY}
    )
    assert [s.aggregated_value for s in summaries.data] == [5]
    with pytest.raises(stripe.InvalidRequestError, match="already been cancelled"):
        await client.v1.billing.meter_event_adjustments.create_async(
            {"event_name": EVENT, "type": "cancel", "cancel": {"identifier": "drop"}}
        )
    with pytest.raises(stripe.InvalidRequestError) as duplicate:
        await send(client, customer, "7", "drop")  # a cancelled identifier stays taken
    assert duplicate.value.code == "resource_already_exists"
    with pytest.raises(stripe.InvalidRequestError, match="No meter event"):
        await client.v1.billing.meter_event_adjustments.create_async(
            {"event_name": EVENT, "type": "cancel", "cancel": {"identifier": "nope"}}
        )
    with pytest.raises(stripe.InvalidRequestError) as wrong_name:
        await client.v1.billing.meter_event_adjustments.create_async(
            {"event_name": "other", "type": "cancel", "cancel": {"identifier": "keep"}}
        )
    assert wrong_name.value.param == "event_name"
    clock.advance(DAY + 1)
    with pytest.raises(stripe.InvalidRequestError, match="24 hours"):
        await client.v1.billing.meter_event_adjustments.create_async(
            {"event_name": EVENT, "type": "cancel", "cancel": {"identifier": "keep"}}
        )
    with pytest.raises(stripe.InvalidRequestError, match=r"Missing required param: cancel\."):
        await client.v1.billing.meter_event_adjustments.create_async(
            {"event_name": EVENT, "type": "cancel"}
        )
    with pytest.raises(stripe.InvalidRequestError) as no_identifier:
        await client.v1.billing.meter_event_adjustments.create_async(
            cast(Any, {"event_name": EVENT, "type": "cancel", "cancel": {"x": "y"}})
        )
    assert no_identifier.value.param == "cancel[x]"


# ---- event summaries -----------------------------------------------------------------------------


async def test_event_summaries_sum_in_one_window_and_by_hour_and_day(
    client: stripe.StripeClient, metered: tuple[str, str]
) -> None:
    meter_id, customer = metered
    other = await new_customer(client, "z@example.com")
    await send(client, customer, "2", timestamp=T0 - 3600)  # 09:30
    await send(client, customer, "3", timestamp=T0 - 60)  # 10:29
    await send(client, customer, "5", timestamp=T0)  # 10:30
    await send(client, other, "100", timestamp=T0)
    service = client.v1.billing.meters.event_summaries
    whole = await service.list_async(
        meter_id, {"customer": customer, "start_time": DAY0, "end_time": DAY0 + DAY}
    )
    assert len(whole.data) == 1
    summary = whole.data[0]
    assert summary.object == "billing.meter_event_summary"
    assert (summary.aggregated_value, summary.meter) == (10, meter_id)
    assert (summary.start_time, summary.end_time) == (DAY0, DAY0 + DAY)
    assert summary.id.startswith("mtrusg_")
    hourly = await service.list_async(
        meter_id,
        {
            "customer": customer,
            "start_time": DAY0 + 9 * 3600,
            "end_time": DAY0 + 11 * 3600,
            "value_grouping_window": "hour",
        },
    )
    assert [(s.start_time, s.aggregated_value) for s in hourly.data] == [
        (DAY0 + 9 * 3600, 2),
        (DAY0 + 10 * 3600, 8),
    ]
    # Half-open windows: start inclusive, end exclusive.
    before = await service.list_async(
        meter_id, {"customer": customer, "start_time": DAY0, "end_time": T0}
    )
    assert before.data[0].aggregated_value == 5
    full_day = await service.list_async(
        meter_id,
        {
            "customer": customer,
            "start_time": DAY0,
            "end_time": DAY0 + DAY,
            "value_grouping_window": "hour",
        },
    )
    assert len(full_day.data) == 10 and full_day.has_more is True
    every = [s async for s in full_day.auto_paging_iter()]
    assert len(every) == 24
    assert sum(s.aggregated_value for s in every) == 10
    daily = await service.list_async(
        meter_id,
        {
            "customer": customer,
            "start_time": DAY0 - DAY,
            "end_time": DAY0 + DAY,
            "value_grouping_window": "day",
        },
    )
    assert [s.aggregated_value for s in daily.data] == [0, 10]


async def test_event_summaries_count_and_last(client: stripe.StripeClient) -> None:
    counter = await new_meter(client, "counted", "count")
    latest = await new_meter(client, "latest", "last")
    customer = await new_customer(client)
    for value, ts in (("4", T0 - 120), ("7", T0 - 60), ("1", T0 - 180)):
        await send(client, customer, value, timestamp=ts, event_name="counted")
        await send(client, customer, value, timestamp=ts, event_name="latest")
    window = {"customer": customer, "start_time": DAY0, "end_time": DAY0 + DAY}
    service = client.v1.billing.meters.event_summaries
    counted = await service.list_async(counter.id, cast(Any, window))
    assert counted.data[0].aggregated_value == 3
    last = await service.list_async(latest.id, cast(Any, window))
    assert last.data[0].aggregated_value == 7  # newest by timestamp, not by arrival


@pytest.mark.parametrize(
    ("window", "message"),
    [
        ({"start_time": DAY0 + 30, "end_time": DAY0 + DAY}, "minute boundaries"),
        ({"start_time": DAY0, "end_time": DAY0 + 90}, "minute boundaries"),
        ({"start_time": DAY0 + DAY, "end_time": DAY0}, "before end_time"),
        ({"start_time": DAY0, "end_time": DAY0}, "before end_time"),
        (
            {"start_time": DAY0 + 60, "end_time": DAY0 + DAY, "value_grouping_window": "hour"},
            "hour boundaries",
        ),
        (
            {"start_time": DAY0 + 3600, "end_time": DAY0 + DAY, "value_grouping_window": "day"},
            "day boundaries",
        ),
        (
            {"start_time": DAY0, "end_time": DAY0 + DAY, "value_grouping_window": "week"},
            "Invalid value_grouping_window",
        ),
        ({"end_time": DAY0 + DAY}, "Missing required param: start_time"),
    ],
)
async def test_event_summaries_rejections(
    client: stripe.StripeClient, metered: tuple[str, str], window: dict[str, Any], message: str
) -> None:
    meter_id, customer = metered
    with pytest.raises(stripe.InvalidRequestError, match=message):
        await client.v1.billing.meters.event_summaries.list_async(
            meter_id, cast(Any, {"customer": customer, **window})
        )


async def test_event_summaries_need_a_known_meter_and_customer(
    client: stripe.StripeClient, metered: tuple[str, str]
) -> None:
    meter_id, customer = metered
    window: Any = {"start_time": DAY0, "end_time": DAY0 + DAY}
    service = client.v1.billing.meters.event_summaries
    with pytest.raises(stripe.InvalidRequestError) as missing:
        await service.list_async(meter_id, window)
    assert missing.value.user_message == "Missing required param: customer."
    with pytest.raises(stripe.InvalidRequestError) as nobody:
        await service.list_async(meter_id, cast(Any, {**window, "customer": "cus_nobody"}))
    assert nobody.value.param == "customer"
    with pytest.raises(stripe.InvalidRequestError) as no_meter:
        await service.list_async("mtr_nope", cast(Any, {**window, "customer": customer}))
    assert no_meter.value.http_status == 404


# ---- fault injection ----------------------------------------------------------------------------


async def test_accept_then_drop_records_the_event_but_the_sdk_sees_a_connection_error(
    client: stripe.StripeClient, fake: StripeFake, metered: tuple[str, str]
) -> None:
    _, customer = metered
    fault = fake.inject(Fault("POST /v1/billing/meter_events", "accept_then_drop"))
    with pytest.raises(stripe.APIConnectionError) as exc:
        await send(client, customer, "4", "lost-reply")
    assert isinstance(exc.value.__cause__, aiohttp.ServerDisconnectedError)
    assert fault.fired == 1
    assert fake.identifiers() == ["lost-reply"]
    assert fake.total(customer) == 4
    with pytest.raises(stripe.InvalidRequestError, match="already exists"):
        await send(client, customer, "4", "lost-reply")
    assert fake.total(customer) == 4


async def test_sdk_retry_after_accept_then_drop_gets_the_idempotent_replay(
    fake: StripeFake, http: aiohttp.ClientSession, metered: tuple[str, str]
) -> None:
    _, customer = metered
    client = make_client(fake, http, retries=1)
    fake.inject(Fault("POST /v1/billing/meter_events", "accept_then_drop"))
    event = await send(client, customer, "4", "once")
    assert event.identifier == "once"
    assert event.last_response is not None
    assert event.last_response.headers["Idempotent-Replayed"] == "true"
    assert fake.calls.count(("POST", "/v1/billing/meter_events")) == 2
    assert fake.total(customer) == 4


async def test_status_500_fault_is_an_api_error_and_processes_nothing(
    fake: StripeFake, http: aiohttp.ClientSession, metered: tuple[str, str]
) -> None:
    _, customer = metered
    client = make_client(fake, http)
    fake.inject(Fault("POST /v1/billing/meter_events", "status_500"))
    with pytest.raises(stripe.APIError) as exc:
        await send(client, customer, "1", "five-hundred")
    assert exc.value.http_status == 500
    assert exc.value.headers is not None
    assert "Stripe-Should-Retry" not in exc.value.headers
    assert exc.value.json_body is not None
    assert cast(Any, exc.value.json_body)["error"]["type"] == "api_error"
    assert fake.meter_events == []
    # With retries the SDK tries again (same idempotency key) and the next attempt succeeds.
    fake.inject(Fault("POST /v1/billing/meter_events", "status_500"))
    retried = make_client(fake, http, retries=1)
    await send(retried, customer, "1", "five-hundred")
    assert fake.identifiers() == ["five-hundred"]


async def test_status_429_fault_is_a_rate_limit_error(
    client: stripe.StripeClient, fake: StripeFake
) -> None:
    fake.inject(Fault("GET /v1/customers", "status_429", count=2))
    for _ in range(2):
        with pytest.raises(stripe.RateLimitError):
            await client.v1.customers.list_async()
    await client.v1.customers.list_async()


async def test_fault_after_lets_requests_through_first(
    client: stripe.StripeClient, fake: StripeFake, metered: tuple[str, str]
) -> None:
    _, customer = metered
    fault = fake.inject(Fault("POST /v1/billing/meter_events", "status_500", after=1))
    await send(client, customer, "1", "first")
    with pytest.raises(stripe.APIError):
        await send(client, customer, "1", "second")
    await send(client, customer, "1", "third")
    assert (fault.seen, fault.fired, fault.exhausted) == (2, 1, True)
    assert fake.identifiers() == ["first", "third"]


async def test_fault_routes_match_method_and_path_prefix(
    client: stripe.StripeClient, fake: StripeFake
) -> None:
    fake.inject(Fault("POST /v1/customers", "status_500", count=None))
    await client.v1.customers.list_async()  # GET passes
    with pytest.raises(stripe.APIError):
        await client.v1.customers.create_async({"email": "x@example.com"})
    fake.clear_faults()
    customer = await new_customer(client)
    fake.inject(Fault("/v1/customers/", "status_500"))  # any method
    with pytest.raises(stripe.APIError):
        await client.v1.customers.retrieve_async(customer)


async def test_timeout_fault_holds_then_drops(
    fake: StripeFake, http: aiohttp.ClientSession, metered: tuple[str, str]
) -> None:
    _, customer = metered
    fake.inject(Fault("POST /v1/billing/meter_events", "timeout", seconds=0.1))
    with pytest.raises(stripe.APIConnectionError) as dropped:
        await send(make_client(fake, http), customer)
    assert isinstance(dropped.value.__cause__, aiohttp.ServerDisconnectedError)
    fake.inject(Fault("POST /v1/billing/meter_events", "timeout", seconds=30))
    with pytest.raises(stripe.APIConnectionError) as timed_out:
        await send(make_client(fake, http, timeout=0.2), customer)
    assert isinstance(timed_out.value.__cause__, TimeoutError)
    assert fake.meter_events == []


async def test_drop_fault_and_down_mode_drop_connections(
    client: stripe.StripeClient, fake: StripeFake, metered: tuple[str, str]
) -> None:
    _, customer = metered
    fake.inject(Fault("POST /v1/billing/meter_events", "drop"))
    with pytest.raises(stripe.APIConnectionError):
        await send(client, customer, identifier="d-1")
    fake.set_down(True)
    assert fake.is_down
    with pytest.raises(stripe.APIConnectionError):
        await send(client, customer, identifier="d-1")
    with pytest.raises(stripe.APIConnectionError):
        await client.v1.customers.retrieve_async(customer)
    fake.up()
    assert not fake.is_down
    await send(client, customer, identifier="d-1")
    assert fake.identifiers() == ["d-1"]


async def test_stop_and_restart_on_the_same_port_keeps_state(
    client: stripe.StripeClient, fake: StripeFake, metered: tuple[str, str]
) -> None:
    _, customer = metered
    await send(client, customer, "2", "before")
    port = fake.port
    await fake.stop()
    with pytest.raises(stripe.APIConnectionError):
        await send(client, customer, "2", "while-down")
    await fake.start(port=port)
    with pytest.raises(stripe.InvalidRequestError, match="already exists"):
        await send(client, customer, "2", "before")
    await send(client, customer, "2", "after")
    assert fake.identifiers() == ["before", "after"]


async def test_lose_event_frees_the_identifier(
    client: stripe.StripeClient, fake: StripeFake, metered: tuple[str, str]
) -> None:
    meter_id, customer = metered
    await send(client, customer, "3", "a")
    await send(client, customer, "4", "b")
    lost = fake.lose_event("a")
    assert (lost.identifier, lost.value) == ("a", 3)
    assert fake.total(customer) == 4
    summaries = await client.v1.billing.meters.event_summaries.list_async(
        meter_id, {"customer": customer, "start_time": DAY0, "end_time": DAY0 + DAY}
    )
    assert summaries.data[0].aggregated_value == 4
    await send(client, customer, "3", "a")  # re-sent after the loss: accepted again
    assert fake.total(customer) == 7
    with pytest.raises(KeyError):
        fake.lose_event("never-sent")


# ---- subscriptions -------------------------------------------------------------------------------


async def plan_prices(client: stripe.StripeClient) -> tuple[str, str]:
    meter = await new_meter(client)
    product = await client.v1.products.create_async({"name": "Pro"})
    flat = await client.v1.prices.create_async(
        {
            "currency": "usd",
            "product": product.id,
            "unit_amount": 2900,
            "recurring": {"interval": "month"},
        }
    )
    usage = await client.v1.prices.create_async(
        {
            "currency": "usd",
            "product": product.id,
            "unit_amount": 1,
            "recurring": {"interval": "month", "usage_type": "metered", "meter": meter.id},
        }
    )
    return flat.id, usage.id


async def test_subscription_periods_live_on_items(client: stripe.StripeClient) -> None:
    flat, usage = await plan_prices(client)
    customer = await new_customer(client)
    sub = await client.v1.subscriptions.create_async(
        {
            "customer": customer,
            "items": [{"price": flat, "quantity": 2}, {"price": usage}],
            "metadata": {"tenant": "t1"},
        }
    )
    assert sub.id.startswith("sub_")
    assert (sub.status, sub.customer, sub.livemode) == ("active", customer, False)
    assert sub.metadata.to_dict() == {"tenant": "t1"}
    assert "current_period_start" not in sub and "current_period_end" not in sub
    month_later = int(datetime.fromtimestamp(T0, UTC).replace(month=2).timestamp())
    items = sub.items.data
    assert [(i.price.id, i.quantity) for i in items] == [(flat, 2), (usage, None)]
    for item in items:
        assert item.object == "subscription_item"
        assert (item.current_period_start, item.current_period_end) == (T0, month_later)
        assert item.subscription == sub.id
    assert items[1].plan.usage_type == "metered"
    fetched = await client.v1.subscriptions.retrieve_async(sub.id)
    assert fetched.status == "active"


async def test_trial_subscription_is_trialing_until_trial_end(
    client: stripe.StripeClient,
) -> None:
    _, usage = await plan_prices(client)
    customer = await new_customer(client)
    sub = await client.v1.subscriptions.create_async(
        {"customer": customer, "items": [{"price": usage}], "trial_period_days": 14}
    )
    assert (sub.status, sub.trial_start, sub.trial_end) == ("trialing", T0, T0 + 14 * DAY)
    assert sub.items.data[0].current_period_end == T0 + 14 * DAY


@pytest.mark.parametrize(
    ("items", "param", "fragment"),
    [
        ([{"price": "@usage", "quantity": 1}], "items[0][quantity]", "metered"),
        ([{"price": "@flat"}, {"price": "@usage", "quantity": 3}], "items[1][quantity]", "metered"),
        ([{"price": "price_missing"}], "items[0][price]", "No such price"),
        ([{"price": "@one_time"}], "items[0][price]", "type=recurring"),
        ([{"price": "@flat"}, {"price": "@flat"}], "items", "same price"),
        ([], "items", "Missing required param: items"),
    ],
)
async def test_subscription_create_rejections(
    client: stripe.StripeClient, items: list[dict[str, Any]], param: str, fragment: str
) -> None:
    flat, usage = await plan_prices(client)
    product = await client.v1.products.create_async({"name": "once"})
    one_time = await client.v1.prices.create_async(
        {"currency": "usd", "product": product.id, "unit_amount": 500}
    )
    names = {"@flat": flat, "@usage": usage, "@one_time": one_time.id}
    resolved = [{**i, "price": names.get(i["price"], i["price"])} for i in items]
    customer = await new_customer(client)
    with pytest.raises(stripe.InvalidRequestError) as exc:
        await client.v1.subscriptions.create_async(
            cast(Any, {"customer": customer, "items": resolved})
        )
    assert exc.value.http_status == 400
    assert exc.value.param == param
    assert fragment in str(exc.value.user_message)


async def test_subscription_needs_an_existing_customer(client: stripe.StripeClient) -> None:
    flat, _ = await plan_prices(client)
    with pytest.raises(stripe.InvalidRequestError) as exc:
        await client.v1.subscriptions.create_async(
            {"customer": "cus_nobody", "items": [{"price": flat}]}
        )
    assert (exc.value.http_status, exc.value.param) == (400, "customer")


async def test_subscription_update_cancel_and_list(client: stripe.StripeClient) -> None:
    flat, usage = await plan_prices(client)
    customer = await new_customer(client)
    sub = await client.v1.subscriptions.create_async(
        {"customer": customer, "items": [{"price": flat}]}
    )
    flat_item = sub.items.data[0].id
    updated = await client.v1.subscriptions.update_async(
        sub.id,
        {
            "items": [{"id": flat_item, "quantity": 3}, {"price": usage}],
            "metadata": {"plan": "pro"},
            "cancel_at_period_end": True,
        },
    )
    assert [(i.price.id, i.quantity) for i in updated.items.data] == [(flat, 3), (usage, None)]
    assert updated.metadata.to_dict() == {"plan": "pro"}
    assert updated.cancel_at_period_end is True
    assert updated.cancel_at == updated.items.data[0].current_period_end
    usage_item = updated.items.data[1].id
    with pytest.raises(stripe.InvalidRequestError, match="metered"):
        await client.v1.subscriptions.update_async(
            sub.id, {"items": [{"id": usage_item, "quantity": 2}]}
        )
    dropped = await client.v1.subscriptions.update_async(
        sub.id, {"items": [{"id": usage_item, "deleted": True}], "cancel_at_period_end": False}
    )
    assert [i.id for i in dropped.items.data] == [flat_item]
    assert dropped.cancel_at is None
    listed = await client.v1.subscriptions.list_async({"customer": customer})
    assert [s.id for s in listed.data] == [sub.id]
    canceled = await client.v1.subscriptions.cancel_async(sub.id)
    assert (canceled.status, canceled.canceled_at, canceled.ended_at) == ("canceled", T0, T0)
    assert (await client.v1.subscriptions.list_async({"customer": customer})).data == []
    every = await client.v1.subscriptions.list_async({"customer": customer, "status": "all"})
    assert [s.id for s in every.data] == [sub.id]
    with pytest.raises(stripe.InvalidRequestError, match="canceled subscription"):
        await client.v1.subscriptions.update_async(sub.id, {"items": [{"price": usage}]})
    after = await client.v1.subscriptions.update_async(sub.id, {"metadata": {"note": "gone"}})
    assert after.metadata.to_dict() == {"plan": "pro", "note": "gone"}
    with pytest.raises(stripe.InvalidRequestError) as missing:
        await client.v1.subscriptions.retrieve_async("sub_missing")
    assert missing.value.http_status == 404


# ---- billing portal and checkout ---------------------------------------------------------------


async def test_billing_portal_session(client: stripe.StripeClient, fake: StripeFake) -> None:
    customer = await new_customer(client)
    session = await client.v1.billing_portal.sessions.create_async(
        {"customer": customer, "return_url": "https://app.example.com/account"}
    )
    assert session.object == "billing_portal.session"
    assert session.url == f"https://billing.stripe.test/session/{session.id}"
    assert (session.customer, session.return_url) == (customer, "https://app.example.com/account")
    assert session.id in fake.portal_sessions
    with pytest.raises(stripe.InvalidRequestError, match="Missing required param: customer"):
        await client.v1.billing_portal.sessions.create_async({})
    with pytest.raises(stripe.InvalidRequestError, match="No such customer"):
        await client.v1.billing_portal.sessions.create_async({"customer": "cus_nobody"})
    with pytest.raises(stripe.InvalidRequestError, match="Not a valid URL"):
        await client.v1.billing_portal.sessions.create_async(
            {"customer": customer, "return_url": "not a url"}
        )


async def test_checkout_subscription_session_and_completion(
    client: stripe.StripeClient, fake: StripeFake
) -> None:
    flat, usage = await plan_prices(client)
    session = await client.v1.checkout.sessions.create_async(
        {
            "mode": "subscription",
            "line_items": [{"price": flat, "quantity": 1}, {"price": usage}],
            "success_url": "https://app.example.com/ok?session_id={CHECKOUT_SESSION_ID}",
            "cancel_url": "https://app.example.com/cancel",
            "customer_email": "new@example.com",
            "client_reference_id": "tenant-42",
            "subscription_data": {"metadata": {"tenant": "tenant-42"}},
        }
    )
    assert session.id.startswith("cs_test_")
    assert session.object == "checkout.session"
    assert session.url == f"https://checkout.stripe.test/c/pay/{session.id}"
    assert (session.mode, session.status, session.payment_status) == (
        "subscription",
        "open",
        "unpaid",
    )
    assert (session.client_reference_id, session.customer_email) == ("tenant-42", "new@example.com")
    assert session.amount_total == 2900
    completed = fake.complete_checkout(session.id)
    fetched = await client.v1.checkout.sessions.retrieve_async(session.id)
    assert (fetched.status, fetched.subscription) == ("complete", completed["subscription"])
    assert isinstance(fetched.subscription, str)
    sub = await client.v1.subscriptions.retrieve_async(fetched.subscription)
    assert sub.metadata.to_dict() == {"tenant": "tenant-42"}
    assert sub.customer == fetched.customer
    assert [i.price.id for i in sub.items.data] == [flat, usage]


@pytest.mark.parametrize(
    ("overrides", "param", "fragment"),
    [
        (
            {"line_items": [{"price": "@usage", "quantity": 1}]},
            "line_items[0][quantity]",
            "metered",
        ),
        ({"line_items": [{"price": "@flat"}]}, "line_items[0][quantity]", "Quantity is required"),
        ({"line_items": None}, "line_items", "Missing required param: line_items"),
        ({"line_items": [{"price": "price_x"}]}, "line_items[0][price]", "No such price"),
        ({"success_url": None}, "success_url", "Missing required param: success_url"),
        ({"success_url": "ok"}, "success_url", "Not a valid URL"),
        ({"customer": "cus_nobody"}, "customer", "No such customer"),
        ({"customer": "@customer", "customer_email": "x@example.com"}, None, "only specify one"),
        ({"mode": "payment"}, "line_items[0][price]", "recurring price"),
        ({"mode": "sideways"}, "mode", "Invalid mode"),
    ],
)
async def test_checkout_session_rejections(
    client: stripe.StripeClient, overrides: dict[str, Any], param: str | None, fragment: str
) -> None:
    flat, usage = await plan_prices(client)
    customer = await new_customer(client)
    names = {"@flat": flat, "@usage": usage, "@customer": customer}
    params: dict[str, Any] = {
        "mode": "subscription",
        "line_items": [{"price": flat, "quantity": 1}],
        "success_url": "https://app.example.com/ok",
    }
    for key, value in overrides.items():
        if value is None:
            params.pop(key)
        elif isinstance(value, list):
            params[key] = [{**v, "price": names.get(v["price"], v["price"])} for v in value]
        else:
            params[key] = names.get(value, value)
    with pytest.raises(stripe.InvalidRequestError) as exc:
        await client.v1.checkout.sessions.create_async(cast(Any, params))
    assert exc.value.http_status == 400
    assert exc.value.param == param
    assert fragment in str(exc.value.user_message)
