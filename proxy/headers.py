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


def _connection_tokens(headers: CIMultiDict[str]) -> set[str]:
    # Repeated Connection lines form one list (RFC 9110 5.3).
    value = ",".join(headers.getall("Connection", []))
    return {t.strip().lower() for t in value.split(",") if t.strip()}


def upstream_request_headers(
    incoming: Mapping[str, str] | Iterable[tuple[str, str]],
    tenant_header: str,
    tenant_id: str,
) -> CIMultiDict[str]:
    source = CIMultiDict(incoming)
    drop = _REQUEST_DROP | _connection_tokens(source)
    tenant = _fold(tenant_header)
    # CGI/WSGI-style servers read X-MCP-Tenant and X_MCP_Tenant as one variable: a client's
    # spelling with underscores must not shadow the tenant the proxy vouches for.
    out: CIMultiDict[str] = CIMultiDict(
        (k, v) for k, v in source.items() if k.lower() not in drop and _fold(k) != tenant
    )
    out[tenant_header] = tenant_id
    return out


def _fold(name: str) -> str:
    return name.lower().replace("_", "-")


def downstream_response_headers(upstream: Mapping[str, str]) -> CIMultiDict[str]:
    source = CIMultiDict(upstream)
    drop = _RESPONSE_DROP | _connection_tokens(source)
    return CIMultiDict((k, v) for k, v in source.items() if k.lower() not in drop)


def origin_allowed(origin: str | None, allowed: tuple[str, ...]) -> bool:
    """No Origin (non-browser client) is fine; a browser Origin must be listed (or '*')."""
    if origin is None:
        return True
    return "*" in allowed or origin.rstrip("/") in allowed
