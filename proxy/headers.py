"""Which headers cross the proxy in each direction (pure)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from multidict import CIMultiDict

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Never forwarded upstream: the tenant's credential, what aiohttp recomputes, and Origin
# (validated here; forwarding it would trip the upstream's own DNS-rebinding checks).
# Accept-Encoding is dropped so replies arrive uncompressed and can be metered.
_REQUEST_DROP = HOP_BY_HOP | {
    "host",
    "content-length",
    "origin",
    "authorization",
    "x-api-key",
    "accept-encoding",
    "cookie",
    # aiohttp hands over the request body already decoded: its encoding no longer applies.
    "content-encoding",
}
# Content-Length goes because the body is re-chunked (and may be filtered for tools/list).
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}

CORS_ALLOW_HEADERS = (
    "Authorization, X-API-Key, Content-Type, Accept, Mcp-Session-Id, MCP-Protocol-Version, "
    "Last-Event-ID, Mcp-Method, Mcp-Name, traceparent, X-Request-Id"
)
CORS_EXPOSE_HEADERS = "Mcp-Session-Id, MCP-Protocol-Version, WWW-Authenticate, Retry-After"
CORS_ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"


def _connection_tokens(pairs: Iterable[tuple[str, str]]) -> frozenset[str]:
    # Repeated Connection lines form one list (RFC 9110 5.3).
    value = ",".join(v for k, v in pairs if k.lower() == "connection")
    return frozenset(t.strip().lower() for t in value.split(",") if t.strip())


def upstream_request_headers(
    incoming: Mapping[str, str] | Iterable[tuple[str, str]],
    tenant_header: str,
    tenant_id: str,
) -> CIMultiDict[str]:
    # One pass, no copies: this runs on every call.
    pairs = list(incoming.items() if isinstance(incoming, Mapping) else incoming)
    hop = _connection_tokens(pairs)
    tenant = _fold(tenant_header)
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in pairs:
        low = k.lower()
        # CGI/WSGI-style servers read X-MCP-Tenant and X_MCP_Tenant as one variable: a
        # client's spelling with underscores must not shadow the tenant the proxy vouches for.
        if low in _REQUEST_DROP or low in hop or low.replace("_", "-") == tenant:
            continue
        out.add(k, v)
    if "Accept" not in out:
        # No Accept means any type (RFC 9110 12.5.1), but the MCP SDK's servers answer 406 to
        # a request without one: say it explicitly, as aiohttp's client did here before.
        out["Accept"] = "*/*"
    out[tenant_header] = tenant_id
    return out


def _fold(name: str) -> str:
    return name.lower().replace("_", "-")


def downstream_response_headers(upstream: Mapping[str, str]) -> CIMultiDict[str]:
    pairs = list(upstream.items())
    hop = _connection_tokens(pairs)
    return CIMultiDict(
        (k, v) for k, v in pairs if (low := k.lower()) not in _RESPONSE_DROP and low not in hop
    )


def origin_allowed(origin: str | None, allowed: tuple[str, ...]) -> bool:
    """No Origin (non-browser client) is fine; a browser Origin must be listed (or '*')."""
    if origin is None:
        return True
    return "*" in allowed or origin.rstrip("/") in allowed
