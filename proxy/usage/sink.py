"""The hand-off from the hot path to billing: one usage event per billable call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class UsageEvent:
    tenant_id: str
    stripe_customer: str | None
    plan: str
    method: str
    tool: str | None
    units: int
    timestamp: float  # epoch seconds when the result was settled
    request_id: str  # the proxy's id for the HTTP request
    rpc_id: str  # the JSON-RPC id, as text
    session_id: str | None
    outcome: str  # "ok" (or "tool_error" when such results are billed)
    degraded: bool  # decided without the quota store (fail_mode open)
    tokens: int | None = None
    billable: bool = False  # has a Stripe customer and a billed plan: the drainer sends it
    # End (exclusive, epoch s) of the quota period the call was counted in: its meter event
    # must land in that billing period too. None: unknown (events spooled before it existed).
    period_end: int | None = None


class UsageSink(Protocol):
    async def append(self, event: UsageEvent) -> None:
        """Return only once the event is durable: the caller then releases the result.
        The event must be taken before the first await, so that cancelling the caller while
        it waits never loses it (the settler relies on this)."""


class MemorySink:
    """Keeps events in a list: enough for the embedded demo and for tests."""

    def __init__(self) -> None:
        self.events: list[UsageEvent] = []

    async def append(self, event: UsageEvent) -> None:
        self.events.append(event)
