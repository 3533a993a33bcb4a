"""Tiny raw JSON-RPC helpers for wire-level tests."""

from __future__ import annotations

from typing import Any

ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def call(rpc_id: int | str, tool: str, **args: Any) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": rpc_id,
        "method": "tools/call",
        "params": {"name": tool, "arguments": args},
    }


def bearer(key: str) -> dict[str, str]:
    return {**ACCEPT, "Authorization": f"Bearer {key}"}
