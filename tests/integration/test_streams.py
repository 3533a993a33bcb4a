"""Stream life cycles: results on a resumed GET stream, client disconnects, refusal modes."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from proxy.clock import ManualClock
from tests.conftest import ConfigFactory
from tests.fakes.upstream import ScriptedUpstream
from tests.proxy_harness import RunningProxy, run_proxy
from tests.rpc import bearer, call


async def _initialize(http: aiohttp.ClientSession, proxy: RunningProxy, key: str) -> str:
    init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {}}
    async with http.post(proxy.url, json=init, headers=bearer(key)) as r:
        assert r.status == 200
        return r.headers["Mcp-Session-Id"]


def _used(proxy: RunningProxy, tenant: str) -> asyncio.Future[int]:
    engine = proxy.components.engine
    return asyncio.ensure_future(engine.used(tenant, engine.period(None, None)))


async def test_result_on_resumed_get_stream_is_settled_there(
    make_config: ConfigFactory, scripted: tuple[ScriptedUpstream, str]
) -> None:
    async with (
        run_proxy(make_config(upstream={"url": scripted[1]})) as proxy,
        aiohttp.ClientSession() as http,
    ):
        key = await proxy.tenant_with_key("acme")
        session = await _initialize(http, proxy, key)
        headers = {**bearer(key), "Mcp-Session-Id": session}
        async with http.post(proxy.url, json=call(7, "sse_resume"), headers=headers) as r:
            first = await r.read()
        assert b"retry: 10" in first and b'"id": 7' not in first
        assert proxy.sink.events == []  # not settled yet: the result has not arrived
        assert await _used(proxy, "acme") == 1  # still reserved, not refunded
        async with http.get(proxy.url, headers={**headers, "Last-Event-ID": "1"}) as r:
            resumed = await r.read()
        (event,) = [
            json.loads(line[6:])
            for line in resumed.decode().splitlines()
            if line.startswith("data: ")
        ]
        assert event["id"] == 7 and event["result"]["isError"] is False
        assert [(e.tool, e.rpc_id, e.session_id) for e in proxy.sink.events] == [
            ("sse_resume", "7", session)
        ]
        assert await _used(proxy, "acme") == 1
        await proxy.components.engine.flush()  # commits are batched off the request path
        assert await proxy.components.storage.held("acme") == 0


async def test_deferred_call_without_result_is_refunded_after_grace(
    make_config: ConfigFactory, scripted: tuple[ScriptedUpstream, str]
) -> None:
    clock = ManualClock()
    config = make_config(upstream={"url": scripted[1]}, proxy={"resume_grace_s": 30})
    async with run_proxy(config, clock=clock) as proxy, aiohttp.ClientSession() as http:
        key = await proxy.tenant_with_key("acme")
        session = await _initialize(http, proxy, key)
        headers = {**bearer(key), "Mcp-Session-Id": session}
        async with http.post(proxy.url, json=call(8, "sse_resume"), headers=headers) as r:
            await r.read()
        running = proxy.components.proxy
        assert running is not None
        clock.advance(29)
        assert await running.reap_deferred() == 0
        assert await _used(proxy, "acme") == 1
        clock.advance(2)
        assert await running.reap_deferred() == 1
        assert await _used(proxy, "acme") == 0
        assert proxy.sink.events == []


async def test_client_disconnect_cancels_upstream_and_refunds(
    make_config: ConfigFactory, scripted: tuple[ScriptedUpstream, str]
) -> None:
    upstream, url = scripted
    async with run_proxy(make_config(upstream={"url": url})) as proxy:
        key = await proxy.tenant_with_key("acme")
        http = aiohttp.ClientSession()
        resp = await http.post(proxy.url, json=call(9, "sse_wait"), headers=bearer(key))
        # Read until the tool is running (its progress events have arrived), then hang up.
        seen = b""
        while b"notifications/progress" not in seen:
            seen += await resp.content.readany()
        assert await _used(proxy, "acme") == 1
        resp.close()
        await http.close()
        for _ in range(200):  # bounded wait for the cancellation to travel upstream
            if upstream.cancelled and await _used(proxy, "acme") == 0:
                break
            await asyncio.sleep(0.01)
        assert upstream.cancelled == ["9"]
        assert await _used(proxy, "acme") == 0
        await proxy.components.engine.flush()  # commits are batched off the request path
        assert await proxy.components.storage.held("acme") == 0
        assert proxy.sink.events == []


async def test_sse_result_is_spooled_before_it_is_forwarded(
    make_config: ConfigFactory, scripted: tuple[ScriptedUpstream, str]
) -> None:
    async with (
        run_proxy(make_config(upstream={"url": scripted[1]})) as proxy,
        aiohttp.ClientSession() as http,
    ):
        key = await proxy.tenant_with_key("acme")
        async with http.post(proxy.url, json=call(3, "sse_ok", steps=3), headers=bearer(key)) as r:
            assert r.headers["Content-Type"] == "text/event-stream"
            body = b""
            async for chunk in r.content.iter_any():
                if b'"id": 3' in body + chunk or b'"id":3' in body + chunk:
                    assert len(proxy.sink.events) == 1  # spooled before the client saw it
                body += chunk
        # Byte-for-byte: priming event, CRLF-framed progress, and the split final event.
        assert body.startswith(b"id: 1\ndata: \n\n")
        assert body.count(b"notifications/progress") == 3
        assert b"\r\n\r\n" in body


@pytest.mark.parametrize("mode", ["jsonrpc_error"])
async def test_jsonrpc_error_refusal_mode(
    make_config: ConfigFactory, scripted: tuple[ScriptedUpstream, str], mode: str
) -> None:
    config = make_config(
        upstream={"url": scripted[1]},
        proxy={"refusal_mode": mode, "upgrade_url": "https://up.example"},
        plans={"free": {"included_units": 1}},
    )
    async with run_proxy(config) as proxy, aiohttp.ClientSession() as http:
        key = await proxy.tenant_with_key("acme")
        for i in range(2):
            async with http.post(proxy.url, json=call(i, "add"), headers=bearer(key)) as r:
                assert r.status == 200
                doc = await r.json()
    assert doc["error"]["code"] == -31429
    assert "Quota exhausted for plan free: 1 of 1" in doc["error"]["message"]
    assert "https://up.example" in doc["error"]["message"]


async def test_a_metered_json_reply_goes_out_whole_with_its_length(
    make_config: ConfigFactory, scripted: tuple[ScriptedUpstream, str]
) -> None:
    """It is read whole to be settled anyway: one Content-Length reply, not chunks, with the
    upstream's own bytes; an unmetered stream still passes through as it comes."""
    _, url = scripted
    async with (
        run_proxy(make_config(upstream={"url": url})) as proxy,
        aiohttp.ClientSession() as http,
    ):
        key = await proxy.tenant_with_key("acme")
        async with http.post(url + "/mcp", json=call(3, "echo")) as r:
            direct = await r.read()
            assert r.status == 200 and b'"id": 3' in direct, direct
        async with http.post(proxy.url, json=call(3, "echo"), headers=bearer(key)) as r:
            assert r.status == 200
            assert "Transfer-Encoding" not in r.headers
            assert r.headers["Content-Length"] == str(len(direct))
            assert r.headers["Content-Type"].startswith("application/json")
            assert await r.read() == direct
        assert [e.rpc_id for e in proxy.sink.events] == ["3"]


@pytest.mark.parametrize("tool", ["odd_headers", "sse_odd_headers", "json_503"])
async def test_status_reason_and_every_header_pass_through(
    make_config: ConfigFactory, scripted: tuple[ScriptedUpstream, str], tool: str
) -> None:
    """Repeated headers (two Set-Cookie), unknown ones, a 5xx with its own reason and a JSON-RPC
    body: the client sees what the upstream sent, whether the reply is read whole or streamed."""
    _, url = scripted
    config = make_config(upstream={"url": url}, plans={"free": {"included_units": 5}})
    async with run_proxy(config) as proxy, aiohttp.ClientSession() as http:
        key = await proxy.tenant_with_key("acme")
        seen = []
        for target, headers in ((url + "/mcp", {}), (proxy.url, bearer(key))):
            async with http.post(target, json=call(4, tool), headers=headers) as r:
                seen.append(
                    (
                        r.status,
                        r.reason,
                        r.headers.getall("Set-Cookie", []),
                        r.headers.get("X-Upstream-Odd"),
                        r.headers.get("Retry-After"),
                        r.headers["Content-Type"],
                        await r.read(),
                    )
                )
        direct, proxied = seen
        assert proxied == direct
        if tool == "json_503":
            assert direct[:2] == (503, "Busy Upstream")
            assert await _used(proxy, "acme") == 0  # an error is not billed: refunded
        else:
            assert direct[2] == ["a=1; Path=/", "b=2; Path=/"] and direct[3] == "kept"
            assert await _used(proxy, "acme") == 1
