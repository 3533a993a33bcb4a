"""Fixtures for the quota contract: one engine per test, on real Redis or the embedded store.

Both backends run the identical Lua scripts. The `ManualClock` starts at the current whole
wall-clock second rather than `ManualClock`'s fixed 2026-01-01 default: Redis expires keys by
its own clock, so an engine clock far from it could make the server drop (or keep) keys in
ways production never sees, whether the scripts set expiries absolute or relative.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import pytest
from redis.asyncio import Redis

from proxy.breaker import CircuitBreaker
from proxy.clock import Clock, ManualClock
from proxy.config import Plan, RatePolicy, RedisConfig
from proxy.keys import KeySpace
from proxy.quota.engine import QuotaEngine
from proxy.quota.pipelined import PipelinedRedis
from proxy.quota.storage import QuotaStorage
from proxy.store import StoreGuard, connect

BREAKER_FAILURES = 3
BREAKER_COOLDOWN_S = 5.0
GUARD_TIMEOUT_S = 1.0


def make_plan(
    *,
    included: int | None = 5,
    overage: str = "block",
    hard_cap: int | None = None,
    rate: tuple[float, int] | None = None,
    weights: Mapping[str, int] | None = None,
    name: str = "test",
) -> Plan:
    return Plan(
        name=name,
        included_units=included,
        overage=overage,  # type: ignore[arg-type]
        hard_cap=hard_cap,
        rate=None if rate is None else RatePolicy(per_second=rate[0], burst=rate[1]),
        tool_weights=dict(weights or {}),
        hidden_tools=frozenset(),
        billed=False,
    )


def build_engine(
    client: Redis,
    prefix: str,
    clock: Clock,
    *,
    fail_open: bool = True,
    reservation_ttl_s: int = 3600,
    pipelined: PipelinedRedis | None = None,
) -> tuple[QuotaEngine, QuotaStorage, StoreGuard]:
    storage = QuotaStorage(client, KeySpace(prefix), pipelined)
    guard = StoreGuard(
        CircuitBreaker(BREAKER_FAILURES, BREAKER_COOLDOWN_S, clock.monotonic),
        timeout=GUARD_TIMEOUT_S,
    )
    engine = QuotaEngine(
        storage, guard, clock, fail_open=fail_open, reservation_ttl_s=reservation_ttl_s
    )
    return engine, storage, guard


@dataclass
class Rig:
    """One backend with a quota engine on it; `engine_with` builds more over the same store."""

    backend: str
    client: Redis
    prefix: str
    clock: ManualClock
    keys: KeySpace
    engine: QuotaEngine
    storage: QuotaStorage
    guard: StoreGuard
    pipelined: PipelinedRedis | None = None
    _extra: list[QuotaEngine] = field(default_factory=list)

    def engine_with(
        self, *, reservation_ttl_s: int = 3600, clock: Clock | None = None
    ) -> tuple[QuotaEngine, QuotaStorage]:
        engine, storage, _ = build_engine(
            self.client,
            self.prefix,
            clock or self.clock,
            reservation_ttl_s=reservation_ttl_s,
            pipelined=self.pipelined,
        )
        return engine, storage

    async def all_keys(self) -> list[str]:
        return sorted([k async for k in self.client.scan_iter(match=f"{self.prefix}:*")])

    async def snapshot(self) -> dict[str, object]:
        """Every key under the prefix with its full content (strings and sorted sets)."""
        out: dict[str, object] = {}
        for key in await self.all_keys():
            kind = await self.client.type(key)
            if kind == "string":
                out[key] = await self.client.get(key)
            elif kind == "zset":
                out[key] = await self.client.zrange(key, 0, -1, withscores=True)
            else:  # pragma: no cover - the quota scripts write nothing else
                out[key] = kind
        return out


def aligned_clock() -> ManualClock:
    """A manual clock starting at the current whole second (exact float arithmetic in steps
    of 0.5 s and 0.001 s), with the monotonic reading the breaker uses."""
    return ManualClock(now=float(int(time.time())), mono=1000.0)


@pytest.fixture
def clock() -> ManualClock:
    return aligned_clock()


@pytest.fixture(
    params=[
        pytest.param("redis", marks=pytest.mark.redis),
        # The same real Redis, the hot scripts on the proxy's own pipelined connection.
        pytest.param("redis-pipelined", marks=pytest.mark.redis),
        pytest.param("memory"),
    ]
)
async def rig(request: pytest.FixtureRequest, clock: ManualClock) -> AsyncIterator[Rig]:
    close: Callable[[], Awaitable[None]]
    pipelined: PipelinedRedis | None = None
    if request.param.startswith("redis"):
        redis_url: str = request.getfixturevalue("redis_url")
        prefix: str = request.getfixturevalue("key_prefix")  # its keys are deleted afterwards
        client = Redis.from_url(redis_url, decode_responses=True)
        if request.param == "redis-pipelined":
            pipelined = PipelinedRedis(redis_url, connect_timeout=1.0, stall_s=5.0)
            fast = pipelined

            async def close() -> None:
                await fast.aclose()
                await client.aclose()
        else:
            close = client.aclose
    else:
        prefix = f"mqpt{uuid.uuid4().hex[:12]}"
        stores = connect(RedisConfig(url="memory://"))
        client = stores.main
        close = stores.close
    engine, storage, guard = build_engine(client, prefix, clock, pipelined=pipelined)
    try:
        yield Rig(
            pipelined=pipelined,
            backend=request.param,
            client=client,
            prefix=prefix,
            clock=clock,
            keys=KeySpace(prefix),
            engine=engine,
            storage=storage,
            guard=guard,
        )
    finally:
        await close()
