"""The request/response exchange's pure parts: labels, request ids, and reading or rewriting
JSON-RPC responses inside JSON and SSE replies."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from .ids import request_ids
from .jsonrpc import Body
from .sse import SSEEvent

REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")

KNOWN_METHODS = frozenset(
    {
        "initialize",
        "ping",
        "server/discover",
        "tools/list",
        "tools/call",
        "resources/list",
        "resources/read",
        "resources/templates/list",
        "resources/subscribe",
        "resources/unsubscribe",
        "prompts/list",
        "prompts/get",
        "completion/complete",
        "logging/setLevel",
        "subscriptions/listen",
        "tasks/get",
        "tasks/result",
        "tasks/list",
        "tasks/cancel",
    }
)


@dataclass(slots=True)
class Ctx:
    """What one request learned on its way, for its metrics and log lines."""

    started: float
    method: str
    outcome: str = ""
    request_id: str = ""
    tenant: str | None = None
    upstream_status: int | None = None
    upstream_s: float | None = None  # time to the upstream's response headers


def method_label(body: Body) -> str:
    """A bounded label: clients can send any method name, Prometheus must not see them all."""
    if body.batch:
        return "batch"
    message = body.messages[0]
    method = message.get("method")
    if not isinstance(method, str):
        return "response"
    if method.startswith("notifications/"):
        return "notification"
    return method if method in KNOWN_METHODS else "other"


def status_outcome(status: int) -> str:
    return {
        401: "unauthorized",
        400: "bad_request",
        403: "forbidden",
        404: "not_found",
        405: "method_not_allowed",
        413: "too_large",
        503: "store_unavailable",
    }.get(status, "ok" if status < 400 else "error")


def request_id_of(headers: Mapping[str, str]) -> str:
    """X-Request-Id if well-formed, else the trace id of a W3C traceparent, else a new one."""
    incoming = headers.get("X-Request-Id", "")
    if REQUEST_ID_RE.fullmatch(incoming):
        return str(incoming)
    parent = headers.get("traceparent", "")
    parts = parent.split("-")
    if (
        len(parts) == 4
        and parts[0] != "ff"  # W3C trace context: version ff and all-zero ids are invalid
        and len(parts[1]) == 32
        and all(c in "0123456789abcdef" for c in parts[1])
        and parts[1] != "0" * 32
        and parts[2] != "0" * 16
    ):
        return str(parts[1])
    return request_ids.next()


def hashable(value: object) -> bool:
    return isinstance(value, str | int) and not isinstance(value, bool)


def responses(data: str) -> list[dict[str, Any]]:
    """JSON-RPC responses carried by one SSE data field (cheap test before parsing)."""
    if '"id"' not in data or ('"result"' not in data and '"error"' not in data):
        return []
    try:
        doc = orjson.loads(data)
    except ValueError:
        return []
    items = doc if isinstance(doc, list) else [doc]
    return [
        m
        for m in items
        if isinstance(m, dict) and ("result" in m or "error" in m) and hashable(m.get("id"))
    ]


def filter_tools(message: dict[str, Any], hidden: frozenset[str]) -> dict[str, Any]:
    result = message.get("result")
    if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
        return message
    tools = [t for t in result["tools"] if not (isinstance(t, dict) and t.get("name") in hidden)]
    new_result = dict(result, tools=tools)
    if "resultType" in result or "ttlMs" in result:
        new_result["cacheScope"] = "private"  # the list now varies per tenant
    return dict(message, result=new_result)


def sse_rewrite(event: SSEEvent, message: dict[str, Any]) -> bytes:
    lines = []
    if event.event != "message":
        lines.append(f"event: {event.event}")
    if event.id is not None:
        lines.append(f"id: {event.id}")
    lines.append("data: " + orjson.dumps(message).decode())
    return ("\n".join(lines) + "\n\n").encode()
