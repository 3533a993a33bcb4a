"""Hot-path tenant lookup by key hash, cached in process and invalidated over pub/sub.

The cache is trusted only while this replica is subscribed to the invalidation channel, so
a revoked key or a changed plan is seen by every replica as soon as Redis publishes it. When
the store is unreachable, the last known answer keeps known tenants working (degraded mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import cast

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from .auth import hash_key, keys_match
from .keys import KeySpace
from .store import STORE_ERRORS, StoreGuard, StoreUnavailable
from .tenants import Tenant

log = structlog.get_logger(__name__)

MAX_CACHED = 100_000
RESUBSCRIBE_DELAY_S = 0.5
STORE_CHECK_TIMEOUT_S = 2.0
STORE_CAME_BACK_EMPTY = (
    "Redis answers again but holds no tenants: it restarted without its data, so every "
    "request will get 401. Restore it from its AOF/RDB if there is one; else re-create each "
    "tenant (`mcp-quota-proxy tenant create ID --plan P --stripe-customer cus_...`) and issue "
    "new keys (`mcp-quota-proxy key issue ID`), and this period's quota starts again from "
    "zero. Run Redis with persistence (appendonly yes)."
)


class Directory:
    def __init__(
        self, redis: Redis, listener: Redis, keys: KeySpace, pepper: str, guard: StoreGuard
    ) -> None:
        self._r = redis
        self._listener_client = listener
        self._k = keys
        self._pepper = pepper
        self._guard = guard
        self._by_hash: dict[str, str] = {}  # key hash -> tenant id
        self._tenants: dict[str, Tenant] = {}
        self._stale_by_hash: dict[str, str] = {}
        self._stale_tenants: dict[str, Tenant] = {}
        self._generation = 0
        self._live = False
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._store_check: asyncio.Task[None] | None = None

    @property
    def live(self) -> bool:
        return self._live

    @property
    def knows_tenants(self) -> bool:
        """Whether some key can be authenticated without the store (the outage fallback)."""
        return bool(self._by_hash or self._stale_by_hash)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="directory-invalidations")
        # Start serving with a trusted cache if the store is up; never block startup on it.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await self._subscribed.wait()

    async def stop(self) -> None:
        for task in (self._task, self._store_check):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def authenticate(self, key: str) -> tuple[Tenant | None, bool]:
        """(tenant or None, degraded). Raises StoreUnavailable when nothing is known."""
        digest = hash_key(key, self._pepper)
        if self._live:
            cached = self._cached(digest)
            if cached is not None:
                return cached, False
        generation = self._generation
        try:
            tenant = await self._guard.run(lambda: self._load(digest))
        except StoreUnavailable:
            stale = self._cached(digest) or self._last_known(digest)
            if stale is not None:
                return stale, True
            raise
        self._stale_by_hash.pop(digest, None)
        if tenant is not None and generation == self._generation:
            if len(self._by_hash) >= MAX_CACHED:
                self._by_hash.clear()
                self._tenants.clear()
            self._by_hash[digest] = tenant.id
            self._tenants[tenant.id] = tenant
        return tenant, False

    async def refresh_tenant(self, tenant_id: str) -> Tenant | None:
        """Read one tenant afresh (the usage API wants the current period)."""
        raw = cast(
            dict[str, str],
            await self._guard.run(lambda: self._r.hgetall(self._k.tenant(tenant_id))),
        )
        return Tenant.from_redis(raw) if raw and "plan" in raw else None

    def _last_known(self, digest: str) -> Tenant | None:
        """What was cached before the channel was lost: good enough in an outage only."""
        tenant_id = self._stale_by_hash.get(digest)
        return None if tenant_id is None else self._stale_tenants.get(tenant_id)

    def _cached(self, digest: str) -> Tenant | None:
        tenant_id = self._by_hash.get(digest)
        return None if tenant_id is None else self._tenants.get(tenant_id)

    async def _load(self, digest: str) -> Tenant | None:
        entry = cast(str | None, await self._r.get(self._k.api_key(digest)))
        if entry is None:
            return None
        tenant_id, _, key_id = entry.partition(":")
        blob = cast(str | None, await self._r.hget(self._k.tenant_keys(tenant_id), key_id))
        # The per-tenant key record must agree, compared in constant time: a half-revoked key
        # (index entry left behind) never authenticates.
        if blob is None or not keys_match(_stored_hash(blob), digest):
            return None
        raw = cast(dict[str, str], await self._r.hgetall(self._k.tenant(tenant_id)))
        return Tenant.from_redis(raw) if raw and "plan" in raw else None

    def _invalidate(self, message: str) -> None:
        self._generation += 1
        kind, _, ident = message.partition(":")
        if kind == "tenant":
            self._tenants.pop(ident, None)
            self._stale_tenants.pop(ident, None)
        elif kind == "key":
            self._by_hash.pop(ident, None)
            self._stale_by_hash.pop(ident, None)
        else:
            self._by_hash.clear()
            self._tenants.clear()
            self._stale_by_hash.clear()
            self._stale_tenants.clear()

    async def _listen(self) -> None:
        channel = self._k.invalidations()
        subscribed_before = False
        while True:
            pubsub = self._listener_client.pubsub()
            try:
                await pubsub.subscribe(channel)
                async for message in pubsub.listen():
                    if message["type"] == "subscribe":
                        # Anything cached before this moment may have missed an invalidation:
                        # no longer trusted, kept only as the outage fallback.
                        self._generation += 1
                        if len(self._stale_by_hash) > MAX_CACHED:
                            self._stale_by_hash.clear()
                            self._stale_tenants.clear()
                        self._stale_by_hash.update(self._by_hash)
                        self._stale_tenants.update(self._tenants)
                        self._by_hash.clear()
                        self._tenants.clear()
                        self._live = True
                        self._subscribed.set()
                        if subscribed_before:  # start-up's own check covers the first one
                            self._check_store_soon()
                        subscribed_before = True
                    elif message["type"] == "message":
                        self._invalidate(str(message["data"]))
            except (RedisError, OSError) as exc:
                if self._live:
                    log.warning("invalidation_channel_lost", error=type(exc).__name__)
            finally:
                self._live = False
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(RESUBSCRIBE_DELAY_S)

    def _check_store_soon(self) -> None:
        """Check in the background, so invalidations keep flowing meanwhile."""
        if self._store_check is None or self._store_check.done():
            self._store_check = asyncio.get_running_loop().create_task(
                self._warn_if_empty(), name="directory-store-check"
            )

    async def _warn_if_empty(self) -> None:
        """The channel came back, so Redis may have restarted: without persistence it is empty
        now, and an operator must hear it from the running serve, not only at its next start.
        One SCARD per reconnect, never on a request."""
        for _ in range(2):  # the first may meet a pooled connection the restart closed
            try:
                async with asyncio.timeout(STORE_CHECK_TIMEOUT_S):
                    count = await self._r.scard(self._k.tenant_index())
            except STORE_ERRORS:  # includes a Redis Cluster's own errors
                continue
            if count == 0:
                log.warning("tenant_store_empty", message=STORE_CAME_BACK_EMPTY)
            return


def _stored_hash(blob: str) -> str:
    value = json.loads(blob).get("hash", "")
    return str(value)
