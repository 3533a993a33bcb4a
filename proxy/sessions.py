"""Legacy-era MCP sessions: which tenant owns a session id, and calls whose result may still
arrive on a resumed GET stream of that session (SEP-1699)."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import cast

from redis.asyncio import Redis

from .jsonrpc import RpcId
from .keys import KeySpace
from .settle import PendingCall
from .store import StoreGuard, StoreUnavailable

MAX_LOCAL_SESSIONS = 50_000
SESSION_TTL_S = 7 * 86400


@dataclass(slots=True)
class Deferred:
    call: PendingCall
    deadline: float  # monotonic


class Sessions:
    def __init__(self, redis: Redis, keys: KeySpace, guard: StoreGuard) -> None:
        self._r = redis
        self._k = keys
        self._guard = guard
        self._owners: OrderedDict[str, str] = OrderedDict()
        self._deferred: dict[str, dict[RpcId, Deferred]] = {}

    async def owner(self, session_id: str) -> str | None:
        owner = self._owners.get(session_id)
        if owner is not None:
            return owner
        try:
            owner = cast(
                str | None,
                await self._guard.run(lambda: self._r.get(self._k.session(session_id))),
            )
        except StoreUnavailable:
            return None
        if owner is not None:
            self._remember(session_id, owner)
        return owner

    async def bind(self, session_id: str, tenant_id: str) -> None:
        self._remember(session_id, tenant_id)
        # On failure this replica still knows; the upstream lives in this pod.
        with contextlib.suppress(StoreUnavailable):
            await self._guard.run(
                lambda: self._r.set(self._k.session(session_id), tenant_id, ex=SESSION_TTL_S)
            )

    async def forget(self, session_id: str) -> list[PendingCall]:
        self._owners.pop(session_id, None)
        leftovers = self._deferred.pop(session_id, {})
        with contextlib.suppress(StoreUnavailable):
            await self._guard.run(lambda: self._r.delete(self._k.session(session_id)))
        return [d.call for d in leftovers.values()]

    def _remember(self, session_id: str, tenant_id: str) -> None:
        self._owners[session_id] = tenant_id
        self._owners.move_to_end(session_id)
        while len(self._owners) > MAX_LOCAL_SESSIONS:
            self._owners.popitem(last=False)

    def defer(self, session_id: str, calls: list[PendingCall], deadline: float) -> None:
        bucket = self._deferred.setdefault(session_id, {})
        for call in calls:
            bucket[call.rpc_id] = Deferred(call, deadline)

    def deferred(self, session_id: str) -> dict[RpcId, Deferred] | None:
        return self._deferred.get(session_id)

    def take(self, session_id: str, rpc_id: RpcId) -> PendingCall | None:
        bucket = self._deferred.get(session_id)
        if bucket is None:
            return None
        entry = bucket.pop(rpc_id, None)
        if not bucket:
            self._deferred.pop(session_id, None)
        return None if entry is None else entry.call

    def expire(self, now: float) -> list[PendingCall]:
        """Deferred calls whose result never came back in time (to be refunded)."""
        gone: list[PendingCall] = []
        for session_id in list(self._deferred):
            bucket = self._deferred[session_id]
            for rpc_id in [i for i, d in bucket.items() if d.deadline <= now]:
                gone.append(bucket.pop(rpc_id).call)
            if not bucket:
                del self._deferred[session_id]
        return gone
