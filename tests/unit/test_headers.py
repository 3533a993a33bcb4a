"""Tests for proxy.headers: which headers cross the proxy, and the Origin check."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from proxy.headers import downstream_response_headers, origin_allowed, upstream_request_headers

TENANT_HEADER = "X-MCP-Tenant"
TENANT = "tenant-42"

KEPT_REQUEST = [
    ("Accept", "application/json, text/event-stream"),
    ("Content-Type", "application/json"),
    ("Mcp-Session-Id", "sess-1"),
    ("MCP-Protocol-Version", "2025-06-18"),
    ("Last-Event-ID", "ev-9"),
    ("Mcp-Method", "tools/call"),
    ("Mcp-Name", "search"),
    ("Mcp-Param-Foo", "bar"),
    ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
]

DROPPED_REQUEST = [
    ("Host", "proxy.example.com"),
    ("Content-Length", "123"),
    ("Origin", "https://app.example.com"),
    ("Authorization", "Bearer mqp_secret"),
    ("X-API-Key", "mqp_secret"),
    ("Accept-Encoding", "gzip, br"),
    ("Cookie", "session=abc"),
    ("Connection", "keep-alive, X-Hop-Custom"),
    ("Keep-Alive", "timeout=5"),
    ("Proxy-Authorization", "Basic abc"),
    ("Proxy-Connection", "keep-alive"),
    ("TE", "trailers"),
    ("Trailer", "Expires"),
    ("Transfer-Encoding", "chunked"),
    ("Upgrade", "websocket"),
    ("X-Hop-Custom", "named in Connection"),
]


def forwarded(pairs: list[tuple[str, str]]) -> CIMultiDict[str]:
    return upstream_request_headers(pairs, TENANT_HEADER, TENANT)


# --- upstream -------------------------------------------------------------------------------


def test_upstream_keeps_mcp_and_tracing_headers() -> None:
    out = forwarded(KEPT_REQUEST + DROPPED_REQUEST)
    for name, value in KEPT_REQUEST:
        assert out.getall(name) == [value]


@pytest.mark.parametrize("name", [n for n, _ in DROPPED_REQUEST])
def test_upstream_drops(name: str) -> None:
    out = forwarded(KEPT_REQUEST + DROPPED_REQUEST)
    assert name not in out


def test_upstream_output_is_exactly_kept_headers_plus_tenant() -> None:
    out = forwarded(KEPT_REQUEST + DROPPED_REQUEST)
    assert list(out.items()) == [*KEPT_REQUEST, (TENANT_HEADER, TENANT)]


@pytest.mark.parametrize(
    "name",
    ["authorization", "AUTHORIZATION", "x-api-key", "X-Api-Key", "HOST", "accept-encoding"],
)
def test_upstream_drops_credentials_case_insensitively(name: str) -> None:
    out = forwarded([(name, "secret"), ("Accept", "*/*")])
    assert name not in out
    assert out["Accept"] == "*/*"


def test_upstream_drops_headers_named_in_connection_case_insensitively() -> None:
    out = forwarded(
        [
            ("Connection", " X-One ,x-two,,"),
            ("x-one", "1"),
            ("X-TWO", "2"),
            ("X-Three", "3"),
        ]
    )
    assert "X-One" not in out
    assert "X-Two" not in out
    assert out["X-Three"] == "3"


def test_upstream_replaces_client_supplied_tenant_header() -> None:
    out = forwarded(
        [
            ("X-MCP-Tenant", "evil"),
            ("x-mcp-tenant", "evil-lower"),
            ("X-MCP-TENANT", "evil-upper"),
            ("Accept", "*/*"),
        ]
    )
    assert out.getall(TENANT_HEADER) == [TENANT]


def test_upstream_sets_tenant_header_with_custom_name() -> None:
    out = upstream_request_headers([("x-tenant", "evil"), ("Accept", "*/*")], "X-Tenant", "t-1")
    assert out.getall("X-Tenant") == ["t-1"]
    assert out["Accept"] == "*/*"


def test_upstream_sets_tenant_header_when_client_sent_none() -> None:
    out = forwarded([])
    # No Accept is "anything" (RFC 9110); the MCP SDK's servers want it said explicitly.
    assert list(out.items()) == [("Accept", "*/*"), (TENANT_HEADER, TENANT)]


def test_upstream_accepts_a_mapping() -> None:
    out = upstream_request_headers(
        {"Authorization": "Bearer k", "Mcp-Session-Id": "s"}, TENANT_HEADER, TENANT
    )
    assert dict(out) == {"Mcp-Session-Id": "s", "Accept": "*/*", TENANT_HEADER: TENANT}


def test_upstream_keeps_repeated_headers() -> None:
    out = forwarded([("Accept", "application/json"), ("Accept", "text/event-stream")])
    assert out.getall("Accept") == ["application/json", "text/event-stream"]


def test_upstream_drops_headers_named_in_any_connection_header() -> None:
    out = forwarded(
        [("Connection", "keep-alive"), ("Connection", "X-Hop"), ("X-Hop", "1"), ("Accept", "a")]
    )
    assert "X-Hop" not in out
    assert out["Accept"] == "a"


# --- downstream -----------------------------------------------------------------------------

KEPT_RESPONSE = [
    ("Content-Type", "text/event-stream"),
    ("Mcp-Session-Id", "sess-1"),
    ("Cache-Control", "no-cache"),
    ("X-Accel-Buffering", "no"),
    ("WWW-Authenticate", 'Bearer resource_metadata="https://x/.well-known"'),
    ("Retry-After", "5"),
    ("Set-Cookie", "a=1"),
    ("Set-Cookie", "b=2"),
]

DROPPED_RESPONSE = [
    ("Transfer-Encoding", "chunked"),
    ("Connection", "keep-alive, X-Upstream-Hop"),
    ("Content-Length", "42"),
    ("Keep-Alive", "timeout=5"),
    ("X-Upstream-Hop", "1"),
]


def test_downstream_keeps_end_to_end_headers() -> None:
    out = downstream_response_headers(CIMultiDict(KEPT_RESPONSE + DROPPED_RESPONSE))
    assert list(out.items()) == KEPT_RESPONSE


@pytest.mark.parametrize("name", [n for n, _ in DROPPED_RESPONSE])
def test_downstream_drops(name: str) -> None:
    out = downstream_response_headers(CIMultiDict(KEPT_RESPONSE + DROPPED_RESPONSE))
    assert name not in out


def test_downstream_drop_is_case_insensitive() -> None:
    out = downstream_response_headers(
        CIMultiDict([("transfer-encoding", "chunked"), ("CONTENT-LENGTH", "1"), ("Vary", "x")])
    )
    assert list(out.items()) == [("Vary", "x")]


# --- origin ---------------------------------------------------------------------------------

ALLOWED = ("https://app.example.com", "http://localhost:3000")


@pytest.mark.parametrize(
    ("origin", "allowed", "ok"),
    [
        (None, (), True),
        (None, ALLOWED, True),
        ("https://app.example.com", ALLOWED, True),
        ("http://localhost:3000", ALLOWED, True),
        ("https://app.example.com/", ALLOWED, True),
        ("https://evil.example.com", ALLOWED, False),
        ("http://app.example.com", ALLOWED, False),  # scheme matters
        ("https://app.example.com:8443", ALLOWED, False),  # port matters
        ("https://app.example.com.evil.com", ALLOWED, False),
        ("null", ALLOWED, False),
        ("", ALLOWED, False),
        ("https://app.example.com", (), False),
        ("https://anything.example", ("*",), True),
        ("null", ("*",), True),
    ],
)
def test_origin_allowed(origin: str | None, allowed: tuple[str, ...], ok: bool) -> None:
    assert origin_allowed(origin, allowed) is ok


@pytest.mark.parametrize("name", ["X_MCP_Tenant", "x_mcp-tenant", "X-MCP_TENANT"])
def test_upstream_drops_the_tenant_header_spelt_with_underscores(name: str) -> None:
    # CGI/WSGI servers map "-" and "_" to the same variable name.
    out = forwarded([(name, "victim"), ("X_Other", "kept")])
    assert list(out.items()) == [("X_Other", "kept"), ("Accept", "*/*"), (TENANT_HEADER, TENANT)]
