"""What each Stripe answer to a meter event means for the spool (pure)."""

from __future__ import annotations

import pytest
import stripe

from proxy.usage.meter import Outcome, classify


@pytest.mark.parametrize(
    ("error", "outcome", "kind"),
    [
        (
            stripe.InvalidRequestError(
                "An event already exists with identifier mqp-1.", None, http_status=400
            ),
            Outcome.DUPLICATE,
            "",
        ),
        (
            stripe.InvalidRequestError("Missing required param: payload.", "payload", 400),
            Outcome.REJECTED,
            "invalid_request",
        ),
        (
            stripe.InvalidRequestError(
                "The timestamp must be no more than 5 minutes in the future.",
                "timestamp",
                "timestamp_in_future",
                http_status=400,
            ),
            Outcome.RETRY,
            "clock_ahead",
        ),
        (
            stripe.InvalidRequestError(
                "The timestamp must be within the past 35 calendar days.",
                "timestamp",
                "timestamp_too_far_in_past",
                http_status=400,
            ),
            Outcome.REJECTED,
            "invalid_request",
        ),
        (
            stripe.RateLimitError("Too many requests.", http_status=429),
            Outcome.RETRY,
            "rate_limited",
        ),
        (stripe.APIConnectionError("Connection reset."), Outcome.RETRY, "connection"),
        (
            stripe.AuthenticationError("Invalid API Key.", http_status=401),
            Outcome.RETRY,
            "authentication",
        ),
        (stripe.APIError("Something went wrong.", http_status=500), Outcome.RETRY, "api_error"),
        (
            stripe.IdempotencyError("Keys for idempotent requests ...", http_status=400),
            Outcome.REJECTED,
            "idempotency",
        ),
    ],
)
def test_classify(error: stripe.StripeError, outcome: Outcome, kind: str) -> None:
    result = classify(error)
    assert (result.outcome, result.kind) == (outcome, kind)
    assert result.accepted is (outcome is Outcome.DUPLICATE)


def test_already_exists_is_a_duplicate_only_as_a_400() -> None:
    """The same words in another status are not Stripe's dedup answer."""
    error = stripe.InvalidRequestError(
        "An event already exists with identifier mqp-1.", None, http_status=404
    )
    assert classify(error).outcome is Outcome.REJECTED
