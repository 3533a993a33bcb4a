"""Quota state in Redis: two Lua scripts, shipped as package data and registered once.

The same code serves a real Redis (or Cluster: every key carries the tenant's hash tag) and
the embedded `memory://` store, where fakeredis runs the identical scripts in-process.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from importlib.resources import files

from redis.asyncio import Redis

from ..keys import KeySpace
from .pipelined import PipelinedRedis


def _script(name: str) -> str:
    return files("proxy.quota").joinpath("lua", name).read_text(encoding="utf-8")


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
        self, redis: Redis, keys: KeySpace, pipelined: PipelinedRedis | None = None
    ) -> None:
        self._r = redis
        self._k = keys
        self._fast = pipelined
        self._reserve_text = _script("reserve.lua")
        self._settle_text = _script("settle.lua")
        self._reserve = redis.register_script(self._reserve_text)
        self._settle = redis.register_script(self._settle_text)

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
            status, used, retry = await self._fast.evalsha(self._reserve_text, keys, args)
        else:
            status, used, retry = await self._reserve(keys=keys, args=args)
        return ReserveResult(int(status), int(used), int(retry))

    async def settle(self, res: Reservation, *, commit: bool) -> bool:
        """True when the reservation was still held (False: it had been reaped as overdue)."""
        t = res.tenant_id
        held = await self._settle(
            keys=[self._k.used(t, res.period_start), self._k.reservations(t), self._k.reaped(t)],
            args=[
                res.reservation_id,
                res.cost,
                "commit" if commit else "refund",
                res.counter_ttl_ms,
                res.period_start,
            ],
        )
        return bool(held)

    async def commit_many(self, reservations: list[Reservation]) -> None:
        """Commit several reservations in one round trip (a pipeline of settle scripts)."""
        if self._fast is not None:
            fast = self._fast
            await asyncio.gather(
                *(fast.evalsha(self._settle_text, *self._commit_call(res)) for res in reservations)
            )
            return
        async with self._r.pipeline(transaction=False) as pipe:
            for res in reservations:
                t = res.tenant_id
                await self._settle(
                    keys=[
                        self._k.used(t, res.period_start),
                        self._k.reservations(t),
                        self._k.reaped(t),
                    ],
                    args=[
                        res.reservation_id,
                        res.cost,
                        "commit",
                        res.counter_ttl_ms,
                        res.period_start,
                    ],
                    client=pipe,
                )
            await pipe.execute()

    def _commit_call(self, res: Reservation) -> tuple[list[str | int], list[str | int]]:
        t = res.tenant_id
        return (
            [self._k.used(t, res.period_start), self._k.reservations(t), self._k.reaped(t)],
            [res.reservation_id, res.cost, "commit", res.counter_ttl_ms, res.period_start],
        )

    async def used(self, tenant_id: str, period_start: int) -> int:
        value = await self._r.get(self._k.used(tenant_id, period_start))
        return int(value or 0)

    async def held(self, tenant_id: str) -> int:
        """Reservations currently held (not yet settled) for a tenant."""
        return int(await self._r.zcard(self._k.reservations(tenant_id)))
