"""Connecting to the shared store and calling it with a hard deadline behind a breaker."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from .breaker import BreakerState, CircuitBreaker
from .config import RedisConfig
from .quota.pipelined import PipelinedRedis
from .quota.pipelined import supports as pipelined_supports

T = TypeVar("T")

MAX_CONNECTIONS = 256  # per node; a burst beyond it waits for a connection
# What a store call can fail with: RedisClusterException (no node reachable, slot not
# covered...) is not a RedisError.
STORE_ERRORS = (RedisError, RedisClusterException, OSError, TimeoutError)


class StoreUnavailable(Exception):
    """The quota/tenant store did not answer in time or is known to be down."""


@dataclass(frozen=True, slots=True)
class StoreClients:
    """`main` has short timeouts for the hot path; `listener` blocks on pub/sub."""

    main: Redis
    listener: Redis
    quota: PipelinedRedis | None = None  # the hot scripts' multiplexed connection

    async def close(self) -> None:
        await self.main.aclose()
        if self.listener is not self.main:
            await self.listener.aclose()
        if self.quota is not None:
            await self.quota.aclose()


def connect(cfg: RedisConfig) -> StoreClients:
    if cfg.embedded:
        import fakeredis  # the embedded store runs the same Lua scripts in-process

        client: Redis = fakeredis.FakeAsyncRedis(
            server=fakeredis.FakeServer(), decode_responses=True
        )
        return StoreClients(main=client, listener=client)
    timeout = cfg.timeout_ms / 1000
    # Pub/sub blocks, so the listener has no read timeout. On a cluster it is a plain client
    # of the seed node too: PUBLISH reaches every node of a cluster, so one subscription on
    # any node hears every invalidation.
    listener = Redis.from_url(
        cfg.url,
        decode_responses=True,
        socket_connect_timeout=timeout,
        health_check_interval=5,
        retry=Retry(NoBackoff(), 0),
    )
    if cfg.cluster:
        return StoreClients(main=_cluster(cfg.url, timeout), listener=listener)
    # A burst beyond the pool waits for a connection (within the guard's deadline) instead of
    # failing as "Too many connections" and opening the breaker.
    pool = BlockingConnectionPool.from_url(
        cfg.url,
        decode_responses=True,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        # The guard owns deadlines and the breaker: the client must not retry with backoff.
        retry=Retry(NoBackoff(), 0),
        max_connections=MAX_CONNECTIONS,
        timeout=timeout,
    )
    main = Redis.from_pool(pool)  # closing the client closes its pool
    quota = (
        PipelinedRedis(
            cfg.url, connect_timeout=timeout, stall_s=max(1.0, 4 * timeout), deadline_s=timeout
        )
        if pipelined_supports(cfg.url)
        else None
    )
    return StoreClients(main=main, listener=listener, quota=quota)


class QueuedRedisCluster(RedisCluster):
    """A cluster client whose callers queue for a connection, as BlockingConnectionPool's do:
    redis-py's cluster pool raises MaxConnectionsError instead of waiting. At most
    `max_connections` commands are in flight in all, so no node ever needs more."""

    def __init__(self, *, max_connections: int, **kwargs: Any) -> None:
        super().__init__(max_connections=max_connections, **kwargs)
        self._turns = asyncio.Semaphore(max_connections)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self._turns:
            return await super().execute_command(*args, **kwargs)


def _cluster(url: str, timeout: float) -> Redis:
    """The hot-path client of a Redis Cluster found from one seed node (the URL's). Every
    command the proxy sends names keys of one hash slot (see keys.py), so it keeps the
    `Redis` command surface: it is typed as one for the stores that use it."""
    client = QueuedRedisCluster.from_url(
        url,
        decode_responses=True,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        # As for one node: the guard owns deadlines and the breaker. Redirects (MOVED, ASK)
        # are still followed; a failed node makes the next command refresh the topology.
        retry=Retry(NoBackoff(), 0),
        max_connections=MAX_CONNECTIONS,
    )
    return cast(Redis, client)


class StoreGuard:
    """Runs one store operation with a deadline; a run of failures opens the breaker."""

    def __init__(
        self, breaker: CircuitBreaker, timeout: float, on_failure: Callable[[], None] | None = None
    ) -> None:
        self.breaker = breaker
        self._timeout = timeout
        self._on_failure = on_failure

    @property
    def state(self) -> BreakerState:
        return self.breaker.state

    async def run(self, op: Callable[[], Awaitable[T]], *, timed: bool = True) -> T:
        """`timed=False` when the op enforces the same deadline itself (the pipelined
        client does, without a timer per call)."""
        if not self.breaker.allow():
            raise StoreUnavailable("circuit open")
        try:
            if timed:
                async with asyncio.timeout(self._timeout):
                    result = await op()
            else:
                result = await op()
        except STORE_ERRORS as exc:
            self.breaker.failure()
            if self._on_failure is not None:
                self._on_failure()
            raise StoreUnavailable(type(exc).__name__) from exc
        self.breaker.success()
        return result
