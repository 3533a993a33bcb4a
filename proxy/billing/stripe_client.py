"""The one place a StripeClient is built: the secret key and the API base come from Config."""

from __future__ import annotations

import stripe
from stripe._base_address import BaseAddresses

from ..config import BillingConfig

TIMEOUT_S = 20.0


def make_client(
    billing: BillingConfig, *, retries: int = 0
) -> tuple[stripe.StripeClient, stripe.AIOHTTPClient]:
    """(client, its HTTP client, which the caller closes with `await http.close_async()`)."""
    http = stripe.AIOHTTPClient(timeout=TIMEOUT_S)
    bases: BaseAddresses = {}
    if billing.stripe_api_base:
        bases = {"api": billing.stripe_api_base, "meter_events": billing.stripe_api_base}
    client = stripe.StripeClient(
        billing.stripe_secret_key,
        base_addresses=bases,
        http_client=http,
        max_network_retries=retries,
    )
    return client, http
