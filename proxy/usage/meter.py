"""Sending one meter event to Stripe Billing Meters, and what its answer means for the spool."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import stripe
from stripe._base_address import BaseAddresses

from .spool import Group

CALL_TIMEOUT_S = 20.0


class Outcome(Enum):
    DELIVERED = "delivered"
    DUPLICATE = "duplicate"  # Stripe already has this identifier: delivered earlier
    RETRY = "retry"  # transient (429, 5xx, network, auth): keep and try again later
    REJECTED = "rejected"  # Stripe refuses this event as it is: keep, alarm, never drop


@dataclass(frozen=True, slots=True)
class SendResult:
    outcome: Outcome
    detail: str = ""
    kind: str = ""  # error kind for metrics: rate_limited, api_error, connection, ...

    @property
    def accepted(self) -> bool:
        return self.outcome in (Outcome.DELIVERED, Outcome.DUPLICATE)


class MeterClient(Protocol):
    async def send(self, group: Group) -> SendResult: ...

    async def probe(self) -> SendResult: ...

    async def close(self) -> None: ...


def classify(exc: stripe.StripeError) -> SendResult:
    """Map a stripe-python error to what the drainer does next (pure)."""
    message = str(exc.user_message or exc)
    if isinstance(exc, stripe.RateLimitError):
        return SendResult(Outcome.RETRY, message, "rate_limited")
    if isinstance(exc, stripe.APIConnectionError):
        return SendResult(Outcome.RETRY, message, "connection")
    if isinstance(exc, stripe.AuthenticationError | stripe.PermissionError):
        return SendResult(Outcome.RETRY, message, "authentication")
    if isinstance(exc, stripe.InvalidRequestError):
        if "already exists" in message and exc.http_status == 400:
            return SendResult(Outcome.DUPLICATE, message)
        if exc.code == "timestamp_in_future":
            # This host's clock runs ahead of Stripe's: the stamp becomes valid as time passes.
            return SendResult(Outcome.RETRY, message, "clock_ahead")
        return SendResult(Outcome.REJECTED, message, "invalid_request")
    if isinstance(exc, stripe.IdempotencyError):
        return SendResult(Outcome.REJECTED, message, "idempotency")
    return SendResult(Outcome.RETRY, message, "api_error")


def idempotency_key(group: Group) -> str:
    """One key per attempt. Stripe saves a 500 under its key and replays it for ~24 h, so a
    key reused across attempts would turn one server error into a day without billing. The
    identifier is what dedups a re-send; a re-send after a crash, before its attempt was
    counted, reuses the key and gets the saved answer, which is as good."""
    return f"{group.identifier}-a{group.attempts}"


class StripeMeterClient:
    def __init__(self, secret_key: str, api_base: str = "") -> None:
        self._http = stripe.AIOHTTPClient(timeout=CALL_TIMEOUT_S)
        bases: BaseAddresses = {}
        if api_base:
            bases = {"api": api_base, "meter_events": api_base}
        # Retries are the drainer's: it backs off with jitter and re-sends the same identifier.
        self._client = stripe.StripeClient(
            secret_key, base_addresses=bases, http_client=self._http, max_network_retries=0
        )

    async def send(self, group: Group) -> SendResult:
        try:
            await self._client.v1.billing.meter_events.create_async(
                {
                    "event_name": group.event_name,
                    "payload": {
                        "stripe_customer_id": group.stripe_customer,
                        "value": str(group.value),
                    },
                    "identifier": group.identifier,
                    "timestamp": group.timestamp,
                },
                {"idempotency_key": idempotency_key(group)},
            )
        except stripe.StripeError as exc:
            return classify(exc)
        except TimeoutError as exc:
            return SendResult(Outcome.RETRY, str(exc) or "timeout", "timeout")
        return SendResult(Outcome.DELIVERED)

    async def probe(self) -> SendResult:
        """A cheap read, so an idle drainer still knows whether Stripe answers."""
        try:
            await self._client.v1.billing.meters.list_async({"limit": 1})
        except stripe.StripeError as exc:
            result = classify(exc)
            # A refusal of this read is still an answer from Stripe, except for auth.
            if result.outcome is Outcome.RETRY:
                return result
            return SendResult(Outcome.DELIVERED)
        except TimeoutError as exc:
            return SendResult(Outcome.RETRY, str(exc) or "timeout", "timeout")
        return SendResult(Outcome.DELIVERED)

    async def close(self) -> None:
        await self._http.close_async()  # type: ignore[no-untyped-call]
