"""The upstream client against a scripted HTTP server on loopback: real sockets, exact bytes."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from proxy.upstream import (
    HIGH_WATER,
    MAX_HEAD_BYTES,
    UpstreamBroken,
    UpstreamClient,
    UpstreamUnreachable,
    _Connection,
)

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


@dataclass
class Scripted:
    """Answers the n-th request it receives (on any connection) with replies[n]."""

    replies: list[bytes | Callable[[asyncio.StreamWriter], object]]
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                raw = head + await reader.readexactly(length)
                self.requests.append(raw)
                reply = self.replies[len(self.requests) - 1]
                if callable(reply):
                    reply(writer)
                    if writer.is_closing():
                        return
                else:
                    writer.write(reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def scripted(
    *replies: bytes | Callable[[asyncio.StreamWriter], object],
    path: str = "",
    userinfo: str = "",
    **options: Any,
) -> AsyncIterator[tuple[Scripted, UpstreamClient]]:
    script = Scripted(list(replies))
    server = await asyncio.start_server(script.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"http://{userinfo}127.0.0.1:{port}{path}"
    client = UpstreamClient(url, connect_timeout=5, **options)
    try:
        yield script, client
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


def close_now(writer: asyncio.StreamWriter) -> None:
    writer.close()


def reset(data: bytes) -> Callable[[asyncio.StreamWriter], None]:
    """Send `data`, then reset the connection (RST, not FIN)."""

    def act(writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()

    return act


async def call(
    client: UpstreamClient, method: str = "POST", body: bytes = b'{"a":1}'
) -> tuple[int, str, bytes]:
    up = await client.request(method, "/mcp?x=1", [("Content-Type", "application/json")], body)
    try:
        return up.status, up.reason, await up.read()
    finally:
        client.release(up)


async def test_one_write_per_request_and_keep_alive_reuses_the_connection() -> None:
    async with scripted(OK, OK, path="/base") as (server, client):
        assert await call(client) == (200, "OK", b"{}")
        assert await call(client, "GET", b"") == (200, "OK", b"{}")
    assert server.connections == 1
    port = client._port
    assert server.requests[0] == (
        f"POST /base/mcp?x=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Content-Type: application/json\r\nContent-Length: 7\r\n\r\n"
        '{"a":1}'.encode()
    )
    # No body, no Content-Length; nothing added that the caller did not give.
    assert server.requests[1] == (
        f"GET /base/mcp?x=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Content-Type: application/json\r\n\r\n".encode()
    )


async def test_status_reason_and_repeated_headers_arrive_as_sent() -> None:
    reply = (
        b"HTTP/1.1 503 Busy Upstream\r\nSet-Cookie: a=1\r\nX-Odd: caf\xc3\xa9\r\n"
        b"Set-Cookie: b=2\r\nContent-Length: 4\r\n\r\nbusy"
    )
    async with scripted(reply) as (_, client):
        up = await client.request("POST", "/mcp", [], b"{}")
        assert (up.status, up.reason) == (503, "Busy Upstream")
        assert up.headers.getall("Set-Cookie") == ["a=1", "b=2"]
        assert up.headers["X-Odd"] == "café"
        assert up.content_length == 4
        assert await up.read() == b"busy"
        client.release(up)


async def test_a_chunked_reply_is_decoded_across_packets() -> None:
    def chunks(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
        writer.write(b"lo\r\n6\r\n world\r\n0\r\n\r\n")

    async with scripted(chunks, OK) as (server, client):
        assert await call(client) == (200, "OK", b"hello world")
        assert await call(client) == (200, "OK", b"{}")
    assert server.connections == 1


async def test_a_body_without_a_length_ends_at_close_and_the_connection_is_not_reused() -> None:
    def until_close(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        writer.close()

    async with scripted(until_close, OK) as (server, client):
        assert await call(client) == (200, "OK", b"all of it")
        assert await call(client) == (200, "OK", b"{}")
    assert server.connections == 2


async def test_a_reply_cut_short_gives_its_bytes_then_breaks_and_is_not_pooled() -> None:
    cut = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"
    async with scripted(reset(cut), OK) as (server, client):
        up = await client.request("POST", "/mcp", [], b"{}")
        got = []
        with pytest.raises(UpstreamBroken):
            async for chunk in up.iter_any():
                got.append(chunk)
        assert b"".join(got) == b"partial"
        client.release(up)
        assert await call(client) == (200, "OK", b"{}")
    assert server.connections == 2


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(close_now, id="closed-before-replying"),
        pytest.param(reset(b""), id="reset-before-replying"),
        pytest.param(b"SSH-2.0-OpenSSH_9.2\r\n\r\n", id="not-http"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n",
            id="head-too-large",
        ),
    ],
)
async def test_no_reply_head_is_unreachable(
    reply: bytes | Callable[[asyncio.StreamWriter], None],
) -> None:
    async with scripted(reply) as (server, client):
        with pytest.raises(UpstreamUnreachable):
            await call(client)
        assert client.open_connections == 0
    assert len(server.requests) == 1


async def test_nothing_listening_is_unreachable() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    client = UpstreamClient(f"http://127.0.0.1:{port}", connect_timeout=5)
    with pytest.raises(UpstreamUnreachable, match="cannot connect"):
        await call(client)


async def test_an_informational_head_is_skipped() -> None:
    reply = b"HTTP/1.1 100 Continue\r\n\r\n" + OK
    async with scripted(reply, OK) as (server, client):
        assert await call(client) == (200, "OK", b"{}")
        assert await call(client) == (200, "OK", b"{}")
    assert server.connections == 1


@pytest.mark.parametrize(("method", "retried"), [("GET", True), ("DELETE", True), ("POST", False)])
async def test_a_stale_keep_alive_connection_is_retried_only_for_idempotent_methods(
    method: str, retried: bool
) -> None:
    # The second request meets a connection the server closes without a word: what a server
    # does to an idle keep-alive connection at the moment the request arrives.
    async with scripted(OK, close_now, OK) as (server, client):
        assert await call(client) == (200, "OK", b"{}")
        if retried:
            assert await call(client, method, b"") == (200, "OK", b"{}")
        else:
            with pytest.raises(UpstreamUnreachable):
                await call(client, method)
    # A POST is sent once: it might have run.
    assert len(server.requests) == (3 if retried else 2)
    assert server.connections == (2 if retried else 1)


async def test_an_idle_connection_past_the_idle_timeout_is_not_reused() -> None:
    now = [0.0]
    async with scripted(OK, OK, OK, idle_timeout=2.0, clock=lambda: now[0]) as (server, client):
        await call(client)
        now[0] = 1.9
        await call(client)
        assert server.connections == 1
        now[0] = 4.0  # idle since 1.9: 2.1 s
        await call(client)
        assert server.connections == 2


async def test_a_reply_not_read_to_its_end_closes_the_connection() -> None:
    # The body is still on its way when the caller lets go.
    async with scripted(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe", OK) as (
        server,
        client,
    ):
        up = await client.request("POST", "/mcp", [], b"{}")
        client.release(up)  # the rest never read: the connection cannot carry another request
        assert client.open_connections == 0
        client.release(up)  # twice is harmless
        assert await call(client) == (200, "OK", b"{}")
    assert server.connections == 2


async def test_a_slow_reader_pauses_the_upstream_and_still_gets_every_byte() -> None:
    size = 8 * 1024 * 1024
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size
    async with scripted(reply) as (_, client):
        up = await client.request("POST", "/mcp", [], b"{}")
        conn = up._conn
        for _ in range(1000):  # let the socket fill the buffer until reading pauses
            if conn._paused:
                break
            await asyncio.sleep(0.001)
        assert conn._paused
        assert up._buffered <= HIGH_WATER + 1024 * 1024  # one read's worth past the mark
        total = 0
        async for chunk in up.iter_any():
            total += len(chunk)
        assert total == size
        client.release(up)


@pytest.mark.parametrize(
    "headers",
    [
        [("X-Evil", "a\r\nX-Injected: 1")],
        [("X-Evil", "a\nb")],
        [("X-Evil\r\nX-Injected", "1")],
    ],
)
async def test_cr_or_lf_in_a_header_is_refused_before_anything_is_sent(
    headers: list[tuple[str, str]],
) -> None:
    async with scripted(OK) as (server, client):
        with pytest.raises(ValueError, match="CR or LF"):
            await client.request("POST", "/mcp", headers, b"{}")
    assert server.requests == []
    assert server.connections == 0


def test_only_http_urls_are_accepted() -> None:
    with pytest.raises(ValueError, match="http"):
        UpstreamClient("ftp://example.com", connect_timeout=1)


class _Transport:
    """Enough of an asyncio transport to drive one connection's parsing by hand."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def test_body_bytes_in_the_read_that_ends_the_head_do_not_count_as_head() -> None:
    client = UpstreamClient("http://127.0.0.1:9", connect_timeout=1)
    conn = _Connection(client)
    conn.connection_made(_Transport())  # type: ignore[arg-type]
    resp = conn.start(b"POST / HTTP/1.1\r\n\r\n")
    body = b"x" * MAX_HEAD_BYTES
    conn.data_received(b"HTTP/1.1 200 OK\r\n")  # a read that is all head...
    # ...then one that ends the head and carries a body as large as the head limit.
    conn.data_received(b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert resp.head.done() and resp.head.exception() is None
    assert (resp.status, resp.complete) == (200, True)
    assert await resp.read() == body


async def test_a_head_that_never_ends_is_cut_off() -> None:
    async with scripted(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (4 * MAX_HEAD_BYTES)) as (_, client):
        with pytest.raises(UpstreamUnreachable, match="head over"):
            await call(client)


async def test_a_switch_of_protocols_is_not_relayed() -> None:
    reply = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    async with scripted(reply) as (_, client):
        with pytest.raises(UpstreamUnreachable, match="switched protocols"):
            await call(client)
        assert client.open_connections == 0


async def test_closing_the_client_breaks_a_reply_that_ends_at_close() -> None:
    # Without a length a reply ends when the connection does: but not when it is the proxy
    # that closes it (shutdown), which must not pass a truncated reply off as whole.
    async with scripted(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npart") as (_, client):
        up = await client.request("POST", "/mcp", [], b"{}")
        await client.close()
        with pytest.raises(UpstreamBroken):
            await up.read()


async def test_a_reply_whose_last_coding_is_not_chunked_ends_at_close() -> None:
    def gzip_until_close(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n\x1f\x8b-bytes")
        writer.close()

    async with scripted(gzip_until_close) as (_, client):
        assert await call(client) == (200, "OK", b"\x1f\x8b-bytes")


async def test_a_keep_alive_timeout_the_server_announces_shortens_reuse() -> None:
    now = [0.0]
    announced = b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=1, max=100\r\nContent-Length: 2\r\n\r\n{}"
    async with scripted(announced, announced, announced, idle_timeout=60, clock=lambda: now[0]) as (
        server,
        client,
    ):
        await call(client)
        now[0] = 0.4
        await call(client)
        assert server.connections == 1
        now[0] = 1.0  # idle 0.6 s: past half of the server's 1 s
        await call(client)
        assert server.connections == 2


async def test_replies_as_loose_as_aiohttp_accepted_still_parse() -> None:
    # Bare LF line ends and spaces after a chunk size: seen from real servers.
    reply = b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n2 \r\n{}\r\n0\r\n\r\n"
    async with scripted(reply) as (_, client):
        assert await call(client) == (200, "OK", b"{}")


async def test_credentials_in_the_upstream_url_go_as_basic_auth() -> None:
    async with scripted(OK, userinfo="svc:p%40ss@") as (server, client):
        await call(client)
    head = server.requests[0].decode()
    assert f"\r\nHost: 127.0.0.1:{client._port}\r\n" in head  # no userinfo in Host
    assert "\r\nAuthorization: Basic c3ZjOnBAc3M=\r\n" in head  # svc:p@ss
