"""Starting the proxy app against a given config, with tenants and keys made through the
same TenantStore the CLI uses."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.app import Components, build_components, create_app
from proxy.clock import Clock
from proxy.config import Config
from proxy.store import StoreClients
from proxy.usage.sink import MemorySink


@dataclass
class RunningProxy:
    url: str  # the MCP endpoint
    base: str
    components: Components
    sink: MemorySink

    async def tenant_with_key(
        self, tenant_id: str, plan: str = "free", stripe_customer: str | None = None
    ) -> str:
        tenants = self.components.tenants
        if await tenants.get(tenant_id) is None:
            await tenants.create(
                tenant_id, name=None, plan=plan, stripe_customer=stripe_customer, now=0
            )
        key, _ = await tenants.issue_key(tenant_id, label="test", now=0)
        return key


@asynccontextmanager
async def run_proxy(
    config: Config, *, clock: Clock | None = None, stores: StoreClients | None = None
) -> AsyncIterator[RunningProxy]:
    sink = MemorySink()
    components = build_components(config, clock=clock, sink=sink, stores=stores)
    app: web.Application = create_app(components)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()  # TestServer sets handler_cancellation=True, as serve does
    try:
        base = str(server.make_url("")).rstrip("/")
        yield RunningProxy(f"{base}/mcp", base, components, sink)
    finally:
        await server.close()
