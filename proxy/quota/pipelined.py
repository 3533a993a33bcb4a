"""A minimal pipelined Redis client for the hot path: one connection, replies matched to
their commands in order (RESP2, parsed by hiredis as they arrive).

redis-py's pooled asyncio client spends 110-200 µs of CPU per call here (pool checkout,
command packing, per-call timeouts). This one is an asyncio Protocol: no reader task and no
stream buffers, and the commands asked for in one turn of the event loop leave in one write.
It is used only for the quota scripts on a single Redis node; everything else (admin,
pub/sub, Redis Cluster, TLS, unix sockets) stays on redis-py.

Given `deadline_s`, each command fails with TimeoutError once it has waited that long. One
watchdog timer per connection enforces it, re-armed for the oldest waiter, rather than a timer
per call (asyncio.timeout costs more than the rest of a call's client work).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

Arg = str | int | bytes


# The RESP form of str arguments seen lately (the per-tenant keys, the script SHA). Bounded,
# and emptied when full: keys are per tenant and per period and reservation ids are unique,
# so a large fleet would otherwise grow it without limit, while the tenants that are busy
# refill it at once. At worst (more busy tenants than fit) the misses cost about what it saves.
_ENCODED_MAX = 4096
_encoded: dict[str, str] = {}


def encode(args: Sequence[Arg]) -> bytes:
    """A RESP array of bulk strings: bytes as they are, anything else as str() in UTF-8.
    Exact str and int are built as one text and encoded once (the hot path); any other
    argument (bytes, bool, subclasses) takes the general encoding."""
    out = [f"*{len(args)}\r\n"]
    append = out.append
    encoded = _encoded
    for arg in args:
        if type(arg) is int:
            text = str(arg)
            append(f"${len(text)}\r\n{text}\r\n")
        elif type(arg) is str:
            chunk = encoded.get(arg)
            if chunk is None:
                size = len(arg) if arg.isascii() else len(arg.encode())  # bytes, not characters
                chunk = f"${size}\r\n{arg}\r\n"
                if len(encoded) >= _ENCODED_MAX:
                    encoded.clear()
                encoded[arg] = chunk
            append(chunk)
        else:
            return _encode_any(args)
    return "".join(out).encode()


def _encode_any(args: Sequence[Arg]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def supports(url: str) -> bool:
    """Plain TCP single-node URLs only."""
    return urlsplit(url).scheme == "redis"


class _Connection(asyncio.Protocol):
    """One socket. `pending` holds a future per command written (or about to be), in order;
    a waiter that gave up leaves its future there, done, and its reply is read and dropped,
    so the order never slips."""

    def __init__(
        self,
        on_lost: Callable[[_Connection], None],
        deadline_s: float | None = None,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.out: list[bytes] = []  # commands of this loop turn, written together
        self.closed = False
        self._parser = hiredis.Reader(encoding="utf-8")
        self._on_lost = on_lost
        self._deadline_s = deadline_s
        self._now = now
        self._watchdog: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport is not an asyncio.Transport subclass, but has its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._parser.feed(data)
        pending = self.pending
        try:
            while (reply := self._parser.gets()) is not False:
                future, _ = pending.popleft()
                if future.done():
                    continue
                if isinstance(reply, hiredis.ReplyError):
                    text = str(reply)
                    _fail(
                        future,
                        NoScriptError(text) if text.startswith("NOSCRIPT") else ResponseError(text),
                    )
                else:
                    future.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:  # garbage, or a reply nobody asked for
            self.drop(RedisConnectionError(f"Redis protocol error: {exc!r}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.drop(RedisConnectionError(str(exc) if exc else "Redis closed the connection"))

    def watch(self) -> None:
        """Arm the watchdog if it is not: called for each command sent."""
        if self._watchdog is None and self._deadline_s is not None:
            self._watchdog = asyncio.get_running_loop().call_later(self._deadline_s, self._expire)

    def _expire(self) -> None:
        """Fail the waiters whose deadline passed; sleep until the next one's. Their
        entries stay in `pending`: the replies still come, in order, and are dropped."""
        self._watchdog = None
        assert self._deadline_s is not None
        now = self._now()
        for future, sent in self.pending:
            if future.done():
                continue
            due = sent + self._deadline_s
            if due > now:
                self._watchdog = asyncio.get_running_loop().call_later(due - now, self._expire)
                return
            _fail(future, TimeoutError(f"Redis did not answer within {self._deadline_s} s"))

    def flush(self) -> None:
        if not self.out or self.closed:
            return
        data = b"".join(self.out)
        self.out.clear()
        try:
            self.transport.write(data)  # type: ignore[union-attr]  # set before any send
        except (RuntimeError, OSError) as exc:  # uvloop: the transport closed under us
            self.drop(RedisConnectionError(str(exc)))

    def drop(self, error: Exception) -> None:
        """Everyone waiting on this socket fails (the guard decides what then)."""
        if self.closed:
            return
        self.closed = True
        self.out.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self.pending:
            future, _ = self.pending.popleft()
            if not future.done():
                _fail(future, error)
        if self.transport is not None:
            self.transport.close()
        self._on_lost(self)


class PipelinedRedis:
    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float,
        stall_s: float,
        deadline_s: float | None = None,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self._now = now
        self._deadline_s = deadline_s
        parts = urlsplit(url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._username = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        path = parts.path.strip("/")
        self._db = int(path) if path.isdigit() else 0
        self._connect_timeout = connect_timeout
        self._stall_s = stall_s  # a reply this late means the connection is wedged
        self._conn: _Connection | None = None
        self._connecting = asyncio.Lock()
        self._scripts: dict[str, str] = {}
        self._loads: dict[str, asyncio.Future[Any]] = {}  # one SCRIPT LOAD per script at once

    @property
    def enforces_deadline(self) -> bool:
        return self._deadline_s is not None

    async def execute(self, *args: Arg) -> Any:
        conn = self._usable() or await self._connect_in_time()
        return await self._send(conn, args)

    async def evalsha_many(
        self, script: str, calls: Sequence[tuple[Sequence[Arg], Sequence[Arg]]]
    ) -> list[Any]:
        """Run `script` once per (keys, args): the commands leave in one write, the replies
        come back in order, or the first error is raised. For idempotent scripts only: on
        NOSCRIPT the whole batch is sent again, and part of it may already have run."""
        if not calls:
            return []
        sha = self._sha(script)
        commands = [["EVALSHA", sha, len(keys), *keys, *args] for keys, args in calls]
        try:
            return await self._execute_many(commands)
        except NoScriptError:
            await self._load(script)
            return await self._execute_many(commands)

    async def _execute_many(self, commands: list[list[Arg]]) -> list[Any]:
        conn = self._usable() or await self._connect_in_time()
        futures = [self._send(conn, command) for command in commands]
        # Awaited in order, no task each. Once one fails the rest are left pending: their
        # replies are still read (or they time out) and an error is marked seen by _fail.
        return [await future for future in futures]

    def _usable(self) -> _Connection | None:
        """The open connection, unless its oldest command has waited past the stall bound:
        then it is dropped, with everyone waiting on it."""
        conn = self._conn
        if conn is not None and conn.pending and self._now() - conn.pending[0][1] > self._stall_s:
            conn.drop(RedisConnectionError("Redis stopped answering on this connection"))
            return None
        return conn

    async def _connect_in_time(self) -> _Connection:
        if self._deadline_s is None:
            return await self._connect()
        async with asyncio.timeout(self._deadline_s):  # waiting for the lock included
            return await self._connect()

    def _send(self, conn: _Connection, args: Sequence[Arg]) -> asyncio.Future[Any]:
        if conn.closed:
            raise RedisConnectionError("the Redis connection is closing")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        conn.pending.append((future, self._now()))
        conn.watch()
        conn.out.append(encode(args))
        if len(conn.out) == 1:
            loop.call_soon(conn.flush)
        return future

    async def _connect(self) -> _Connection:
        async with self._connecting:
            if self._conn is not None:
                return self._conn
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self._lost, self._deadline_s, self._now),
                    self._host,
                    self._port,
                )
                try:
                    for command in self._hello():
                        await self._send(conn, command)
                except BaseException:
                    conn.drop(RedisConnectionError("Redis refused the connection set-up"))
                    raise
            self._conn = conn
            return conn

    def _hello(self) -> list[list[Arg]]:
        hello: list[list[Arg]] = []
        if self._password is not None:
            auth: list[Arg] = ["AUTH", self._password]
            if self._username is not None:
                auth.insert(1, self._username)
            hello.append(auth)
        if self._db:
            hello.append(["SELECT", self._db])
        return hello

    def _lost(self, conn: _Connection) -> None:
        if self._conn is conn:
            self._conn = None

    async def evalsha(self, script: str, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        sha = self._sha(script)
        try:
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)
        except NoScriptError:
            await self._load(script)
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)

    async def _load(self, script: str) -> None:
        """After a restart every waiting call sees NOSCRIPT: they share one load."""
        loading = self._loads.get(script)
        if loading is None:
            loading = self._loads[script] = asyncio.ensure_future(
                self.execute("SCRIPT", "LOAD", script)
            )
            loading.add_done_callback(self._loaded(script))
        await asyncio.shield(loading)

    def _loaded(self, script: str) -> Callable[[asyncio.Future[Any]], None]:
        def done(future: asyncio.Future[Any]) -> None:
            self._loads.pop(script, None)
            if not future.cancelled():
                future.exception()  # seen here even if every waiter has given up

        return done

    def _sha(self, script: str) -> str:
        sha = self._scripts.get(script)
        if sha is None:
            sha = self._scripts[script] = hashlib.sha1(script.encode()).hexdigest()
        return sha

    async def aclose(self) -> None:
        if self._conn is not None:
            self._conn.drop(RedisConnectionError("client closed"))
        self._conn = None


def _fail(future: asyncio.Future[Any], error: Exception) -> None:
    future.set_exception(error)
    # Its caller may have given up already (timeout, client gone): mark the error as seen so
    # asyncio does not log it; a caller still waiting gets it all the same.
    future.exception()
