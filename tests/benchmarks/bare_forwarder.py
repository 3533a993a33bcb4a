"""A bare aiohttp forwarder for ``tests.benchmarks.proxy_overhead``: not a test.

    python -m tests.benchmarks.bare_forwarder --port P --upstream http://127.0.0.1:U/mcp
        [--host 127.0.0.1] [--loop auto] [--client aiohttp|proxy]

What every aiohttp proxy pays before doing anything useful (perf-baseline.md config 3): read
the body, POST it upstream through one shared ``ClientSession`` (keep-alive, limit 256), read
the answer, return it. No auth, no quota, no spool. ``AppRunner(access_log=None)``; uvloop
when installed (``--loop auto``), as ``mcp-quota-proxy serve`` does. Prints ``READY <port>``.

``--client proxy`` forwards with the proxy's own upstream client (``proxy.upstream``) instead:
the same plumbing as the proxy's, so the proxy's CPU beyond it is its own per-call work.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from proxy.upstream import UpstreamClient

from .minimal_upstream import run

SESSION = web.AppKey("session", aiohttp.ClientSession)
CLIENT = web.AppKey("client", UpstreamClient)
UPSTREAM = web.AppKey("upstream", str)
JSON_HEADERS = {"Content-Type": "application/json"}


async def forward(request: web.Request) -> web.Response:
    body = await request.read()
    session = request.app[SESSION]
    async with session.post(request.app[UPSTREAM], data=body, headers=JSON_HEADERS) as up:
        answer = await up.read()
        status = up.status
    return web.Response(body=answer, status=status, content_type="application/json")


async def forward_with_proxy_client(request: web.Request) -> web.Response:
    body = await request.read()
    client = request.app[CLIENT]
    up = await client.request("POST", "/mcp", JSON_HEADERS.items(), body)
    try:
        answer = await up.read()
    finally:
        client.release(up)
    return web.Response(body=answer, status=up.status, content_type="application/json")


async def _client(app: web.Application) -> AsyncIterator[None]:
    base = app[UPSTREAM].removesuffix("/mcp")
    client = app[CLIENT] = UpstreamClient(base, connect_timeout=10)
    yield
    await client.close()


async def _session(app: web.Application) -> AsyncIterator[None]:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
    app[SESSION] = session
    yield
    await session.close()


def build_app(upstream: str, client: str = "aiohttp") -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream
    if client == "proxy":
        app.cleanup_ctx.append(_client)
        app.router.add_post("/mcp", forward_with_proxy_client)
    else:
        app.cleanup_ctx.append(_session)
        app.router.add_post("/mcp", forward)
    return app


async def serve(host: str, port: int, upstream: str, client: str = "aiohttp") -> None:
    runner = web.AppRunner(build_app(upstream, client), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    sys.stdout.write(f"READY {runner.addresses[0][1]}\n")
    sys.stdout.flush()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.bare_forwarder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--upstream", required=True, help="full URL, e.g. http://127.0.0.1:8081/mcp"
    )
    parser.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto")
    parser.add_argument("--client", choices=("aiohttp", "proxy"), default="aiohttp")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        run(serve(args.host, args.port, args.upstream, args.client), args.loop)


if __name__ == "__main__":
    main()
