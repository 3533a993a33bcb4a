"""HTTP answers the proxy gives itself (errors, refusals, CORS), all with JSON-RPC bodies."""

from __future__ import annotations

from aiohttp import web

from .headers import CORS_ALLOW_HEADERS, CORS_ALLOW_METHODS, CORS_EXPOSE_HEADERS
from .jsonrpc import Body, RpcId, dumps, error, is_request

JSON = "application/json"
HOW_TO_SEND_A_KEY = (
    "Send your key as 'Authorization: Bearer <key>' (or 'X-API-Key: <key>'); ask the "
    "service operator for a key if you have none."
)
AUTH_HELP = "Missing or invalid API key. " + HOW_TO_SEND_A_KEY
INVALID_KEY_HELP = (
    "Invalid API key: this service does not know it (mistyped, revoked or never issued). "
    + HOW_TO_SEND_A_KEY
)


def json_reply(
    doc: object, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(body=dumps(doc), status=status, content_type=JSON, headers=headers)


def reply_id(body: Body | None) -> RpcId | None:
    """The id of an error the proxy gives for a whole POST: the request's own when the body is
    one request (JSON-RPC 2.0: the response id equals the request's), else null (a batch, as
    for a batch the parser refuses; a notification; no body)."""
    if body is None or body.batch or not is_request(body.messages[0]):
        return None
    rpc_id: RpcId = body.messages[0]["id"]
    return rpc_id


def rpc_error_reply(
    status: int,
    code: int,
    message: str,
    rpc_id: RpcId | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return json_reply(error(rpc_id, code, message), status, headers)


def unauthorized(rpc_id: RpcId | None, code: int, *, key_offered: bool = False) -> web.Response:
    """401 for a request without a usable key; `key_offered`: it sent one this service does not
    accept, so "invalid API key" rather than "API key required"."""
    # No resource_metadata: advertising OAuth makes clients ignore the static key.
    # error="invalid_token" either way, as design.md fixes the challenge.
    description = "invalid API key" if key_offered else "API key required"
    challenge = f'Bearer realm="mcp", error="invalid_token", error_description="{description}"'
    help_text = INVALID_KEY_HELP if key_offered else AUTH_HELP
    return rpc_error_reply(401, code, help_text, rpc_id, {"WWW-Authenticate": challenge})


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
