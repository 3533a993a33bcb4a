"""Deciding, before anything is forwarded, which calls of a POST body may run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import Plan, ProxyConfig
from .jsonrpc import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    QUOTA_EXCEEDED,
    Body,
    RpcError,
    RpcId,
    is_request,
    tool_error,
)
from .jsonrpc import error as rpc_error
from .quota.engine import QuotaEngine
from .quota.policy import Decision, refusal_meta, refusal_text
from .settle import PendingCall
from .tenants import Tenant

META_KEY = "mcp-quota-proxy/quota"


@dataclass(slots=True)
class GateResult:
    pending: dict[RpcId, PendingCall] = field(default_factory=dict)
    replies: dict[RpcId, dict[str, Any]] = field(default_factory=dict)  # answered here
    list_ids: set[RpcId] = field(default_factory=set)  # tools/list replies to filter
    decisions: list[tuple[str | None, Decision]] = field(default_factory=list)  # (tool, ...)
    hidden: list[str] = field(default_factory=list)  # refused as unknown tools


def refusal(
    rpc_id: RpcId, decision: Decision, cfg: ProxyConfig, modern: bool, now: float
) -> dict[str, Any]:
    text = refusal_text(decision, cfg.upgrade_url)
    if cfg.refusal_mode == "jsonrpc_error":
        return rpc_error(rpc_id, QUOTA_EXCEEDED, text)
    meta = refusal_meta(decision, cfg.upgrade_url, now)
    return tool_error(rpc_id, text, {META_KEY: meta}, modern)


async def gate(
    body: Body,
    tenant: Tenant,
    plan: Plan,
    engine: QuotaEngine,
    cfg: ProxyConfig,
    *,
    modern: bool,
    request_id: str,
    session_id: str | None,
    now: float,
) -> GateResult:
    out = GateResult()
    seen: set[RpcId] = set()
    for message in body.messages:
        if is_request(message):
            if message["id"] in seen:
                raise RpcError(
                    INVALID_REQUEST, "Invalid Request: duplicate id in batch", message["id"]
                )
            seen.add(message["id"])
    period = None
    for message in body.messages:
        if not is_request(message):
            continue
        method: str = message["method"]
        rpc_id: RpcId = message["id"]
        if method == "tools/list" and plan.hidden_tools:
            out.list_ids.add(rpc_id)
        weight = cfg.gated_methods.get(method)
        if weight is None:
            continue
        tool = message["params"]["name"] if method == "tools/call" else None
        if tool is not None and tool in plan.hidden_tools:
            # Indistinguishable from a tool the server does not have.
            out.replies[rpc_id] = rpc_error(rpc_id, INVALID_PARAMS, f"Unknown tool: {tool}")
            out.hidden.append(tool)
            continue
        if period is None:
            period = engine.period(tenant.period_start, tenant.period_end)
        decision, reservation = await engine.reserve(tenant.id, plan, period, weight, tool)
        out.decisions.append((tool, decision))
        if decision.allowed:
            out.pending[rpc_id] = PendingCall(
                rpc_id=rpc_id,
                method=method,
                tool=tool,
                decision=decision,
                reservation=reservation,
                tenant=tenant,
                request_id=request_id,
                session_id=session_id,
                billed=plan.billed,
            )
        else:
            out.replies[rpc_id] = refusal(rpc_id, decision, cfg, modern, now)
    return out
