"""Hostile input at the MCP endpoint: arbitrary bodies and headers, fuzzed SSE streams from the
upstream, slow and oversized requests, smuggled tenant headers and garbage from the upstream.

What must always hold: no 5xx the proxy made itself, no hang, only well-formed JSON-RPC reaches
the upstream, the upstream sees exactly one tenant header (the authenticated tenant), and a
gated call is settled exactly once when its result passed through, refunded otherwise.

The property tests are synchronous functions that drive one event loop of their own
(`LoopHarness`): one proxy and one upstream serve every example, and each example checks the
deltas it caused. Each bug found here has a test that pins its fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import string
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
import pytest
from aiohttp import web
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy.config import Config
from proxy.serve import run_server
from proxy.upstream import UpstreamBroken
from tests.conftest import ConfigFactory
from tests.proxy_harness import RunningProxy, local_server, run_proxy
from tests.redis_server import free_port

pytestmark = pytest.mark.timeout(120)

T = TypeVar("T")
TENANT = "acme"
TENANT_HEADER = "X-MCP-Tenant"
SMALL_LIMIT = 64 * 1024  # proxy.max_body_bytes where a test needs a small one
UNLIMITED = {"free": {"included_units": None, "overage": "block"}}
PROPERTY = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI stays stable
    database=None,  # no example database: failures reproduce from the seed, not from disk
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- an upstream whose behaviour each test chooses --------------------------------------------


@dataclass
class Got:
    """One request as the upstream received it: raw header lines (duplicates kept)."""

    method: str
    headers: list[tuple[str, str]]
    body: bytes

    def header_values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


Behaviour = Callable[[web.Request, bytes], Awaitable[web.StreamResponse]]


def result_for(rpc_id: object, text: str = "ok") -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": rpc_id,
        "result": {"content": [{"type": "text", "text": text}], "isError": False},
    }


async def answer_jsonrpc(_: web.Request, body: bytes) -> web.StreamResponse:
    """A well-behaved server: a result for every request, 202 when there is none."""
    try:
        doc = json.loads(body)
    except ValueError:
        return web.Response(status=400, text="upstream: the body is not JSON")
    messages = doc if isinstance(doc, list) else [doc]
    replies = [
        result_for(m["id"]) for m in messages if isinstance(m, dict) and "method" in m and "id" in m
    ]
    if not replies:
        return web.Response(status=202)
    return web.json_response(replies if isinstance(doc, list) else replies[0])


@dataclass
class HostileUpstream:
    got: list[Got] = field(default_factory=list)
    behaviour: Behaviour | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/mcp", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = [
            (k.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
            for k, v in request.raw_headers
        ]
        self.got.append(Got(request.method, headers, body))
        return await (self.behaviour or answer_jsonrpc)(request, body)


@asynccontextmanager
async def serve_upstream() -> AsyncIterator[tuple[HostileUpstream, str]]:
    up = HostileUpstream()
    async with local_server(up.app()) as base:
        yield up, base


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[HostileUpstream, str]]:
    async with serve_upstream() as pair:
        yield pair


# --- helpers ----------------------------------------------------------------------------------


def bearer(key: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {key}",
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
    }


def tools_call(rpc_id: object, tool: str = "add") -> bytes:
    return json.dumps(
        {"jsonrpc": "2.0", "id": rpc_id, "method": "tools/call", "params": {"name": tool}}
    ).encode()


async def quota(proxy: RunningProxy) -> tuple[int, int]:
    """(units counted this period, reservations still held) for TENANT."""
    engine = proxy.components.engine
    await engine.flush()  # commits leave the request path in batches
    used = await engine.used(TENANT, engine.period(None, None))
    return used, await proxy.components.storage.held(TENANT)


async def eventually(
    probe: Callable[[], Awaitable[T]], want: T, limit: float = 5.0, what: str = ""
) -> None:
    """Poll until probe() == want (bounded); refunds after a broken stream run off-task."""
    deadline = time.monotonic() + limit
    while True:
        got = await probe()
        if got == want:
            return
        assert time.monotonic() < deadline, f"{what or 'condition'}: {got!r} != {want!r}"
        await asyncio.sleep(0.01)


def assert_rpc_error(raw: bytes) -> dict[str, Any]:
    doc = json.loads(raw)
    assert doc["jsonrpc"] == "2.0", doc
    assert isinstance(doc["error"]["code"], int), doc
    assert isinstance(doc["error"]["message"], str) and doc["error"]["message"], doc
    assert doc["id"] is None or isinstance(doc["id"], str | int), doc
    return dict(doc)


def unhandled(caplog: pytest.LogCaptureFixture, *allowed: type[BaseException]) -> list[str]:
    """aiohttp's "Error handling request" records for exceptions the proxy did not handle."""
    out = []
    for record in caplog.records:
        if record.name != "aiohttp.server" or record.levelno < logging.ERROR:
            continue
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and isinstance(exc, allowed):
            continue
        out.append(f"{record.getMessage()}: {exc!r}")
    return out


@asynccontextmanager
async def proxy_for(
    make_config: ConfigFactory, upstream_url: str, **proxy_section: Any
) -> AsyncIterator[tuple[RunningProxy, str]]:
    config = make_config(upstream={"url": upstream_url}, plans=UNLIMITED, proxy=proxy_section)
    async with run_proxy(config) as proxy:
        yield proxy, await proxy.tenant_with_key(TENANT)


# --- raw HTTP/1.1, for what aiohttp's client will not send ------------------------------------


@dataclass
class RawReply:
    status: int
    headers: CIMultiDict[str]
    body: bytes


async def read_reply(reader: asyncio.StreamReader) -> RawReply:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.add(name.strip(), value.strip())
    if "Content-Length" in headers:
        body = await reader.readexactly(int(headers["Content-Length"]))
    elif headers.get("Transfer-Encoding", "").lower() == "chunked":
        body = b""
        while size := int((await reader.readline()).strip(), 16):
            body += await reader.readexactly(size)
            await reader.readline()
        await reader.readline()
    else:
        body = await reader.read()
    return RawReply(status, headers, body)


def port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


async def raw_exchange(port: int, request: bytes, *, limit: float = 5.0) -> RawReply:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(limit):
            return await read_reply(reader)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def raw_post(key_header: bytes, body: bytes, *extra: bytes) -> bytes:
    lines = [
        b"POST /mcp HTTP/1.1",
        b"Host: 127.0.0.1",
        key_header,
        b"Content-Type: application/json",
        b"Content-Length: " + str(len(body)).encode(),
        b"Connection: close",
        *extra,
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# --- one event loop for the property tests ----------------------------------------------------


class LoopHarness:
    """A proxy, an upstream and a client session on an event loop this object owns, so that a
    synchronous hypothesis test can run one coroutine per example against the same servers."""

    def __init__(self, make_config: ConfigFactory, **proxy_section: Any) -> None:
        self._make_config = make_config
        self._proxy_section = proxy_section
        self._runner = asyncio.Runner()
        self._stack = contextlib.AsyncExitStack()

    def __enter__(self) -> LoopHarness:
        self._runner.__enter__()
        try:
            self.run(self._start())
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.run(self._stack.aclose())
        finally:
            self._runner.__exit__(None, None, None)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(coro)

    async def _start(self) -> None:
        self.up, url = await self._stack.enter_async_context(serve_upstream())
        self.proxy, self.key = await self._stack.enter_async_context(
            proxy_for(self._make_config, url, **self._proxy_section)
        )
        self.http = await self._stack.enter_async_context(aiohttp.ClientSession())

    async def post(
        self, body: bytes, headers: CIMultiDict[str] | dict[str, str] | None = None
    ) -> tuple[int, CIMultiDict[str], bytes]:
        async with asyncio.timeout(10):
            async with self.http.post(
                self.proxy.url, data=body, headers=headers or bearer(self.key)
            ) as r:
                return r.status, CIMultiDict(r.headers), await r.read()


# --- 1. arbitrary bodies ----------------------------------------------------------------------

# An independent statement of what the proxy documents as well-formed (MCP's JSON-RPC: ids are
# strings or integers, never null or bool; tools/call needs params.name; no duplicate request
# ids in a batch). JSON itself is what orjson accepts: strict UTF-8, no NaN, no BOM, integers
# beyond 64 bits become floats (and so are not valid ids).


def _valid_id(value: object) -> bool:
    return isinstance(value, str | int) and not isinstance(value, bool)


def _valid_message(m: object) -> bool:
    if not isinstance(m, dict) or m.get("jsonrpc") != "2.0":
        return False
    if "id" in m and not _valid_id(m["id"]):
        return False
    if "method" in m:
        method, params = m["method"], m.get("params")
        if not isinstance(method, str) or not method:
            return False
        if params is not None and not isinstance(params, dict | list):
            return False
        if method == "tools/call":
            return (
                isinstance(params, dict)
                and isinstance(params.get("name"), str)
                and isinstance(params.get("arguments", {}), dict)
            )
        return True
    return ("result" in m or "error" in m) and _valid_id(m.get("id"))


def expected_calls(raw: bytes) -> int | None:
    """None when the body must be refused, else how many gated calls (tools/call) it holds."""
    try:
        doc = orjson.loads(raw)
    except ValueError:
        return None
    if isinstance(doc, list) and not doc:
        return None
    messages = doc if isinstance(doc, list) else [doc]
    if not all(_valid_message(m) for m in messages):
        return None
    request_ids = [m["id"] for m in messages if "method" in m and "id" in m]
    if len(request_ids) != len(set(request_ids)):
        return None
    return sum(1 for m in messages if m.get("method") == "tools/call" and "id" in m)


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
rpc_ids = st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8) | json_values
methods = (
    st.sampled_from(["tools/call", "tools/list", "initialize", "ping", "notifications/x", ""])
    | st.text(max_size=12)
    | json_scalars
)
tool_params = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["add", "echo", ""]) | json_scalars,
        "arguments": st.dictionaries(st.text(max_size=4), json_values, max_size=2) | json_values,
    },
)
good_ids = st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8)
gated_calls = st.fixed_dictionaries(
    {
        "jsonrpc": st.just("2.0"),
        "id": good_ids,
        "method": st.just("tools/call"),
        "params": st.fixed_dictionaries(
            {"name": st.text(max_size=8)},
            optional={"arguments": st.dictionaries(st.text(max_size=4), json_values, max_size=2)},
        ),
    }
)
good_messages = st.one_of(
    gated_calls,
    st.fixed_dictionaries(  # another request
        {"jsonrpc": st.just("2.0"), "id": good_ids, "method": methods.filter(bool)},
        optional={"params": st.dictionaries(st.text(max_size=4), json_values, max_size=2)},
    ),
    st.fixed_dictionaries(  # a notification
        {"jsonrpc": st.just("2.0"), "method": st.just("notifications/initialized")},
    ),
    st.fixed_dictionaries(  # a response (to a server request)
        {"jsonrpc": st.just("2.0"), "id": good_ids},
        optional={"result": json_values, "error": json_values},
    ),
)
MEMBERS = ["jsonrpc", "id", "method", "params", "result", "error"]
# Values at the edges of the rules: bool is an int to Python, 2**64 is a float to orjson...
EDGES = st.sampled_from(
    [True, False, None, 0, -1, 1.5, "", "2.0", "1.0", [], {}, 2**64, -(2**63) - 1, "tools/call"]
)


def _mutate(message: dict[str, Any], member: str, value: Any, delete: bool) -> dict[str, Any]:
    out = dict(message)
    if delete:
        out.pop(member, None)
    elif member == "params" and isinstance(out.get("params"), dict) and isinstance(value, dict):
        out["params"] = {**out["params"], **value}  # e.g. a bad name or arguments
    else:
        out[member] = value
    return out


noisy_messages = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.just("2.0") | json_scalars,
        "id": rpc_ids,
        "method": methods,
        "params": tool_params | json_values,
        "result": json_values,
        "error": json_values,
    },
)
mutated_messages = st.builds(
    _mutate,
    good_messages,
    st.sampled_from(MEMBERS),
    st.one_of(EDGES, EDGES.map(lambda v: {"name": v}), EDGES.map(lambda v: {"arguments": v})),
    st.integers(0, 9).map(lambda n: n == 0),  # now and then, drop the member instead
)
messages_st = st.one_of(good_messages, mutated_messages, mutated_messages, noisy_messages)
# Hypothesis also mixes in literals it finds in the code under test (which changes), so the
# share of well-formed bodies is kept high on purpose: both sides of the line stay explored.
json_docs = gated_calls | messages_st | st.lists(messages_st, max_size=4) | json_values
GATED = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "add"}}
EXPLICIT = [
    GATED,
    [GATED, {**GATED, "id": "1"}],  # 1 and "1" are different ids
    {**GATED, "id": True},
    {**GATED, "id": 2**64},  # a float to orjson
    [GATED, GATED],  # a duplicate id
    {"jsonrpc": "2.0", "method": "notifications/initialized"},
    {"jsonrpc": "2.0", "id": 7, "result": {}},
    {**GATED, "params": {"name": "add", "arguments": []}},
    [],
]


def explicit_examples(key: str, values: list[Any]) -> Callable[[Any], Any]:
    def decorate(f: Any) -> Any:
        for value in reversed(values):
            f = example(**{key: value})(f)
        return f

    return decorate


def _splice(raw: bytes, at: int, junk: bytes, replace: bool) -> bytes:
    at %= len(raw) + 1
    return raw[:at] + junk + raw[at + (len(junk) if replace else 0) :]


body_bytes = st.one_of(
    st.binary(max_size=300),
    json_docs.map(lambda d: json.dumps(d).encode()),
    st.builds(
        _splice,
        json_docs.map(lambda d: json.dumps(d).encode()),
        st.integers(0, 400),
        st.binary(min_size=1, max_size=3),
        st.booleans(),
    ),
)


async def _check_body(h: LoopHarness, body: bytes) -> None:
    seen = len(h.up.got)
    used_before, _ = await quota(h.proxy)
    status, headers, raw = await h.post(body)
    forwarded = h.up.got[seen:]
    used_after, held = await quota(h.proxy)
    calls = expected_calls(body)

    assert status < 500, (status, raw)
    assert held == 0
    if calls is None:
        assert 400 <= status < 500, (status, raw)
        assert headers.get("Content-Type", "").startswith("application/json")
        assert_rpc_error(raw)
        assert forwarded == [], "a malformed body reached the upstream"
        assert used_after == used_before, "a refused body moved the quota counter"
    else:
        assert [g.body for g in forwarded] == [body], (status, raw)
        assert used_after - used_before == calls
        assert status in (200, 202), (status, raw)


def test_arbitrary_bytes_never_5xx_and_only_wellformed_jsonrpc_reaches_upstream(
    make_config: ConfigFactory,
) -> None:
    with LoopHarness(make_config) as h:

        @PROPERTY
        @given(body=body_bytes)
        @explicit_examples("body", [json.dumps(d).encode() for d in EXPLICIT] + [b"\xef\xbb\xbf{}"])
        def check(body: bytes) -> None:
            h.run(_check_body(h, body))

        check()
        forwarded = len(h.up.got)
    assert forwarded >= 10, "too few well-formed examples: the strategy is too weak"


def test_arbitrary_json_values_never_5xx_and_are_gated_exactly(
    make_config: ConfigFactory,
) -> None:
    with LoopHarness(make_config) as h:

        @PROPERTY
        @given(doc=json_docs)
        @explicit_examples("doc", EXPLICIT)
        def check(doc: Any) -> None:
            h.run(_check_body(h, json.dumps(doc).encode()))

        check()
        bodies = [g.body for g in h.up.got]
        refused = h.proxy.components.metrics.registry.get_sample_value(
            "mqp_requests_total", {"method": "POST", "outcome": "bad_request"}
        )
    # Both sides of the line were explored.
    assert sum(b'"tools/call"' in b for b in bodies) >= 10, "too few gated calls were forwarded"
    assert (refused or 0) >= 10, "too few bodies were refused"


# --- 2. arbitrary headers ---------------------------------------------------------------------

TCHAR = "!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits
# Framing headers are the client library's business; Content-Encoding has its own test below.
CLIENT_OWNED = {"content-length", "transfer-encoding", "host", "connection", "expect", "upgrade"}
INTERESTING = [
    "X-MCP-Tenant",
    "x-mcp-tenant",
    "X-MCP-TENANT",
    "Authorization",
    "X-API-Key",
    "Mcp-Session-Id",
    "MCP-Protocol-Version",
    "X-Request-Id",
    "traceparent",
    "Origin",
    "Accept",
    "Content-Type",
    "Last-Event-ID",
    "Cookie",
    "Accept-Encoding",
    "Forwarded",
    "X-Forwarded-For",
    "TE",
    "Trailer",
    "Keep-Alive",
    "Proxy-Authorization",
    "Via",
]
header_names = (st.text(TCHAR, min_size=1, max_size=20) | st.sampled_from(INTERESTING)).filter(
    lambda n: n.lower() not in CLIENT_OWNED | {"content-encoding"}
)
header_values = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.sampled_from("\té☃ü"),
    max_size=40,
)


def test_arbitrary_headers_never_5xx_and_upstream_sees_only_the_authenticated_tenant(
    make_config: ConfigFactory,
) -> None:
    with LoopHarness(make_config) as h:

        async def one(extra: list[tuple[str, str]]) -> None:
            headers = CIMultiDict(bearer(h.key))  # the real key first: it is the one read
            for name, value in extra:
                headers.add(name, value)
            seen = len(h.up.got)
            status, _, raw = await h.post(tools_call(1), headers)
            assert status < 500, (status, raw, extra)
            for got in h.up.got[seen:]:
                assert got.header_values(TENANT_HEADER) == [TENANT], got.headers
                for secret in ("Authorization", "X-API-Key", "Cookie", "Proxy-Authorization"):
                    assert got.header_values(secret) == [], got.headers
                assert h.key not in json.dumps(got.headers)

        @PROPERTY
        @given(extra=st.lists(st.tuples(header_names, header_values), max_size=10))
        def check(extra: list[tuple[str, str]]) -> None:
            h.run(one(extra))

        check()
        assert h.up.got, "no example was forwarded"


async def test_client_tenant_headers_in_any_case_are_replaced_by_the_authenticated_one(
    make_config: ConfigFactory, upstream: tuple[HostileUpstream, str]
) -> None:
    up, url = upstream
    spoofs = [
        [("X-MCP-Tenant", "victim")],
        [("x-mcp-tenant", "victim")],
        [("X-MCP-TENANT", "victim")],
        [("X-Mcp-Tenant", "a"), ("x-mcp-tenant", "b"), ("X-MCP-TENANT", "c")],
        [("X-MCP-Tenant", "")],
        [("X-MCP-Tenant", "acme, victim")],
        [("Connection", "X-MCP-Tenant"), ("X-MCP-Tenant", "victim")],
    ]
    async with proxy_for(make_config, url) as (proxy, key):
        port = port_of(proxy.base)
        for i, spoof in enumerate(spoofs):
            # Raw, so that exactly these lines (duplicates, cases) are what the proxy reads.
            extra = [f"{k}: {v}".encode() for k, v in spoof]
            reply = await raw_exchange(
                port, raw_post(f"Authorization: Bearer {key}".encode(), tools_call(i), *extra)
            )
            assert reply.status == 200, (spoof, reply)
            got = up.got[-1]
            assert got.header_values(TENANT_HEADER) == [TENANT], (spoof, got.headers)
    assert len(up.got) == len(spoofs)


async def test_underscore_spelling_of_the_tenant_header_is_not_forwarded(
    make_config: ConfigFactory, upstream: tuple[HostileUpstream, str]
) -> None:
    up, url = upstream
    async with proxy_for(make_config, url) as (proxy, key):
        headers = CIMultiDict(bearer(key))
        headers.add("X_MCP_Tenant", "victim")
        async with (
            aiohttp.ClientSession() as http,
            http.post(proxy.url, data=tools_call(1), headers=headers) as r,
        ):
            assert r.status == 200
    (got,) = up.got
    normalised = [v for k, v in got.headers if k.lower().replace("_", "-") == "x-mcp-tenant"]
    assert normalised == [TENANT], got.headers


async def test_a_cookie_the_upstream_sets_for_one_tenant_never_reaches_another(
    make_config: ConfigFactory, upstream: tuple[HostileUpstream, str]
) -> None:
    """The proxy's one upstream session serves every tenant: it must keep no cookie jar."""
    up, url = upstream

    async def set_cookie(request: web.Request, body: bytes) -> web.StreamResponse:
        reply = await answer_jsonrpc(request, body)
        reply.headers.add("Set-Cookie", "upstream_session=first-tenant; Path=/")
        return reply

    up.behaviour = set_cookie
    # By a host name: aiohttp's cookie jar ignores cookies from IP addresses.
    by_name = url.replace("127.0.0.1", "localhost")
    async with proxy_for(make_config, by_name) as (proxy, key), aiohttp.ClientSession() as http:
        other = await proxy.tenant_with_key("other-tenant")
        async with http.post(proxy.url, data=tools_call(1), headers=bearer(key)) as r:
            assert r.status == 200
            # Passed on to the client it was meant for, as the upstream sent it.
            assert r.headers.getall("Set-Cookie") == ["upstream_session=first-tenant; Path=/"]
        http.cookie_jar.clear()  # the client keeps no cookie either: only the proxy could leak
        async with http.post(proxy.url, data=tools_call(2), headers=bearer(other)) as r:
            assert r.status == 200
    assert len(up.got) == 2
    assert [k for k, _ in up.got[1].headers if k.lower() == "cookie"] == [], up.got[1].headers


# --- 3. invalid bytes in headers and bodies (raw sockets) -------------------------------------


@pytest.mark.parametrize("header", [b"Authorization: Bearer \xff\xfe", b"X-API-Key: k\xc3\xff"])
async def test_a_key_that_is_not_utf8_is_401_not_500(
    make_config: ConfigFactory, upstream: tuple[HostileUpstream, str], header: bytes
) -> None:
    up, url = upstream
    async with proxy_for(make_config, url) as (proxy, _):
        reply = await raw_exchange(port_of(proxy.base), raw_post(header, tools_call(1)))
    assert reply.status == 401, reply
    assert_rpc_error(reply.body)
    assert up.got == []


async def test_a_session_id_that_is_not_utf8_is_4xx_not_500(
    make_config: ConfigFactory, upstream: tuple[HostileUpstream, str]
) -> None:
    up, url = upstream
    async with proxy_for(make_config, url) as (proxy, key):
        request = raw_post(
            f"Authorization: Bearer {key}".encode(), tools_call(1), b"Mcp-Session-Id: s\xff\xfe"
        )
        reply = await raw_exchange(port_of(proxy.base), request)
        assert await quota(proxy) == (0, 0)
    assert 400 <= reply.status < 500, reply
    assert up.got == []


async def _inflight(proxy: RunningProxy) -> float:
    return proxy.components.metrics.registry.get_sample_value("mqp_inflight_requests") or 0.0


async def test_an_undecodable_compressed_body_is_400_not_500(
    make_config: ConfigFactory, upstream: tuple[HostileUpstream, str]
) -> None:
    up, url = upstream
    async with proxy_for(make_config, url) as (proxy, key):
        body = b"this is not gzip"
        head = (
            f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Encoding: gzip\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy.base))
        try:
            writer.write(head)
            await writer.drain()
            # The body goes once the handler runs, so it is decoded while request.read() waits.
            await eventually(lambda: _inflight(proxy), 1.0, what="the handler to start")
            writer.write(body)
            await writer.drain()
            async with asyncio.timeout(5):
                reply = await read_reply(reader)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    assert reply.status == 400, reply
    assert_rpc_error(reply.body)
    assert up.got == []


async def test_a_gzip_request_body_reaches_the_upstream_decoded_and_labelled_so(
    make_config: ConfigFactory, upstream: tuple[HostileUpstream, str]
) -> None:
    import gzip

    up, url = upstream
    async with proxy_for(make_config, url) as (proxy, key), aiohttp.ClientSession() as http:
        headers = {**bearer(key), "Content-Encoding": "gzip"}
        async with http.post(proxy.url, data=gzip.compress(tools_call(5)), headers=headers) as r:
            status = r.status
    (got,) = up.got
    assert got.header_values("Content-Encoding") in ([], ["identity"]), got.headers
    assert got.body == tools_call(5)
    assert status == 200


async def test_a_gzip_bomb_stops_at_the_body_limit(
    make_config: ConfigFactory, upstream: tuple[HostileUpstream, str]
) -> None:
    import gzip

    up, url = upstream
    bomb = gzip.compress(b"[" + b" " * (32 * 1024 * 1024) + b"]")  # 32 MiB from ~32 KiB
    async with (
        proxy_for(make_config, url, max_body_bytes=SMALL_LIMIT) as (proxy, key),
        aiohttp.ClientSession() as http,
    ):
        headers = {**bearer(key), "Content-Encoding": "gzip"}
        async with http.post(proxy.url, data=bomb, headers=headers) as r:
            status, raw = r.status, await r.read()
        assert await quota(proxy) == (0, 0)
    assert status == 413
    assert assert_rpc_error(raw)["error"]["code"] == -31413
    assert up.got == []


@pytest.mark.parametrize(
    "framing",
    [
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",  # bad chunk size
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nabcdefgh\r\n0\r\n\r\n",  # chunk overrun
        b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",  # smuggling shape
        b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",  # conflicting lengths
        b"Content-Length: -1\r\n\r\n{}",
    ],
    ids=["bad-chunk-size", "chunk-overrun", "cl-and-te", "two-lengths", "negative-length"],
)
async def test_malformed_framing_is_refused_before_the_proxy(
    make_config: ConfigFactory, upstream: tuple[HostileUpstream, str], framing: bytes
) -> None:
    up, url = upstream
    async with proxy_for(make_config, url) as (proxy, key):
        head = f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        reply = await raw_exchange(port_of(proxy.base), head.encode() + framing)
        assert await quota(proxy) == (0, 0)
    assert 400 <= reply.status < 500, reply
    assert up.got == []


# --- 4. parser differentials --------------------------------------------------------------------


def _go_like(raw: bytes) -> dict[str, Any]:
    """How Go's encoding/json (v1) fills `Method string `json:"method"``-style structs: keys
    match fields case-insensitively and the last match wins."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            out[k.lower()] = v
        return out

    return dict(json.loads(raw, object_pairs_hook=hook))


def _first_wins(raw: bytes) -> dict[str, Any]:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            out.setdefault(k, v)
        return out

    return dict(json.loads(raw, object_pairs_hook=hook))


def _view(doc: dict[str, Any]) -> tuple[object, object]:
    params = doc.get("params")
    return doc.get("method"), params.get("name") if isinstance(params, dict) else None


@pytest.mark.parametrize(
    "body",
    [
        # gated as tools/call "add"; Go runs the plan-hidden "secret_tool"
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call",'
        b'"params":{"name":"add","Name":"secret_tool"}}',
        # gated as ping (free); Go runs tools/call
        b'{"jsonrpc":"2.0","id":2,"method":"ping","Method":"tools/call","params":{"name":"add"}}',
        # gated as ping (free); a first-wins parser runs tools/call
        b'{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"add"},"method":"ping"}',
    ],
    ids=["case-folded-tool-name", "case-folded-method", "duplicate-method"],
)
async def test_the_upstream_reads_the_same_call_the_proxy_gated(
    make_config: ConfigFactory, upstream: tuple[HostileUpstream, str], body: bytes
) -> None:
    up, url = upstream
    config = make_config(
        upstream={"url": url},
        plans={
            "free": {"included_units": None, "overage": "block", "hidden_tools": ["secret_tool"]}
        },
    )
    async with run_proxy(config) as proxy, aiohttp.ClientSession() as http:
        key = await proxy.tenant_with_key(TENANT)
        async with http.post(proxy.url, data=body, headers=bearer(key)) as r:
            assert r.status < 500
    gated = _view(orjson.loads(body))
    for got in up.got:  # refusing the body (nothing forwarded) is a fix too
        assert _view(_go_like(got.body)) == gated, got.body
        assert _view(_first_wins(got.body)) == gated, got.body


# --- 5. SSE streams from the upstream -------------------------------------------------------------


def sse_replay(chunks: list[bytes], *, abort: bool = False) -> Behaviour:
    async def behave(request: web.Request, _: bytes) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for chunk in chunks:
            await resp.write(chunk)
            # Pacing, not synchronisation: gives the proxy a chance to read each chunk on its own.
            await asyncio.sleep(0.001)
        if abort:
            assert request.transport is not None
            request.transport.abort()
        else:
            await resp.write_eof()
        return resp

    return behave


async def sse_call(
    h_http: aiohttp.ClientSession, proxy: RunningProxy, key: str, rpc_id: int
) -> tuple[int, bytes]:
    async with asyncio.timeout(20):
        async with h_http.post(proxy.url, data=tools_call(rpc_id), headers=bearer(key)) as r:
            return r.status, await r.read()


async def check_stream(
    up: HostileUpstream,
    http: aiohttp.ClientSession,
    proxy: RunningProxy,
    key: str,
    rpc_id: int,
    chunks: list[bytes],
    *,
    has_result: bool,
) -> None:
    up.behaviour = sse_replay(chunks)
    events_before = len(proxy.sink.events)
    used_before, _ = await quota(proxy)
    status, got = await sse_call(http, proxy, key, rpc_id)
    assert status == 200
    assert got == b"".join(chunks), "the client did not get the upstream's exact bytes"
    used_after, held = await quota(proxy)
    new = proxy.sink.events[events_before:]
    assert held == 0
    if has_result:
        assert [e.rpc_id for e in new] == [str(rpc_id)], "not settled exactly once"
        assert used_after - used_before == 1
    else:
        assert new == [], "settled without a result"
        assert used_after == used_before, "not refunded"


def result_event(rpc_id: int, eol: str = "\n", *, extra: str = "") -> bytes:
    data = json.dumps(result_for(rpc_id, text="done"))
    return f"event: message{eol}id: r{rpc_id}{eol}{extra}data: {data}{eol}{eol}".encode()


PRELUDE = (
    b"\xef\xbb\xbf: stream opened\n\n"  # BOM at the start, then a comment-only keep-alive
    b"id: 1\r\ndata: \r\n\r\n"  # MCP priming event
    b"retry: 1500\rdata: line one\rdata: line two\r\r"
    b"event: message\r\ndata: "
    + json.dumps(
        {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}}
    ).encode()
    + b"\r\n\r\n\n"  # an extra blank line between events
)
EPILOGUE = b": after the result\n\ndata: trailing\n\n"


async def test_the_result_event_split_at_every_byte_offset_passes_byte_for_byte_and_settles_once(
    make_config: ConfigFactory, upstream: tuple[HostileUpstream, str]
) -> None:
    up, url = upstream
    async with proxy_for(make_config, url) as (proxy, key), aiohttp.ClientSession() as http:
        rpc_id = 1000  # ids 1001..1999 all have four digits: every event has the same length
        for eol in ("\n", "\r\n", "\r"):
            length = len(result_event(rpc_id, eol, extra=f": inside{eol}"))
            for k in range(length + 1):
                rpc_id += 1
                final = result_event(rpc_id, eol, extra=f": inside{eol}")
                chunks = [c for c in (PRELUDE, final[:k], final[k:], EPILOGUE) if c]
                await check_stream(up, http, proxy, key, rpc_id, chunks, has_result=True)
        assert 1400 < rpc_id < 2000
        assert await quota(proxy) == (rpc_id - 1000, 0)


async def test_a_stream_closed_before_or_inside_the_result_event_is_refunded(
    make_config: ConfigFactory, upstream: tuple[HostileUpstream, str]
) -> None:
    up, url = upstream
    async with proxy_for(make_config, url) as (proxy, key), aiohttp.ClientSession() as http:
        final = result_event(7, "\r\n")
        for k in range(0, len(final), 7):  # every 7th offset: the event never completes
            await check_stream(
                up, http, proxy, key, 7, [PRELUDE, final[:k]] if k else [PRELUDE], has_result=False
            )
        assert await quota(proxy) == (0, 0)
        assert proxy.sink.events == []


async def test_a_one_mebibyte_multiline_event_then_the_result(
    make_config: ConfigFactory, upstream: tuple[HostileUpstream, str]
) -> None:
    up, url = upstream
    eols = ["\n", "\r\n", "\r"]
    lines = [f"data: {'x' * 997}{i % 10}{eols[i % 3]}" for i in range(1050)]  # ~1 MiB
    huge = ("event: log\n" + "".join(lines) + "\n\n").encode()
    stream = PRELUDE + huge + result_event(9) + EPILOGUE
    # 64 KiB pieces with odd offsets, so chunk edges fall inside lines, CRLFs and the result.
    cuts = sorted({*range(0, len(stream), 65_537), len(stream) - len(EPILOGUE) - 40})
    chunks = [stream[a:b] for a, b in zip(cuts, [*cuts[1:], len(stream)], strict=True)]
    async with proxy_for(make_config, url) as (proxy, key), aiohttp.ClientSession() as http:
        await check_stream(up, http, proxy, key, 9, chunks, has_result=True)
        await check_stream(up, http, proxy, key, 10, [PRELUDE, huge], has_result=False)
        assert await quota(proxy) == (1, 0)


EOLS = ("\n", "\r\n", "\r")
# No '"': no other event can carry a JSON-RPC response that the proxy would take for the result.
sse_text = st.text(
    st.characters(blacklist_characters='\r\n"', blacklist_categories=("Cs",)), max_size=24
)
field_lines = st.one_of(
    sse_text.map(lambda v: f"data: {v}"),
    sse_text.map(lambda v: f"data:{v}"),
    st.just("data"),
    sse_text.map(lambda v: f":{v}"),
    sse_text.map(lambda v: f"id: {v}"),
    (st.integers(0, 10**7).map(str) | sse_text).map(lambda v: f"retry: {v}"),
    sse_text.map(lambda v: f"event: {v}"),
    st.tuples(st.text(string.ascii_letters, min_size=1, max_size=6), sse_text).map(
        lambda kv: f"{kv[0]}: {kv[1]}"
    ),
)
blocks = st.lists(
    st.tuples(
        st.lists(st.tuples(field_lines, st.sampled_from(EOLS)), min_size=1, max_size=5),
        st.sampled_from(EOLS),
        st.integers(0, 2),  # extra blank lines after the event
    ),
    max_size=6,
)


def render_block(
    lines: list[tuple[str, str]], end: str, extra_blanks: int, prev: str
) -> tuple[str, str]:
    """Serialise one event, never letting a CR end one line while an LF starts the next (that
    would be a CRLF and change where the event ends)."""
    out = []
    for text, wanted in [*lines, ("", end), *[("", "\n")] * extra_blanks]:
        eol = "\r\n" if prev == "\r" and wanted.startswith("\n") else wanted
        out.append(text + eol)
        prev = eol[-1]
    return "".join(out), prev


@dataclass
class GeneratedStream:
    before: list[Any]
    after: list[Any]
    with_result: bool
    result_eol: str
    tail: str
    cuts: list[float]

    def render(self, rpc_id: int) -> tuple[bytes, bool]:
        text, prev = "", ""
        for lines, end, blanks in self.before:
            block, prev = render_block(lines, end, blanks, prev)
            text += block
        if self.with_result:
            eol = "\r\n" if prev == "\r" and self.result_eol == "\n" else self.result_eol
            text += result_event(rpc_id, eol).decode()
            prev = eol[-1]
        for lines, end, blanks in self.after:
            block, prev = render_block(lines, end, blanks, prev)
            text += block
        return (text + self.tail).encode(), self.with_result

    def chunks(self, stream: bytes) -> list[bytes]:
        cuts = sorted({int(c * len(stream)) for c in self.cuts} | {0, len(stream)})
        return [stream[a:b] for a, b in itertools.pairwise(cuts) if b > a]


generated_streams = st.builds(
    GeneratedStream,
    before=blocks,
    after=blocks,
    with_result=st.booleans(),
    result_eol=st.sampled_from(EOLS),
    tail=st.sampled_from(["", "data: unfinished", ": half a comment", "id: 9"]),
    cuts=st.lists(st.floats(0, 1), max_size=12),
)


def test_generated_sse_streams_pass_byte_for_byte_and_settle_iff_the_result_came(
    make_config: ConfigFactory,
) -> None:
    with LoopHarness(make_config) as h:
        ids = iter(range(10_000, 1_000_000))

        @PROPERTY
        @given(gen=generated_streams)
        def check(gen: GeneratedStream) -> None:
            rpc_id = next(ids)
            stream, has_result = gen.render(rpc_id)
            if not stream:
                return
            h.run(
                check_stream(
                    h.up, h.http, h.proxy, h.key, rpc_id, gen.chunks(stream), has_result=has_result
                )
            )

        check()


# --- 6. slow clients ----------------------------------------------------------------------------


async def _trickle(writer: asyncio.StreamWriter, data: bytes, every: float) -> None:
    """A slowloris: one byte at a time, until the server stops reading or closes."""
    with contextlib.suppress(ConnectionError):
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
            await asyncio.sleep(every)


async def _closed_within(reader: asyncio.StreamReader, limit: float) -> bool:
    """Whether the server closes the connection within `limit` s (reading whatever it says)."""
    try:
        async with asyncio.timeout(limit):
            while await reader.read(65536):
                pass
            return True
    except TimeoutError:
        return False
    except ConnectionError:
        return True


async def test_a_body_sent_one_byte_at_a_time_is_cut_off_and_the_connection_released(
    make_config: ConfigFactory, upstream: tuple[HostileUpstream, str]
) -> None:
    """The bound today: 408 at proxy.body_timeout_s (a total deadline the trickle cannot
    extend), then aiohttp's lingering close (lingering_time, 10 s) reads and drops what is
    still coming and closes the connection."""
    up, url = upstream
    body_timeout = 1.0
    section = {"body_timeout_s": body_timeout}
    async with proxy_for(make_config, url, **section) as (proxy, key):
        body = tools_call(1) + b" " * 400
        head = (
            f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy.base))
        writer.write(head)
        await writer.drain()
        started = time.monotonic()
        trickle = asyncio.create_task(_trickle(writer, body, every=0.25))
        try:
            async with asyncio.timeout(body_timeout + 2.0):
                reply = await read_reply(reader)
            answered = time.monotonic() - started
            assert reply.status == 408, reply
            assert_rpc_error(reply.body)
            assert reply.headers.get("Connection", "").lower() == "close"
            assert await _inflight(proxy) == 0, "the handler is still holding the request"
            lingering = 10.0  # aiohttp's RequestHandler lingering_time default
            assert await _closed_within(reader, lingering + 3.0), (
                "the connection outlived the body timeout plus aiohttp's lingering close"
            )
            closed = time.monotonic() - started
        finally:
            trickle.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await trickle
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        assert await quota(proxy) == (0, 0)
    assert body_timeout * 0.8 < answered < body_timeout + 2.0
    assert closed < body_timeout + 13.0
    assert up.got == []


@asynccontextmanager
async def serve_in_process(config: Config) -> AsyncIterator[str]:
    """proxy.serve.run_server (the production AppRunner wiring) on this loop; its base URL."""
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def on_ready(url: str) -> None:
        ready.set_result(url)

    task = asyncio.create_task(run_server(config, on_ready=on_ready, stop=stop))
    try:
        done, _ = await asyncio.wait({task, ready}, timeout=15, return_when="FIRST_COMPLETED")
        assert ready in done, f"serve did not start: {task.exception() if task.done() else ''}"
        yield ready.result()
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_slow_headers_and_idle_connections_are_cut_off(
    make_config: ConfigFactory, upstream: tuple[HostileUpstream, str], tmp_path: Path
) -> None:
    _, url = upstream
    bound = 1.0
    section = {"body_timeout_s": bound, "header_timeout_s": bound}
    config = make_config(
        listen={"host": "127.0.0.1", "port": free_port()},
        upstream={"url": url},
        proxy=section,
        spool={"path": str(tmp_path / "usage.db")},
        ops={"readiness_delay_s": 0, "shutdown_grace_s": 2},
    )
    async with serve_in_process(config) as base:
        port = port_of(base)
        slow_reader, slow_writer = await asyncio.open_connection("127.0.0.1", port)
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
        slow_writer.write(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        trickle = asyncio.create_task(_trickle(slow_writer, b"X-Slow: " + b"a" * 400, 0.25))
        try:
            slow_closed, idle_closed = await asyncio.gather(
                _closed_within(slow_reader, bound + 3.0), _closed_within(idle_reader, bound + 3.0)
            )
        finally:
            trickle.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await trickle
            for w in (slow_writer, idle_writer):
                w.close()
                with contextlib.suppress(ConnectionError):
                    await w.wait_closed()
    assert slow_closed, f"a client trickling its headers still held its socket after {bound + 3} s"
    assert idle_closed, f"a connection that sent nothing was still open after {bound + 3} s"


# --- 7. oversized bodies ------------------------------------------------------------------------


async def test_content_length_over_the_limit_is_413_and_upstream_untouched(
    make_config: ConfigFactory, upstream: tuple[HostileUpstream, str]
) -> None:
    up, url = upstream
    body = tools_call(1)[:-1] + b',"pad":"' + b"a" * SMALL_LIMIT + b'"}'
    async with (
        proxy_for(make_config, url, max_body_bytes=SMALL_LIMIT) as (proxy, key),
        aiohttp.ClientSession() as http,
    ):
        async with http.post(proxy.url, data=body, headers=bearer(key)) as r:
            status, raw = r.status, await r.read()
        # Just under the limit is fine.
        ok = tools_call(2)[:-1] + b',"pad":"' + b"a" * (SMALL_LIMIT - 200) + b'"}'
        async with http.post(proxy.url, data=ok, headers=bearer(key)) as r:
            assert r.status == 200
        assert await quota(proxy) == (1, 0)
    assert status == 413
    assert "limit is 65536 bytes" in assert_rpc_error(raw)["error"]["message"]
    assert [g.body for g in up.got] == [ok]


async def test_a_chunked_body_growing_past_the_limit_is_413_and_upstream_untouched(
    make_config: ConfigFactory, upstream: tuple[HostileUpstream, str]
) -> None:
    up, url = upstream

    async def chunks() -> AsyncIterator[bytes]:
        yield tools_call(1)[:-1] + b',"pad":"'
        for _ in range(4 * SMALL_LIMIT // 4096):
            yield b"a" * 4096
        yield b'"}'

    async with (
        proxy_for(make_config, url, max_body_bytes=SMALL_LIMIT) as (proxy, key),
        aiohttp.ClientSession() as http,
    ):
        async with http.post(proxy.url, data=chunks(), headers=bearer(key)) as r:
            assert "Content-Length" not in r.request_info.headers
            status, raw = r.status, await r.read()
        assert await quota(proxy) == (0, 0)
    assert status == 413
    assert_rpc_error(raw)
    assert up.got == []


async def test_a_declared_content_length_over_the_limit_is_refused_before_the_body(
    make_config: ConfigFactory, upstream: tuple[HostileUpstream, str]
) -> None:
    up, url = upstream
    async with proxy_for(make_config, url, max_body_bytes=SMALL_LIMIT) as (proxy, key):
        head = (
            f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Length: {100 * SMALL_LIMIT}\r\n\r\n"
        ).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy.base))
        try:
            writer.write(head + b'{"jsonrpc":')  # and nothing more for now
            await writer.drain()
            try:
                async with asyncio.timeout(3.0):
                    reply: RawReply | None = await read_reply(reader)
            except TimeoutError:
                reply = None
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    assert reply is not None, (
        "no answer within 3 s to a request declaring 6.4 MB over a 64 KiB limit"
    )
    assert reply.status == 413
    assert up.got == []


# --- 8. garbage from the upstream ------------------------------------------------------------


def _result_bytes(rpc_id: int) -> bytes:
    return json.dumps(result_for(rpc_id)).encode()


async def _send(request: web.Request, status: int, ctype: str, body: bytes) -> web.StreamResponse:
    return web.Response(status=status, body=body, headers={"Content-Type": ctype})


async def _abort_after(
    request: web.Request, ctype: str, first: bytes, *, length: int | None = None
) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": ctype})
    if length is not None:
        resp.content_length = length
    await resp.prepare(request)
    await resp.write(first)
    assert request.transport is not None
    request.transport.abort()  # connection reset mid-body
    return resp


async def _abort_at_once(request: web.Request, _: bytes) -> web.StreamResponse:
    assert request.transport is not None
    request.transport.abort()
    return web.Response()


GARBAGE: dict[str, tuple[Behaviour, str, int | None, bytes | None]] = {
    # name: (behaviour, what the client gets: "bytes" / "rpc_error" / "broken", status, body)
    "json-not-json": (
        lambda r, _: _send(r, 200, "application/json", b"{not json"),
        "bytes",
        200,
        b"{not json",
    ),
    "json-truncated": (
        lambda r, _: _send(r, 200, "application/json", _result_bytes(1)[:-9]),
        "bytes",
        200,
        _result_bytes(1)[:-9],
    ),
    "json-empty": (lambda r, _: _send(r, 200, "application/json", b""), "bytes", 200, b""),
    "json-wrong-id": (
        lambda r, _: _send(r, 200, "application/json", _result_bytes(999)),
        "bytes",
        200,
        _result_bytes(999),
    ),
    "json-not-an-object": (
        lambda r, _: _send(r, 200, "application/json", b'[1, "two", null]'),
        "bytes",
        200,
        b'[1, "two", null]',
    ),
    "result-as-text-plain": (
        lambda r, _: _send(r, 200, "text/plain", _result_bytes(1)),
        "bytes",
        200,
        _result_bytes(1),
    ),
    "http-500": (
        lambda r, _: _send(r, 500, "text/plain", b"upstream exploded"),
        "bytes",
        500,
        b"upstream exploded",
    ),
    "http-502-html": (
        lambda r, _: _send(r, 502, "text/html", b"<html>bad gateway</html>"),
        "bytes",
        502,
        b"<html>bad gateway</html>",
    ),
    "sse-closed-mid-event": (
        sse_replay([b"id: 1\ndata: \n\n", b"data: " + _result_bytes(1)[:20]]),
        "bytes",
        200,
        b"id: 1\ndata: \n\ndata: " + _result_bytes(1)[:20],
    ),
    "sse-garbage-data": (
        sse_replay([b'data: {"id": 1, "result": \n\n', b"\x00\xff\xfe\n\n"]),
        "bytes",
        200,
        b'data: {"id": 1, "result": \n\n\x00\xff\xfe\n\n',
    ),
    "reset-before-headers": (_abort_at_once, "rpc_error", 502, None),
    # A metered JSON reply is read whole before anything is sent: the client gets a 502.
    "reset-mid-json-chunked": (
        lambda r, _: _abort_after(r, "application/json", _result_bytes(1)[:10]),
        "rpc_error",
        502,
        None,
    ),
    # A metered JSON reply is read whole before anything is sent: the client gets a 502.
    "reset-mid-json-content-length": (
        lambda r, _: _abort_after(r, "application/json", _result_bytes(1)[:10], length=500),
        "rpc_error",
        502,
        None,
    ),
    "reset-mid-sse-event": (
        sse_replay([b"id: 1\ndata: \n\n", b"data: " + _result_bytes(1)[:20]], abort=True),
        "broken",
        None,
        None,
    ),
    "reset-mid-plain-text": (
        lambda r, _: _abort_after(r, "text/plain", b"partial"),
        "broken",
        None,
        None,
    ),
}


@pytest.mark.parametrize("name", list(GARBAGE))
async def test_upstream_garbage_gets_a_clean_answer_and_a_refund(
    make_config: ConfigFactory,
    upstream: tuple[HostileUpstream, str],
    caplog: pytest.LogCaptureFixture,
    name: str,
) -> None:
    up, url = upstream
    behaviour, kind, status, body = GARBAGE[name]
    up.behaviour = behaviour
    async with proxy_for(make_config, url) as (proxy, key), aiohttp.ClientSession() as http:
        outcome: tuple[int, bytes] | BaseException
        try:
            async with asyncio.timeout(10):  # never a hang
                async with http.post(proxy.url, data=tools_call(1), headers=bearer(key)) as r:
                    outcome = (r.status, await r.read())
        except aiohttp.ClientError as exc:
            outcome = exc
        await eventually(lambda: quota(proxy), (0, 0), what="refund")
        assert proxy.sink.events == []
        assert await _inflight(proxy) == 0
    if kind == "broken":
        # Headers went out before the upstream failed: the only honest signal left is an
        # aborted transfer, never a complete-looking reply.
        assert isinstance(outcome, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError), (
            outcome
        )
    else:
        assert isinstance(outcome, tuple), outcome
        got_status, got_body = outcome
        assert got_status == status, outcome
        if kind == "bytes":
            assert got_body == body, "the client did not get the upstream's own bytes"
        else:
            doc = assert_rpc_error(got_body)
            assert (doc["error"]["code"], doc["id"]) == (-31502, 1)  # the request's own id
    assert len(up.got) == 1
    # A broken upstream stream is re-raised on purpose (forward.py logs upstream_stream_broken
    # and re-raises so aiohttp aborts the client's transfer); nothing else may escape.
    assert unhandled(caplog, UpstreamBroken) == []


async def test_an_sse_event_over_the_parser_limit_is_an_upstream_fault_not_a_crash(
    make_config: ConfigFactory,
    upstream: tuple[HostileUpstream, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    up, url = upstream
    up.behaviour = sse_replay([b"data: " + b"x" * (9 * 1024 * 1024) + b"\n\n"])
    async with proxy_for(make_config, url) as (proxy, key), aiohttp.ClientSession() as http:
        with contextlib.suppress(aiohttp.ClientError):
            async with asyncio.timeout(20):
                async with http.post(proxy.url, data=tools_call(1), headers=bearer(key)) as r:
                    await r.read()
        await eventually(lambda: quota(proxy), (0, 0), what="refund")
    assert unhandled(caplog, UpstreamBroken) == []
