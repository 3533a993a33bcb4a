"""Quota state in Redis: two Lua scripts, shipped as package data and registered once.

The same code serves a real Redis (or Cluster: every key carries the tenant's hash tag) and
the embedded `memory://` store, where fakeredis runs the identical scripts in-process.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from ..keys import KeySpace
from .pipelined import PipelinedRedis

Arg = str | int


def _script(name: str) -> str:
    return files("proxy.quota").joinpath("lua", name).read_text(encoding="utf-8")


class Script:
    """One Lua script run by its SHA1. A node's script cache is empty after a restart or a
    failover: every call then in flight gets NOSCRIPT, and they all wait for one SCRIPT LOAD
    (on a cluster it goes to every master) instead of each sending its own."""

    def __init__(self, redis: Redis | RedisCluster, text: str) -> None:
        self._r = redis
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()
        self._loading: asyncio.Task[None] | None = None
        self._loads = 0  # SCRIPT LOADs finished: a NOSCRIPT older than the last one retries

    async def __call__(self, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        loads = self._loads
        try:
            return await self._r.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            if loads == self._loads:
                await self.load()
            return await self._r.evalsha(self.sha, len(keys), *keys, *args)

    async def load(self) -> None:
        """SCRIPT LOAD, shared with every caller that asks while one is under way. Shielded:
        a caller that gives up (its deadline) does not cancel it for the others."""
        if self._loading is None:
            self._loading = asyncio.get_running_loop().create_task(
                self._load(), name="redis-script-load"
            )
            self._loading.add_done_callback(self._loaded)
        await asyncio.shield(self._loading)

    async def _load(self) -> None:
        await self._r.script_load(self.text)

    def _loaded(self, task: asyncio.Task[None]) -> None:
        self._loading = None
        if not task.cancelled() and task.exception() is None:  # seen here if nobody waited
            self._loads += 1


@dataclass(frozen=True, slots=True)
class Reservation:
    tenant_id: str
    period_start: int
    reservation_id: str
    cost: int
    counter_ttl_ms: int  # relative, so Redis's clock never has to agree with ours


@dataclass(frozen=True, slots=True)
class ReserveResult:
    status: int  # 1 allowed, 0 over quota, 2 over rate
    used: int
    retry_after_ms: int


ALLOWED, OVER_QUOTA, OVER_RATE = 1, 0, 2


class QuotaStorage:
    """`pipelined`, when given, carries the two hot scripts (one multiplexed connection);
    the redis-py client does everything else and is the only client for the embedded store
    and for Redis Cluster."""

    def __init__(
        self,
        redis: Redis | RedisCluster,
        keys: KeySpace,
        pipelined: PipelinedRedis | None = None,
    ) -> None:
        self._r = redis
        self._k = keys
        self._fast = pipelined
        self._reserve = Script(redis, _script("reserve.lua"))
        self._settle = Script(redis, _script("settle.lua"))

    @property
    def reserve_has_deadline(self) -> bool:
        """Whether reserve() fails by itself after the store's timeout."""
        return self._fast is not None and self._fast.enforces_deadline

    async def load_scripts(self) -> None:
        """Put both scripts in the store's script cache (every master of a cluster), so the
        first calls after start-up do not all meet NOSCRIPT at once."""
        await asyncio.gather(self._reserve.load(), self._settle.load())

    async def reserve(
        self,
        res: Reservation,
        *,
        allowed_total: int | None,
        interval_us: int,
        tolerance_us: int,
        now_us: int,
        deadline_ms: int,
    ) -> ReserveResult:
        t = res.tenant_id
        keys = [
            self._k.used(t, res.period_start),
            self._k.rate(t),
            self._k.reservations(t),
            self._k.reaped(t),
        ]
        args: list[str | int] = [
            res.cost,
            -1 if allowed_total is None else allowed_total,
            interval_us,
            tolerance_us,
            now_us,
            now_us // 1000,
            res.counter_ttl_ms,
            res.reservation_id,
            deadline_ms,
            res.period_start,
        ]
        if self._fast is not None:
            status, used, retry = await self._fast.evalsha(self._reserve.text, keys, args)
        else:
            status, used, retry = await self._reserve(keys, args)
        return ReserveResult(int(status), int(used), int(retry))

    async def settle(self, res: Reservation, *, commit: bool) -> bool:
        """True when the reservation was still held (False: it had been reaped as overdue)."""
        held = await self._settle(*self._settle_call(res, "commit" if commit else "refund"))
        return bool(held)

    async def commit_many(self, reservations: list[Reservation]) -> None:
        """Commit several reservations at once: written together on the pipelined connection
        or in one redis-py pipeline; on a cluster (whose pipelines refuse EVALSHA) as
        concurrent scripts, each on its tenant's master (all its keys share one hash slot)."""
        calls = [self._settle_call(res, "commit") for res in reservations]
        if self._fast is not None:
            # After NOSCRIPT it sends the whole batch again, which the settle script's
            # idempotence makes safe (the same as for the pipeline below).
            await self._fast.evalsha_many(self._settle.text, calls)
            return
        if isinstance(self._r, RedisCluster):
            await asyncio.gather(*(self._settle(keys, args) for keys, args in calls))
            return
        try:
            await self._pipelined(self._r, calls)
        except NoScriptError:
            # The whole pipeline ran and the settle script is idempotent: load it and send
            # the batch again.
            await self._settle.load()
            await self._pipelined(self._r, calls)

    async def _pipelined(self, redis: Redis, calls: list[tuple[list[Arg], list[Arg]]]) -> None:
        async with redis.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                pipe.evalsha(self._settle.sha, len(keys), *keys, *args)
            await pipe.execute()

    def _settle_call(self, res: Reservation, action: str) -> tuple[list[Arg], list[Arg]]:
        t = res.tenant_id
        return (
            [self._k.used(t, res.period_start), self._k.reservations(t), self._k.reaped(t)],
            [res.reservation_id, res.cost, action, res.counter_ttl_ms, res.period_start],
        )

    async def used(self, tenant_id: str, period_start: int) -> int:
        value = await self._r.get(self._k.used(tenant_id, period_start))
        return int(value or 0)

    async def held(self, tenant_id: str) -> int:
        """Reservations currently held (not yet settled) for a tenant."""
        return int(await self._r.zcard(self._k.reservations(tenant_id)))
