"""Tenant records and API keys in Redis (the admin side; the hot path reads via Directory)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from typing import Any, cast

from redis.asyncio import Redis

from .auth import hash_key, new_key
from .keys import KeySpace

TENANT_ID_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
STRIPE_CUSTOMER_RE = re.compile(r"cus_[A-Za-z0-9]{1,64}")


class TenantError(ValueError):
    """Bad admin input (unknown tenant, duplicate id, malformed value); message says the fix."""


@dataclass(frozen=True, slots=True)
class Tenant:
    id: str
    name: str
    plan: str
    status: str = "active"
    stripe_customer: str | None = None
    period_start: int | None = None  # epoch seconds, set from Stripe; calendar month otherwise
    period_end: int | None = None
    created_at: int = 0
    subscription_id: str | None = None
    trial_end: int | None = None
    past_due_since: int | None = None  # when the subscription went past_due (grace starts)

    def to_redis(self) -> dict[str, str]:
        return {k: "" if v is None else str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_redis(cls, raw: dict[str, str]) -> Tenant:
        def opt_int(key: str) -> int | None:
            value = raw.get(key, "")
            return int(value) if value else None

        return cls(
            id=raw["id"],
            name=raw.get("name", raw["id"]),
            plan=raw["plan"],
            status=raw.get("status", "active"),
            stripe_customer=raw.get("stripe_customer") or None,
            period_start=opt_int("period_start"),
            period_end=opt_int("period_end"),
            created_at=int(raw.get("created_at") or 0),
            subscription_id=raw.get("subscription_id") or None,
            trial_end=opt_int("trial_end"),
            past_due_since=opt_int("past_due_since"),
        )


@dataclass(frozen=True, slots=True)
class KeyInfo:
    key_id: str
    created_at: int
    label: str


def validate_tenant_id(tenant_id: str) -> str:
    if not TENANT_ID_RE.fullmatch(tenant_id):
        raise TenantError(
            f"invalid tenant id {tenant_id!r}: use 1-63 lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return tenant_id


class TenantStore:
    """CRUD for tenants and keys; every change publishes an invalidation to all replicas."""

    def __init__(self, redis: Redis, keys: KeySpace, pepper: str, key_prefix: str) -> None:
        self._r = redis
        self._k = keys
        self._pepper = pepper
        self._key_prefix = key_prefix

    async def create(
        self,
        tenant_id: str,
        *,
        name: str | None,
        plan: str,
        stripe_customer: str | None,
        now: int,
    ) -> Tenant:
        validate_tenant_id(tenant_id)
        if stripe_customer is not None and not STRIPE_CUSTOMER_RE.fullmatch(stripe_customer):
            raise TenantError(f"invalid Stripe customer id {stripe_customer!r}: expected cus_...")
        tenant = Tenant(
            id=tenant_id,
            name=name or tenant_id,
            plan=plan,
            stripe_customer=stripe_customer,
            created_at=now,
        )
        created = await self._r.hsetnx(self._k.tenant(tenant_id), "id", tenant_id)
        if not created:
            raise TenantError(f"tenant {tenant_id!r} already exists; see `tenant show {tenant_id}`")
        await self._r.hset(self._k.tenant(tenant_id), mapping=_mapping(tenant))
        await self._r.sadd(self._k.tenant_index(), tenant_id)
        if stripe_customer is not None:
            await self._r.set(self._k.customer(stripe_customer), tenant_id)
        await self._publish(f"tenant:{tenant_id}")
        return tenant

    async def get(self, tenant_id: str) -> Tenant | None:
        raw = cast(dict[str, str], await self._r.hgetall(self._k.tenant(tenant_id)))
        if not raw or "plan" not in raw:
            return None
        return Tenant.from_redis(raw)

    async def require(self, tenant_id: str) -> Tenant:
        tenant = await self.get(tenant_id)
        if tenant is None:
            raise TenantError(f"no tenant {tenant_id!r}; list them with `tenant list`")
        return tenant

    async def all(self) -> list[Tenant]:
        ids = sorted(str(i) for i in await self._r.smembers(self._k.tenant_index()))
        tenants = [await self.get(tid) for tid in ids]
        return [t for t in tenants if t is not None]

    async def update(self, tenant_id: str, **changes: Any) -> Tenant:
        tenant = replace(await self.require(tenant_id), **changes)
        await self._r.hset(self._k.tenant(tenant_id), mapping=_mapping(tenant))
        if tenant.stripe_customer is not None:
            await self._r.set(self._k.customer(tenant.stripe_customer), tenant_id)
        await self._publish(f"tenant:{tenant_id}")
        return tenant

    async def issue_key(self, tenant_id: str, *, label: str, now: int) -> tuple[str, KeyInfo]:
        await self.require(tenant_id)
        key, key_id = new_key(self._key_prefix)
        digest = hash_key(key, self._pepper)
        info = KeyInfo(key_id=key_id, created_at=now, label=label)
        await self._r.set(self._k.api_key(digest), f"{tenant_id}:{key_id}")
        await self._r.hset(
            self._k.tenant_keys(tenant_id),
            key_id,
            json.dumps({"hash": digest, "created_at": now, "label": label}),
        )
        return key, info

    async def list_keys(self, tenant_id: str) -> list[KeyInfo]:
        await self.require(tenant_id)
        raw = cast(dict[str, str], await self._r.hgetall(self._k.tenant_keys(tenant_id)))
        infos = []
        for key_id, blob in raw.items():
            meta = json.loads(blob)
            infos.append(KeyInfo(key_id=key_id, created_at=meta["created_at"], label=meta["label"]))
        return sorted(infos, key=lambda i: (i.created_at, i.key_id))

    async def revoke_key(self, tenant_id: str, key_id: str) -> None:
        blob = await self._r.hget(self._k.tenant_keys(tenant_id), key_id)
        if blob is None:
            raise TenantError(
                f"tenant {tenant_id!r} has no key {key_id!r}; see `key list {tenant_id}`"
            )
        digest = json.loads(blob)["hash"]
        await self._r.delete(self._k.api_key(digest))
        await self._r.hdel(self._k.tenant_keys(tenant_id), key_id)
        await self._publish(f"key:{digest}")

    async def by_customer(self, customer: str) -> str | None:
        value = await self._r.get(self._k.customer(customer))
        return None if value is None else str(value)

    async def close(self) -> None:
        await self._r.aclose()

    async def _publish(self, what: str) -> None:
        await self._r.publish(self._k.invalidations(), what)


def _mapping(tenant: Tenant) -> Any:
    # redis-py's stubs want a Mapping over its wide value union; ours is plain str -> str.
    return tenant.to_redis()
