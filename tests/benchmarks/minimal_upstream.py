"""A minimal JSON-RPC upstream for ``tests.benchmarks.proxy_overhead``: not a test.

    python -m tests.benchmarks.minimal_upstream --port P [--host 127.0.0.1] [--loop auto]

``POST /mcp``: ``json.loads`` the body and answer a ~130-byte ``tools/call`` result carrying
the request's id (perf-baseline.md's upstream). ``GET /mcp``: an SSE stream that sends a
comment (``: keep-alive``) every second until the client leaves (for the open-streams RSS
figure). ``AppRunner(access_log=None)``; uvloop when installed (``--loop auto``). Prints
``READY <port>`` on stdout once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Coroutine
from typing import Any

from aiohttp import web

RESULT_TEXT = "3 matches: Q3 EMEA 41%, APAC 33%, AMER 26%"
KEEPALIVE = b": keep-alive\n\n"


def result_for(rpc_id: object) -> bytes:
    doc = {
        "jsonrpc": "2.0",
        "id": rpc_id,
        "result": {"content": [{"type": "text", "text": RESULT_TEXT}], "isError": False},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


async def post_mcp(request: web.Request) -> web.Response:
    message = json.loads(await request.read())
    return web.Response(body=result_for(message.get("id")), content_type="application/json")


async def get_mcp(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    with contextlib.suppress(ConnectionError, asyncio.CancelledError):
        while True:
            await resp.write(KEEPALIVE)
            await asyncio.sleep(1.0)
    return resp


def build_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/mcp", post_mcp)
    app.router.add_get("/mcp", get_mcp)
    return app


async def serve(host: str, port: int) -> None:
    runner = web.AppRunner(build_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    sys.stdout.write(f"READY {runner.addresses[0][1]}\n")
    sys.stdout.flush()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def run(main: Coroutine[Any, Any, None], loop: str) -> None:
    """uvloop when asked for or (``auto``) installed, asyncio otherwise."""
    if loop in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if loop == "uvloop":
                raise
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.minimal_upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        run(serve(args.host, args.port), args.loop)


if __name__ == "__main__":
    main()
