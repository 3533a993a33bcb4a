"""The hot path's pipelined Redis connection against a private redis-server: order under
concurrency, script cache loss, restarts and a frozen server."""

from __future__ import annotations

import asyncio
import signal

import pytest
import redis
import uvloop
from redis.exceptions import ConnectionError as RedisConnectionError

from proxy.clock import ManualClock
from proxy.quota.pipelined import PipelinedRedis, encode
from tests.ops_support import until
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis

ECHO = "return {KEYS[1], ARGV[1]}"


def test_encode_is_resp() -> None:
    assert (
        encode(["SET", "k", 5, b"\x00"])
        == b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n5\r\n$1\r\n\x00\r\n"
    )


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
