"""JSON-RPC 2.0 bodies as MCP uses them: validation and the replies the proxy makes itself."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# Application codes live outside -32768..-32000 (MCP 2026-07-28 basic/index).
QUOTA_EXCEEDED = -31429
UNAUTHORIZED = -31401
STORE_UNAVAILABLE = -31503
UPSTREAM_UNAVAILABLE = -31502
SESSION_FORBIDDEN = -31404
PAYLOAD_TOO_LARGE = -31413
ORIGIN_FORBIDDEN = -31403

MODERN_PROTOCOL = "2026-07-28"

RpcId = str | int


class RpcError(Exception):
    """A message the proxy refuses before forwarding; rendered as a JSON-RPC error body."""

    def __init__(self, code: int, message: str, rpc_id: RpcId | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.rpc_id = rpc_id


@dataclass(frozen=True, slots=True)
class Body:
    messages: list[dict[str, Any]]
    batch: bool


def _valid_id(value: object) -> bool:
    return isinstance(value, str | int) and not isinstance(value, bool)


def _check(message: object) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise RpcError(INVALID_REQUEST, "Invalid Request: each JSON-RPC message must be an object")
    rpc_id = message.get("id")
    reply_id = rpc_id if _valid_id(rpc_id) else None
    if message.get("jsonrpc") != "2.0":
        raise RpcError(INVALID_REQUEST, 'Invalid Request: "jsonrpc" must be "2.0"', reply_id)
    if "id" in message and not _valid_id(rpc_id):
        raise RpcError(INVALID_REQUEST, 'Invalid Request: "id" must be a string or an integer')
    if "method" in message:
        method = message["method"]
        if not isinstance(method, str) or not method:
            raise RpcError(
                INVALID_REQUEST, 'Invalid Request: "method" must be a non-empty string', reply_id
            )
        params = message.get("params")
        if params is not None and not isinstance(params, dict | list):
            raise RpcError(INVALID_REQUEST, 'Invalid Request: "params" must be an object', reply_id)
        if method == "tools/call":
            if not isinstance(params, dict) or not isinstance(params.get("name"), str):
                raise RpcError(
                    INVALID_PARAMS,
                    "Invalid params: tools/call needs params.name (a string)",
                    reply_id,
                )
            if not isinstance(params.get("arguments", {}), dict):
                raise RpcError(
                    INVALID_PARAMS,
                    "Invalid params: tools/call params.arguments must be an object",
                    reply_id,
                )
        return message
    if ("result" in message or "error" in message) and _valid_id(rpc_id):
        return message
    raise RpcError(
        INVALID_REQUEST,
        'Invalid Request: a message needs "method", or "id" with "result" or "error"',
        reply_id,
    )


def parse_body(raw: bytes) -> Body:
    """Validate a POST body: one JSON-RPC message or a batch (2025-03-26) of them."""
    if not raw.strip():
        raise RpcError(
            INVALID_REQUEST, "Invalid Request: the body is empty; POST one JSON-RPC message"
        )
    try:
        # orjson accepts only strict UTF-8 (no UTF-16/32, no lone surrogates) and no NaN.
        doc = orjson.loads(raw)
    except ValueError:
        raise RpcError(PARSE_ERROR, "Parse error: the body is not valid UTF-8 JSON") from None
    if isinstance(doc, list):
        if not doc:
            raise RpcError(INVALID_REQUEST, "Invalid Request: an empty batch")
        body = Body([_check(m) for m in doc], batch=True)
    else:
        body = Body([_check(doc)], batch=False)
    _refuse_ambiguous_keys(raw, body.messages)
    return body


# The raw body is forwarded, so the upstream must read it as it was gated. JSON parsers
# disagree on duplicate keys (first or last wins) and Go's encoding/json matches keys
# case-insensitively, so either could make the upstream run another method or tool.
_GATED_KEYS = frozenset({"jsonrpc", "id", "method", "params"})


def _refuse_ambiguous_keys(raw: bytes, messages: list[dict[str, Any]]) -> None:
    if not _may_be_ambiguous(raw, messages):
        return
    try:
        doc = json.loads(raw, object_pairs_hook=_pairs)
    except RecursionError:  # orjson allows a little deeper nesting than the stdlib
        raise RpcError(PARSE_ERROR, "Parse error: the body is nested too deeply") from None
    for message in doc if isinstance(doc, list) else [doc]:
        params = message.get("params")
        objects = (message, params) if isinstance(params, dict) else (message,)
        if any(isinstance(obj, _Repeated) for obj in objects):
            raise RpcError(
                INVALID_REQUEST,
                "Invalid Request: a key occurs twice in one JSON-RPC message or its params; "
                "send each key once",
                _reply_id(message),
            )
        if any(len({k.lower() for k in obj}) != len(obj) for obj in objects):
            raise RpcError(
                INVALID_REQUEST,
                "Invalid Request: keys that differ only in case in one JSON object; "
                "send each key once, in lower case",
                _reply_id(message),
            )


def _may_be_ambiguous(raw: bytes, messages: list[dict[str, Any]]) -> bool:
    """Cheap test on the hot path. Each gated key the parser kept occurs at least once in
    the raw bytes, so equal totals mean no repeats, in any case. A gated name elsewhere
    (say, a value) or a \\u escape only sends the body to the exact check."""
    if b"\\u" in raw:
        return True
    low = raw.lower()
    seen = (
        low.count(b'"jsonrpc"')
        + low.count(b'"id"')
        + low.count(b'"method"')
        + low.count(b'"params"')
        + low.count(b'"name"')
    )
    expected = 0
    for m in messages:
        expected += len(_GATED_KEYS & m.keys())
        params = m.get("params")
        expected += isinstance(params, dict) and "name" in params
    return seen != expected


class _Repeated(dict[str, Any]):
    """A JSON object in which a key occurred more than once."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    return obj if len(obj) == len(pairs) else _Repeated(obj)


def _reply_id(message: dict[str, Any]) -> RpcId | None:
    rpc_id = message.get("id")
    return rpc_id if _valid_id(rpc_id) else None


def is_request(message: dict[str, Any]) -> bool:
    return "method" in message and "id" in message


def error(rpc_id: RpcId | None, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rpc_id, "error": {"code": code, "message": message}}


def tool_error(rpc_id: RpcId, text: str, meta: dict[str, Any], modern: bool) -> dict[str, Any]:
    """A tool result with isError, which clients hand to the model instead of failing."""
    result: dict[str, Any] = {
        "content": [{"type": "text", "text": text}],
        "isError": True,
        "_meta": meta,
    }
    if modern:
        result["resultType"] = "complete"
    return {"jsonrpc": "2.0", "id": rpc_id, "result": result}


def dumps(doc: object) -> bytes:
    return orjson.dumps(doc)


def is_modern(protocol_version: str | None) -> bool:
    return protocol_version is not None and protocol_version >= MODERN_PROTOCOL
