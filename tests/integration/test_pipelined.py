"""The hot path's pipelined Redis connection against a private redis-server: order under
concurrency, script cache loss, restarts and a frozen server."""

from __future__ import annotations

import asyncio
import signal

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError

from proxy.clock import ManualClock
from proxy.quota.pipelined import PipelinedRedis, encode
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
        assert len(client._pending) == 1  # only "c": "b" went with the old connection
        private_redis.proc.send_signal(signal.SIGCONT)
        assert await client.evalsha(ECHO, ["d"], [4]) == ["d", "4"]
    finally:
        if private_redis.proc is not None:
            private_redis.proc.send_signal(signal.SIGCONT)
        await client.aclose()
