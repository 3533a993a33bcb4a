"""What never reaches the upstream: unauthenticated requests and malformed input."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.clock import ManualClock
from tests.conftest import ConfigFactory
from tests.fakes.upstream import ScriptedUpstream
from tests.proxy_harness import RunningProxy, local_server, run_proxy
from tests.rpc import ACCEPT, bearer, call


@pytest.fixture
async def proxy(
    scripted: tuple[ScriptedUpstream, str], make_config: ConfigFactory
) -> AsyncIterator[RunningProxy]:
    config = make_config(
        upstream={"url": scripted[1]},
        proxy={"allowed_origins": ["https://inspector.example"]},
        plans={"free": {"included_units": 5, "hidden_tools": ["secret_tool"]}},
    )
    async with run_proxy(config) as running:
        yield running


async def _post(
    url: str, body: bytes | io.BytesIO | dict[str, object], headers: dict[str, str]
) -> tuple[int, dict[str, str], Any]:
    async with aiohttp.ClientSession() as http:
        if isinstance(body, dict):
            r = await http.post(url, headers=headers, json=body)
        else:
            r = await http.post(url, headers=headers, data=body)
        async with r:
            return r.status, dict(r.headers), await r.json(content_type=None)


REQUIRED = 'Bearer realm="mcp", error="invalid_token", error_description="API key required"'
INVALID = 'Bearer realm="mcp", error="invalid_token", error_description="invalid API key"'


@pytest.mark.parametrize(
    ("headers", "challenge"),
    [
        (ACCEPT, REQUIRED),
        ({**ACCEPT, "Authorization": "Bearer mqp_000000000000_unknownsecret"}, INVALID),
        ({**ACCEPT, "Authorization": "Basic dXNlcjpwYXNz"}, REQUIRED),
        ({**ACCEPT, "X-API-Key": "not-a-key"}, INVALID),
        ({**ACCEPT, "Authorization": "Bearer " + "k" * 300}, INVALID),  # too long to be one
    ],
    ids=["missing", "unknown", "other-scheme", "bad-x-api-key", "overlong"],
)
async def test_no_valid_key_is_401_and_upstream_sees_nothing(
    proxy: RunningProxy,
    scripted: tuple[ScriptedUpstream, str],
    headers: dict[str, str],
    challenge: str,
) -> None:
    for body in (call(1, "add"), {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {}}):
        status, hdrs, doc = await _post(proxy.url, body, headers)
        assert status == 401
        assert hdrs["WWW-Authenticate"] == challenge
        assert "resource_metadata" not in hdrs["WWW-Authenticate"]
        assert "Authorization: Bearer <key>" in str(doc["error"])
        invalid = challenge == INVALID
        assert doc["error"]["message"].startswith("Invalid API key") is invalid
    assert scripted[0].requests == []


async def test_revoked_key_is_401(
    proxy: RunningProxy, scripted: tuple[ScriptedUpstream, str]
) -> None:
    key = await proxy.tenant_with_key("acme")
    assert (await _post(proxy.url, call(1, "add"), bearer(key)))[0] == 200
    tenants = proxy.components.tenants
    (info,) = await tenants.list_keys("acme")
    await tenants.revoke_key("acme", info.key_id)
    directory = proxy.components.directory
    for _ in range(100):  # bounded: the invalidation arrives over pub/sub within a loop turn
        if (await directory.authenticate(key))[0] is None:
            break
        await asyncio.sleep(0.001)
    seen = len(scripted[0].requests)
    status, hdrs, doc = await _post(proxy.url, call(2, "add"), bearer(key))
    assert status == 401
    assert doc["error"]["code"] == -31401
    assert hdrs["WWW-Authenticate"] == INVALID
    assert len(scripted[0].requests) == seen


async def test_x_api_key_header_works_and_key_is_not_forwarded(
    proxy: RunningProxy, scripted: tuple[ScriptedUpstream, str]
) -> None:
    key = await proxy.tenant_with_key("acme")
    headers = {**ACCEPT, "X-API-Key": key, "X-MCP-Tenant": "someone-else"}
    status, _, _ = await _post(proxy.url, call(1, "add"), headers)
    assert status == 200
    (seen,) = scripted[0].requests
    assert key not in str(seen.headers)
    assert seen.headers["X-MCP-Tenant"] == "acme"  # the client's copy was replaced


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        (b"{not json", -32700, "Parse error"),
        (b"", -32600, "empty"),
        (b"\xff\xfe", -32700, "Parse error"),
        (b"42", -32600, "must be an object"),
        (b'"tools/call"', -32600, "must be an object"),
        (b"[]", -32600, "empty batch"),
        (b'{"jsonrpc":"1.0","id":1,"method":"ping"}', -32600, '"jsonrpc" must be "2.0"'),
        (b'{"jsonrpc":"2.0","id":true,"method":"ping"}', -32600, '"id" must be'),
        (b'{"jsonrpc":"2.0","id":1,"method":7}', -32600, '"method" must be'),
        (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":"x"}', -32600, '"params"'),
        (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{}}', -32602, "params.name"),
        (
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","arguments":[]}}',
            -32602,
            "arguments",
        ),
        (
            b'[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":1,"method":"ping"}]',
            -32600,
            "duplicate id",
        ),
    ],
)
async def test_bad_input_gets_a_precise_error(
    proxy: RunningProxy, scripted: tuple[ScriptedUpstream, str], body: bytes, code: int, words: str
) -> None:
    key = await proxy.tenant_with_key("acme")
    status, _, doc = await _post(proxy.url, body, bearer(key))
    assert status == 400
    assert doc["error"]["code"] == code
    assert words in doc["error"]["message"]
    assert scripted[0].requests == []
    engine = proxy.components.engine
    assert await engine.used("acme", engine.period(None, None)) == 0


async def test_oversized_body_is_413_and_not_forwarded(
    proxy: RunningProxy, scripted: tuple[ScriptedUpstream, str]
) -> None:
    key = await proxy.tenant_with_key("acme")
    big = (
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","arguments":{"x":"'
        + b"a" * (10 * 1024 * 1024)
        + b'"}}}'
    )
    status, _, doc = await _post(proxy.url, io.BytesIO(big), bearer(key))
    assert status == 413
    assert "limit is 4194304 bytes" in doc["error"]["message"]
    assert scripted[0].requests == []


async def test_hidden_tool_is_unknown_and_filtered_from_list(
    proxy: RunningProxy, scripted: tuple[ScriptedUpstream, str]
) -> None:
    key = await proxy.tenant_with_key("acme")
    status, _, doc = await _post(proxy.url, call(1, "secret_tool"), bearer(key))
    assert status == 200
    assert doc["error"] == {"code": -32602, "message": "Unknown tool: secret_tool"}
    listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    status, _, doc = await _post(proxy.url, listing, bearer(key))
    assert [t["name"] for t in doc["result"]["tools"]] == ["add", "echo"]
    assert scripted[0].calls() == []


async def test_batch_gates_every_element(
    proxy: RunningProxy, scripted: tuple[ScriptedUpstream, str]
) -> None:
    key = await proxy.tenant_with_key("acme")
    ok_batch = [call(1, "add"), call(2, "echo"), {"jsonrpc": "2.0", "id": 3, "method": "ping"}]
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.url, json=ok_batch, headers=bearer(key)) as r:
            replies = await r.json()
        assert sorted(m["id"] for m in replies) == [1, 2, 3]
        bad_batch = [call(4, "add"), call(5, "secret_tool")]
        async with http.post(proxy.url, json=bad_batch, headers=bearer(key)) as r:
            replies = await r.json()
    assert replies[1]["error"]["message"] == "Unknown tool: secret_tool"
    assert "Not run" in replies[0]["error"]["message"]
    engine = proxy.components.engine
    assert await engine.used("acme", engine.period(None, None)) == 2
    assert len(proxy.sink.events) == 2


async def test_cors_preflight_needs_no_key_and_origins_are_checked(
    proxy: RunningProxy, scripted: tuple[ScriptedUpstream, str]
) -> None:
    async with aiohttp.ClientSession() as http:
        pre = {"Origin": "https://inspector.example", "Access-Control-Request-Method": "POST"}
        async with http.options(proxy.url, headers=pre) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "https://inspector.example"
            assert "Mcp-Session-Id" in r.headers["Access-Control-Allow-Headers"]
        async with http.options(proxy.url, headers={"Origin": "https://evil.example"}) as r:
            assert r.status == 403
        key = await proxy.tenant_with_key("acme")
        headers = {**bearer(key), "Origin": "https://evil.example"}
        async with http.post(proxy.url, json=call(1, "add"), headers=headers) as r:
            assert r.status == 403
        headers = {**bearer(key), "Origin": "https://inspector.example"}
        async with http.post(proxy.url, json=call(1, "add"), headers=headers) as r:
            assert r.status == 200
            assert "Mcp-Session-Id" in r.headers["Access-Control-Expose-Headers"]
    (seen,) = scripted[0].requests
    assert "Origin" not in seen.headers


async def test_oauth_discovery_gets_json_404(proxy: RunningProxy) -> None:
    async with aiohttp.ClientSession() as http:
        for path in (
            "/.well-known/oauth-protected-resource",
            "/.well-known/oauth-authorization-server",
            "/register",
        ):
            async with http.get(proxy.base + path) as r:
                assert r.status == 404
                assert r.content_type == "application/json"


async def test_slow_body_is_cut_off_with_408(
    scripted: tuple[ScriptedUpstream, str], make_config: ConfigFactory
) -> None:
    config = make_config(upstream={"url": scripted[1]}, proxy={"body_timeout_s": 0.3})
    async with run_proxy(config) as proxy:
        key = await proxy.tenant_with_key("acme")
        host, port = proxy.base.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        head = (
            f"POST /mcp HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        )
        writer.write(head.encode() + b'{"jsonrpc":')  # then nothing more: a slowloris
        await writer.drain()
        started = asyncio.get_running_loop().time()
        async with asyncio.timeout(5):  # a bound on the test, not a sleep
            status_line = await reader.readline()
        waited = asyncio.get_running_loop().time() - started
        writer.close()
        await writer.wait_closed()
    assert status_line.startswith(b"HTTP/1.1 408")
    assert 0.2 < waited < 2.0
    assert scripted[0].requests == []


# --- the proxy's own errors echo the request's id (JSON-RPC 2.0 section 5) -------------------


async def test_foreign_session_404_echoes_the_request_id(
    proxy: RunningProxy, scripted: tuple[ScriptedUpstream, str]
) -> None:
    await proxy.tenant_with_key("owner")
    key = await proxy.tenant_with_key("thief")
    await proxy.components.sessions.bind("sess-of-owner", "owner")
    headers = {**bearer(key), "Mcp-Session-Id": "sess-of-owner"}
    status, _, doc = await _post(proxy.url, call("call-7", "add"), headers)
    assert status == 404
    assert doc["id"] == "call-7"
    assert doc["error"]["code"] == -31404
    # A batch has no one id: null, as for a batch the parser refuses.
    batch = json.dumps([call(8, "add"), call(9, "echo")]).encode()
    status, _, doc = await _post(proxy.url, batch, headers)
    assert (status, doc["id"]) == (404, None)
    assert scripted[0].requests == []
    engine = proxy.components.engine
    assert await engine.used("thief", engine.period(None, None)) == 0


async def test_unreachable_upstream_502_echoes_the_request_id(
    make_config: ConfigFactory,
) -> None:
    async with local_server(web.Application()) as gone:
        pass  # closed again: nothing listens on its port now
    async with run_proxy(make_config(upstream={"url": gone})) as proxy:
        key = await proxy.tenant_with_key("acme")
        status, _, doc = await _post(proxy.url, call(41, "add"), bearer(key))
        assert status == 502
        assert doc["id"] == 41
        assert doc["error"]["code"] == -31502
        notification = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        status, _, doc = await _post(proxy.url, notification, bearer(key))
        assert (status, doc["id"]) == (502, None)  # nothing to echo
        engine = proxy.components.engine
        assert await engine.used("acme", engine.period(None, None)) == 0  # refunded


async def test_quota_refusal_tells_the_agent_to_wait_until_the_reset(
    make_config: ConfigFactory, scripted: tuple[ScriptedUpstream, str]
) -> None:
    clock = ManualClock()  # 2026-01-01T00:00:00Z
    clock.advance(30 * 86400 + 82800)  # 2026-01-31T23:00:00Z: one hour before the reset
    config = make_config(upstream={"url": scripted[1]}, plans={"free": {"included_units": 1}})
    async with run_proxy(config, clock=clock) as proxy:
        key = await proxy.tenant_with_key("acme")
        assert (await _post(proxy.url, call(1, "add"), bearer(key)))[0] == 200
        status, headers, doc = await _post(proxy.url, call(2, "add"), bearer(key))
    assert status == 200  # never 429 on tools/call
    assert "Retry-After" not in headers
    assert doc["result"]["isError"] is True
    assert "Do not retry before 2026-02-01T00:00:00Z" in doc["result"]["content"][0]["text"]
    meta = doc["result"]["_meta"]["mcp-quota-proxy/quota"]
    assert meta["resets_at"] == "2026-02-01T00:00:00Z"
    assert meta["retry_after_ms"] == 3_600_000
