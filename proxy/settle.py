"""Settling a gated call from its final JSON-RPC response: commit and spool, or refund."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from .clock import Clock
from .jsonrpc import RpcId
from .quota.engine import QuotaEngine
from .quota.policy import Decision
from .quota.storage import Reservation
from .tenants import Tenant
from .usage.sink import UsageEvent, UsageSink


@dataclass(slots=True)
class PendingCall:
    rpc_id: RpcId
    method: str
    tool: str | None
    decision: Decision
    reservation: Reservation | None  # None when decided in degraded mode
    tenant: Tenant
    request_id: str
    session_id: str | None
    billed: bool = False  # the plan is billed through Stripe


# Stripe refuses a meter event value of more than 15 significant digits: a batch of at most
# MAX_BATCH calls of at most this many tokens each stays below 10**14. A larger count is an
# upstream's mistake, and would not even fit the spool's 64-bit column.
MAX_TOKENS_PER_CALL = 10**9


def token_count(message: dict[str, Any], meta_key: str) -> int | None:
    """A whole token count from 0 to MAX_TOKENS_PER_CALL at result._meta[meta_key], else
    None (pure)."""
    if not meta_key:
        return None
    result = message.get("result")
    meta = result.get("_meta") if isinstance(result, dict) else None
    value = meta.get(meta_key) if isinstance(meta, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKENS_PER_CALL:
        return value
    return None


def billable(message: dict[str, Any], bill_tool_errors: bool) -> tuple[bool, str]:
    """Whether a final response is billable, and the outcome name (pure)."""
    if "error" in message:
        return False, "rpc_error"
    result = message.get("result")
    if not isinstance(result, dict):
        return True, "ok"
    if result.get("resultType") == "input_required":
        return False, "input_required"  # MRTR: the retry carries a new id and is charged then
    if result.get("isError") is True:
        return bill_tool_errors, "tool_error"
    return True, "ok"


class Settler:
    def __init__(
        self,
        engine: QuotaEngine,
        sink: UsageSink,
        clock: Clock,
        *,
        bill_tool_errors: bool,
        token_meta_key: str = "",
    ) -> None:
        self._engine = engine
        self._sink = sink
        self._clock = clock
        self._bill_tool_errors = bill_tool_errors
        self._token_meta_key = token_meta_key

    async def final(self, call: PendingCall, message: dict[str, Any]) -> tuple[bool, str]:
        """Settle from the final response; returns (charged, outcome). Durable before it
        returns.

        Safe to cancel: once the upstream has answered, the settlement must not be cut in half
        by a client that leaves. A charge is handed to the quota engine and the sink before
        the first await (the await only waits for durability); a refund is shielded."""
        charge, outcome = billable(message, self._bill_tool_errors)
        if not charge:
            await asyncio.shield(self.refund(call))
            return False, outcome
        if call.reservation is not None:
            self._engine.commit_later(call.reservation)
        await self._sink.append(
            UsageEvent(
                tenant_id=call.tenant.id,
                stripe_customer=call.tenant.stripe_customer,
                plan=call.decision.plan,
                method=call.method,
                tool=call.tool,
                units=call.decision.cost,
                timestamp=self._clock.time(),
                request_id=call.request_id,
                rpc_id=str(call.rpc_id),
                session_id=call.session_id,
                outcome=outcome,
                degraded=call.reservation is None,
                tokens=token_count(message, self._token_meta_key),
                billable=call.billed and call.tenant.stripe_customer is not None,
                period_end=call.decision.period.end,
            )
        )
        return True, outcome

    async def refund(self, call: PendingCall) -> None:
        if call.reservation is not None:
            await self._engine.settle(call.reservation, commit=False)
