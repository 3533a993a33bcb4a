"""Tests for proxy.jsonrpc: body validation and the replies the proxy builds itself."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.jsonrpc import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    MODERN_PROTOCOL,
    PARSE_ERROR,
    Body,
    RpcError,
    dumps,
    error,
    is_modern,
    is_request,
    parse_body,
    tool_error,
)


def encode(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def rpc_error_of(raw: bytes) -> RpcError:
    with pytest.raises(RpcError) as info:
        parse_body(raw)
    return info.value


def request(rpc_id: Any = 1, method: str = "ping", **extra: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rpc_id, "method": method, **extra}


def call(rpc_id: Any = 1, **params: Any) -> dict[str, Any]:
    return request(rpc_id, "tools/call", params=params)


# --- accepted bodies ------------------------------------------------------------------------


def test_single_message() -> None:
    msg = call(7, name="search", arguments={"q": "x"})
    body = parse_body(encode(msg))
    assert body == Body(messages=[msg], batch=False)


def test_batch_keeps_order() -> None:
    msgs = [request(1, "tools/list"), call("two", name="search"), request(3)]
    body = parse_body(encode(msgs))
    assert body.batch is True
    assert body.messages == msgs


def test_single_element_batch_is_still_a_batch() -> None:
    body = parse_body(encode([request(1)]))
    assert body.batch is True
    assert len(body.messages) == 1


def test_notification_without_id() -> None:
    msg = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    assert parse_body(encode(msg)).messages == [msg]


def test_string_and_integer_ids() -> None:
    assert parse_body(encode(request("abc"))).messages[0]["id"] == "abc"
    assert parse_body(encode(request(0))).messages[0]["id"] == 0
    assert parse_body(encode(request(-5))).messages[0]["id"] == -5


def test_tools_call_without_arguments() -> None:
    msg = call(1, name="search")
    assert parse_body(encode(msg)).messages == [msg]


@pytest.mark.parametrize(
    "msg",
    [
        {"jsonrpc": "2.0", "id": 1, "result": {}},
        {"jsonrpc": "2.0", "id": "s", "result": None},
        {"jsonrpc": "2.0", "id": 2, "error": {"code": -1, "message": "no"}},
    ],
    ids=["result", "null-result", "error"],
)
def test_response_message_accepted(msg: dict[str, Any]) -> None:
    assert parse_body(encode(msg)).messages == [msg]


def test_leading_and_trailing_whitespace_is_fine() -> None:
    body = parse_body(b"\n  " + encode(request(1)) + b"  \r\n")
    assert body.messages == [request(1)]


# --- refused bodies -------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"", b"   ", b"\n\t\r\n"], ids=["empty", "spaces", "mixed"])
def test_empty_body(raw: bytes) -> None:
    err = rpc_error_of(raw)
    assert err.code == INVALID_REQUEST
    assert "empty" in err.message
    assert err.rpc_id is None


@pytest.mark.parametrize(
    "raw",
    [b"{", b'{"jsonrpc": "2.0", "id": 1,}', b"not json", b"\xff\xfe\x00"],
    ids=["truncated", "trailing-comma", "text", "garbage"],
)
def test_invalid_json_is_parse_error(raw: bytes) -> None:
    err = rpc_error_of(raw)
    assert err.code == PARSE_ERROR == -32700
    assert err.rpc_id is None


def test_invalid_utf8_is_parse_error() -> None:
    raw = b'{"jsonrpc":"2.0","id":1,"method":"caf\xe9"}'
    err = rpc_error_of(raw)
    assert err.code == PARSE_ERROR
    assert "UTF-8" in err.message


@pytest.mark.parametrize("raw", [b"42", b'"ping"', b"null", b"true"])
def test_non_object_json(raw: bytes) -> None:
    err = rpc_error_of(raw)
    assert err.code == INVALID_REQUEST
    assert "object" in err.message
    assert err.rpc_id is None


def test_empty_batch() -> None:
    err = rpc_error_of(b"[]")
    assert err.code == INVALID_REQUEST
    assert "empty batch" in err.message


@pytest.mark.parametrize("element", [1, "x", None, [request(2)]])
def test_batch_with_non_object_element(element: Any) -> None:
    err = rpc_error_of(encode([request(1), element]))
    assert err.code == INVALID_REQUEST
    assert err.rpc_id is None


def test_batch_error_carries_id_of_offending_element() -> None:
    bad = {"jsonrpc": "1.0", "id": "second", "method": "ping"}
    err = rpc_error_of(encode([request(1), bad]))
    assert err.code == INVALID_REQUEST
    assert err.rpc_id == "second"


@pytest.mark.parametrize(
    ("msg", "rpc_id"),
    [
        ({"id": 9, "method": "ping"}, 9),
        ({"jsonrpc": "1.0", "id": "a", "method": "ping"}, "a"),
        ({"jsonrpc": 2.0, "id": 3, "method": "ping"}, 3),
        ({"jsonrpc": "2.0 ", "method": "notify"}, None),
    ],
    ids=["missing", "wrong-version", "number", "notification"],
)
def test_missing_or_incorrect_jsonrpc_version(msg: dict[str, Any], rpc_id: Any) -> None:
    err = rpc_error_of(encode(msg))
    assert err.code == INVALID_REQUEST
    assert '"jsonrpc"' in err.message
    assert err.rpc_id == rpc_id


@pytest.mark.parametrize("bad_id", [True, False, 1.5, 1.0, None, [1], {"a": 1}])
def test_invalid_ids_are_refused_without_echoing_them(bad_id: Any) -> None:
    err = rpc_error_of(encode(request(bad_id)))
    assert err.code == INVALID_REQUEST
    assert '"id"' in err.message
    assert err.rpc_id is None


@pytest.mark.parametrize("method", [5, None, "", ["tools/call"], {"m": 1}])
def test_method_must_be_a_non_empty_string(method: Any) -> None:
    err = rpc_error_of(encode({"jsonrpc": "2.0", "id": "m1", "method": method}))
    assert err.code == INVALID_REQUEST
    assert '"method"' in err.message
    assert err.rpc_id == "m1"


@pytest.mark.parametrize("params", ["a string", 5, True])
def test_params_must_be_structured(params: Any) -> None:
    err = rpc_error_of(encode(request(4, "tools/list", params=params)))
    assert err.code == INVALID_REQUEST
    assert '"params"' in err.message
    assert err.rpc_id == 4


@pytest.mark.parametrize(
    "params",
    [
        None,
        {},
        {"arguments": {}},
        {"name": 5},
        {"name": None},
        {"name": ["search"]},
        ["search", {}],
    ],
    ids=["no-params", "empty", "no-name", "int-name", "null-name", "list-name", "list-params"],
)
def test_tools_call_needs_string_name(params: Any) -> None:
    msg = request(11, "tools/call")
    if params is not None:
        msg["params"] = params
    err = rpc_error_of(encode(msg))
    assert err.code == INVALID_PARAMS == -32602
    assert "params.name" in err.message
    assert err.rpc_id == 11


@pytest.mark.parametrize("arguments", ["x", 1, [1, 2], None])
def test_tools_call_arguments_must_be_object(arguments: Any) -> None:
    err = rpc_error_of(encode(call("c", name="search", arguments=arguments)))
    assert err.code == INVALID_PARAMS
    assert "arguments" in err.message
    assert err.rpc_id == "c"


def test_tools_call_notification_error_has_no_id() -> None:
    msg = {"jsonrpc": "2.0", "method": "tools/call", "params": {}}
    err = rpc_error_of(encode(msg))
    assert err.code == INVALID_PARAMS
    assert err.rpc_id is None


@pytest.mark.parametrize(
    "msg",
    [
        {"jsonrpc": "2.0", "id": 1},
        {"jsonrpc": "2.0"},
        {"jsonrpc": "2.0", "result": {}},
        {"jsonrpc": "2.0", "id": None, "error": {"code": 1, "message": "x"}},
    ],
    ids=["id-only", "bare", "result-without-id", "error-null-id"],
)
def test_message_without_method_or_valid_response_shape(msg: dict[str, Any]) -> None:
    err = rpc_error_of(encode(msg))
    assert err.code == INVALID_REQUEST


def test_response_without_id_says_what_is_needed() -> None:
    err = rpc_error_of(encode({"jsonrpc": "2.0", "id": 1}))
    assert '"method"' in err.message
    assert err.rpc_id == 1


def test_rpc_error_is_an_exception_with_message() -> None:
    err = RpcError(INVALID_REQUEST, "nope", 3)
    assert isinstance(err, Exception)
    assert str(err) == "nope"
    assert (err.code, err.message, err.rpc_id) == (INVALID_REQUEST, "nope", 3)


# --- replies --------------------------------------------------------------------------------


def test_is_request() -> None:
    assert is_request(request(1))
    assert not is_request({"jsonrpc": "2.0", "method": "notifications/initialized"})
    assert not is_request({"jsonrpc": "2.0", "id": 1, "result": {}})


def test_error_shape() -> None:
    assert error(5, INVALID_REQUEST, "bad") == {
        "jsonrpc": "2.0",
        "id": 5,
        "error": {"code": INVALID_REQUEST, "message": "bad"},
    }
    assert error(None, PARSE_ERROR, "x")["id"] is None


def test_tool_error_legacy_shape() -> None:
    meta = {"k": {"reason": "refused_quota"}}
    assert tool_error("r1", "Quota exhausted", meta, modern=False) == {
        "jsonrpc": "2.0",
        "id": "r1",
        "result": {
            "content": [{"type": "text", "text": "Quota exhausted"}],
            "isError": True,
            "_meta": meta,
        },
    }


def test_tool_error_modern_shape_adds_result_type() -> None:
    reply = tool_error(2, "t", {}, modern=True)
    assert reply["id"] == 2
    assert reply["result"]["resultType"] == "complete"
    assert reply["result"]["isError"] is True
    assert reply["result"]["content"] == [{"type": "text", "text": "t"}]


def test_dumps_is_compact_utf8() -> None:
    assert dumps({"a": [1, 2], "b": "café"}) == '{"a":[1,2],"b":"café"}'.encode()


@pytest.mark.parametrize(
    ("version", "modern"),
    [
        (None, False),
        ("2024-11-05", False),
        ("2025-03-26", False),
        ("2025-06-18", False),
        ("2026-07-27", False),
        (MODERN_PROTOCOL, True),
        ("2026-07-28", True),
        ("2027-01-01", True),
    ],
)
def test_is_modern(version: str | None, modern: bool) -> None:
    assert is_modern(version) is modern


# --- bugs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        encode(request(1)).decode().encode("utf-16"),
        encode(request(1)).decode().encode("utf-32"),
        b'{"jsonrpc":"2.0","id":1,"method":"p\xed\xa0\x80"}',  # UTF-8-encoded lone surrogate
    ],
    ids=["utf-16", "utf-32", "lone-surrogate"],
)
def test_non_utf8_body_is_parse_error(raw: bytes) -> None:
    err = rpc_error_of(raw)
    assert err.code == PARSE_ERROR


# --- keys the upstream could read differently -------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","method":"ping"}',
        b'{"jsonrpc":"2.0","id":1,"id":2,"method":"ping"}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","name":"b"}}',
        # spelt with an escape, so the raw bytes hold "method" only once
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","m\\u0065thod":"ping"}',
        b'[{"jsonrpc":"2.0","id":1,"method":"ping"},'
        b'{"jsonrpc":"2.0","id":2,"method":"ping","params":{},"params":{"name":"x"}}]',
    ],
    ids=["method", "id", "tool-name", "escaped", "in-batch"],
)
def test_a_repeated_key_in_a_message_or_its_params_is_refused(raw: bytes) -> None:
    err = rpc_error_of(raw)
    assert err.code == INVALID_REQUEST
    assert "occurs twice" in err.message


@pytest.mark.parametrize(
    "doc",
    [
        request(Method="tools/call"),
        call(name="add", Name="secret"),
        {"jsonrpc": "2.0", "id": 1, "method": "ping", "JSONRPC": "1.0"},
    ],
    ids=["method", "tool-name", "jsonrpc"],
)
def test_keys_that_differ_only_in_case_are_refused(doc: dict[str, Any]) -> None:
    err = rpc_error_of(encode(doc))
    assert err.code == INVALID_REQUEST
    assert "differ only in case" in err.message
    assert err.rpc_id == 1


@pytest.mark.parametrize(
    "raw",
    [
        # gated key names inside arguments, as keys and as values, repeated or not
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo",'
        b'"arguments":{"name":"id","method":"params","jsonrpc":"name","Name":1}}}',
        # a repeated key deep in arguments is the tool's business, not the gate's
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo",'
        b'"arguments":{"x":1,"x":2}}}',
        # escapes elsewhere send the body to the exact check, which finds nothing
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"caf\\u00e9"}}',
    ],
    ids=["names-in-arguments", "repeat-in-arguments", "escape-in-a-value"],
)
def test_gated_key_names_elsewhere_in_the_body_are_fine(raw: bytes) -> None:
    assert parse_body(raw).messages[0]["method"] == "tools/call"
