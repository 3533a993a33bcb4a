"""The official MCP SDK (2.x) as client and as upstream server, with the proxy in between:
both wire eras, stateful and stateless servers, streaming progress, refusals, sessions."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from proxy.config import parse_config
from tests.conftest import PEPPER
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
from tests.proxy_harness import RunningProxy, run_proxy

pytestmark = pytest.mark.asyncio(loop_scope="module")

DELAY = 0.3
STEPS = 3
# Progress through the proxy must keep the direct run's rhythm: each gap within this margin.
GAP_MARGIN = 0.12


@pytest_asyncio.fixture(
    scope="module", loop_scope="module", params=[False, True], ids=["stateful", "stateless"]
)
async def stack(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, RunningProxy, bool]]:
    """(direct upstream url, proxy in front of it, stateless)."""
    stateless: bool = request.param
    async with run_upstream(stateless=stateless) as url:
        config = parse_config(
            {
                "upstream": {"url": url.removesuffix("/mcp")},
                "plans": {
                    "free": {"included_units": 3, "overage": "block"},
                    "pro": {"included_units": 10_000, "hidden_tools": ["fail"]},
                },
                "proxy": {"upgrade_url": "https://example.test/upgrade"},
                "billing": {"token_meter_event_name": "mcp_tokens", "token_meta_key": "tokens"},
            },
            {"MQP_KEY_PEPPER": PEPPER},
        )
        async with run_proxy(config) as proxy:
            yield url, proxy, stateless


async def _auth(proxy: RunningProxy, tenant: str, plan: str = "pro") -> dict[str, str]:
    return {"Authorization": f"Bearer {await proxy.tenant_with_key(tenant, plan)}"}


def _gaps(records: list[ProgressRecord], end: float) -> list[float]:
    times = [t for t, _, _ in records] + [end]
    return [b - a for a, b in itertools.pairwise(times)]


@pytest.mark.parametrize("mode", MODES)
async def test_list_and_call(stack: tuple[str, RunningProxy, bool], mode: Mode) -> None:
    _, proxy, stateless = stack
    headers = await _auth(proxy, f"lc-{mode[:2]}-{int(stateless)}")
    tools = await list_tools(proxy.url, headers, mode)
    assert set(tools) == {"add", "echo", "slow_count", "usage_report"}  # "fail" hidden on pro
    call = await call_tool(proxy.url, headers, mode, "add", {"a": 2, "b": 3})
    assert not call.is_error and call.text == "5"
    assert call.protocol_version == (LEGACY_VERSION if mode == "legacy" else MODERN_VERSION)
    if mode == "legacy":
        assert (call.session_id is None) == stateless


@pytest.mark.parametrize("mode", MODES)
async def test_progress_streams_like_direct(
    stack: tuple[str, RunningProxy, bool], mode: Mode
) -> None:
    direct_url, proxy, _ = stack
    headers = await _auth(proxy, f"pg-{mode[:2]}")
    args = {"n": STEPS, "delay": DELAY}
    direct: list[ProgressRecord] = []
    d = await call_tool(direct_url, {}, mode, "slow_count", args, progress=direct)
    proxied: list[ProgressRecord] = []
    p = await call_tool(proxy.url, headers, mode, "slow_count", args, progress=proxied)
    assert p.text == d.text == f"counted to {STEPS}"
    assert [pr for _, pr, _ in proxied] == [pr for _, pr, _ in direct] == [1, 2, 3]
    # Each notification arrives while the tool runs, with the same spacing as without the
    # proxy: buffering would bunch them up at the end.
    for g_direct, g_proxy in zip(
        _gaps(direct, d.finished), _gaps(proxied, p.finished), strict=True
    ):
        assert abs(g_proxy - g_direct) < GAP_MARGIN
    assert p.finished - proxied[0][0] > (STEPS - 1) * DELAY


@pytest.mark.parametrize("mode", MODES)
async def test_quota_refusal_reaches_the_model(
    stack: tuple[str, RunningProxy, bool], mode: Mode
) -> None:
    _, proxy, stateless = stack
    tenant = f"qr-{mode[:2]}-{int(stateless)}"
    headers = await _auth(proxy, tenant, plan="free")
    async with connect(proxy.url, headers, mode) as peer:
        results = [await peer.call_tool("add", {"a": i, "b": 1}) for i in range(4)]
        # The session survives the refusal: the client can still list tools.
        assert "add" in await peer.list_tools()
    assert [r.is_error for r in results] == [False, False, False, True]
    refusal = results[3]
    assert "Quota exhausted for plan free: 3 of 3" in refusal.text
    assert "https://example.test/upgrade" in refusal.text
    assert refusal.meta is not None
    quota = refusal.meta["mcp-quota-proxy/quota"]
    assert quota["reason"] == "refused_quota" and quota["limit"] == 3
    assert [e.tool for e in proxy.sink.events if e.tenant_id == tenant] == ["add"] * 3


@pytest.mark.parametrize("mode", MODES)
async def test_tool_error_is_refunded(stack: tuple[str, RunningProxy, bool], mode: Mode) -> None:
    _, proxy, stateless = stack
    tenant = f"te-{mode[:2]}-{int(stateless)}"
    headers = await _auth(proxy, tenant, plan="free")
    async with connect(proxy.url, headers, mode) as peer:
        failed = await peer.call_tool("fail", {"message": "nope"})
        assert failed.is_error
        ok = [await peer.call_tool("add", {"a": 1, "b": 1}) for _ in range(3)]
    assert not any(r.is_error for r in ok), "the failed call must not have used a unit"
    period = proxy.components.engine.period(None, None)
    assert await proxy.components.engine.used(tenant, period) == 3


async def test_session_is_bound_to_its_tenant(stack: tuple[str, RunningProxy, bool]) -> None:
    _, proxy, stateless = stack
    if stateless:
        pytest.skip("stateless servers hand out no session")
    owner = await _auth(proxy, "sess-owner")
    other = await _auth(proxy, "sess-other")
    async with connect(proxy.url, owner, "legacy") as peer:
        await peer.list_tools()
        session_id = peer.session_id
        assert session_id is not None
        body = tools_call_body("add", {"a": 1, "b": 2})
        stolen = await post_jsonrpc(
            proxy.url,
            body,
            {
                **other,
                **wire_headers(),
                "Mcp-Session-Id": session_id,
                "MCP-Protocol-Version": LEGACY_VERSION,
            },
        )
        assert stolen.status_code == 404
        assert "Session not found for this API key" in stolen.json()["error"]["message"]
        # The owner's session still works.
        assert (await peer.call_tool("add", {"a": 1, "b": 2})).text == "3"


async def test_modern_refusal_carries_result_type(stack: tuple[str, RunningProxy, bool]) -> None:
    _, proxy, _ = stack
    headers = await _auth(proxy, "modern-wire", plan="free")
    statuses = []
    for i in range(4):
        body = tools_call_body("add", {"a": i, "b": 0}, request_id=i + 1, modern=True)
        resp = await post_jsonrpc(
            proxy.url, body, {**headers, **wire_headers(method="tools/call", name="add")}
        )
        statuses.append(resp.status_code)
        last = resp
    assert statuses == [200, 200, 200, 200]
    doc = json.loads(last.text)
    assert doc["result"]["isError"] is True
    assert doc["result"]["resultType"] == "complete"


@pytest.mark.parametrize("mode", MODES)
async def test_token_count_in_result_meta_is_recorded(
    stack: tuple[str, RunningProxy, bool], mode: Mode
) -> None:
    _, proxy, stateless = stack
    tenant = f"tok-{mode[:2]}-{int(stateless)}"
    headers = await _auth(proxy, tenant)
    result = await call_tool(proxy.url, headers, mode, "usage_report", {"tokens": 1234})
    assert result.meta is not None and result.meta["tokens"] == 1234
    (event,) = [e for e in proxy.sink.events if e.tenant_id == tenant]
    assert (event.tool, event.units, event.tokens) == ("usage_report", 1, 1234)
