"""Running the proxy as a server process: start-up checks, signals, graceful stop."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web
from redis.exceptions import MovedError, RedisClusterException

from .app import Components, build_components, create_app
from .config import Config
from .store import STORE_ERRORS

log = structlog.get_logger(__name__)


class ListenError(Exception):
    """The listening socket could not be bound: the operator's to fix (port, host)."""

    def __init__(self, host: str, port: int, cause: OSError) -> None:
        super().__init__(f"cannot listen on {host}:{port}: {cause}")
        self.host, self.port, self.cause = host, port, cause


def redacted(url: str) -> str:
    """A Redis URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    return f"{scheme}{sep}***@{host}" if at and creds else url


def _cluster_hint(exc: BaseException, *, cluster: bool) -> str:
    if isinstance(exc, MovedError) and not cluster:
        return " That node belongs to a Redis Cluster: set redis.cluster: true."
    if isinstance(exc, RedisClusterException):
        return f" redis.cluster is true: {exc}"  # e.g. cluster mode is not enabled there
    return ""


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
            # In every master's script cache before the first calls, which would otherwise
            # all meet NOSCRIPT together.
            await c.storage.load_scripts()
    except STORE_ERRORS as exc:
        log.error(
            "tenant_store_unreachable",
            url=redacted(c.config.redis.url),
            error=type(exc).__name__,
            message="Every MCP request gets 503 until Redis answers. Check REDIS_URL."
            + _cluster_hint(exc, cluster=c.config.redis.cluster),
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
    """Serve until SIGTERM/SIGINT, then shut down without cutting a call: readiness turns
    false first, in-flight requests and streams get `ops.shutdown_grace_s` to finish, the
    spool is flushed, and the drainer child makes a final attempt."""
    c = components or build_components(config)
    # Signals first: a SIGTERM during start-up must stop cleanly too.
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = create_app(c)
    runner = web.AppRunner(
        app,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=config.ops.shutdown_grace_s,
        # aiohttp's default (3630 s) lets a client that never finishes its headers, or never
        # sends a request, hold a socket for an hour.
        keepalive_timeout=config.proxy.header_timeout_s,
    )
    await runner.setup()
    site = web.TCPSite(runner, config.listen.host, config.listen.port)
    try:
        await site.start()
    except OSError as exc:
        raise ListenError(config.listen.host, config.listen.port, exc) from exc
    await startup_checks(c)
    port = runner.addresses[0][1] if runner.addresses else config.listen.port
    url = f"http://{config.listen.host}:{port}"
    log.info(
        "listening", url=url, upstream=config.upstream.url, mcp_paths=config.upstream.mcp_paths
    )
    drainer_stop = asyncio.Event()
    drainer: asyncio.Task[None] | None = None
    if config.billing.enabled and config.drain.embedded:
        from .usage.runner import supervise

        drainer = asyncio.create_task(
            supervise(config_path, drainer_stop), name="drainer-supervisor"
        )
    try:
        if on_ready is not None:
            await on_ready(url)
        await stop.wait()
        c.lifecycle.shutting_down = True
        log.info(
            "shutting_down",
            readiness_delay_s=config.ops.readiness_delay_s,
            grace_s=config.ops.shutdown_grace_s,
        )
        # Load balancers and Kubernetes endpoints need a moment to see /readyz fail.
        await asyncio.sleep(config.ops.readiness_delay_s)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        # Stops listening, lets in-flight calls finish (up to the grace), flushes the spool.
        await runner.cleanup()
        drainer_stop.set()
        if drainer is not None:
            await drainer  # the child's final attempt sends what the spool just received
        log.info("stopped")
