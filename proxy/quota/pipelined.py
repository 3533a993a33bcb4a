"""A minimal pipelined Redis client for the hot path: one connection, each command written
as soon as it is asked for, replies matched in order (RESP2, parsed by hiredis).

redis-py's pooled asyncio client spends 110-200 µs of CPU per call here (pool checkout,
command packing, per-call timeouts); one multiplexed connection costs ~40 µs. It is used
only for the quota scripts on a single Redis node; everything else (admin, pub/sub, Redis
Cluster, TLS, unix sockets) stays on redis-py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

Arg = str | int | bytes


def encode(args: Sequence[Arg]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def supports(url: str) -> bool:
    """Plain TCP single-node URLs only."""
    return urlsplit(url).scheme == "redis"


class PipelinedRedis:
    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float,
        stall_s: float,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self._now = now
        parts = urlsplit(url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._username = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        path = parts.path.strip("/")
        self._db = int(path) if path.isdigit() else 0
        self._connect_timeout = connect_timeout
        self._stall_s = stall_s  # a reply this late means the connection is wedged
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._connecting = asyncio.Lock()
        self._scripts: dict[str, bytes] = {}

    async def _connect(self) -> asyncio.StreamWriter:
        async with self._connecting:
            if self._writer is not None:
                return self._writer
            async with asyncio.timeout(self._connect_timeout):
                reader, writer = await asyncio.open_connection(self._host, self._port)
            self._writer = writer
            self._reader_task = asyncio.get_running_loop().create_task(
                self._read_replies(reader, writer), name="redis-pipelined-reader"
            )
            hello: list[list[Arg]] = []
            if self._password is not None:
                auth: list[Arg] = ["AUTH", self._password]
                if self._username is not None:
                    auth.insert(1, self._username)
                hello.append(auth)
            if self._db:
                hello.append(["SELECT", self._db])
            for command in hello:
                await self._send(writer, command)
            return writer

    async def _send(self, writer: asyncio.StreamWriter, args: Sequence[Arg]) -> Any:
        if writer.is_closing():
            raise RedisConnectionError("the Redis connection is closing")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        try:
            writer.write(encode(args))
        except RuntimeError as exc:  # uvloop: the transport closed under us
            raise RedisConnectionError(str(exc)) from exc
        self._pending.append((future, self._now()))
        # Shielded: a caller that gives up (timeout, client gone) must not desynchronise the
        # reply order; its reply is read and dropped.
        return await asyncio.shield(future)

    async def execute(self, *args: Arg) -> Any:
        if self._pending and self._now() - self._pending[0][1] > self._stall_s:
            self._reset(RedisConnectionError("Redis stopped answering on this connection"))
        writer = self._writer or await self._connect()
        return await self._send(writer, args)

    async def evalsha(self, script: str, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        sha = self._sha(script)
        try:
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.execute("SCRIPT", "LOAD", script)
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)

    def _sha(self, script: str) -> str:
        sha = self._scripts.get(script)
        if sha is None:
            sha = self._scripts[script] = hashlib.sha1(script.encode()).hexdigest().encode()
        return sha.decode()

    async def _read_replies(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        parser = hiredis.Reader(encoding="utf-8")
        error: Exception = RedisConnectionError("Redis closed the connection")
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    future, _ = self._pending.popleft()
                    if future.done():
                        continue
                    if isinstance(reply, hiredis.ReplyError):
                        text = str(reply)
                        _fail(
                            future,
                            NoScriptError(text)
                            if text.startswith("NOSCRIPT")
                            else ResponseError(text),
                        )
                    else:
                        future.set_result(reply)
        except (OSError, hiredis.ProtocolError) as exc:
            error = RedisConnectionError(str(exc))
        if self._writer is writer:
            self._reset(error)

    def _reset(self, error: Exception) -> None:
        """Drop the connection; everyone waiting on it fails (the guard decides what then)."""
        writer, self._writer = self._writer, None
        while self._pending:
            future, _ = self._pending.popleft()
            if not future.done():
                _fail(future, error)
        if writer is not None:
            writer.close()
        if self._reader_task is not None and self._reader_task is not asyncio.current_task():
            self._reader_task.cancel()

    async def aclose(self) -> None:
        self._reset(RedisConnectionError("client closed"))
        if self._reader_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
            self._reader_task = None


def _fail(future: asyncio.Future[Any], error: Exception) -> None:
    future.set_exception(error)
    # Its caller may have given up already (timeout, client gone): mark the error as seen so
    # asyncio does not log it; a caller still waiting gets it all the same.
    future.exception()
