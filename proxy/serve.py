"""Running the proxy as a server process: start-up checks, signals, graceful stop."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web
from redis.exceptions import RedisError

from .app import Components, build_components, create_app
from .config import Config

log = structlog.get_logger(__name__)


def redacted(url: str) -> str:
    """A Redis URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    return f"{scheme}{sep}***@{host}" if at and creds else url


async def startup_checks(c: Components) -> None:
    """Say clearly, once, what an operator must fix about the tenant store."""
    if c.config.redis.embedded:
        log.warning(
            "embedded_store",
            message="redis.url is memory://: quotas, tenants and keys live in this process only, "
            "are not shared across replicas and are lost at exit. Set REDIS_URL for production.",
        )
        return
    try:
        async with asyncio.timeout(2.0):
            count = await c.stores.main.scard(c.keys.tenant_index())
    except (RedisError, OSError, TimeoutError) as exc:
        log.error(
            "tenant_store_unreachable",
            url=redacted(c.config.redis.url),
            error=type(exc).__name__,
            message="Every MCP request gets 503 until Redis answers. Check REDIS_URL.",
        )
        return
    if count == 0:
        log.warning(
            "tenant_store_empty",
            message="No tenants yet: every request will get 401. Create one with "
            "`mcp-quota-proxy tenant create ID` and `mcp-quota-proxy key issue ID`. "
            "Redis holds tenants and keys: run it with persistence (appendonly yes).",
        )


async def run_server(
    config: Config,
    *,
    config_path: str | None = None,
    components: Components | None = None,
    on_ready: Callable[[str], Awaitable[None]] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    c = components or build_components(config)
    app = create_app(c)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, config.listen.host, config.listen.port)
    await site.start()
    await startup_checks(c)
    port = runner.addresses[0][1] if runner.addresses else config.listen.port
    url = f"http://{config.listen.host}:{port}"
    log.info(
        "listening", url=url, upstream=config.upstream.url, mcp_paths=config.upstream.mcp_paths
    )
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    drainer: asyncio.Task[None] | None = None
    if config.billing.enabled and config.drain.embedded:
        from .usage.runner import supervise

        drainer = asyncio.create_task(supervise(config_path, stop), name="drainer-supervisor")
    try:
        if on_ready is not None:
            await on_ready(url)
        await stop.wait()
        if drainer is not None:
            await drainer  # the child makes its final attempt within its grace period
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        log.info("stopping")
        await runner.cleanup()
