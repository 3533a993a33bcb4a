"""`mcp-quota-proxy demo`: the bundled MCP server, the proxy on embedded defaults, a tenant
with a key, and a command to paste. Ctrl-C stops everything."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import shlex
import sys
import tempfile
import time

from ..app import build_components
from ..config import parse_config
from ..logs import configure
from ..serve import run_server

DEMO_UNITS = 20
DEMO_PLAN = {
    "included_units": DEMO_UNITS,
    "overage": "block",
    "rate": {"per_second": 5, "burst": 10},
}
READY = b"READY "


async def _start_upstream() -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy.demo.upstream",
        "--port",
        "0",
        "--stateless",
        "--json",
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    async with asyncio.timeout(30):
        while True:
            line = await proc.stdout.readline()
            if not line:
                raise RuntimeError("the demo MCP server exited before it was ready")
            if line.startswith(READY):
                return proc, line[len(READY) :].decode().strip()


def _curl(url: str, key: str) -> str:
    body = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "add", "arguments": {"a": 2, "b": 3}},
        }
    )
    return (
        f"curl -s {url} -H {shlex.quote('Authorization: Bearer ' + key)} "
        "-H 'Content-Type: application/json' -H 'Accept: application/json, text/event-stream' "
        f"-d {shlex.quote(body)}"
    )


async def _demo(port: int, spool_dir: str) -> None:
    upstream, upstream_url = await _start_upstream()
    try:
        # An empty environment: the demo always runs on the embedded store, even if REDIS_URL
        # is set for something else.
        config = parse_config(
            {
                "listen": {"host": "127.0.0.1", "port": port},
                "upstream": {"url": upstream_url.removesuffix("/mcp")},
                "plans": {"free": DEMO_PLAN},
                "spool": {"path": f"{spool_dir}/usage.db"},
                # No load balancer in front of a demo: stop at once on Ctrl-C.
                "ops": {"readiness_delay_s": 0},
                "log_level": "warning",
            },
            {},
        )
        configure(config.log_level)
        components = build_components(config)
        await components.tenants.create(
            "demo", name="Demo tenant", plan="free", stripe_customer=None, now=int(time.time())
        )
        key, _ = await components.tenants.issue_key("demo", label="demo", now=int(time.time()))

        async def announce(base: str) -> None:
            url = f"{base}/mcp"
            print(
                f"\nmcp-quota-proxy demo is running.\n"
                f"  MCP endpoint  {url}  (in front of the bundled server at {upstream_url})\n"
                f"  tenant        demo, plan free: {DEMO_UNITS} tool calls, "
                f"5 per second\n"
                f"  API key       {key}\n\n"
                f"Call a tool through the proxy:\n\n  {_curl(url, key)}\n\n"
                f"Call it in a quick loop to meet the rate limit; after {DEMO_UNITS} calls the "
                f"quota refusal answers instead. "
                f"Ctrl-C stops everything.\n",
                flush=True,
            )

        await run_server(config, components=components, on_ready=announce)
    finally:
        if upstream.returncode is None:
            upstream.terminate()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await upstream.wait()
            if upstream.returncode is None:
                upstream.kill()
                await upstream.wait()


def run_demo(port: int) -> int:
    if importlib.util.find_spec("mcp") is None:
        print(
            "error: the demo needs the official MCP SDK: pip install 'mcp-quota-proxy[demo]'",
            file=sys.stderr,
        )
        return 2
    with (
        tempfile.TemporaryDirectory(prefix="mqp-demo-") as spool_dir,
        contextlib.suppress(KeyboardInterrupt),
    ):
        asyncio.run(_demo(port, spool_dir))
    return 0
