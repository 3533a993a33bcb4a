"""HTTP answers the proxy gives itself (errors, refusals, CORS), all with JSON-RPC bodies."""

from __future__ import annotations

from aiohttp import web

from .headers import CORS_ALLOW_HEADERS, CORS_ALLOW_METHODS, CORS_EXPOSE_HEADERS
from .jsonrpc import RpcId, dumps, error

JSON = "application/json"
AUTH_HELP = (
    "Missing or invalid API key. Send your key as 'Authorization: Bearer <key>' "
    "(or 'X-API-Key: <key>'); ask the service operator for a key if you have none."
)


def json_reply(
    doc: object, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(body=dumps(doc), status=status, content_type=JSON, headers=headers)


def rpc_error_reply(
    status: int,
    code: int,
    message: str,
    rpc_id: RpcId | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return json_reply(error(rpc_id, code, message), status, headers)


def unauthorized(rpc_id: RpcId | None, code: int) -> web.Response:
    # No resource_metadata: advertising OAuth makes clients ignore the static key.
    challenge = 'Bearer realm="mcp", error="invalid_token", error_description="API key required"'
    return rpc_error_reply(401, code, AUTH_HELP, rpc_id, {"WWW-Authenticate": challenge})


def cors_headers(origin: str | None) -> dict[str, str]:
    if origin is None:
        return {}
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Expose-Headers": CORS_EXPOSE_HEADERS,
        "Vary": "Origin",
    }


def preflight(origin: str | None) -> web.Response:
    headers = cors_headers(origin)
    headers.update(
        {
            "Access-Control-Allow-Methods": CORS_ALLOW_METHODS,
            "Access-Control-Allow-Headers": CORS_ALLOW_HEADERS,
            "Access-Control-Max-Age": "600",
        }
    )
    return web.Response(status=204, headers=headers)


def not_found() -> web.Response:
    return json_reply({"error": "not_found", "message": "No such endpoint on this MCP proxy."}, 404)
