"""Interop: the reference TypeScript-SDK server ``@modelcontextprotocol/server-everything``
(streamable HTTP, stateful, resumable) behind the proxy, driven by the official Python 2.x
client: tools, progress streaming, quota refusal and sessions.

The package is found via ``SERVER_EVERYTHING_DIR`` (the package directory), else
``<repo>/.ci/node/node_modules/@modelcontextprotocol/server-everything``; without it (or
without ``node``) the module is skipped. The server's ``app.listen(PORT)`` binds every
interface, so it is started with ``tests/fakes/loopback.mjs`` preloaded, which pins it to
127.0.0.1.

Only the client's ``"legacy"`` mode is exercised. In ``"2026-07-28"`` mode the client skips
the ``initialize`` handshake and sends ``tools/list`` without a session, and this server
(TS SDK 1.x, protocol 2025-11-25 at most) answers every session-less non-``initialize`` POST
with HTTP 400 ``Bad Request: Server not initialized`` (checked directly, without the proxy),
so there is no modern-era conversation to put the proxy in the middle of.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

import pytest
import pytest_asyncio

from proxy.config import parse_config
from tests.conftest import PEPPER
from tests.mcp_peers import LEGACY_VERSION, ProgressRecord, call_tool, connect, list_tools
from tests.proxy_harness import RunningProxy, run_proxy

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
PACKAGE: Final = "@modelcontextprotocol/server-everything"
ENV_DIR: Final = "SERVER_EVERYTHING_DIR"
CI_DIR: Final = REPO_ROOT / ".ci" / "node" / "node_modules" / PACKAGE
LOOPBACK: Final = REPO_ROOT / "tests" / "fakes" / "loopback.mjs"
INSTALL_HINT: Final = (
    f"{PACKAGE} is not installed: run `npm install --prefix .ci/node {PACKAGE}` in the "
    f"repository root, or set {ENV_DIR} to the package directory"
)


def _locate_package() -> Path:
    """The server-everything package directory, or a module-level skip (or error)."""
    if shutil.which("node") is None:
        pytest.skip(
            "node is not on PATH (needed to run the TS reference server)", allow_module_level=True
        )
    explicit = os.environ.get(ENV_DIR)
    if explicit:
        pkg = Path(explicit)
        if not (pkg / "dist" / "index.js").is_file():
            # Asked for explicitly: a wrong path is a configuration error, not a skip.
            pytest.fail(
                f"{ENV_DIR}={explicit} has no dist/index.js; it must name the "
                f"{PACKAGE} package directory",
                pytrace=False,
            )
        return pkg
    if (CI_DIR / "dist" / "index.js").is_file():
        return CI_DIR
    pytest.skip(INSTALL_HINT, allow_module_level=True)


PACKAGE_DIR: Final = _locate_package()

pytestmark = [pytest.mark.node, pytest.mark.asyncio(loop_scope="module")]

REQUIRED_TOOLS: Final = {"echo", "get-sum", "trigger-long-running-operation"}
DURATION = 1.5  # trigger-long-running-operation: seconds in total...
STEPS = 3  # ...split into this many steps, one progress notification after each
STEP = DURATION / STEPS
# Progress through the proxy must keep the direct run's rhythm: each gap within this margin.
GAP_MARGIN = 0.15
QUOTA = 3

READY_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0
START_ATTEMPTS = 3  # a fresh port each time, should another process grab the one picked
HAS_PROC_NET: Final = Path("/proc/net/tcp").exists()
# Printed from the listen() callback, so seeing it also proves loopback.mjs kept callbacks.
LISTENING_MARK: Final = b"listening on port"
IN_USE_MARK: Final = b"already in use"


# --------------------------------------------------------------------------- the upstream


@dataclass(frozen=True)
class Everything:
    url: str  # http://127.0.0.1:PORT/mcp
    port: int
    pid: int


class _StartFailed(RuntimeError):
    def __init__(self, message: str, *, port_taken: bool) -> None:
        super().__init__(message)
        self.port_taken = port_taken


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _tail(data: bytes | bytearray, limit: int = 4000) -> str:
    return bytes(data[-limit:]).decode(errors="replace")


def _read_back(file: IO[bytes]) -> str:
    file.flush()
    file.seek(0)
    return _tail(file.read())


async def _pump(stream: asyncio.StreamReader, tail: bytearray, listening: asyncio.Event) -> None:
    """Read the child's stderr for its whole life (so it never blocks on a full pipe),
    keeping the tail and flagging the listening line."""
    while line := await stream.readline():
        tail += line
        del tail[:-8000]
        if LISTENING_MARK in line.lower():
            listening.set()


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    await proc.wait()


@contextlib.asynccontextmanager
async def _start_once(port: int, stdout_file: IO[bytes]) -> AsyncIterator[Everything]:
    argv = [
        "node",
        "--import",
        LOOPBACK.as_uri(),
        str(PACKAGE_DIR / "dist" / "index.js"),
        "streamableHttp",
    ]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=stdout_file,  # one log line per request: a file, never a pipe to drain
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PORT": str(port)},
    )
    assert proc.stderr is not None
    tail = bytearray()
    listening = asyncio.Event()
    pump = asyncio.create_task(_pump(proc.stderr, tail, listening))
    try:
        exited = asyncio.create_task(proc.wait())
        ready = asyncio.create_task(listening.wait())
        try:
            await asyncio.wait(
                {exited, ready}, timeout=READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            exited.cancel()
            ready.cancel()
        if not listening.is_set():
            await _stop(proc)
            await pump
            what = (
                f"exited with {proc.returncode}"
                if proc.returncode is not None
                else f"printed no listening line within {READY_TIMEOUT}s"
            )
            raise _StartFailed(
                f"{PACKAGE} ({' '.join(argv)}, PORT={port}) {what}\n"
                f"--- stderr:\n{_tail(tail)}\n--- stdout:\n{_read_back(stdout_file)}",
                port_taken=IN_USE_MARK in tail,
            )
        yield Everything(url=f"http://127.0.0.1:{port}/mcp", port=port, pid=proc.pid)
    finally:
        await _stop(proc)
        await pump


@contextlib.asynccontextmanager
async def run_everything() -> AsyncIterator[Everything]:
    """Start server-everything (streamable HTTP) on a free 127.0.0.1 port; stop it on exit."""
    with tempfile.TemporaryFile() as stdout_file:
        for attempt in range(1, START_ATTEMPTS + 1):
            stdout_file.seek(0)
            stdout_file.truncate()
            try:
                async with _start_once(_free_port(), stdout_file) as everything:
                    yield everything
                    return
            except _StartFailed as exc:
                if not exc.port_taken or attempt == START_ATTEMPTS:
                    raise


# --------------------------------------------------------------------------- fixtures


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def everything() -> AsyncIterator[Everything]:
    async with run_everything() as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def proxy(everything: Everything) -> AsyncIterator[RunningProxy]:
    config = parse_config(
        {
            "upstream": {"url": f"http://127.0.0.1:{everything.port}"},
            "plans": {"free": {"included_units": QUOTA}},
        },
        {"MQP_KEY_PEPPER": PEPPER},
    )
    async with run_proxy(config) as running:
        yield running


async def _auth(proxy: RunningProxy, tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {await proxy.tenant_with_key(tenant, 'free')}"}


def _listening_addresses(port: int) -> list[str]:
    """Local addresses of the TCP sockets in LISTEN state on ``port``, from /proc/net."""
    found: list[str] = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        with contextlib.suppress(FileNotFoundError), open(table, encoding="ascii") as f:
            for row in list(f)[1:]:
                local, state = row.split()[1], row.split()[3]
                addr_hex, port_hex = local.split(":")
                if state != "0A" or int(port_hex, 16) != port:  # 0A: TCP_LISTEN
                    continue
                # The address is printed as 32-bit words in host byte order.
                words = [int(addr_hex[i : i + 8], 16) for i in range(0, len(addr_hex), 8)]
                found.append(socket.inet_ntop(family, struct.pack(f"={len(words)}I", *words)))
    return found


def _gaps(started: float, records: list[ProgressRecord], finished: float) -> list[float]:
    times = [started] + [t for t, _, _ in records] + [finished]
    return [b - a for a, b in itertools.pairwise(times)]


# --------------------------------------------------------------------------- tests


@pytest.mark.skipif(not HAS_PROC_NET, reason="needs Linux /proc/net/tcp to list listening sockets")
async def test_upstream_listens_on_loopback_only(everything: Everything) -> None:
    assert _listening_addresses(everything.port) == ["127.0.0.1"]


async def test_lists_tools_and_issues_a_session(
    everything: Everything, proxy: RunningProxy
) -> None:
    headers = await _auth(proxy, "tools")
    direct = await list_tools(everything.url, {}, "legacy")
    async with connect(proxy.url, headers, "legacy") as peer:
        proxied = await peer.list_tools()
        assert peer.protocol_version == LEGACY_VERSION
        # A stateful server: the initialize response carries a session id and the client
        # sends it on every later request.
        issued = [x.response_headers.get("mcp-session-id") for x in peer.exchanges]
        assert issued[0], "initialize response carried no Mcp-Session-Id"
        assert peer.session_id == issued[0]
    assert set(proxied) >= REQUIRED_TOOLS
    assert proxied == direct  # the free plan hides nothing


async def test_echo_and_get_sum(proxy: RunningProxy) -> None:
    headers = await _auth(proxy, "calls")
    async with connect(proxy.url, headers, "legacy") as peer:
        echo = await peer.call_tool("echo", {"message": "hello through the proxy"})
        total = await peer.call_tool("get-sum", {"a": 2, "b": 3.5})
    assert not echo.is_error and echo.text == "Echo: hello through the proxy"
    assert not total.is_error and total.text == "The sum of 2 and 3.5 is 5.5."
    assert echo.session_id is not None and total.session_id == echo.session_id


async def test_progress_streams_like_direct(everything: Everything, proxy: RunningProxy) -> None:
    headers = await _auth(proxy, "progress")
    args = {"duration": DURATION, "steps": STEPS}
    tool = "trigger-long-running-operation"
    direct: list[ProgressRecord] = []
    d = await call_tool(everything.url, {}, "legacy", tool, args, progress=direct)
    proxied: list[ProgressRecord] = []
    p = await call_tool(proxy.url, headers, "legacy", tool, args, progress=proxied)
    expected = f"Long running operation completed. Duration: {DURATION} seconds, Steps: {STEPS}."
    assert p.text == d.text == expected
    assert [(pr, tot) for _, pr, tot in proxied] == [(pr, tot) for _, pr, tot in direct]
    assert [pr for _, pr, _ in proxied] == [1, 2, 3]
    # Each notification arrives while the tool runs, with the same spacing as without the
    # proxy: buffering would bunch them up at the end.
    gaps_direct = _gaps(d.started, direct, d.finished)
    gaps_proxy = _gaps(p.started, proxied, p.finished)
    for g_direct, g_proxy in zip(gaps_direct, gaps_proxy, strict=True):
        assert abs(g_proxy - g_direct) < GAP_MARGIN, (gaps_direct, gaps_proxy)
    assert p.finished - proxied[0][0] > (STEPS - 1) * STEP - GAP_MARGIN


async def test_quota_refusal_reaches_the_model(proxy: RunningProxy) -> None:
    tenant = "quota"
    headers = await _auth(proxy, tenant)
    async with connect(proxy.url, headers, "legacy") as peer:
        results = [await peer.call_tool("echo", {"message": f"m{i}"}) for i in range(QUOTA + 1)]
        # The session survives the refusal: the client can still list tools.
        assert set(await peer.list_tools()) >= REQUIRED_TOOLS
    assert [r.is_error for r in results] == [False] * QUOTA + [True]
    assert [r.text for r in results[:QUOTA]] == [f"Echo: m{i}" for i in range(QUOTA)]
    assert results[QUOTA].text.startswith("Quota exhausted"), results[QUOTA].text
    assert [e.tool for e in proxy.sink.events if e.tenant_id == tenant] == ["echo"] * QUOTA
