"""Real processes for the fault tests: redis-servers a test owns (so it may SIGKILL them and
restart them on the same port and directory), `python -m proxy serve` processes in their own
process groups, the scripted upstream and the Stripe fake.

Every server binds 127.0.0.1. Every wait is bounded and polls a condition. Teardown kills
whole process groups (a serve's drainer child goes with it) and removes every directory a
test made. No test touches a Redis it did not start, except through its own key prefix.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import PEPPER
from tests.fakes.stripe_fake import StripeFake, run_stripe_fake
from tests.fakes.upstream import ScriptedUpstream
from tests.ops_support import RedisProcess, Serve, free_ports, make_serve, spool_rows, wait_for
from tests.ops_support import until as _until
from tests.proxy_harness import local_server
from tests.rpc import bearer, call

# Imported from here by tests/faults/test_cluster.py.
__all__ = ["free_ports", "spool_rows", "until", "wait_for"]

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


async def until(
    predicate: Callable[[], object | Awaitable[object]],
    limit: float,
    what: str,
    every: float = 0.02,
) -> None:
    """ops_support.until at the finer step the fault tests were written against."""
    await _until(predicate, limit, what, every)


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mqp-faults-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


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


ServeFactory = Callable[[str, dict[str, Any], dict[str, str]], Serve]


@pytest.fixture
def serves(workdir: Path) -> Iterator[ServeFactory]:
    """Make (not start) serve processes; each gets a free port, its own dir and spool."""
    made: list[Serve] = []

    def make(name: str, config: dict[str, Any], env: dict[str, str]) -> Serve:
        serve = make_serve(workdir, name, config, env)
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
    async with local_server(up.app()) as base:
        yield up, base


@pytest.fixture
async def stripe_fake() -> AsyncIterator[StripeFake]:
    async with run_stripe_fake() as fake:
        fake.add_meter(METER)
        yield fake


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
