"""A small, real MCP server built on the official Python SDK (``mcp`` 2.x).

It is the upstream the quota proxy is demonstrated and integration-tested against::

    python -m proxy.demo.upstream --port 9101 [--host 127.0.0.1] [--stateless] [--json]

serves Streamable HTTP at ``http://HOST:PORT/mcp`` and prints exactly one line
``READY http://HOST:PORT/mcp`` to stdout (flushed) once the listening socket accepts
connections. ``--port 0`` picks a free port; the READY line names the real one.

Tools: ``add``, ``echo``, ``slow_count`` (progress notifications), ``fail``
(``isError: true`` result) and ``usage_report`` (result ``_meta`` carrying a token count).

Importing this module has no side effects; ``build_server()`` and ``main(argv)`` do the work.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from collections.abc import Sequence
from typing import Any

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, TextContent

SERVER_NAME = "mcp-quota-proxy-demo-upstream"
MCP_PATH = "/mcp"
READY_PREFIX = "READY "


def build_server() -> MCPServer:
    """Build the demo MCP server (no I/O; call ``streamable_http_app`` or ``run`` on it)."""
    server: MCPServer = MCPServer(
        SERVER_NAME,
        instructions="Demo upstream for mcp-quota-proxy: arithmetic, echo, progress and errors.",
        version="0.1.0",
        log_level="WARNING",
    )

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @server.tool()
    def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    @server.tool()
    async def slow_count(n: int, ctx: Context[Any, Any], delay: float = 0.5) -> str:
        """Count to n: at each step report progress (i, n, "step i"), then sleep `delay` seconds.

        Progress i is sent at about (i - 1) * delay, the result at about n * delay.
        """
        for i in range(1, n + 1):
            await ctx.report_progress(i, n, f"step {i}")
            await asyncio.sleep(delay)
        return f"counted to {n}"

    @server.tool()
    def fail(message: str) -> str:
        """Always fail; the SDK turns the exception into a result with isError: true."""
        raise ToolError(message)

    @server.tool()
    def usage_report(tokens: int) -> CallToolResult:
        """Return a normal result whose `_meta` reports `tokens` (for usage metering)."""
        return CallToolResult(
            content=[TextContent(type="text", text=f"used {tokens} tokens")],
            _meta={"tokens": tokens},
        )

    return server


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}{MCP_PATH}"


class _ReadyServer(uvicorn.Server):
    """A uvicorn server that announces ``READY <url>`` once its socket is listening."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if not self.started:
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        sys.stdout.write(f"{READY_PREFIX}{_url(str(host), int(port))}\n")
        sys.stdout.flush()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m proxy.demo.upstream",
        description="Demo MCP upstream (official SDK 2.x), Streamable HTTP at /mcp.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="TCP port; 0 picks a free one")
    parser.add_argument(
        "--stateless", action="store_true", help="stateless HTTP (no Mcp-Session-Id)"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        dest="json_response",
        help="answer POSTs with application/json instead of SSE (drops progress)",
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn log level (default warning; logs go to stderr)",
    )
    return parser.parse_args(argv)


def build_uvicorn(args: argparse.Namespace) -> uvicorn.Server:
    """Build (but do not start) the uvicorn server for parsed arguments."""
    app = build_server().streamable_http_app(
        streamable_http_path=MCP_PATH,
        stateless_http=bool(args.stateless),
        json_response=bool(args.json_response),
        host=str(args.host),  # 127.0.0.1/localhost/::1 enable DNS-rebinding protection
    )
    config = uvicorn.Config(
        app,
        host=str(args.host),
        port=int(args.port),
        log_level=str(args.log_level),
        access_log=False,  # uvicorn's access log goes to stdout; keep stdout to the READY line
        timeout_graceful_shutdown=2,  # open SSE streams must not stall a SIGTERM
        lifespan="on",
    )
    return _ReadyServer(config)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    server = build_uvicorn(args)
    try:
        asyncio.run(server.serve())
    except KeyboardInterrupt:
        # uvicorn shuts down on Ctrl-C, then re-raises SIGINT: a traceback would follow.
        return 130
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
