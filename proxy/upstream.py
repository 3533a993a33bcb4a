"""The client the proxy forwards with: HTTP/1.1 to one origin over pooled keep-alive
connections, one asyncio Protocol each, replies parsed by httptools (llhttp, the parser under
aiohttp and uvicorn too).

aiohttp's ClientSession was the largest single cost on the hot path (a quarter of the loop at
16 concurrent calls): per call it builds a request object, a URL, timers, trace hooks and a
connector key. A sidecar talks to one origin, so a pool of connections and one write per
request are all it needs. Bytes pass untouched: no decompression, no cookies, no redirects,
no headers added beyond Host and Content-Length.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from base64 import b64encode
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import cast
from urllib.parse import unquote, urlsplit

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

# Body bytes buffered for a slow reader before the upstream socket stops being read; it is
# read again once the reader has taken everything buffered.
HIGH_WATER = 256 * 1024
# A response head larger than this is refused (llhttp itself sets no bound).
MAX_HEAD_BYTES = 256 * 1024
# Idle connections older than this are closed rather than reused: it stays below common
# server keep-alive timeouts (gunicorn 2 s, uvicorn and Node 5 s), and below half of what a
# server announces in `Keep-Alive: timeout=N`, so that a request rarely meets a connection
# the server is closing at that moment (a POST is never retried).
IDLE_TIMEOUT_S = 1.0
MAX_IDLE = 256
# Methods that are retried once when a reused connection closes before any reply (the
# server closed it while idle). A POST is never retried: it might have run.
_RETRY_ON_STALE = frozenset({"GET", "DELETE"})


class UpstreamUnreachable(Exception):
    """No response head arrived: refused, reset, timed out or not HTTP. Nothing was relayed."""


class UpstreamBroken(Exception):
    """The response began but broke off or was malformed after its head."""


class _ClosedUnanswered(UpstreamUnreachable):
    """Closed before a single byte of reply: on a reused connection, the server had closed
    it while idle, so an idempotent request may go again on a fresh one."""


def _keep_alive_timeout(value: str) -> float | None:
    """`Keep-Alive: timeout=5, max=100` -> 5.0 (RFC 2068 19.7.1.1); None if absent."""
    for part in value.split(","):
        name, _, number = part.partition("=")
        if name.strip().lower() == "timeout":
            try:
                return max(0.0, float(number.strip()))
            except ValueError:
                return None
    return None


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")  # as aiohttp's parser: bytes round-trip


class UpstreamResponse:
    """One reply: status, reason and headers once the head is in; the body by iter_any()."""

    def __init__(self, conn: _Connection, loop: asyncio.AbstractEventLoop) -> None:
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
        self.content_length: int | None = None
        self.keep_alive = False
        self.head: asyncio.Future[None] = loop.create_future()
        self._got_bytes = False
        self._conn = conn
        self._loop = loop
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._complete = False
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def complete(self) -> bool:
        return self._complete

    async def iter_any(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive (whatever is buffered, joined); raises UpstreamBroken
        after the buffered bytes if the reply broke off."""
        while True:
            if self._chunks:
                chunks = self._chunks
                data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                self._conn.resume()
                yield data
            elif self._error is not None:
                raise self._error
            elif self._complete:
                return
            else:
                waiter = self._waiter = self._loop.create_future()
                try:
                    await waiter
                finally:
                    self._waiter = None

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.iter_any()])

    # --- fed by the connection -------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER:
            self._conn.pause()
        self._wake()

    def _finish(self) -> None:
        if self._error is None:
            self._complete = True
            self._wake()

    def _fail(self, exc: Exception) -> None:
        if self._complete or self._error is not None:
            return
        if not self.head.done():
            self.head.set_exception(exc)
            self.head.exception()  # retrieved: the awaiting request may be gone already
        self._error = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; it carries one request at a time."""

    def __init__(self, client: UpstreamClient) -> None:
        self._client = client
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self.keep_alive_s: float | None = None  # what the server announced, if it did
        self._response: UpstreamResponse | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._paused = False
        self._reusable = True
        self._reason = bytearray()
        self._headers: list[tuple[str, str]] = []
        self._head_bytes = 0  # bytes of whole reads that were all head
        self._head_size = 0  # the head as parsed so far
        self._informational = False
        self._eof_ends = False

    # --- asyncio -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        resp = self._response
        if resp is None or resp.complete:
            # Bytes nobody asked for: this connection can no longer be trusted.
            self._reusable = False
            self.close()
            return
        resp._got_bytes = True
        assert self._parser is not None
        if not resp.head.done() and self._head_bytes > MAX_HEAD_BYTES:
            # llhttp holds a header being received in memory until it ends: bound that.
            self._abort(UpstreamUnreachable(f"response head over {MAX_HEAD_BYTES} bytes"))
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._abort(UpstreamUnreachable("the upstream switched protocols"))
            return
        except httptools.HttpParserError as exc:
            if resp.head.done():
                self._abort(UpstreamBroken(f"malformed response body: {exc}"))
            else:
                self._abort(UpstreamUnreachable(f"malformed response head: {exc}"))
            return
        if not resp.head.done() and not resp.complete:
            self._head_bytes += len(data)  # counted only once it is known to be all head

    def connection_lost(self, exc: Exception | None) -> None:
        self._reusable = False
        self._client._forget(self)
        resp = self._response
        if resp is None or resp.complete:
            return
        if resp.head.done() and self._eof_ends and exc is None:
            resp._finish()  # a body without a length ends when the upstream closes
        elif resp.head.done():
            resp._fail(UpstreamBroken("the upstream closed the connection mid-reply"))
        elif resp._got_bytes:
            resp._fail(UpstreamUnreachable("the upstream closed the connection mid-head"))
        else:
            resp._fail(_ClosedUnanswered("the upstream closed the connection before replying"))

    # --- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reason.clear()
        self._headers = []
        self._head_size = 0

    def on_status(self, status: bytes) -> None:
        self._reason += status  # may arrive in pieces
        self._head_size += len(status)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((_decode(name), _decode(value)))
        self._head_size += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        assert self._parser is not None and self._response is not None
        if self._response.complete:  # a second reply nobody asked for
            self._reusable = False
            return
        code = self._parser.get_status_code()
        resp = self._response
        if self._head_size > MAX_HEAD_BYTES:
            self._reusable = False
            resp._fail(UpstreamUnreachable(f"response head over {MAX_HEAD_BYTES} bytes"))
            return
        if code == 101:  # nothing asked to switch protocols: not an answer to relay
            self._reusable = False
            resp._fail(UpstreamUnreachable("the upstream switched protocols"))
            return
        self._informational = 100 <= code < 200
        if self._informational:
            return  # e.g. 100 Continue: the real head follows
        headers = CIMultiDict(self._headers)
        resp.status = code
        resp.reason = _decode(bytes(self._reason))
        resp.headers = CIMultiDictProxy(headers)
        resp.keep_alive = self._parser.should_keep_alive()
        length = headers.get("Content-Length")
        resp.content_length = int(length) if length is not None and length.isdigit() else None
        coding = headers.get("Transfer-Encoding")
        if coding is not None:  # llhttp reads to the end unless chunked is the last coding
            self._eof_ends = coding.rpartition(",")[2].strip().lower() != "chunked"
        else:
            self._eof_ends = length is None
        self._eof_ends = self._eof_ends and code not in (204, 304)
        announced = headers.get("Keep-Alive")
        if announced is not None:
            self.keep_alive_s = _keep_alive_timeout(announced)
        resp.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        assert self._response is not None
        if self._response.complete:
            self._reusable = False
            return
        self._response._feed(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        assert self._response is not None
        self._response._finish()

    # --- used by the client ----------------------------------------------------------------

    def start(self, data: bytes) -> UpstreamResponse:
        assert self.transport is not None
        self._response = resp = UpstreamResponse(self, self._loop)
        self._parser = parser = httptools.HttpResponseParser(self)
        # As lenient as aiohttp's client parser was (servers in the wild send such replies).
        parser.set_dangerous_leniencies(
            lenient_headers=True,
            lenient_optional_cr_before_lf=True,
            lenient_spaces_after_chunk_size=True,
        )
        self._head_bytes = 0
        self._head_size = 0
        self._informational = False
        self._eof_ends = False
        self.transport.write(data)
        return resp

    @property
    def usable(self) -> bool:
        return self._reusable and self.transport is not None and not self.transport.is_closing()

    def detach(self) -> bool:
        """Let go of the reply; True if it was read to its end and the connection may carry
        another."""
        resp = self._response
        self._response = None
        self._parser = None
        return (
            resp is not None
            and resp.complete
            and resp.keep_alive
            and not self._paused
            and self.usable
        )

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self._reusable = False
        self._client._forget(self)
        if self._response is not None:  # our close is no end of the reply (even without length)
            self._response._fail(UpstreamBroken("the connection was closed by the proxy"))
        if self.transport is not None:
            self.transport.close()

    def _abort(self, exc: Exception) -> None:
        if self._response is not None:
            self._response._fail(exc)
        self.close()


class UpstreamClient:
    """Requests to one origin (the MCP server), each on a pooled keep-alive connection."""

    def __init__(
        self,
        url: str,
        connect_timeout: float,
        *,
        idle_timeout: float = IDLE_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream URL must be http(s)://host[:port][/path], got {url!r}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        netloc = parts.netloc.rpartition("@")[2]
        host_line = f"\r\nHost: {netloc}\r\n"
        if parts.username is not None:
            # user:password@ in the URL is the upstream's own credential (as aiohttp sent it).
            userinfo = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            host_line += f"Authorization: Basic {b64encode(userinfo.encode()).decode()}\r\n"
        self._prefix = (host_line.encode("ascii"), parts.path.rstrip("/"))
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._clock = clock
        self._idle: deque[_Connection] = deque()
        self._all: set[_Connection] = set()

    async def request(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes = b"",
    ) -> UpstreamResponse:
        """Send one request; returns once the response head is in. Release the response
        (release()) when done with it. Raises UpstreamUnreachable."""
        data = self._serialise(method, target, headers, body)
        conn = self._take_idle()
        if conn is not None and method in _RETRY_ON_STALE:
            try:
                return await self._exchange(conn, data)
            except _ClosedUnanswered:
                conn = None  # once more, on a fresh connection
        if conn is None:
            conn = await self._connect()
        return await self._exchange(conn, data)

    def release(self, resp: UpstreamResponse) -> None:
        """Back to the pool if the reply was read to its end; otherwise close it."""
        conn = resp._conn
        if conn._response is not resp:
            return  # already released
        if conn.detach():
            conn.idle_since = self._clock()
            self._idle.append(conn)
            while len(self._idle) > MAX_IDLE:
                self._idle.popleft().close()
        else:
            conn.close()

    async def close(self) -> None:
        for conn in list(self._all):
            conn.close()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports run connection_lost

    @property
    def open_connections(self) -> int:
        return len(self._all)

    # --- internals -------------------------------------------------------------------------

    def _serialise(
        self, method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes
    ) -> bytes:
        host_line, base = self._prefix
        lines = [f"{k}: {v}\r\n" for k, v in headers]
        if body or method == "POST":
            lines.append(f"Content-Length: {len(body)}\r\n")
        text = "".join(lines)
        request_line = f"{method} {base}{target} HTTP/1.1"
        # Names and values came through aiohttp's parser or from this proxy; one check keeps
        # any CR or LF in them from splitting the request (smuggling).
        if (
            text.count("\n") != len(lines)
            or text.count("\r") != len(lines)
            or "\r" in request_line
            or "\n" in request_line
            or " " in target
        ):
            raise ValueError("refusing to forward a header or target that contains CR or LF")
        head = request_line.encode("utf-8", "surrogateescape") + host_line
        return head + text.encode("utf-8", "surrogateescape") + b"\r\n" + body

    async def _exchange(self, conn: _Connection, data: bytes) -> UpstreamResponse:
        resp = conn.start(data)
        try:
            await resp.head
        except BaseException:
            conn.close()
            raise
        return resp

    def _take_idle(self) -> _Connection | None:
        now = self._clock()
        idle = self._idle
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be stale
            if not conn.usable:
                continue
            limit = self._idle_timeout
            if conn.keep_alive_s is not None:
                limit = min(limit, conn.keep_alive_s / 2)
            if now - conn.idle_since > limit:
                # This one and every older one: closed rather than risked.
                conn.close()
                while idle:
                    idle.popleft().close()
                return None
            return conn
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                )
        except (OSError, TimeoutError) as exc:
            raise UpstreamUnreachable(f"cannot connect to the upstream: {exc!r}") from exc
        self._all.add(conn)
        return conn

    def _forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
