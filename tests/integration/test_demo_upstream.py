"""The test harness itself, run directly against the demo upstream (no proxy in between).

Proves that ``tests.mcp_peers`` can start the official-SDK upstream and drive the official
2.x client in both wire eras, so proxy integration tests can trust it.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.mcp_peers import (
    LEGACY_VERSION,
    MODERN_VERSION,
    MODES,
    Mode,
    ProgressRecord,
    call_tool,
    connect,
    list_tools,
    post_jsonrpc,
    run_upstream,
    tools_call_body,
    wire_headers,
)

# One upstream process per server flavour for the whole module (spawning costs ~1 s), so the
# tests and those fixtures share the module's event loop.
pytestmark = pytest.mark.asyncio(loop_scope="module")

EXPECTED_TOOLS = {"add", "echo", "slow_count", "fail", "usage_report"}
DELAY = 0.3
TOLERANCE = 0.15  # seconds either way, per gap


@pytest_asyncio.fixture(
    scope="module", loop_scope="module", params=[False, True], ids=["stateful", "stateless"]
)
async def upstream(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, bool]]:
    """(url, stateless) of a running SSE-answering demo upstream."""
    stateless: bool = request.param
    async with run_upstream(stateless=stateless, json_response=False) as url:
        yield url, stateless


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stateless_json_upstream() -> AsyncIterator[str]:
    async with run_upstream(stateless=True, json_response=True) as url:
        yield url


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stateful_json_upstream() -> AsyncIterator[str]:
    async with run_upstream(stateless=False, json_response=True) as url:
        yield url


# --------------------------------------------------------------------------- per combination


@pytest.mark.parametrize("mode", MODES)
async def test_list_tools(upstream: tuple[str, bool], mode: Mode) -> None:
    url, _ = upstream
    assert set(await list_tools(url, {}, mode)) == EXPECTED_TOOLS


@pytest.mark.parametrize("mode", MODES)
async def test_add_and_negotiation(upstream: tuple[str, bool], mode: Mode) -> None:
    url, stateless = upstream
    call = await call_tool(url, {"X-Harness": "yes"}, mode, "add", {"a": 2, "b": 3})
    assert not call.is_error
    assert call.text == "5"
    assert call.structured == {"result": 5}
    if mode == "legacy":
        assert call.protocol_version == LEGACY_VERSION
        # Only a stateful server in the handshake era hands out a session.
        assert (call.session_id is None) == stateless
    else:
        assert call.protocol_version == MODERN_VERSION
        assert call.session_id is None


@pytest.mark.parametrize("mode", MODES)
async def test_fail_is_error_result(upstream: tuple[str, bool], mode: Mode) -> None:
    url, _ = upstream
    call = await call_tool(url, {}, mode, "fail", {"message": "boom"})
    assert call.is_error
    assert "boom" in call.text


@pytest.mark.parametrize("mode", MODES)
async def test_slow_count_streams_progress(upstream: tuple[str, bool], mode: Mode) -> None:
    url, _ = upstream
    progress: list[ProgressRecord] = []
    call = await call_tool(url, {}, mode, "slow_count", {"n": 3, "delay": DELAY}, progress)
    assert not call.is_error
    assert call.text == "counted to 3"
    assert progress == call.progress
    assert [(p, total) for _, p, total in progress] == [(1, 3), (2, 3), (3, 3)]

    times = [t for t, _, _ in progress]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(abs(gap - DELAY) <= TOLERANCE for gap in gaps), gaps
    # The first notification is live: sent at ~0 s, well before the result at ~3 * DELAY.
    assert times[0] - call.started < DELAY, times[0] - call.started
    assert call.finished - times[0] >= 2 * DELAY, call.finished - times[0]
    assert abs((call.finished - times[-1]) - DELAY) <= TOLERANCE


@pytest.mark.parametrize("mode", MODES)
async def test_one_session_many_calls(upstream: tuple[str, bool], mode: Mode) -> None:
    url, stateless = upstream
    async with connect(url, {"Authorization": "Bearer k_test"}, mode) as peer:
        first = await peer.call_tool("echo", {"text": "hi"})
        second = await peer.call_tool("usage_report", {"tokens": 42})
        sid = peer.session_id
    assert first.text == "hi"
    assert second.meta is not None and second.meta["tokens"] == 42
    assert first.session_id == second.session_id == sid
    assert (sid is not None) == (mode == "legacy" and not stateless)
    # Every request carried the caller's header; modern POSTs also the routing headers.
    assert peer.exchanges
    assert all(e.request_headers["authorization"] == "Bearer k_test" for e in peer.exchanges)
    posts = [e for e in peer.exchanges if e.method == "POST"]
    if mode == MODERN_VERSION:
        assert {e.request_headers["mcp-protocol-version"] for e in posts} == {MODERN_VERSION}
        # (The modern client may interleave a tools/list of its own after a first call.)
        calls = [e for e in posts if e.request_headers["mcp-method"] == "tools/call"]
        assert [e.request_headers.get("mcp-name") for e in calls] == ["echo", "usage_report"]
    else:
        assert posts[0].request_headers.get("mcp-protocol-version") is None  # initialize


# --------------------------------------------------------------------------- json-response servers


@pytest.mark.parametrize("mode", MODES)
async def test_json_response_server_drops_progress(
    stateless_json_upstream: str, mode: Mode
) -> None:
    call = await call_tool(stateless_json_upstream, {}, mode, "slow_count", {"n": 2, "delay": 0.05})
    assert call.text == "counted to 2"
    assert call.progress == []


# --------------------------------------------------------------------------- bare wire (curl-style)


async def test_bare_tools_call_stateless_json(stateless_json_upstream: str) -> None:
    """The minimal curl: no initialize, no session, no version headers."""
    resp = await post_jsonrpc(
        stateless_json_upstream, tools_call_body("add", {"a": 2, "b": 3}), wire_headers()
    )
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    assert resp.json() == {
        "jsonrpc": "2.0",
        "id": 1,
        "result": {
            "content": [{"type": "text", "text": "5"}],
            "isError": False,
            "structuredContent": {"result": 5},
        },
    }


async def test_bare_tools_call_modern_headers_need_meta(stateless_json_upstream: str) -> None:
    headers = wire_headers(method="tools/call", name="add")
    url = stateless_json_upstream
    missing = await post_jsonrpc(url, tools_call_body("add", {"a": 2, "b": 3}), headers)
    assert missing.status_code == 400
    assert missing.json()["error"]["code"] == -32602

    ok = await post_jsonrpc(url, tools_call_body("add", {"a": 2, "b": 3}, modern=True), headers)
    assert ok.status_code == 200
    assert ok.json()["result"]["resultType"] == "complete"
    assert ok.json()["result"]["structuredContent"] == {"result": 5}

    wrong_name = wire_headers(method="tools/call", name="echo")
    bad = await post_jsonrpc(url, tools_call_body("add", {"a": 2, "b": 3}, modern=True), wrong_name)
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == -32020


async def test_bare_tools_call_stateful_needs_session(stateful_json_upstream: str) -> None:
    url = stateful_json_upstream
    legacy = await post_jsonrpc(url, tools_call_body("add", {"a": 2, "b": 3}), wire_headers())
    assert legacy.status_code == 400
    assert legacy.json()["error"]["message"] == "Bad Request: Missing session ID"

    modern = await post_jsonrpc(
        url,
        tools_call_body("add", {"a": 2, "b": 3}, modern=True),
        wire_headers(method="tools/call", name="add"),
    )
    assert modern.status_code == 200
    assert modern.json()["result"]["structuredContent"] == {"result": 5}
    assert "mcp-session-id" not in modern.headers


async def test_dns_rebinding_protection(stateless_json_upstream: str) -> None:
    url = stateless_json_upstream
    authority = url.removeprefix("http://").removesuffix("/mcp")
    body = tools_call_body("add", {"a": 1, "b": 1})
    own = await post_jsonrpc(url, body, wire_headers(extra={"Host": authority}))
    assert own.status_code == 200
    foreign_host = await post_jsonrpc(url, body, wire_headers(extra={"Host": "evil.example"}))
    assert foreign_host.status_code == 421
    foreign_origin = await post_jsonrpc(
        url, body, wire_headers(extra={"Origin": "http://evil.example"})
    )
    assert foreign_origin.status_code == 403
