"""`mcp-quota-proxy demo`: the bundled MCP server, the proxy on embedded defaults, a tenant
with a key, and a command to paste. Ctrl-C stops everything."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import shlex
import signal
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
DEMO_HOST = "127.0.0.1"
STOP_SIGNALS = (signal.SIGHUP, signal.SIGTERM)


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
        # Out of the terminal's process group: Ctrl-C must reach the proxy alone, which then
        # lets in-flight calls finish before it stops the server (in `_demo`'s finally).
        start_new_session=True,
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


async def _stop_upstream(proc: asyncio.subprocess.Process) -> None:
    """Terminate the server, and kill it if it lingers, even if this task is cancelled
    meanwhile: in its own session, nothing else would stop it."""
    if proc.returncode is not None:
        return
    proc.terminate()
    try:
        async with asyncio.timeout(5):
            await proc.wait()
    except TimeoutError:
        pass
    finally:
        if proc.returncode is None:
            proc.kill()
    await proc.wait()


async def _demo(port: int, spool_dir: str) -> None:
    # A closed terminal (SIGHUP) no longer reaches the server in its own session, and a
    # SIGTERM before run_server handles it would leave it running: both stop the demo (and
    # then the server) the way run_server stops on SIGINT/SIGTERM.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    upstream, upstream_url = await _start_upstream()
    try:
        # An empty environment: the demo always runs on the embedded store, even if REDIS_URL
        # is set for something else.
        config = parse_config(
            {
                "listen": {"host": DEMO_HOST, "port": port},
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

        await run_server(config, components=components, on_ready=announce, stop=stop)
    finally:
        await _stop_upstream(upstream)
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


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
