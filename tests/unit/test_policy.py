"""Tests for proxy.quota.policy: periods, costs, limits and refusal wording."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

import pytest

from proxy.config import Plan
from proxy.quota.policy import (
    Decision,
    Outcome,
    Period,
    allowed_total,
    calendar_month,
    call_cost,
    current_period,
    iso,
    refusal_meta,
    refusal_text,
    retry_after_ms,
)

UPGRADE = "https://example.com/upgrade"


def ts(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    return int(datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp())


def make_plan(
    included_units: int | None = 100,
    overage: Literal["block", "bill"] = "block",
    hard_cap: int | None = None,
    tool_weights: dict[str, int] | None = None,
) -> Plan:
    return Plan(
        name="free",
        included_units=included_units,
        overage=overage,
        hard_cap=hard_cap,
        rate=None,
        tool_weights=tool_weights or {},
        hidden_tools=frozenset(),
        billed=True,
    )


JAN_2026 = Period(ts(2026, 1, 1), ts(2026, 2, 1))


def decision(
    outcome: Outcome,
    *,
    used: int = 100,
    limit: int | None = 100,
    retry_after_ms: int = 0,
    period: Period = JAN_2026,
) -> Decision:
    return Decision(
        outcome=outcome,
        plan="free",
        cost=2,
        used=used,
        limit=limit,
        period=period,
        retry_after_ms=retry_after_ms,
    )


# --- periods --------------------------------------------------------------------------------


def test_calendar_month_mid_month() -> None:
    assert calendar_month(ts(2026, 3, 15, 12, 30)) == Period(ts(2026, 3, 1), ts(2026, 4, 1))


def test_calendar_month_december_rolls_into_next_year() -> None:
    assert calendar_month(ts(2025, 12, 31, 23, 59, 59)) == Period(ts(2025, 12, 1), ts(2026, 1, 1))


def test_calendar_month_november_ends_in_december() -> None:
    assert calendar_month(ts(2025, 11, 30)) == Period(ts(2025, 11, 1), ts(2025, 12, 1))


def test_calendar_month_leap_february() -> None:
    assert calendar_month(ts(2028, 2, 29, 8)) == Period(ts(2028, 2, 1), ts(2028, 3, 1))


def test_calendar_month_start_is_inclusive() -> None:
    start = ts(2026, 1, 1)
    assert calendar_month(start) == Period(start, ts(2026, 2, 1))


def test_calendar_month_end_is_exclusive() -> None:
    end = ts(2026, 1, 1)
    assert calendar_month(end - 1) == Period(ts(2025, 12, 1), end)
    assert calendar_month(end - 0.001).end == end
    assert calendar_month(end).start == end


def test_calendar_month_is_utc_and_whole_seconds() -> None:
    period = calendar_month(ts(2026, 5, 31, 23, 30) + 0.75)
    assert period == Period(ts(2026, 5, 1), ts(2026, 6, 1))
    assert isinstance(period.start, int)
    assert isinstance(period.end, int)


def test_current_period_uses_tenant_period_when_now_inside() -> None:
    start, end = ts(2026, 1, 15), ts(2026, 2, 15)
    assert current_period(ts(2026, 2, 1), start, end) == Period(start, end)


def test_current_period_tenant_start_inclusive() -> None:
    start, end = ts(2026, 1, 15), ts(2026, 2, 15)
    assert current_period(start, start, end) == Period(start, end)


def test_current_period_tenant_end_exclusive_falls_back_to_calendar() -> None:
    start, end = ts(2026, 1, 15), ts(2026, 2, 15)
    assert current_period(end, start, end) == Period(ts(2026, 2, 1), ts(2026, 3, 1))


def test_current_period_before_tenant_period_falls_back_to_calendar() -> None:
    start, end = ts(2026, 1, 15), ts(2026, 2, 15)
    assert current_period(start - 1, start, end) == Period(ts(2026, 1, 1), ts(2026, 2, 1))


@pytest.mark.parametrize(
    ("start", "end"),
    [(None, None), (ts(2026, 1, 15), None), (None, ts(2026, 2, 15))],
)
def test_current_period_without_full_tenant_period_is_calendar(
    start: int | None, end: int | None
) -> None:
    assert current_period(ts(2026, 1, 20), start, end) == Period(ts(2026, 1, 1), ts(2026, 2, 1))


# --- costs and limits -----------------------------------------------------------------------


def test_call_cost_uses_tool_weight_when_configured() -> None:
    plan = make_plan(tool_weights={"search": 5})
    assert call_cost(plan, 1, "search") == 5
    assert call_cost(plan, 3, "search") == 5


def test_call_cost_uses_method_weight_for_unweighted_tool() -> None:
    plan = make_plan(tool_weights={"search": 5})
    assert call_cost(plan, 2, "fetch") == 2


def test_call_cost_uses_method_weight_without_tool() -> None:
    plan = make_plan(tool_weights={"search": 5})
    assert call_cost(plan, 3, None) == 3


@pytest.mark.parametrize(
    ("included", "overage", "hard_cap", "expected"),
    [
        (100, "block", None, 100),
        (100, "block", 150, 100),
        (100, "bill", 150, 150),
        (100, "bill", None, None),
        (None, "block", None, None),
        (None, "bill", None, None),
        (None, "block", 50, 50),
    ],
    ids=[
        "block",
        "block-ignores-cap",
        "bill-capped",
        "bill-uncapped",
        "unlimited",
        "unlimited-bill",
        "unlimited-with-cap",
    ],
)
def test_allowed_total(
    included: int | None,
    overage: Literal["block", "bill"],
    hard_cap: int | None,
    expected: int | None,
) -> None:
    plan = make_plan(included_units=included, overage=overage, hard_cap=hard_cap)
    assert allowed_total(plan) == expected


@pytest.mark.parametrize(
    ("outcome", "allowed"),
    [
        (Outcome.ALLOWED, True),
        (Outcome.DEGRADED, True),
        (Outcome.REFUSED_QUOTA, False),
        (Outcome.REFUSED_RATE, False),
        (Outcome.HIDDEN_TOOL, False),
        (Outcome.UNAVAILABLE, False),
    ],
)
def test_decision_allowed(outcome: Outcome, allowed: bool) -> None:
    assert decision(outcome).allowed is allowed


def test_iso_formats_utc_with_z() -> None:
    assert iso(ts(2026, 2, 1)) == "2026-02-01T00:00:00Z"
    assert iso(ts(2026, 7, 4, 13, 5, 9) + 0.9) == "2026-07-04T13:05:09Z"


# --- refusal wording ------------------------------------------------------------------------


def test_quota_refusal_text() -> None:
    text = refusal_text(decision(Outcome.REFUSED_QUOTA, used=98, limit=100), UPGRADE)
    assert "Quota exhausted" in text
    assert "plan free" in text
    assert "98 of 100" in text
    assert "resets at 2026-02-01T00:00:00Z" in text
    assert f"Upgrade at {UPGRADE}." in text
    assert "Do not retry before 2026-02-01T00:00:00Z" in text


def test_quota_refusal_text_without_upgrade_url() -> None:
    text = refusal_text(decision(Outcome.REFUSED_QUOTA), "")
    assert "Upgrade" not in text
    assert "Do not retry before 2026-02-01T00:00:00Z" in text


def test_rate_refusal_text() -> None:
    text = refusal_text(decision(Outcome.REFUSED_RATE, retry_after_ms=1500), UPGRADE)
    assert "Rate limit reached for plan free" in text
    assert "Retry after 1.5 seconds" in text
    assert f"Upgrade at {UPGRADE}." in text
    assert "Quota exhausted" not in text


def test_rate_refusal_text_never_says_zero_seconds() -> None:
    text = refusal_text(decision(Outcome.REFUSED_RATE, retry_after_ms=0), "")
    assert "Retry after 0.001 seconds" in text
    assert "Upgrade" not in text


def test_rate_refusal_text_whole_seconds() -> None:
    text = refusal_text(decision(Outcome.REFUSED_RATE, retry_after_ms=2000), "")
    assert "Retry after 2 seconds" in text


def test_unavailable_refusal_text() -> None:
    text = refusal_text(decision(Outcome.UNAVAILABLE), UPGRADE)
    assert "unavailable" in text
    assert "nothing was charged" in text
    assert "Retry" in text
    assert UPGRADE not in text
    assert "Quota exhausted" not in text


def test_refusal_meta_fields() -> None:
    meta = refusal_meta(
        decision(Outcome.REFUSED_RATE, used=7, limit=100, retry_after_ms=250),
        UPGRADE,
        ts(2026, 1, 15),
    )
    assert meta == {
        "reason": "refused_rate",
        "plan": "free",
        "used": 7,
        "limit": 100,
        "cost": 2,
        "period_start": "2026-01-01T00:00:00Z",
        "resets_at": "2026-02-01T00:00:00Z",
        "retry_after_ms": 250,
        "upgrade_url": UPGRADE,
    }


def test_refusal_meta_without_upgrade_url_is_none() -> None:
    meta = refusal_meta(decision(Outcome.REFUSED_QUOTA, limit=None), "", ts(2026, 1, 15))
    assert meta["upgrade_url"] is None
    assert meta["reason"] == "refused_quota"
    assert meta["limit"] is None


def test_quota_refusal_meta_waits_until_the_period_resets() -> None:
    # 90.25 s before the reset the text names; retry_after_ms = 0 would read "retry now".
    now = JAN_2026.end - 90.25
    refused = decision(Outcome.REFUSED_QUOTA)  # as the engine makes it: retry_after_ms 0
    meta = refusal_meta(refused, UPGRADE, now)
    assert meta["retry_after_ms"] == 90_250
    assert meta["resets_at"] == "2026-02-01T00:00:00Z"
    assert "Do not retry before 2026-02-01T00:00:00Z" in refusal_text(refused, UPGRADE)


def test_quota_retry_after_spans_the_whole_remaining_period() -> None:
    assert retry_after_ms(decision(Outcome.REFUSED_QUOTA), JAN_2026.start) == 31 * 86_400_000


def test_quota_retry_after_rounds_up_and_is_never_zero() -> None:
    assert retry_after_ms(decision(Outcome.REFUSED_QUOTA), JAN_2026.end - 0.0001) == 1
    assert retry_after_ms(decision(Outcome.REFUSED_QUOTA), JAN_2026.end) == 1


def test_rate_retry_after_is_the_limiters() -> None:
    refused = decision(Outcome.REFUSED_RATE, retry_after_ms=1500)
    assert retry_after_ms(refused, JAN_2026.start) == 1500


def test_unavailable_retry_after_matches_its_text() -> None:
    refused = decision(Outcome.UNAVAILABLE)
    assert retry_after_ms(refused, JAN_2026.start) == 60_000
    assert "Retry in a minute" in refusal_text(refused, "")
