"""The hot path's pipelined Redis connection against a private redis-server: its encoding,
order under concurrency and in batches, script cache loss, restarts and a frozen server."""

from __future__ import annotations

import asyncio
import gc
import signal
import time
from collections.abc import Sequence
from typing import Any

import pytest
import redis
import uvloop
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from proxy.clock import ManualClock
from proxy.keys import KeySpace
from proxy.quota import pipelined
from proxy.quota.pipelined import PipelinedRedis, encode
from proxy.quota.storage import QuotaStorage, Reservation
from tests.ops_support import until
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis

ECHO = "return {KEYS[1], ARGV[1]}"
# An error reply for ARGV[1] == "boom", else an echo.
BOOM = "if ARGV[1] == 'boom' then return redis.error_reply('boom ' .. KEYS[1]) end " + ECHO


def resp(args: Sequence[str | int | bytes]) -> bytes:
    """RESP spelled out: what encode() must produce, cache or not."""
    out = b"*" + str(len(args)).encode() + b"\r\n"
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode("utf-8")
        out += b"$" + str(len(data)).encode() + b"\r\n" + data + b"\r\n"
    return out


def test_encode_is_resp() -> None:
    assert (
        encode(["SET", "k", 5, b"\x00"])
        == b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n5\r\n$1\r\n\x00\r\n"
    )


ENCODE_CASES: list[list[str | int | bytes]] = [
    [],
    [0, 1, -1, 4, 1_767_225_600_123_456, -(2**70), 10**40],
    ["", "k", "EVALSHA", "mqp:{tenant-é}:used:1767225600", "日本語", "🎉", "a\r\nb", "\x00"],
    [b"", b"\x00\xff", b"\r\n", "s", 7],
    [True, False, 1, "True"],  # bool is written as str() spells it, not as an int
    ["EVALSHA", "a" * 40, 4, "k1", "k2", "k3", "k4", 1, -1, 0, 0, 10**15, 10**12, 5, "r", 9, 8],
]


@pytest.mark.parametrize("args", ENCODE_CASES)
def test_encode_matches_a_reference_encoding(args: list[str | int | bytes]) -> None:
    assert encode(args) == resp(args)
    assert encode(args) == resp(args)  # again, its str arguments from the cache now


@given(st.lists(st.one_of(st.integers(), st.text(), st.binary(), st.booleans())))
def test_encode_matches_a_reference_encoding_for_any_arguments(
    args: list[str | int | bytes],
) -> None:
    assert encode(args) == resp(args)
    assert encode(args) == resp(args)


def test_the_encoding_cache_is_bounded() -> None:
    for i in range(3 * pipelined._ENCODED_MAX):
        key = f"q:{{tenant-{i}}}:used:1767225600"
        assert encode([key]) == resp([key])
        assert len(pipelined._encoded) <= pipelined._ENCODED_MAX


async def test_replies_match_their_commands_under_concurrency(private_redis: RedisServer) -> None:
    client = PipelinedRedis(private_redis.url, connect_timeout=1.0, stall_s=5.0)
    try:
        replies = await asyncio.gather(*(client.evalsha(ECHO, [f"k{i}"], [i]) for i in range(500)))
        assert replies == [[f"k{i}", str(i)] for i in range(500)]
    finally:
        await client.aclose()


def test_on_uvloop_as_serve_runs_it(private_redis: RedisServer) -> None:
    """uvloop's transports are not asyncio's classes: the protocol must not depend on them."""

    async def burst() -> list[object]:
        client = PipelinedRedis(private_redis.url, connect_timeout=1.0, stall_s=5.0)
        try:
            async with asyncio.timeout(10):
                return list(
                    await asyncio.gather(
                        *(client.evalsha(ECHO, [f"k{i}"], [i]) for i in range(300))
                    )
                )
        finally:
            await client.aclose()

    assert uvloop.run(burst()) == [[f"k{i}", str(i)] for i in range(300)]


async def test_evalsha_many_returns_the_replies_in_order_from_one_write(
    private_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = PipelinedRedis(private_redis.url, connect_timeout=1.0, stall_s=5.0)
    try:
        assert await client.evalsha(ECHO, ["a"], [0]) == ["a", "0"]
        conn = client._conn
        assert conn is not None and conn.transport is not None
        writes: list[bytes] = []
        write = conn.transport.write

        def counted(data: Any) -> None:
            writes.append(bytes(data))
            write(data)

        monkeypatch.setattr(conn.transport, "write", counted)
        calls = [([f"k{i}"], [i]) for i in range(100)]
        assert await client.evalsha_many(ECHO, calls) == [[f"k{i}", str(i)] for i in range(100)]
        assert len(writes) == 1
        assert await client.evalsha_many(ECHO, []) == []
    finally:
        await client.aclose()


async def test_evalsha_many_after_a_script_flush_loads_once_and_commits_once(
    private_redis: RedisServer,
) -> None:
    """The settle script is idempotent, so the batch is sent again whole after NOSCRIPT;
    a reaped reservation in it is charged again exactly once."""
    client = PipelinedRedis(private_redis.url, connect_timeout=1.0, stall_s=5.0)
    main = AsyncRedis(port=private_redis.port, decode_responses=True)
    admin = redis.Redis(port=private_redis.port, decode_responses=True)
    storage = QuotaStorage(main, KeySpace("mqpt"), client)
    now_us = int(time.time()) * 1_000_000
    period = now_us // 1_000_000

    def res(name: str, cost: int) -> Reservation:
        return Reservation("t1", period, name, cost, counter_ttl_ms=3_600_000)

    async def reserve(r: Reservation, at_us: int, deadline_ms: int) -> None:
        result = await storage.reserve(
            r,
            allowed_total=None,
            interval_us=0,
            tolerance_us=0,
            now_us=at_us,
            deadline_ms=deadline_ms,
        )
        assert result.status == 1

    try:
        reaped, held = res("r-reaped", 3), [res(f"r-{i}", i + 1) for i in range(4)]
        await reserve(reaped, now_us, now_us // 1000 + 1)
        later = now_us + 10_000  # past the first one's deadline: it is reaped (refunded)
        for r in held:
            await reserve(r, later, later // 1000 + 60_000)
        assert await storage.used("t1", period) == 1 + 2 + 3 + 4
        admin.script_flush()
        admin.config_resetstat()
        await storage.commit_many([*held, reaped])
        assert admin.info("commandstats")["cmdstat_script|load"]["calls"] == 1
        assert await storage.used("t1", period) == 1 + 2 + 3 + 4 + 3
        assert await storage.held("t1") == 0
        await storage.commit_many([*held, reaped])  # once more: nothing changes
        assert await storage.used("t1", period) == 1 + 2 + 3 + 4 + 3
    finally:
        admin.close()
        await main.aclose()
        await client.aclose()


async def test_an_error_in_a_batch_is_raised_and_the_connection_stays_usable(
    private_redis: RedisServer,
) -> None:
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: unhandled.append(context))
    client = PipelinedRedis(private_redis.url, connect_timeout=1.0, stall_s=5.0)
    try:
        assert await client.evalsha(BOOM, ["a"], [0]) == ["a", "0"]
        conn = client._conn
        calls: list[tuple[list[str], list[str | int]]] = [
            (["k0"], [0]),
            (["k1"], ["boom"]),
            (["k2"], [2]),
            (["k3"], ["boom"]),
            (["k4"], ["boom"]),
            (["k5"], [5]),
        ]
        with pytest.raises(ResponseError, match="boom k1"):  # the first error
            await client.evalsha_many(BOOM, calls)
        # The replies after it are read and dropped: the next caller gets its own.
        assert await client.evalsha(BOOM, ["b"], [1]) == ["b", "1"]
        assert await client.evalsha_many(BOOM, [(["c"], [1]), (["d"], [2])]) == [
            ["c", "1"],
            ["d", "2"],
        ]
        assert client._conn is conn and conn is not None and not conn.pending
        gc.collect()
        # No "Future exception was never retrieved" for the errors nobody awaited.
        assert unhandled == []
    finally:
        loop.set_exception_handler(None)
        await client.aclose()


async def test_a_batch_fails_at_its_deadline_and_a_stalled_connection_is_replaced(
    private_redis: RedisServer,
) -> None:
    """Every command of a batch has the deadline and stall check a single one has."""
    clock = ManualClock()
    client = PipelinedRedis(
        private_redis.url, connect_timeout=1.0, stall_s=0.3, deadline_s=0.05, now=clock.monotonic
    )
    assert private_redis.proc is not None
    calls = [([f"k{i}"], [i]) for i in range(5)]
    try:
        assert await client.evalsha_many(ECHO, calls) == [[f"k{i}", str(i)] for i in range(5)]
        first = client._conn
        assert first is not None
        private_redis.proc.send_signal(signal.SIGSTOP)
        batch = asyncio.ensure_future(client.evalsha_many(ECHO, calls))
        await asyncio.sleep(0)
        clock.advance(0.06)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(batch, 5)
        await until(lambda: all(f.done() for f, _ in first.pending), 5, "every command to time out")
        assert len(first.pending) == 5
        clock.advance(0.3)  # past the stall bound: the next batch replaces the connection
        batch = asyncio.ensure_future(client.evalsha_many(ECHO, calls))
        await until(
            lambda: client._conn not in (None, first) and len(client._conn.pending) == 5,
            5,
            "the batch to go out on a new connection",
        )
        assert first.closed and not first.pending  # dropped, its waiters with it
        clock.advance(0.06)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(batch, 5)
        private_redis.proc.send_signal(signal.SIGCONT)
        assert await client.evalsha_many(ECHO, calls[:2]) == [["k0", "0"], ["k1", "1"]]
        assert client._conn is not None and not client._conn.pending
    finally:
        if private_redis.proc is not None:
            private_redis.proc.send_signal(signal.SIGCONT)
        await client.aclose()


async def test_lost_script_cache_and_restart_are_recovered(private_redis: RedisServer) -> None:
    client = PipelinedRedis(private_redis.url, connect_timeout=1.0, stall_s=5.0)
    try:
        assert await client.evalsha(ECHO, ["a"], [1]) == ["a", "1"]
        admin = redis.Redis(port=private_redis.port)
        admin.script_flush()
        admin.close()
        assert await client.evalsha(ECHO, ["b"], [2]) == ["b", "2"]  # NOSCRIPT -> LOAD -> retry
        private_redis.stop()
        with pytest.raises(RedisConnectionError):
            await client.evalsha(ECHO, ["c"], [3])
        private_redis.start()  # same port, empty script cache
        assert await client.evalsha(ECHO, ["d"], [4]) == ["d", "4"]
    finally:
        await client.aclose()


async def test_a_frozen_server_resets_the_connection(private_redis: RedisServer) -> None:
    clock = ManualClock()
    client = PipelinedRedis(
        private_redis.url, connect_timeout=0.5, stall_s=0.3, now=clock.monotonic
    )
    assert private_redis.proc is not None
    try:
        assert await client.evalsha(ECHO, ["a"], [1]) == ["a", "1"]
        private_redis.proc.send_signal(signal.SIGSTOP)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):  # what the store guard does
                await client.evalsha(ECHO, ["b"], [2])
        clock.advance(0.31)  # past the stall bound
        # The next call notices the stall: the wedged connection and its waiter are dropped
        # and a fresh connection is opened (which the frozen server does not answer either).
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await client.evalsha(ECHO, ["c"], [3])
        # Only "c" is owed a reply: "b" went with the old connection.
        assert client._conn is not None and len(client._conn.pending) == 1
        private_redis.proc.send_signal(signal.SIGCONT)
        assert await client.evalsha(ECHO, ["d"], [4]) == ["d", "4"]
    finally:
        if private_redis.proc is not None:
            private_redis.proc.send_signal(signal.SIGCONT)
        await client.aclose()


async def test_each_command_fails_at_its_own_deadline_and_late_replies_are_dropped(
    private_redis: RedisServer,
) -> None:
    """The store guard sets no timer per call on this client: its watchdog fails each
    waiter once it has waited deadline_s (by the injected clock), a later one not earlier."""
    clock = ManualClock()
    client = PipelinedRedis(
        private_redis.url, connect_timeout=1.0, stall_s=60.0, deadline_s=0.05, now=clock.monotonic
    )
    assert private_redis.proc is not None
    try:
        assert await client.evalsha(ECHO, ["a"], [1]) == ["a", "1"]
        private_redis.proc.send_signal(signal.SIGSTOP)
        early = [asyncio.ensure_future(client.evalsha(ECHO, [f"e{i}"], [i])) for i in range(20)]
        await asyncio.sleep(0)  # sent at clock 0
        clock.advance(0.04)
        late = asyncio.ensure_future(client.evalsha(ECHO, ["late"], [0]))  # due at 0.09
        await asyncio.sleep(0)
        clock.advance(0.02)  # 0.06: past the early ones' deadline only
        await until(lambda: all(f.done() for f in early), 5, "the early commands to time out")
        for f in early:
            with pytest.raises(TimeoutError):
                f.result()
        assert not late.done()
        clock.advance(0.04)  # 0.10: past the late one's too
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(late, 5)
        private_redis.proc.send_signal(signal.SIGCONT)
        # The 21 late replies are read and dropped, in order: the next caller gets its own.
        assert await client.evalsha(ECHO, ["b"], [2]) == ["b", "2"]
        assert client._conn is not None and not client._conn.pending
    finally:
        if private_redis.proc is not None:
            private_redis.proc.send_signal(signal.SIGCONT)
        await client.aclose()


async def test_callers_that_all_meet_noscript_share_one_load(private_redis: RedisServer) -> None:
    client = PipelinedRedis(private_redis.url, connect_timeout=1.0, stall_s=5.0)
    admin = redis.Redis(port=private_redis.port, decode_responses=True)
    try:
        assert await client.evalsha(ECHO, ["a"], [0]) == ["a", "0"]
        admin.script_flush()
        admin.config_resetstat()
        replies = await asyncio.gather(*(client.evalsha(ECHO, [f"k{i}"], [i]) for i in range(50)))
        assert replies == [[f"k{i}", str(i)] for i in range(50)]
        stats = admin.info("commandstats")
        assert stats["cmdstat_script|load"]["calls"] == 1, stats
    finally:
        admin.close()
        await client.aclose()


async def test_a_reply_nobody_asked_for_drops_the_connection() -> None:
    """A peer that is not speaking our conversation: the connection is dropped, not trusted
    to pair later replies with the wrong callers; the next call opens a new one."""
    connections = 0
    talkers: list[asyncio.Task[None]] = []

    async def talker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        talkers.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            while await reader.read(1024):
                writer.write(b"+OK\r\n+SURPRISE\r\n" if connections == 1 else b"+OK\r\n")
        finally:
            writer.close()
            await writer.wait_closed()

    server = await asyncio.start_server(talker, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = PipelinedRedis(f"redis://127.0.0.1:{port}", connect_timeout=1.0, stall_s=5.0)
    try:
        async with asyncio.timeout(5):
            assert await client.execute("PING") == "OK"
            # The surprise may arrive in a later segment.
            await until(lambda: client._conn is None, 5, "the connection to be dropped")
            assert await client.execute("PING") == "OK"
        assert connections == 2
    finally:
        await client.aclose()
        # Each handler ends on the client's EOF; wait so no socket outlives the loop.
        async with asyncio.timeout(5):
            await asyncio.gather(*talkers, return_exceptions=True)
        server.close()
        await server.wait_closed()
