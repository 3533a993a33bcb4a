"""Helpers for the operability acceptance tests: scraping /metrics and checking it with
promtool, serving the app on a real spool, a drainer on the same spool file, `serve` as a
real process group, and bounded polling."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import Components, build_components, create_app
from proxy.clock import Clock
from proxy.config import Config, RedisConfig
from proxy.keys import KeySpace
from proxy.store import connect
from proxy.tenants import TenantStore
from proxy.usage.drainer import Drainer
from proxy.usage.meter import StripeMeterClient
from proxy.usage.spool import Spool
from tests.conftest import PEPPER
from tests.redis_server import free_port

PROMTOOL_INSTALL = "apt-get update && apt-get install -y prometheus"


# --- Prometheus ----------------------------------------------------------------------------


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(f"promtool is not installed; install it with: {PROMTOOL_INSTALL}")
    return path


async def assert_promtool_accepts(text: str) -> None:
    """`promtool check metrics` reads the exposition on stdin; exit 0 means no parse error and
    no lint problem."""
    proc = await asyncio.create_subprocess_exec(
        promtool(),
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(text.encode()), 30)
    assert proc.returncode == 0, (
        f"promtool check metrics exited {proc.returncode}:\n{out.decode()}{err.decode()}"
    )


async def scrape(http: aiohttp.ClientSession, base: str) -> str:
    """A real HTTP scrape of /metrics."""
    async with http.get(f"{base}/metrics") as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/plain"), r.headers["Content-Type"]
        return await r.text()


def scraped(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in an exposition text, or None when it is absent."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return None


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A sample from the app's own registry (0 when the labelled child does not exist yet)."""
    return registry.get_sample_value(name, labels) or 0.0


def label_values(registry: CollectorRegistry) -> set[str]:
    return {v for family in registry.collect() for s in family.samples for v in s.labels.values()}


def family_names(registry: CollectorRegistry) -> set[str]:
    return {family.name for family in registry.collect()}


# --- polling -------------------------------------------------------------------------------


async def until(
    predicate: Callable[[], bool | Awaitable[bool]],
    limit: float,
    what: str,
    interval: float = 0.05,
) -> None:
    deadline = time.monotonic() + limit
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"timed out after {limit} s waiting for {what}"
        await asyncio.sleep(interval)


async def poll(predicate: Callable[[], bool], limit: float, interval: float = 0.02) -> bool:
    """Like `until`, but says whether it happened instead of failing."""
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)
    return True


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with http.get(url) as r:
        return r.status, await r.json()


# --- the app in-process, on a real spool ---------------------------------------------------


@dataclass
class AppServer:
    base: str
    components: Components

    @property
    def url(self) -> str:
        return f"{self.base}/mcp"

    async def tenant_with_key(
        self, tenant_id: str, plan: str = "free", stripe_customer: str | None = None
    ) -> str:
        tenants = self.components.tenants
        if await tenants.get(tenant_id) is None:
            await tenants.create(
                tenant_id, name=None, plan=plan, stripe_customer=stripe_customer, now=0
            )
        key, _ = await tenants.issue_key(tenant_id, label="ops", now=0)
        return key


@asynccontextmanager
async def serve_app(config: Config, *, clock: Clock | None = None) -> AsyncIterator[AppServer]:
    """build_components with its default sink (the Spool at config.spool.path), served by
    aiohttp's TestServer."""
    components = build_components(config, clock=clock)
    assert isinstance(components.sink, Spool)
    server = TestServer(create_app(components), host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield AppServer(str(server.make_url("")).rstrip("/"), components)
    finally:
        await server.close()


@asynccontextmanager
async def drainer_for(config: Config, clock: Clock) -> AsyncIterator[Drainer]:
    """A Drainer as the child process builds it: its own Spool on the same file."""
    spool = Spool(config.spool.path, synchronous=config.spool.synchronous, replica_id="drainer")
    await spool.open()
    client = StripeMeterClient(config.billing.stripe_secret_key, config.billing.stripe_api_base)
    try:
        yield Drainer(
            spool,
            client,
            drain=config.drain,
            billing=config.billing,
            spool_config=config.spool,
            clock=clock,
            probe_interval_s=config.ops.stripe_probe_interval_s,
        )
    finally:
        await client.close()
        await spool.close()


# --- `serve` as a real process -------------------------------------------------------------


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for name, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(name), dict):
            out[name].update(value)
        else:
            out[name] = value
    return out


@dataclass
class ServeStack:
    """Everything a `serve` process needs: config file, environment, a tenant and its key."""

    env: dict[str, str] = field(repr=False)  # the whole environment: keep it out of reports
    port: int
    spool: Path
    tenant: str
    customer: str
    key: str = field(repr=False)
    stripe_key: str = field(repr=False)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/mcp"

    def unreported(self) -> int:
        with contextlib.closing(sqlite3.connect(self.spool)) as db:
            return int(
                db.execute(
                    "SELECT COUNT(*) FROM events WHERE billable = 1 AND reported_at IS NULL"
                ).fetchone()[0]
            )

    def billable_units(self) -> int:
        with contextlib.closing(sqlite3.connect(self.spool)) as db:
            return int(
                db.execute(
                    "SELECT COALESCE(SUM(units), 0) FROM events WHERE billable = 1"
                ).fetchone()[0]
            )


async def make_serve_stack(
    tmp_path: Path,
    *,
    redis_url: str,
    key_prefix: str,
    upstream_url: str,
    stripe_url: str,
    stripe_key: str,
    customer: str,
    meter: str,
    tenant: str = "acme",
    **sections: Any,
) -> ServeStack:
    port = free_port()
    spool = tmp_path / "usage.db"
    config = _merge(
        {
            "listen": {"host": "127.0.0.1", "port": port},
            "upstream": {"url": upstream_url},
            "redis": {"key_prefix": key_prefix},
            "plans": {"pro": {"included_units": 1_000_000, "overage": "bill"}},
            "spool": {"path": str(spool)},
            "billing": {"enabled": True, "meter_event_name": meter},
        },
        sections,
    )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "MQP_KEY_PEPPER": PEPPER,
        "STRIPE_SECRET_KEY": stripe_key,
        "STRIPE_API_BASE": stripe_url,
        "MQP_CONFIG": str(path),
    }
    stores = connect(RedisConfig(url=redis_url))
    try:
        tenants = TenantStore(stores.main, KeySpace(key_prefix), PEPPER, "mqp_")
        await tenants.create(tenant, name=None, plan="pro", stripe_customer=customer, now=0)
        key, _ = await tenants.issue_key(tenant, label="ops", now=0)
    finally:
        await stores.close()
    return ServeStack(env, port, spool, tenant, customer, key, stripe_key)


@dataclass
class ServeProcess:
    proc: asyncio.subprocess.Process
    base: str

    def kill_group(self) -> None:
        # Its own session: the group holds serve and its drainer child.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    async def wait_healthy(self, http: aiohttp.ClientSession, limit: float = 30) -> None:
        async def healthy() -> bool:
            assert self.proc.returncode is None, f"serve exited with {self.proc.returncode}"
            try:
                async with http.get(f"{self.base}/healthz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await until(healthy, limit, "serve to answer /healthz")

    async def terminate(self, limit: float = 40) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), limit)


def _open_for_child(path: Path) -> BinaryIO:
    return path.open("wb")


@asynccontextmanager
async def serving(stack: ServeStack, *, stderr: Path | None = None) -> AsyncIterator[ServeProcess]:
    """`python -m proxy serve` in its own process group; the group is killed on exit."""
    err = _open_for_child(stderr) if stderr is not None else None
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "serve",
            env=stack.env,
            start_new_session=True,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=err if err is not None else asyncio.subprocess.DEVNULL,
        )
    finally:
        if err is not None:
            err.close()  # the child holds its own descriptor
    serve = ServeProcess(proc, stack.base)
    try:
        yield serve
    finally:
        serve.kill_group()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 10)


# --- processes ------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    if not path.exists():
        pytest.skip("needs /proc/PID/task/PID/children (Linux)")
    return [int(p) for p in path.read_text().split()]


def _signal_mask(pid: int, name: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return 0
    for line in text.splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1], 16)
    return 0


def catches(pid: int, sig: int) -> bool:
    """Whether the process has a handler installed for `sig`."""
    return bool(_signal_mask(pid, "SigCgt") >> (sig - 1) & 1)


def pending(pid: int, sig: int) -> bool:
    """Whether `sig` was sent to the process and not delivered yet (it is stopped)."""
    return any(_signal_mask(pid, f) >> (sig - 1) & 1 for f in ("SigPnd", "ShdPnd"))
