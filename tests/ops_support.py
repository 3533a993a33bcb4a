"""Support shared by the tests that run real processes (and by `python -m tests.soak`):
scraping /metrics and checking it with promtool, serving the app on a real spool, a drainer
on the same spool file, `serve` and redis-server as real process groups, free ports, bounded
polling, reading spools, and signed Stripe webhooks."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import aiohttp
import pytest
import redis
import stripe
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import build_components, create_app
from proxy.clock import Clock
from proxy.config import Config, RedisConfig
from proxy.keys import KeySpace
from proxy.store import connect
from proxy.tenants import TenantStore
from proxy.usage.drainer import Drainer
from proxy.usage.meter import StripeMeterClient
from proxy.usage.spool import Spool
from tests.conftest import PEPPER
from tests.fakes.stripe_fake import StripeFake, run_stripe_fake
from tests.proxy_harness import InProcessProxy, local_server

PROMTOOL_INSTALL = "apt-get update && apt-get install -y prometheus"
ROOT = Path(__file__).resolve().parents[1]


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


async def poll(
    predicate: Callable[[], object | Awaitable[object]], limit: float, every: float = 0.02
) -> bool:
    """Whether `predicate` (sync or async) held within `limit` seconds, checked every `every`."""
    deadline = time.monotonic() + limit
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(every)


async def until(
    predicate: Callable[[], object | Awaitable[object]],
    limit: float,
    what: str,
    every: float = 0.05,
) -> None:
    """Like `poll`, but a timeout fails the test."""
    if not await poll(predicate, limit, every):
        raise AssertionError(f"timed out after {limit} s waiting for {what}")


def wait_for(predicate: Callable[[], bool], limit: float, what: str) -> None:
    """`until` for code off the event loop (it blocks the thread)."""
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit} s waiting for {what}")
        time.sleep(0.02)


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all held open until all are chosen)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with http.get(url) as r:
        return r.status, await r.json()


# --- the app in-process, on a real spool ---------------------------------------------------


class AppServer(InProcessProxy):
    key_label: ClassVar[str] = "ops"


@asynccontextmanager
async def serve_app(config: Config, *, clock: Clock | None = None) -> AsyncIterator[AppServer]:
    """build_components with its default sink (the Spool at config.spool.path), served by
    aiohttp's TestServer."""
    components = build_components(config, clock=clock)
    assert isinstance(components.sink, Spool)
    async with local_server(create_app(components)) as base:
        yield AppServer(base, components)


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


# --- spools ----------------------------------------------------------------------------------


@dataclass
class SpoolRow:
    request_id: str
    tenant_id: str
    stripe_customer: str | None
    units: int
    degraded: bool
    billable: bool
    reported: bool


def spool_rows(path: Path) -> list[SpoolRow]:
    if not path.exists():
        return []
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as db:
        rows = db.execute(
            "SELECT request_id, tenant_id, stripe_customer, units, degraded, billable, "
            "reported_at IS NOT NULL FROM events ORDER BY id"
        ).fetchall()
    return [
        SpoolRow(str(r[0]), str(r[1]), r[2], int(r[3]), bool(r[4]), bool(r[5]), bool(r[6]))
        for r in rows
    ]


def unreported(path: Path) -> int:
    """Billable events the drainer has not delivered yet."""
    return sum(1 for r in spool_rows(path) if r.billable and not r.reported)


def spooled_units(path: Path, *, billable_only: bool = False) -> int:
    return sum(r.units for r in spool_rows(path) if r.billable or not billable_only)


# --- tenants and Stripe webhooks ---------------------------------------------------------------


async def create_tenant(
    redis_url: str,
    key_prefix: str,
    tenant_id: str,
    *,
    plan: str,
    customer: str | None,
    label: str = "test",
    pepper: str = PEPPER,
) -> str:
    """Create a tenant and issue one key through the TenantStore the CLI uses; the key."""
    stores = connect(RedisConfig(url=redis_url, timeout_ms=2000))
    try:
        tenants = TenantStore(stores.main, KeySpace(key_prefix), pepper, "mqp_")
        await tenants.create(tenant_id, name=None, plan=plan, stripe_customer=customer, now=0)
        key, _ = await tenants.issue_key(tenant_id, label=label, now=0)
        return key
    finally:
        await stores.close()


def stripe_event(evt_id: str, kind: str, created: int, obj: dict[str, Any]) -> bytes:
    """A webhook body as Stripe sends it."""
    return json.dumps(
        {
            "id": evt_id,
            "object": "event",
            "type": kind,
            "created": created,
            "api_version": "2026-10-28.endive",
            "data": {"object": obj},
        }
    ).encode()


def sign_webhook(body: bytes, secret: str, *, ts: int | None = None) -> str:
    """A Stripe-Signature header for `body`, signed now or at `ts`."""
    return str(
        stripe.WebhookSignature.generate_signature_header(
            body.decode(), secret, timestamp=int(time.time()) if ts is None else ts
        )
    )


async def post_webhook(
    http: aiohttp.ClientSession,
    base: str,
    body: bytes,
    header: str | None,
    *,
    content_type: str | None = "application/json",
) -> tuple[int, dict[str, Any]]:
    """POST /stripe/webhook; the status and the JSON answer (of `content_type`; None: any)."""
    headers = {"Content-Type": "application/json"}
    if header is not None:
        headers["Stripe-Signature"] = header
    data = io.BytesIO(body) if len(body) > 512 * 1024 else body  # big raw bytes warn
    async with http.post(f"{base}/stripe/webhook", data=data, headers=headers) as r:
        return r.status, await r.json(content_type=content_type)


# --- `serve` as a real process -------------------------------------------------------------


class OnLoopback:
    """A server on 127.0.0.1:`port`, with the proxy's MCP endpoint."""

    port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/mcp"


async def wait_healthy(
    http: aiohttp.ClientSession,
    base: str,
    check_alive: Callable[[], None],
    limit: float,
    what: str,
) -> None:
    """Until GET /healthz answers 200; `check_alive` fails early if the process is gone."""

    async def healthy() -> bool:
        check_alive()
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(f"{base}/healthz") as r:
                return r.status == 200
        return False

    await until(healthy, limit, what, every=0.05)


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for name, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(name), dict):
            out[name].update(value)
        else:
            out[name] = value
    return out


@dataclass
class ServeStack(OnLoopback):
    """Everything a `serve` process needs: config file, environment, a tenant and its key."""

    env: dict[str, str] = field(repr=False)  # the whole environment: keep it out of reports
    port: int
    spool: Path
    tenant: str
    customer: str
    key: str = field(repr=False)
    stripe_key: str = field(repr=False)

    def unreported(self) -> int:
        return unreported(self.spool)

    def billable_units(self) -> int:
        return spooled_units(self.spool, billable_only=True)


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
    key_label: str = "ops",
    **sections: Any,
) -> ServeStack:
    (port,) = free_ports(1)
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
    key = await create_tenant(
        redis_url, key_prefix, tenant, plan="pro", customer=customer, label=key_label
    )
    return ServeStack(env, port, spool, tenant, customer, key, stripe_key)


@asynccontextmanager
async def stripe_serve_stack(
    tmp_path: Path, *, stripe_key: str, meter: str, **stack: Any
) -> AsyncIterator[tuple[StripeFake, ServeStack]]:
    """The Stripe fake (with `meter` and one customer) and a ServeStack billing to it; `stack`
    goes to make_serve_stack."""
    async with run_stripe_fake() as fake:
        fake.add_meter(meter)
        customer = fake.add_customer(name="acme")["id"]
        yield (
            fake,
            await make_serve_stack(
                tmp_path,
                stripe_url=fake.url,
                stripe_key=stripe_key,
                customer=customer,
                meter=meter,
                **stack,
            ),
        )


@dataclass
class ServeProcess:
    proc: asyncio.subprocess.Process
    base: str

    def kill_group(self) -> None:
        # Its own session: the group holds serve and its drainer child.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def _check_alive(self) -> None:
        assert self.proc.returncode is None, f"serve exited with {self.proc.returncode}"

    async def wait_healthy(self, http: aiohttp.ClientSession, limit: float = 30) -> None:
        await wait_healthy(http, self.base, self._check_alive, limit, "serve to answer /healthz")

    async def terminate(self, limit: float = 40) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), limit)


def _open_for_child(path: Path) -> BinaryIO:
    return path.open("wb")


async def start_proxy(stack: ServeStack, *args: str, stderr: Path | None = None) -> ServeProcess:
    """`python -m proxy ARGS...` (serve, drain...) in its own process group, so SIGKILL to the
    group takes a serve's drainer child down too, as a pod kill would."""
    err = _open_for_child(stderr) if stderr is not None else None
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            *args,
            env=stack.env,
            start_new_session=True,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=err if err is not None else asyncio.subprocess.DEVNULL,
        )
    finally:
        if err is not None:
            err.close()  # the child holds its own descriptor
    return ServeProcess(proc, stack.base)


@asynccontextmanager
async def serving(stack: ServeStack, *, stderr: Path | None = None) -> AsyncIterator[ServeProcess]:
    """`python -m proxy serve` in its own process group; the group is killed on exit."""
    serve = await start_proxy(stack, "serve", stderr=stderr)
    try:
        yield serve
    finally:
        serve.kill_group()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(serve.proc.wait(), 10)


# --- processes with their own directory: redis-server, serve ---------------------------------


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class RedisProcess:
    """A redis-server this test owns, in its own process group."""

    port: int
    dir: Path
    persistent: bool
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.dir / "redis.log"

    def argv(self) -> list[str]:
        binary = shutil.which("redis-server")
        assert binary is not None
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--protected-mode", "yes", "--dir", str(self.dir), "--save", ""]
        if self.persistent:  # every write is on disk before its reply leaves the server
            return [*argv, "--appendonly", "yes", "--appendfsync", "always"]
        return [*argv, "--appendonly", "no"]

    def start(self, limit: float = 15.0) -> None:
        """Start and wait until it answers PING (blocking: from a loop, use a thread)."""
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        wait_for(self.answers, limit, f"redis-server on port {self.port} (start {self.starts})")

    def answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"redis-server exited {self.proc.returncode}:\n{_tail(self.log)}")
        client = redis.Redis(
            host="127.0.0.1", port=self.port, socket_connect_timeout=0.2, socket_timeout=1.0
        )
        try:
            return bool(client.ping())
        except redis.RedisError:  # refused, or BusyLoadingError while the AOF is replayed
            return False
        finally:
            client.close()

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True)

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill: no shutdown save, no AOF rewrite."""
        if self.proc is not None:
            _kill_group(self.proc)
            self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _kill_group(self.proc)
        self.proc = None


@dataclass
class Serve(OnLoopback):
    """One `python -m proxy serve` (and its drainer child) with its own directory: config.yaml,
    serve.log (the JSON log lines of both processes) and usage.db (its spool)."""

    name: str
    dir: Path
    port: int
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def config_path(self) -> Path:
        return self.dir / "config.yaml"

    @property
    def log_path(self) -> Path:
        return self.dir / "serve.log"

    @property
    def spool(self) -> Path:
        return self.dir / "usage.db"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "serve"],
                cwd=self.dir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # its own group: killing it takes the drainer too
            )
        self.starts += 1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _check_alive(self) -> None:
        if not self.alive():
            raise AssertionError(f"serve {self.name} is not running:\n{_tail(self.log_path)}")

    async def ready(self, http: aiohttp.ClientSession, limit: float = 30.0) -> None:
        await wait_healthy(
            http, self.base, self._check_alive, limit, f"serve {self.name} to listen"
        )

    async def readyz(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        async with http.get(f"{self.base}/readyz") as r:
            doc: dict[str, Any] = await r.json()
            return doc

    async def stop(self, limit: float = 45.0) -> int:
        """SIGTERM to serve alone (it stops its drainer child itself); its exit code."""
        assert self.proc is not None
        proc = self.proc
        proc.send_signal(signal.SIGTERM)
        await until(lambda: proc.poll() is not None, limit, f"serve {self.name} to exit", 0.02)
        self.proc = None
        return int(proc.returncode)

    def kill(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)
            self.proc = None

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict):
                    out.append(doc)
        return out

    def events(self, name: str) -> list[dict[str, Any]]:
        return [doc for doc in self.logs() if doc.get("event") == name]


def make_serve(workdir: Path, name: str, config: dict[str, Any], env: dict[str, str]) -> Serve:
    """A (not started) Serve in workdir/name on a free port, its spool in that directory;
    `env` is added to this process's environment."""
    path = workdir / name
    path.mkdir()
    (port,) = free_ports(1)
    doc = json.loads(json.dumps(config))
    doc["listen"] = {"host": "127.0.0.1", "port": port}
    doc.setdefault("spool", {})["path"] = str(path / "usage.db")
    (path / "config.yaml").write_text(yaml.safe_dump(doc))
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    full_env = {
        **os.environ,
        **env,
        "MQP_CONFIG": str(path / "config.yaml"),
        "PYTHONPATH": pythonpath,
    }
    return Serve(name, path, port, full_env)


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
