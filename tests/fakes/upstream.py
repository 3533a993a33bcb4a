"""A scripted JSON-RPC upstream (aiohttp) for tests that need exact control over replies:
errors, SSE framing, early closes, garbage. It records every request it receives."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

# Headers a proxy could lose by treating them as a dict: repeats, and ones it does not know.
ODD_HEADERS = CIMultiDict(
    [("Set-Cookie", "a=1; Path=/"), ("Set-Cookie", "b=2; Path=/"), ("X-Upstream-Odd", "kept")]
)


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class ScriptedUpstream:
    requests: list[Seen] = field(default_factory=list)
    tools: tuple[str, ...] = ("add", "secret_tool", "echo")
    session_id: str = "sess-1"
    release: asyncio.Event = field(default_factory=asyncio.Event)
    # SEP-1699: results held back for a resumed GET stream, by session id.
    parked: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    cancelled: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/mcp", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(Seen(request.method, request.path_qs, dict(request.headers), body))
        if request.method == "GET" and "Last-Event-ID" in request.headers:
            return await self._resume(request)
        if request.method == "DELETE":
            return web.Response(status=200)
        if request.method != "POST":
            return web.Response(status=405, headers={"Allow": "POST"})
        msg = json.loads(body)
        if isinstance(msg, list):
            return web.json_response([self._result(m) for m in msg if "id" in m])
        if "id" not in msg:
            return web.Response(status=202)
        method = msg["method"]
        if method == "initialize":
            return web.json_response(
                self._ok(
                    msg,
                    {
                        "protocolVersion": "2025-06-18",
                        "capabilities": {},
                        "serverInfo": {"name": "scripted", "version": "1"},
                    },
                ),
                headers={"Mcp-Session-Id": self.session_id},
            )
        if method == "tools/list":
            tools = [{"name": t, "inputSchema": {"type": "object"}} for t in self.tools]
            return web.json_response(self._ok(msg, {"tools": tools}))
        if method != "tools/call":
            return web.json_response(self._ok(msg, {}))
        name = msg["params"]["name"]
        args = msg["params"].get("arguments", {})
        if name == "rpc_error":
            return web.json_response(
                {"jsonrpc": "2.0", "id": msg["id"], "error": {"code": -32602, "message": "bad"}}
            )
        if name == "tool_error":
            return web.json_response(
                self._ok(msg, {"content": [{"type": "text", "text": "boom"}], "isError": True})
            )
        if name == "http_500":
            return web.Response(status=500, text="upstream exploded")
        if name == "json_503":  # an overloaded server answering in JSON-RPC, with its own reason
            return web.json_response(
                {"jsonrpc": "2.0", "id": msg["id"], "error": {"code": -32000, "message": "busy"}},
                status=503,
                reason="Busy Upstream",
                headers={"Retry-After": "7"},
            )
        if name == "odd_headers":
            return web.json_response(self._result(msg), headers=ODD_HEADERS)
        if name == "garbage":
            return web.Response(body=b"{not json", content_type="application/json")
        if name.startswith("sse_"):
            return await self._sse(request, msg, name, args)
        return web.json_response(self._result(msg))

    async def _sse(
        self, request: web.Request, msg: dict[str, Any], name: str, args: dict[str, Any]
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        if name == "sse_odd_headers":
            resp.headers.extend(ODD_HEADERS)
        await resp.prepare(request)
        await resp.write(b"id: 1\ndata: \n\n")  # priming event
        for i in range(int(args.get("steps", 2))):
            note = {
                "jsonrpc": "2.0",
                "method": "notifications/progress",
                "params": {"progressToken": 1, "progress": i + 1},
            }
            await resp.write(f"event: message\r\ndata: {json.dumps(note)}\r\n\r\n".encode())
        if name == "sse_wait":
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled.append(str(msg["id"]))
                raise
        if name == "sse_close_early":
            return resp  # stream ends without the result
        if name == "sse_resume":
            # Close the POST stream early and deliver the result on the next GET (SEP-1699).
            session = request.headers.get("Mcp-Session-Id", "")
            self.parked.setdefault(session, []).append(self._result(msg))
            await resp.write(b"retry: 10\n\n")
            return resp
        result = json.dumps(self._result(msg))
        # Split the final event mid-line to exercise chunk reassembly.
        await resp.write(f"event: message\ndata: {result[:7]}".encode())
        await resp.write(f"{result[7:]}\n\n".encode())
        await resp.write_eof()
        return resp

    async def _resume(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        session = request.headers.get("Mcp-Session-Id", "")
        for n, result in enumerate(self.parked.pop(session, []), start=2):
            await resp.write(f"id: {n}\ndata: {json.dumps(result)}\n\n".encode())
        await resp.write_eof()
        return resp

    @staticmethod
    def _ok(msg: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "id": msg["id"], "result": result}

    def _result(self, msg: dict[str, Any]) -> dict[str, Any]:
        text = json.dumps(msg.get("params", {}).get("arguments", {}))
        return self._ok(msg, {"content": [{"type": "text", "text": text}], "isError": False})

    def calls(self) -> list[Seen]:
        return [r for r in self.requests if r.method == "POST" and b'"tools/call"' in r.body]
