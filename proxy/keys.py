"""Redis key names in one place. Every per-tenant key shares the `{tenant}` hash tag so the
quota script touches a single slot and runs unchanged on Redis Cluster."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KeySpace:
    prefix: str

    def tenant(self, tenant_id: str) -> str:
        return f"{self.prefix}:{{{tenant_id}}}:tenant"

    def tenant_keys(self, tenant_id: str) -> str:
        return f"{self.prefix}:{{{tenant_id}}}:keys"

    def used(self, tenant_id: str, period_start: int) -> str:
        return f"{self.prefix}:{{{tenant_id}}}:used:{period_start}"

    def rate(self, tenant_id: str) -> str:
        return f"{self.prefix}:{{{tenant_id}}}:rate"

    def reservations(self, tenant_id: str) -> str:
        return f"{self.prefix}:{{{tenant_id}}}:resv"

    def reaped(self, tenant_id: str) -> str:
        return f"{self.prefix}:{{{tenant_id}}}:reaped"

    def tenant_index(self) -> str:
        return f"{self.prefix}:tenants"

    def api_key(self, key_hash: str) -> str:
        return f"{self.prefix}:key:{key_hash}"

    def customer(self, stripe_customer: str) -> str:
        return f"{self.prefix}:cust:{stripe_customer}"

    def webhook_event(self, tenant_id: str, event_id: str) -> str:
        return f"{self.prefix}:{{{tenant_id}}}:whevt:{event_id}"

    def webhook_last(self) -> str:
        return f"{self.prefix}:webhook:last"

    def session(self, session_id: str) -> str:
        return f"{self.prefix}:sess:{session_id}"

    def invalidations(self) -> str:
        return f"{self.prefix}:invalidate"
