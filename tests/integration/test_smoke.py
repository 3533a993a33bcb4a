from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import ConfigFactory
from tests.fakes.upstream import ScriptedUpstream
from tests.proxy_harness import RunningProxy, run_proxy

HDRS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[ScriptedUpstream, str]]:
    up = ScriptedUpstream()
    server = TestServer(up.app(), host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield up, str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@pytest.fixture
async def proxy(
    upstream: tuple[ScriptedUpstream, str], make_config: ConfigFactory
) -> AsyncIterator[RunningProxy]:
    async with run_proxy(make_config(upstream={"url": upstream[1]})) as running:
        yield running


def call(rpc_id: int, tool: str, **args: object) -> dict[str, object]:
    return {"jsonrpc": "2.0", "id": rpc_id, "method": "tools/call",
            "params": {"name": tool, "arguments": args}}


async def test_call_through_proxy(proxy: RunningProxy, upstream: tuple[ScriptedUpstream, str]) -> None:
    key = await proxy.tenant_with_key("acme")
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.url, json=call(1, "add", a=1), headers={**HDRS, "Authorization": f"Bearer {key}"}) as r:
            assert r.status == 200
            doc = await r.json()
    assert doc["result"]["isError"] is False
    seen = upstream[0].calls()[0]
    assert "Authorization" not in seen.headers
    assert seen.headers["X-MCP-Tenant"] == "acme"
    assert len(proxy.sink.events) == 1
