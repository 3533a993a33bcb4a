"""Real processes for the fault tests: redis-servers a test owns (so it may SIGKILL them and
restart them on the same port and directory), `python -m proxy serve` processes in their own
process groups, the scripted upstream and the Stripe fake.

Every server binds 127.0.0.1. Every wait is bounded and polls a condition. Teardown kills
whole process groups (a serve's drainer child goes with it) and removes every directory a
test made. No test touches a Redis it did not start, except through its own key prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import yaml
from aiohttp.test_utils import TestServer

from proxy.config import RedisConfig
from proxy.keys import KeySpace
from proxy.store import connect
from proxy.tenants import TenantStore
from tests.conftest import PEPPER
from tests.fakes.stripe_fake import StripeFake, run_stripe_fake
from tests.fakes.upstream import ScriptedUpstream
from tests.rpc import bearer, call

ROOT = Path(__file__).resolve().parents[2]
STRIPE_KEY = "sk_test_faults_0123456789"
METER = "mcp_tool_calls"
QUOTA_REFUSAL = "Quota exhausted"


def need(*binaries: str) -> None:
    missing = [b for b in binaries if shutil.which(b) is None]
    if missing:
        pytest.skip(
            f"{' and '.join(missing)} not installed: `apt-get install redis-server` "
            "(the package ships redis-cli too)"
        )


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


def wait_for(predicate: Callable[[], bool], limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit} s waiting for {what}")
        time.sleep(0.02)


async def until(
    predicate: Callable[[], bool | Awaitable[bool]], limit: float, what: str, every: float = 0.02
) -> None:
    deadline = time.monotonic() + limit
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit} s waiting for {what}")
        await asyncio.sleep(every)


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mqp-faults-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


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


# --- redis-server ----------------------------------------------------------------------------


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


@pytest.fixture
def redis_factory(workdir: Path) -> Iterator[Callable[..., RedisProcess]]:
    made: list[RedisProcess] = []

    def make(*, persistent: bool) -> RedisProcess:
        need("redis-server")
        (port,) = free_ports(1)
        path = workdir / f"redis-{port}"
        path.mkdir()
        server = RedisProcess(port, path, persistent)
        made.append(server)
        server.start()
        return server

    try:
        yield make
    finally:
        for server in made:
            server.stop()


# --- serve -----------------------------------------------------------------------------------


@dataclass
class Serve:
    """One `python -m proxy serve` (and its drainer child) with its own directory: config.yaml,
    serve.log (the JSON log lines of both processes) and usage.db (its spool)."""

    name: str
    dir: Path
    port: int
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.dir / "config.yaml"

    @property
    def log_path(self) -> Path:
        return self.dir / "serve.log"

    @property
    def spool(self) -> Path:
        return self.dir / "usage.db"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/mcp"

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

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _check_alive(self) -> None:
        if not self.alive():
            raise AssertionError(f"serve {self.name} is not running:\n{_tail(self.log_path)}")

    async def ready(self, http: aiohttp.ClientSession, limit: float = 30.0) -> None:
        async def listening() -> bool:
            self._check_alive()
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{self.base}/healthz") as r:
                    return r.status == 200
            return False

        await until(listening, limit, f"serve {self.name} to listen", every=0.05)

    async def readyz(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        async with http.get(f"{self.base}/readyz") as r:
            doc: dict[str, Any] = await r.json()
            return doc

    async def stop(self, limit: float = 45.0) -> int:
        """SIGTERM to serve alone (it stops its drainer child itself); its exit code."""
        assert self.proc is not None
        proc = self.proc
        proc.send_signal(signal.SIGTERM)
        await until(lambda: proc.poll() is not None, limit, f"serve {self.name} to exit")
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


ServeFactory = Callable[[str, dict[str, Any], dict[str, str]], Serve]


@pytest.fixture
def serves(workdir: Path) -> Iterator[ServeFactory]:
    """Make (not start) serve processes; each gets a free port, its own dir and spool."""
    made: list[Serve] = []

    def make(name: str, config: dict[str, Any], env: dict[str, str]) -> Serve:
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
        serve = Serve(name, path, port, full_env)
        made.append(serve)
        return serve

    try:
        yield make
    finally:
        for serve in made:
            serve.kill()


def serve_config(
    *,
    upstream_url: str,
    key_prefix: str,
    plans: dict[str, Any],
    redis_section: dict[str, Any] | None = None,
    drain_interval_s: float = 0.2,
) -> dict[str, Any]:
    return {
        "upstream": {"url": upstream_url},
        "redis": {"key_prefix": key_prefix, **(redis_section or {})},
        "plans": plans,
        "default_plan": next(iter(plans)),
        "drain": {"interval_s": drain_interval_s},
        "billing": {"enabled": True, "meter_event_name": METER},
        "ops": {"readiness_delay_s": 0.1},
        "log_level": "warning",
    }


def serve_env(redis_url: str, fake: StripeFake) -> dict[str, str]:
    return {
        "REDIS_URL": redis_url,
        "MQP_KEY_PEPPER": PEPPER,
        "STRIPE_SECRET_KEY": STRIPE_KEY,
        "STRIPE_API_BASE": fake.url,
    }


# --- upstream, Stripe, tenants -----------------------------------------------------------------


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ScriptedUpstream, str]]:
    """A scripted upstream on 127.0.0.1 and its base URL."""
    up = ScriptedUpstream()
    server = TestServer(up.app(), host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield up, str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@pytest.fixture
async def stripe_fake() -> AsyncIterator[StripeFake]:
    async with run_stripe_fake() as fake:
        fake.add_meter(METER)
        yield fake


async def create_tenant(
    redis_url: str, key_prefix: str, tenant_id: str, *, plan: str, customer: str | None
) -> str:
    """Create a tenant and issue one key through the TenantStore the CLI uses; the key."""
    stores = connect(RedisConfig(url=redis_url, timeout_ms=2000))
    try:
        tenants = TenantStore(stores.main, KeySpace(key_prefix), PEPPER, "mqp_")
        await tenants.create(tenant_id, name=None, plan=plan, stripe_customer=customer, now=0)
        key, _ = await tenants.issue_key(tenant_id, label="faults", now=0)
        return key
    finally:
        await stores.close()


# --- clients and spools -------------------------------------------------------------------------


@dataclass
class Reply:
    """One tools/call as the client saw it."""

    rid: str
    started: float
    elapsed: float
    status: int = 0  # 0: no HTTP answer (connection error or client timeout)
    doc: dict[str, Any] | None = None
    error: str = ""

    @property
    def result(self) -> dict[str, Any] | None:
        result = (self.doc or {}).get("result")
        return result if isinstance(result, dict) else None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.result is not None and self.result["isError"] is False

    @property
    def refused(self) -> bool:
        result = self.result
        return (
            self.status == 200
            and result is not None
            and result["isError"] is True
            and QUOTA_REFUSAL in result["content"][0]["text"]
        )

    @property
    def message(self) -> str:
        error = (self.doc or {}).get("error")
        return str(error.get("message", "")) if isinstance(error, dict) else ""


async def tool_call(
    http: aiohttp.ClientSession, url: str, key: str, rid: str, tool: str = "add"
) -> Reply:
    """POST one tools/call with X-Request-Id = rid (the spool row's request_id)."""
    headers = {**bearer(key), "X-Request-Id": rid}
    started = time.monotonic()
    try:
        async with http.post(url, json=call(rid, tool, rid=rid), headers=headers) as r:
            text = await r.text()
            status = r.status
            sse = r.content_type == "text/event-stream"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Reply(rid, started, time.monotonic() - started, error=type(exc).__name__)
    elapsed = time.monotonic() - started
    try:
        doc = _sse_response(text, rid) if sse else json.loads(text)
    except ValueError:
        return Reply(rid, started, elapsed, status, error=f"not JSON: {text[:200]!r}")
    return Reply(rid, started, elapsed, status, doc)


def _sse_response(text: str, rid: str) -> dict[str, Any] | None:
    """The JSON-RPC response to `rid` carried by an SSE body (progress events skipped)."""
    for line in text.splitlines():
        if line.startswith("data:"):
            with contextlib.suppress(ValueError):
                doc = json.loads(line[5:])
                if isinstance(doc, dict) and doc.get("id") == rid and "method" not in doc:
                    return doc
    return None


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
    return sum(1 for r in spool_rows(path) if r.billable and not r.reported)


@dataclass
class Tally:
    replies: list[Reply] = field(default_factory=list)

    @property
    def ok(self) -> list[Reply]:
        return [r for r in self.replies if r.ok]

    def by_status(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for r in self.replies:
            out[r.status] = out.get(r.status, 0) + 1
        return out
