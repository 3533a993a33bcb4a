"""Quota decisions' pure parts: periods, costs, and the words a refused agent reads."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum

from ..config import Plan

UNAVAILABLE_RETRY_MS = 60_000  # "Retry in a minute", as the refusal text says


class Outcome(Enum):
    ALLOWED = "allowed"
    REFUSED_QUOTA = "refused_quota"
    REFUSED_RATE = "refused_rate"
    HIDDEN_TOOL = "hidden_tool"
    DEGRADED = "degraded"  # store unreachable, fail_mode open: allowed without a reservation
    UNAVAILABLE = "unavailable"  # store unreachable, fail_mode closed: refused


@dataclass(frozen=True, slots=True)
class Period:
    start: int  # epoch seconds, inclusive
    end: int  # epoch seconds, exclusive


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    plan: str
    cost: int
    used: int  # units used in the period after this decision
    limit: int | None  # units allowed in the period (None: unlimited)
    period: Period
    retry_after_ms: int = 0
    reservation_id: str | None = None

    @property
    def allowed(self) -> bool:
        return self.outcome in (Outcome.ALLOWED, Outcome.DEGRADED)


def calendar_month(now: float) -> Period:
    t = datetime.fromtimestamp(now, UTC)
    start = datetime(t.year, t.month, 1, tzinfo=UTC)
    end = datetime(t.year + (t.month == 12), t.month % 12 + 1, 1, tzinfo=UTC)
    return Period(int(start.timestamp()), int(end.timestamp()))


def current_period(now: float, start: int | None, end: int | None) -> Period:
    """The tenant's own billing period when known and current, else the calendar month (UTC)."""
    if start is not None and end is not None and start <= now < end:
        return Period(start, end)
    return calendar_month(now)


def call_cost(plan: Plan, method_weight: int, tool: str | None) -> int:
    if tool is not None and tool in plan.tool_weights:
        return plan.tool_weights[tool]
    return method_weight


def allowed_total(plan: Plan) -> int | None:
    """Units a tenant may consume in one period before being refused."""
    if plan.included_units is None:
        return plan.hard_cap
    if plan.overage == "bill":
        return plan.hard_cap
    return plan.included_units


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def refusal_text(decision: Decision, upgrade_url: str) -> str:
    upgrade = f" Upgrade at {upgrade_url}." if upgrade_url else ""
    if decision.outcome is Outcome.REFUSED_RATE:
        seconds = max(decision.retry_after_ms, 1) / 1000
        return (
            f"Rate limit reached for plan {decision.plan}: too many tool calls per second. "
            f"Retry after {seconds:.3g} seconds.{upgrade}"
        )
    if decision.outcome is Outcome.UNAVAILABLE:
        return (
            "The quota service is unavailable, so this tool call was not run and nothing was "
            "charged. Retry in a minute; if it persists, tell the service operator."
        )
    resets = iso(decision.period.end)
    return (
        f"Quota exhausted for plan {decision.plan}: {decision.used} of {decision.limit} "
        f"tool-call units used this period; it resets at {resets}.{upgrade} "
        f"Do not retry before {resets}."
    )


def retry_after_ms(decision: Decision, now: float) -> int:
    """How long a refused caller should wait, in the same terms as its refusal text: until
    the period resets for an exhausted quota (never 0, which reads as "retry now")."""
    if decision.outcome is Outcome.REFUSED_QUOTA:
        return max(1, math.ceil((decision.period.end - now) * 1000))
    if decision.outcome is Outcome.UNAVAILABLE:
        return UNAVAILABLE_RETRY_MS
    return decision.retry_after_ms


def refusal_meta(decision: Decision, upgrade_url: str, now: float) -> dict[str, object]:
    """Machine-readable detail for agents and SDKs that look at `_meta`."""
    return {
        "reason": decision.outcome.value,
        "plan": decision.plan,
        "used": decision.used,
        "limit": decision.limit,
        "cost": decision.cost,
        "period_start": iso(decision.period.start),
        "resets_at": iso(decision.period.end),
        "retry_after_ms": retry_after_ms(decision, now),
        "upgrade_url": upgrade_url or None,
    }
