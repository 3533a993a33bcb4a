"""Test support: real MCP peers for integration tests (not a test module).

* ``run_upstream(...)`` starts ``python -m proxy.demo.upstream`` (the official SDK 2.x
  server) on a free 127.0.0.1 port and yields its ``http://127.0.0.1:PORT/mcp`` URL.
* ``connect(...)`` / ``call_tool(...)`` / ``list_tools(...)`` drive the official 2.x
  client (``mcp.Client`` over ``streamable_http_client`` with an ``httpx2.AsyncClient``)
  in a chosen mode, recording progress notifications with their arrival time, the
  negotiated protocol version, the session id and every HTTP exchange.
* ``post_jsonrpc(...)`` sends one raw JSON-RPC POST (curl-style) for wire-level checks.

Modes: ``"legacy"`` (initialize handshake, 2025-11-25 against the 2.x server, sessions on a
stateful server), ``"2026-07-28"`` (pinned modern protocol: no handshake, no session, every
POST carries ``MCP-Protocol-Version``/``Mcp-Method``/``Mcp-Name``), ``"auto"`` (SDK default:
probe ``server/discover``, fall back to ``initialize``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult, TextContent

Mode = Literal["legacy", "auto", "2026-07-28"]
MODES: Final[tuple[Mode, Mode]] = ("legacy", "2026-07-28")
"""The two explicit client modes integration tests iterate over."""

MODERN_VERSION: Final = "2026-07-28"
LEGACY_VERSION: Final = "2025-11-25"
"""What the 2.x client negotiates with the 2.x server in legacy mode."""

ACCEPT_BOTH: Final = "application/json, text/event-stream"

ProgressRecord = tuple[float, float, float | None]
"""``(time.monotonic() at arrival, progress, total)`` for one progress notification."""

_REPO_ROOT: Final = Path(__file__).resolve().parents[1]
_UPSTREAM_MODULE: Final = "proxy.demo.upstream"
_READY_PREFIX: Final = b"READY "


# --------------------------------------------------------------------------- upstream process


@contextlib.asynccontextmanager
async def run_upstream(
    stateless: bool = False,
    json_response: bool = False,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    extra_args: Sequence[str] = (),
    ready_timeout: float = 20.0,
    stop_timeout: float = 5.0,
) -> AsyncIterator[str]:
    """Run the demo upstream as a subprocess and yield its URL (``http://HOST:PORT/mcp``).

    ``port=0`` (default) lets the OS pick a free port; the child reports it on its
    ``READY <url>`` line, which is awaited (bounded by ``ready_timeout``) instead of sleeping.
    On exit the child is terminated, waited for (``stop_timeout``), and killed if needed.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(_REPO_ROOT), env.get("PYTHONPATH", "")) if p
    )
    argv = [sys.executable, "-m", _UPSTREAM_MODULE, "--host", host, "--port", str(port)]
    if stateless:
        argv.append("--stateless")
    if json_response:
        argv.append("--json")
    argv.extend(extra_args)

    with tempfile.TemporaryFile() as stderr_file:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr_file,
            env=env,
        )
        drain: asyncio.Task[None] | None = None
        try:
            assert proc.stdout is not None
            url = await _await_ready(proc, proc.stdout, stderr_file, ready_timeout)
            # Keep reading stdout so the child can never block on a full pipe.
            drain = asyncio.create_task(_drain(proc.stdout))
            yield url
        finally:
            await _stop(proc, stop_timeout)
            if drain is not None:
                await drain
            elif proc.stdout is not None:
                await _drain(proc.stdout)
            # The child logs at WARNING and above only; surface that in the test's captured stderr.
            if logged := _read_back(stderr_file):
                sys.stderr.write(f"--- demo upstream stderr ({_argv_hint(argv)}):\n{logged}\n")


async def _await_ready(
    proc: asyncio.subprocess.Process,
    stdout: asyncio.StreamReader,
    stderr_file: Any,
    limit_s: float,
) -> str:
    try:
        async with asyncio.timeout(limit_s):
            while True:
                line = await stdout.readline()
                if not line:  # EOF: the child exited (or closed stdout) before READY
                    await proc.wait()
                    raise RuntimeError(
                        f"demo upstream exited with {proc.returncode} before READY:\n"
                        + _read_back(stderr_file)
                    )
                if line.startswith(_READY_PREFIX):
                    return line[len(_READY_PREFIX) :].decode().strip()
    except TimeoutError:
        raise RuntimeError(
            f"demo upstream not READY within {limit_s}s:\n{_read_back(stderr_file)}"
        ) from None


def _argv_hint(argv: Sequence[str]) -> str:
    return " ".join(argv[2:])


def _read_back(stderr_file: Any) -> str:
    stderr_file.flush()
    stderr_file.seek(0)
    data: bytes = stderr_file.read()
    return data.decode(errors="replace")[-4000:]


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


async def _stop(proc: asyncio.subprocess.Process, limit_s: float) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            async with asyncio.timeout(limit_s):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    await proc.wait()


# --------------------------------------------------------------------------- client side


@dataclass(frozen=True)
class HttpExchange:
    """One HTTP request the client made and the response headers it got back."""

    method: str
    url: str
    status: int
    request_headers: Mapping[str, str]
    response_headers: Mapping[str, str]
    at: float  # time.monotonic() when the response headers arrived


@dataclass
class ToolCall:
    """A finished ``tools/call`` plus what was observed around it."""

    result: CallToolResult
    protocol_version: str
    session_id: str | None
    progress: list[ProgressRecord]
    started: float  # time.monotonic() just before sending
    finished: float  # time.monotonic() when the result was returned

    @property
    def is_error(self) -> bool:
        return bool(self.result.is_error)

    @property
    def text(self) -> str:
        """All text content blocks, joined with newlines."""
        return "\n".join(b.text for b in self.result.content if isinstance(b, TextContent))

    @property
    def structured(self) -> dict[str, Any] | None:
        structured: dict[str, Any] | None = self.result.structured_content
        return structured

    @property
    def meta(self) -> dict[str, Any] | None:
        return self.result.meta


@dataclass
class Peer:
    """A connected official 2.x client plus recorders (see ``connect``)."""

    client: Client
    mode: Mode
    exchanges: list[HttpExchange] = field(default_factory=list)

    @property
    def protocol_version(self) -> str:
        """The negotiated protocol version (``2025-11-25`` legacy, ``2026-07-28`` modern)."""
        return self.client.protocol_version

    @property
    def session_id(self) -> str | None:
        """The ``Mcp-Session-Id`` the client sends, or None (stateless server or modern mode)."""
        for exchange in reversed(self.exchanges):
            sid = exchange.request_headers.get("mcp-session-id")
            if sid:
                return sid
        return None

    async def call_tool(
        self,
        name: str,
        args: dict[str, Any] | None = None,
        progress: list[ProgressRecord] | None = None,
        *,
        read_timeout: float | None = None,
    ) -> ToolCall:
        """Call a tool; progress notifications are appended to ``progress`` (if given) as
        ``(time.monotonic(), progress, total)`` and are also returned in ``ToolCall.progress``."""
        seen: list[ProgressRecord] = []
        sink = progress

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            record = (time.monotonic(), progress, total)
            seen.append(record)
            if sink is not None:
                sink.append(record)

        started = time.monotonic()
        result = await self.client.call_tool(
            name, args or {}, read_timeout_seconds=read_timeout, progress_callback=on_progress
        )
        finished = time.monotonic()
        return ToolCall(
            result=result,
            protocol_version=self.protocol_version,
            session_id=self.session_id,
            progress=seen,
            started=started,
            finished=finished,
        )

    async def list_tools(self) -> list[str]:
        """Names of all tools (follows pagination; bypasses the client's response cache)."""
        names: list[str] = []
        cursor: str | None = None
        while True:
            page = await self.client.list_tools(cursor=cursor, cache_mode="refresh")
            names.extend(tool.name for tool in page.tools)
            cursor = page.next_cursor
            if cursor is None:
                return names


@contextlib.asynccontextmanager
async def connect(
    url: str,
    headers: Mapping[str, str] | None = None,
    mode: Mode = "legacy",
    *,
    read_timeout: float = 30.0,
) -> AsyncIterator[Peer]:
    """Connect the official 2.x client to ``url`` with extra HTTP ``headers`` in ``mode``.

    The handshake (legacy ``initialize``, auto ``server/discover``; none for a pinned modern
    version) runs on entry, so a rejected key surfaces here (``mcp.shared.exceptions.MCPError``).
    """
    exchanges: list[HttpExchange] = []

    async def on_response(response: httpx2.Response) -> None:
        request = response.request
        exchanges.append(
            HttpExchange(
                method=request.method,
                url=str(request.url),
                status=response.status_code,
                request_headers={k.lower(): v for k, v in request.headers.items()},
                response_headers={k.lower(): v for k, v in response.headers.items()},
                at=time.monotonic(),
            )
        )

    http = httpx2.AsyncClient(
        headers=dict(headers or {}),
        timeout=httpx2.Timeout(read_timeout, read=max(read_timeout, 60.0)),
        event_hooks={"response": [on_response]},
    )
    async with (
        http,
        Client(
            streamable_http_client(url, http_client=http),
            mode=mode,
            read_timeout_seconds=read_timeout,
        ) as client,
    ):
        yield Peer(client=client, mode=mode, exchanges=exchanges)


async def call_tool(
    url: str,
    headers: Mapping[str, str] | None,
    mode: Mode,
    name: str,
    args: dict[str, Any] | None = None,
    progress: list[ProgressRecord] | None = None,
) -> ToolCall:
    """Connect, call one tool, disconnect. See ``Peer.call_tool``."""
    async with connect(url, headers, mode) as peer:
        return await peer.call_tool(name, args, progress)


async def list_tools(url: str, headers: Mapping[str, str] | None, mode: Mode) -> list[str]:
    """Connect, list tool names, disconnect."""
    async with connect(url, headers, mode) as peer:
        return await peer.list_tools()


# --------------------------------------------------------------------------- raw wire helpers


def modern_meta(**extra: Any) -> dict[str, Any]:
    """The ``params._meta`` envelope a 2026-07-28 request must carry."""
    return {
        "io.modelcontextprotocol/protocolVersion": MODERN_VERSION,
        "io.modelcontextprotocol/clientCapabilities": {},
        **extra,
    }


def tools_call_body(
    name: str, args: Mapping[str, Any], *, request_id: int | str = 1, modern: bool = False
) -> dict[str, Any]:
    """A JSON-RPC ``tools/call`` request body (with the modern ``_meta`` envelope if asked)."""
    params: dict[str, Any] = {"name": name, "arguments": dict(args)}
    if modern:
        params["_meta"] = modern_meta()
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}


def wire_headers(
    *, method: str | None = None, name: str | None = None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """``Accept``/``Content-Type`` for a bare POST; with ``method`` also the 2026-07-28
    ``MCP-Protocol-Version``/``Mcp-Method`` (and ``Mcp-Name`` when given) headers."""
    out = {"Accept": ACCEPT_BOTH, "Content-Type": "application/json"}
    if method is not None:
        out["MCP-Protocol-Version"] = MODERN_VERSION
        out["Mcp-Method"] = method
        if name is not None:
            out["Mcp-Name"] = name
    out.update(extra or {})
    return out


async def post_jsonrpc(
    url: str, body: Any, headers: Mapping[str, str], *, http_timeout: float = 10.0
) -> httpx2.Response:
    """One raw POST (like curl); the response body is fully read before returning."""
    async with httpx2.AsyncClient(timeout=http_timeout) as http:
        return await http.post(url, json=body, headers=dict(headers))
