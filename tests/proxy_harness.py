"""Starting the proxy app against a given config, with tenants and keys made through the
same TenantStore the CLI uses; and any aiohttp app (an upstream, the proxy) on a loopback
port for the length of a block."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import ClassVar

from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.app import Components, build_components, create_app
from proxy.clock import Clock
from proxy.config import Config
from proxy.store import StoreClients
from proxy.usage.sink import MemorySink


@asynccontextmanager
async def local_server(app: web.Application) -> AsyncIterator[str]:
    """`app` served on 127.0.0.1 (a free port); its base URL, without a trailing slash."""
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()  # TestServer sets handler_cancellation=True, as serve does
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@dataclass
class InProcessProxy:
    """The proxy app served in this process."""

    base: str
    components: Components
    key_label: ClassVar[str] = "test"

    @property
    def url(self) -> str:  # the MCP endpoint
        return f"{self.base}/mcp"

    async def tenant_with_key(
        self, tenant_id: str, plan: str = "free", stripe_customer: str | None = None
    ) -> str:
        tenants = self.components.tenants
        if await tenants.get(tenant_id) is None:
            await tenants.create(
                tenant_id, name=None, plan=plan, stripe_customer=stripe_customer, now=0
            )
        key, _ = await tenants.issue_key(tenant_id, label=self.key_label, now=0)
        return key


@dataclass
class RunningProxy(InProcessProxy):
    sink: MemorySink


@asynccontextmanager
async def run_proxy(
    config: Config, *, clock: Clock | None = None, stores: StoreClients | None = None
) -> AsyncIterator[RunningProxy]:
    sink = MemorySink()
    components = build_components(config, clock=clock, sink=sink, stores=stores)
    async with local_server(create_app(components)) as base:
        yield RunningProxy(base, components, sink)
