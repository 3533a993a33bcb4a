"""The quota contract, and `serve`, on a real 3-master Redis Cluster (loopback, no replicas).

1. Every test of tests/contract/test_quota_contract.py that runs on a `rig` runs here
   unchanged, with the rig's client a `redis.asyncio.cluster.RedisCluster`: block, exactness,
   refunds, idempotency, weights, overage, GCRA, reaping, periods, expiry, hash tags, batched
   commits (concurrent settle scripts: a cluster pipeline refuses EVALSHA).
2. Tenants chosen so their hash tags land on all three masters (checked against the servers'
   own CLUSTER KEYSLOT and CLUSTER NODES, and by reading each key on the node that owns it):
   concurrent exactness per tenant, every operation on every node, no CROSSSLOT error, and an
   emptied script cache under load (one SCRIPT LOAD per master, shared by every caller).
3. What `serve` builds with `redis.cluster: true` (`proxy.store.connect`): a cluster client
   whose callers queue for a connection, cluster errors counted by the StoreGuard, scripts
   loaded on every master at start-up, cache invalidations heard through one node, and a real
   `serve` process making tool calls end to end.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import itertools
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import MaxConnectionsError, MovedError

from proxy.app import build_components
from proxy.breaker import BreakerState, CircuitBreaker
from proxy.clock import ManualClock
from proxy.config import Config, parse_config
from proxy.directory import Directory
from proxy.keys import KeySpace
from proxy.quota.engine import QuotaEngine
from proxy.quota.policy import Outcome, Period, calendar_month
from proxy.quota.storage import Reservation
from proxy.serve import startup_checks
from proxy.store import QueuedRedisCluster, StoreGuard, StoreUnavailable, connect
from proxy.tenants import TenantStore
from proxy.usage.sink import MemorySink
from tests.conftest import PEPPER
from tests.contract import test_quota_contract as contract
from tests.contract.conftest import Rig, aligned_clock, build_engine, make_plan
from tests.fakes.stripe_fake import StripeFake
from tests.fakes.upstream import ScriptedUpstream
from tests.faults.conftest import (
    ServeFactory,
    free_ports,
    need,
    serve_config,
    serve_env,
    spool_rows,
    tool_call,
    until,
    wait_for,
)

pytestmark = [pytest.mark.redis, pytest.mark.timeout(240)]

SLOTS = 16384
ENV = {"MQP_KEY_PEPPER": PEPPER}


def _sha(name: str) -> str:
    text = files("proxy.quota").joinpath("lua", name).read_text(encoding="utf-8")
    return hashlib.sha1(text.encode()).hexdigest()


QUOTA_SCRIPTS = (_sha("reserve.lua"), _sha("settle.lua"))


# --- the cluster --------------------------------------------------------------------------------


@dataclass
class Cluster:
    ports: list[int]
    workdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, decode_responses=True, socket_timeout=5)

    def info(self, port: int) -> dict[str, str]:
        client = self.node(port)
        try:
            info = client.cluster("INFO")
        except redis.RedisError:
            return {}
        finally:
            client.close()
        return {str(k): str(v) for k, v in info.items()}

    def healthy(self) -> bool:
        for port in self.ports:
            info = self.info(port)
            if info.get("cluster_state") != "ok" or info.get("cluster_known_nodes") != "3":
                return False
            if info.get("cluster_slots_ok") != str(SLOTS):
                return False
        return True

    def owners(self) -> dict[int, int]:
        """slot -> owning master's port, from CLUSTER SLOTS on the first node."""
        client = self.node(self.ports[0])
        try:
            ranges = client.cluster("SLOTS")
        finally:
            client.close()
        out: dict[int, int] = {}
        for row in ranges:
            start, end, master = int(row[0]), int(row[1]), row[2]
            for slot in range(start, end + 1):
                out[slot] = int(master[1])
        return out

    def server_keyslot(self, key: str) -> int:
        client = self.node(self.ports[1])
        try:
            return int(client.cluster("KEYSLOT", key))
        finally:
            client.close()

    @property
    def seed(self) -> str:
        """The URL an operator would give: one node; the client finds the others."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def cold_scripts(self) -> None:
        """Empty every master's script cache (as after a restart or failover) and reset its
        command counters. This module's own cluster: nothing else is touched."""
        for port in self.ports:
            node = self.node(port)
            try:
                node.script_flush()
                node.config_resetstat()
            finally:
                node.close()

    def script_loads(self, port: int) -> int:
        """SCRIPT LOAD commands the node ran since `cold_scripts`."""
        node = self.node(port)
        try:
            stats = node.info("commandstats")
        finally:
            node.close()
        return int(stats.get("cmdstat_script|load", {}).get("calls", 0))

    def scripts_cached(self, shas: tuple[str, ...]) -> bool:
        """Every master holds every script."""
        for port in self.ports:
            node = self.node(port)
            try:
                if not all(node.script_exists(*shas)):
                    return False
            finally:
                node.close()
        return True


def _start_cluster(workdir: Path) -> Cluster:
    ports = free_ports(6)  # 3 client ports, 3 bus ports (cluster-port: no +10000 overflow)
    cluster = Cluster(ports[:3], workdir)
    binary = shutil.which("redis-server")
    assert binary is not None
    for port, bus in zip(ports[:3], ports[3:], strict=True):
        with (workdir / f"redis-{port}.log").open("ab") as log:
            cluster.procs.append(
                subprocess.Popen(
                    [
                        binary,
                        "--port",
                        str(port),
                        "--cluster-port",
                        str(bus),
                        "--bind",
                        "127.0.0.1",
                        "--protected-mode",
                        "yes",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(workdir / f"nodes-{port}.conf"),
                        "--appendonly",
                        "no",
                        "--save",
                        "",
                        "--dir",
                        str(workdir),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def pings(port: int) -> bool:
        client = cluster.node(port)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    for port in cluster.ports:
        wait_for(lambda p=port: pings(p), 15, f"cluster node {port}")  # type: ignore[misc]
    cli = shutil.which("redis-cli")
    assert cli is not None
    created = subprocess.run(
        [
            cli,
            "--cluster",
            "create",
            *(f"127.0.0.1:{p}" for p in cluster.ports),
            "--cluster-replicas",
            "0",
            "--cluster-yes",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert created.returncode == 0, created.stdout + created.stderr
    wait_for(cluster.healthy, 30, "cluster_state:ok on all three nodes")
    return cluster


def _stop_cluster(cluster: Cluster) -> None:
    for proc in cluster.procs:
        proc.terminate()
    for proc in cluster.procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    need("redis-server", "redis-cli")
    workdir = Path(tempfile.mkdtemp(prefix="mqp-cluster-"))
    cluster: Cluster | None = None
    try:
        cluster = Cluster([], workdir)
        cluster = _start_cluster(workdir)
        yield cluster
    finally:
        if cluster is not None:
            _stop_cluster(cluster)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
async def client(cluster: Cluster) -> AsyncIterator[RedisCluster]:
    """The client the brief names; the test's keys (its prefix) are deleted afterwards."""
    rc = RedisCluster(host="127.0.0.1", port=cluster.ports[0], decode_responses=True)
    await rc.initialize()
    try:
        yield rc
    finally:
        await rc.aclose()


@pytest.fixture
async def prefix(client: RedisCluster) -> AsyncIterator[str]:
    value = f"mqpc{uuid.uuid4().hex[:12]}"
    yield value
    async for key in client.scan_iter(match=f"{value}:*"):
        await client.delete(key)


# --- 1. the contract, unchanged, on the cluster ----------------------------------------------


@pytest.fixture
async def rig(client: RedisCluster, prefix: str, clock: ManualClock) -> Rig:
    engine, storage, guard = build_engine(client, prefix, clock)  # type: ignore[arg-type]
    return Rig(
        backend="redis",  # the real-server branches (TTL read-backs) apply
        client=client,  # type: ignore[arg-type]
        prefix=prefix,
        clock=clock,
        keys=KeySpace(prefix),
        engine=engine,
        storage=storage,
        guard=guard,
    )


@pytest.fixture
def clock() -> ManualClock:
    return aligned_clock()


ContractTest = Callable[..., Coroutine[Any, Any, None]]


def _on_cluster(test: ContractTest) -> ContractTest:
    """A copy of a contract test for this module (marks added here stay off the original)."""

    @functools.wraps(test)
    async def run(*args: Any, **kwargs: Any) -> None:
        await test(*args, **kwargs)

    return run


CONTRACT_ON_RIG = sorted(
    name
    for name, fn in vars(contract).items()
    if name.startswith("test_")
    and inspect.iscoroutinefunction(fn)
    and "rig" in inspect.signature(fn).parameters
)
for _name in CONTRACT_ON_RIG:
    globals()[_name] = _on_cluster(getattr(contract, _name))


def test_the_whole_contract_is_run_here() -> None:
    assert len(CONTRACT_ON_RIG) >= 20, CONTRACT_ON_RIG
    assert "test_concurrent_reserves_admit_exactly_the_limit" in CONTRACT_ON_RIG
    assert "test_batched_commits_release_reservations_without_recounting" in CONTRACT_ON_RIG


# --- 2. tenants on every node ----------------------------------------------------------------


def spread_tenants(cluster: Cluster, per_node: int) -> dict[int, list[str]]:
    """`per_node` tenant ids whose hash tag lands on each master: port -> ids."""
    owners = cluster.owners()
    out: dict[int, list[str]] = {port: [] for port in cluster.ports}
    n = 0
    while any(len(ids) < per_node for ids in out.values()):
        tenant = f"tenant-{n}"
        n += 1
        ids = out[owners[key_slot(tenant.encode())]]
        if len(ids) < per_node:
            ids.append(tenant)
    return out


def tenant_keys(keys: KeySpace, tenant: str, period: Period) -> list[str]:
    return [
        keys.used(tenant, period.start),
        keys.rate(tenant),
        keys.reservations(tenant),
        keys.reaped(tenant),
    ]


async def test_tenants_spread_over_all_three_masters(
    cluster: Cluster, client: RedisCluster, prefix: str
) -> None:
    spread = spread_tenants(cluster, per_node=3)
    keys = KeySpace(prefix)
    period = Period(1_700_000_000, 1_702_592_000)
    for port, tenants in spread.items():
        for tenant in tenants:
            slot = key_slot(tenant.encode())
            for key in tenant_keys(keys, tenant, period):
                # The server, the client and the hash tag agree on one slot per tenant ...
                assert cluster.server_keyslot(key) == slot == client.keyslot(key)
                assert await client.cluster_keyslot(key) == slot
                # ... and that slot's master is the node this tenant was picked for.
                node = client.get_node_from_key(key)
                assert node is not None and node.port == port
    assert len({t for ts in spread.values() for t in ts}) == 9


@pytest.mark.parametrize(
    ("per_node", "max_connections"),
    [(2, None), (3, 256)],
    ids=["6-tenants-default-pool", "9-tenants-pool-256"],
)
async def test_exactly_the_limit_per_tenant_with_tenants_on_every_node(
    cluster: Cluster, client: RedisCluster, prefix: str, per_node: int, max_connections: int | None
) -> None:
    """limit 5, 40 concurrent reserves for each tenant (per_node tenants on each master), all
    at once: exactly 5 each; each key lives on its tenant's master only; no store error.

    RedisCluster's pool holds at most 100 connections per node (redis-py 8 default) and raises
    MaxConnectionsError beyond that instead of waiting: 120 concurrent scripts on one master
    need a bigger pool, as a cluster-aware `connect` must configure (see the module doc)."""
    if max_connections is not None:
        client = RedisCluster(
            host="127.0.0.1",
            port=cluster.ports[0],
            decode_responses=True,
            max_connections=max_connections,
        )
    try:
        await _exactness_on_every_node(cluster, client, prefix, per_node)
    finally:
        if max_connections is not None:
            await client.aclose()


async def warm_scripts(engine: QuotaEngine, prefix: str) -> None:
    """One reserve and refund: a cold script cache is loaded (on every master) and the
    cluster client has found its nodes before the burst."""
    plan = make_plan(included=None)
    period = engine.period(None, None)
    decision, res = await engine.reserve("warm-up", plan, period, 1, None)
    assert decision.outcome is Outcome.ALLOWED and res is not None, decision
    await engine.settle(res, commit=False)


async def _exactness_on_every_node(
    cluster: Cluster, client: RedisCluster, prefix: str, per_node: int
) -> None:
    spread = spread_tenants(cluster, per_node=per_node)
    tenants = [t for ts in spread.values() for t in ts]
    clock = aligned_clock()
    # fail closed: a store error (CROSSSLOT, MOVED...) would show as UNAVAILABLE, not pass.
    engine, storage, guard = build_engine(client, prefix, clock, fail_open=False)  # type: ignore[arg-type]
    await warm_scripts(engine, prefix)
    plan = make_plan(included=5)
    period = engine.period(None, None)

    async def one(tenant: str) -> tuple[str, Outcome, int, Reservation | None]:
        decision, res = await engine.reserve(tenant, plan, period, 1, None)
        return tenant, decision.outcome, decision.used, res

    results = await asyncio.gather(*(one(t) for t in tenants for _ in range(40)))
    assert Counter(o for _, o, _, _ in results) == {
        Outcome.ALLOWED: 5 * len(tenants),
        Outcome.REFUSED_QUOTA: 35 * len(tenants),
    }
    for tenant in tenants:
        mine = [(o, used, r) for t, o, used, r in results if t == tenant]
        allowed = sorted(used for o, used, _ in mine if o is Outcome.ALLOWED)
        assert allowed == [1, 2, 3, 4, 5], (tenant, allowed)
        assert {used for o, used, _ in mine if o is Outcome.REFUSED_QUOTA} == {5}
        assert await storage.used(tenant, period.start) == 5
        assert await storage.held(tenant) == 5
    assert guard.state is BreakerState.CLOSED

    # Each tenant's counter and reservations are on its own master, and only there.
    keys = KeySpace(prefix)
    for port, owned in spread.items():
        node = cluster.node(port)
        try:
            for tenant in tenants:
                counter = keys.used(tenant, period.start)
                mine_here = tenant in owned
                if mine_here:
                    assert node.get(counter) == "5"
                    assert node.zcard(keys.reservations(tenant)) == 5
                else:
                    with pytest.raises(MovedError):  # the node redirects: not its slot
                        node.get(counter)
        finally:
            node.close()

    await asyncio.gather(
        *(engine.settle(r, commit=True) for _, o, _, r in results if r is not None)
    )
    for tenant in tenants:
        assert await storage.used(tenant, period.start) == 5
        assert await storage.held(tenant) == 0
    assert guard.state is BreakerState.CLOSED


async def test_every_quota_operation_on_every_master(
    cluster: Cluster, client: RedisCluster, prefix: str
) -> None:
    """Refund, commit, GCRA refusal and reaping of a dead reservation, for one tenant per
    master, interleaved: every figure exact on every node."""
    spread = spread_tenants(cluster, per_node=1)
    tenants = [ids[0] for ids in spread.values()]
    clock = aligned_clock()
    engine, storage, guard = build_engine(
        client,  # type: ignore[arg-type]
        prefix,
        clock,
        fail_open=False,
        reservation_ttl_s=60,
    )
    plan = make_plan(included=10, rate=(2, 3), weights={"big": 3})
    period = engine.period(None, None)

    async def scenario(tenant: str) -> None:
        d1, r1 = await engine.reserve(tenant, plan, period, 1, None)
        d2, r2 = await engine.reserve(tenant, plan, period, 1, "big")
        d3, r3 = await engine.reserve(tenant, plan, period, 1, None)
        assert [d.outcome for d in (d1, d2, d3)] == [Outcome.ALLOWED] * 3
        assert (d1.used, d2.used, d3.used) == (1, 4, 5)
        d4, r4 = await engine.reserve(tenant, plan, period, 1, None)  # burst of 3 spent
        assert (d4.outcome, d4.retry_after_ms, r4) == (Outcome.REFUSED_RATE, 500, None)
        assert r1 is not None and r2 is not None and r3 is not None
        assert await storage.settle(r2, commit=False) is True  # refund the 3 units
        assert await storage.settle(r1, commit=True) is True
        assert await storage.used(tenant, period.start) == 2
        assert await storage.held(tenant) == 1  # r3: its holder "dies"

    await asyncio.gather(*(scenario(t) for t in tenants))
    clock.advance(60)  # r3's deadline: the next reserve reaps it into its own period
    for tenant in tenants:
        d, r = await engine.reserve(tenant, plan, period, 1, None)
        assert (d.outcome, d.used) == (Outcome.ALLOWED, 2)  # 2 - 1 reaped + 1
        assert await storage.held(tenant) == 1
        assert r is not None
        await engine.settle(r, commit=True)
        assert await storage.used(tenant, period.start) == 2
        assert await storage.held(tenant) == 0
    assert guard.state is BreakerState.CLOSED


async def test_cold_script_cache_under_load(
    cluster: Cluster, client: RedisCluster, prefix: str
) -> None:
    """A master's script cache is empty after a restart or a failover. 240 concurrent
    reserves (6 tenants, 80 per master) then each get NOSCRIPT. Were each to SCRIPT LOAD on
    its own (it goes to all three masters), that would be 240 concurrent commands per node on
    a 100-connection pool: they share one load instead, and every figure stays exact."""
    cluster.cold_scripts()
    spread = spread_tenants(cluster, per_node=2)
    tenants = [t for ts in spread.values() for t in ts]
    engine, _, guard = build_engine(client, prefix, aligned_clock(), fail_open=False)  # type: ignore[arg-type]
    plan = make_plan(included=5)
    period = engine.period(None, None)
    results = await asyncio.gather(
        *(engine.reserve(t, plan, period, 1, None) for t in tenants for _ in range(40))
    )
    outcomes = Counter(d.outcome for d, _ in results)
    assert outcomes == {Outcome.ALLOWED: 30, Outcome.REFUSED_QUOTA: 210}, outcomes
    assert guard.state is BreakerState.CLOSED
    assert [cluster.script_loads(port) for port in cluster.ports] == [1, 1, 1]


async def test_batched_commits_across_masters(
    cluster: Cluster, client: RedisCluster, prefix: str
) -> None:
    spread = spread_tenants(cluster, per_node=2)
    tenants = [t for ts in spread.values() for t in ts]
    engine, storage, _ = build_engine(client, prefix, aligned_clock())  # type: ignore[arg-type]
    plan = make_plan(included=10)
    period = engine.period(None, None)
    for tenant in tenants:
        for _ in range(3):
            decision, res = await engine.reserve(tenant, plan, period, 1, None)
            assert decision.outcome is Outcome.ALLOWED and res is not None
            engine.commit_later(res)
    await engine.flush()
    for tenant in tenants:
        assert await storage.held(tenant) == 0
        assert await storage.used(tenant, period.start) == 3


def cluster_config(cluster: Cluster, prefix: str, **redis: Any) -> Config:
    return parse_config(
        {"redis": {"url": cluster.seed, "key_prefix": prefix, "cluster": True, **redis}}, ENV
    )


async def test_serve_store_clients_on_a_cluster(cluster: Cluster, prefix: str) -> None:
    """What `serve` builds from its config, pointed at one node of the cluster: a cluster
    client (a plain one would get MOVED for every tenant another master owns), no pipelined
    connection (it speaks to one node), and a listener on the seed node."""
    config = cluster_config(cluster, prefix)
    stores = connect(config.redis)
    assert isinstance(stores.main, RedisCluster)
    assert stores.quota is None
    assert not isinstance(stores.listener, RedisCluster)
    assert stores.listener.get_connection_kwargs()["port"] == cluster.ports[0]
    try:
        engine, storage, guard = build_engine(stores.main, prefix, aligned_clock(), fail_open=False)
        plan = make_plan(included=5)
        period = engine.period(None, None)
        spread = spread_tenants(cluster, per_node=1)
        outcomes = {}
        for ids in spread.values():
            decision, res = await engine.reserve(ids[0], plan, period, 1, None)
            outcomes[ids[0]] = decision.outcome
            if res is not None:
                engine.commit_later(res)
        assert set(outcomes.values()) == {Outcome.ALLOWED}, outcomes
        await engine.flush()
        for ids in spread.values():
            assert await storage.held(ids[0]) == 0
        assert guard.state is BreakerState.CLOSED
        assert await stores.main.scard(KeySpace(prefix).tenant_index()) == 0  # startup_checks
    finally:
        await stores.close()


# --- 3. what serve builds on a cluster --------------------------------------------------------


async def test_cluster_errors_are_store_failures_to_the_guard() -> None:
    """No node answers: redis-py raises RedisClusterUnreachableError, which is not a
    RedisError. The guard turns it into StoreUnavailable and counts it towards the breaker."""
    (port,) = free_ports(1)  # nothing listens there
    config = parse_config(
        {"redis": {"url": f"redis://127.0.0.1:{port}/0", "cluster": True, "timeout_ms": 200}},
        ENV,
    )
    stores = connect(config.redis)
    clock = ManualClock()
    guard = StoreGuard(CircuitBreaker(2, 60.0, clock.monotonic), timeout=2.0)
    try:
        for _ in range(2):
            with pytest.raises(StoreUnavailable, match="RedisClusterUnreachableError"):
                await guard.run(lambda: stores.main.get("mqp:anything"))
        assert guard.state is BreakerState.OPEN
        with pytest.raises(StoreUnavailable, match="circuit open"):
            await guard.run(lambda: stores.main.get("mqp:anything"))
    finally:
        await stores.close()


async def test_a_burst_beyond_the_pool_waits_for_a_connection(
    cluster: Cluster, prefix: str
) -> None:
    """redis-py's cluster pool raises MaxConnectionsError past `max_connections` per node;
    the client `connect` builds makes the burst wait its turn instead (the guard's deadline
    still bounds the wait), as the single-node BlockingConnectionPool does."""
    owner = cluster.owners()[key_slot(b"burst")]
    key = KeySpace(prefix).used("burst", 0)  # one tenant: one master takes the whole burst
    plain = RedisCluster(host="127.0.0.1", port=owner, decode_responses=True, max_connections=4)
    queued = QueuedRedisCluster(
        host="127.0.0.1", port=owner, decode_responses=True, max_connections=4
    )
    try:
        raced = await asyncio.gather(*(plain.incr(key) for _ in range(50)), return_exceptions=True)
        failed = [r for r in raced if isinstance(r, BaseException)]
        assert failed and all(isinstance(r, MaxConnectionsError) for r in failed), raced
        before = int(await queued.get(key) or 0)
        assert before == 50 - len(failed)
        counts = await asyncio.gather(*(queued.incr(key) for _ in range(50)))
        assert sorted(counts) == list(range(before + 1, before + 51))
        node = queued.get_node_from_key(key)
        assert node is not None and len(node._connections) <= 4  # never more opened
    finally:
        await plain.aclose()
        await queued.aclose()


async def test_startup_loads_both_scripts_on_every_master(cluster: Cluster, prefix: str) -> None:
    cluster.cold_scripts()
    assert not cluster.scripts_cached(QUOTA_SCRIPTS)
    c = build_components(cluster_config(cluster, prefix), sink=MemorySink())
    try:
        with structlog.testing.capture_logs() as logs:
            await startup_checks(c)
    finally:
        await c.stores.close()
    assert [e["event"] for e in logs] == ["tenant_store_empty"], logs  # reached, no error
    assert cluster.scripts_cached(QUOTA_SCRIPTS)


async def test_a_single_node_config_on_a_cluster_node_says_what_to_set(
    cluster: Cluster, prefix: str
) -> None:
    """Without `redis.cluster: true`, a cluster node answers MOVED for the slots it does not
    own; start-up says which setting is missing instead of only "unreachable"."""
    index = KeySpace(prefix).tenant_index()
    other = next(p for p in cluster.ports if p != cluster.owners()[key_slot(index.encode())])
    config = parse_config(
        {"redis": {"url": f"redis://127.0.0.1:{other}/0", "key_prefix": prefix}}, ENV
    )
    c = build_components(config, sink=MemorySink())
    try:
        with structlog.testing.capture_logs() as logs:
            await startup_checks(c)
    finally:
        await c.stores.close()
    (event,) = logs
    assert (event["event"], event["error"]) == ("tenant_store_unreachable", "MovedError")
    assert "set redis.cluster: true" in event["message"]


async def make_tenants(
    cluster: Cluster, prefix: str, tenants: list[str], plan: str
) -> dict[str, str]:
    """Create the tenants and one key each through the TenantStore the CLI uses, on the
    cluster; tenant -> key."""
    stores = connect(cluster_config(cluster, prefix, timeout_ms=2000).redis)
    try:
        admin = TenantStore(stores.main, KeySpace(prefix), PEPPER, "mqp_")
        keys = {}
        for tenant in tenants:
            await admin.create(tenant, name=None, plan=plan, stripe_customer=None, now=0)
            keys[tenant], _ = await admin.issue_key(tenant, label="cluster", now=0)
        return keys
    finally:
        await stores.close()


async def test_webhook_changes_reach_a_directory_listening_on_one_node(
    cluster: Cluster, prefix: str
) -> None:
    """The Directory trusts its cache while it is subscribed; on a cluster it subscribes
    through a plain connection to the seed node. The webhook script (apply_event.lua) runs on
    each tenant's own master and PUBLISHes there: the cluster bus carries it to the seed node,
    so every cached tenant, whichever master holds it, sees its new plan."""
    tenants = [ids[0] for ids in spread_tenants(cluster, per_node=1).values()]
    keys = await make_tenants(cluster, prefix, tenants, plan="small")
    space = KeySpace(prefix)
    stores = connect(cluster_config(cluster, prefix, timeout_ms=2000).redis)
    clock = ManualClock()
    guard = StoreGuard(CircuitBreaker(3, 5.0, clock.monotonic), timeout=2.0)
    directory = Directory(stores.main, stores.listener, space, PEPPER, guard)
    await directory.start()
    try:
        assert directory.live
        for tenant in tenants:
            found, degraded = await directory.authenticate(keys[tenant])
            assert found is not None and (found.plan, degraded) == ("small", False)
        script = files("proxy.billing").joinpath("lua", "apply_event.lua").read_text("utf-8")
        apply_event = stores.main.register_script(script)
        for tenant in tenants:
            event = f"evt_{tenant}"
            # event id, created, subscription, terminal, mode, ledger TTL, channel; tenant
            args: list[str | int] = [event, 1, "", 0, "subscription", 60, space.invalidations()]
            result = await apply_event(
                keys=[space.tenant(tenant), space.webhook_event(tenant, event)],
                args=[*args, tenant, "plan", "large", "status", "active"],
            )
            assert result == "applied"

        async def all_upgraded() -> bool:
            for tenant in tenants:
                found, _ = await directory.authenticate(keys[tenant])
                if found is None or found.plan != "large":
                    return False
            return True

        await until(all_upgraded, 5, "every cached tenant to see its new plan")
        assert directory.live
    finally:
        await directory.stop()
        await stores.close()


async def test_serve_on_the_cluster_end_to_end(
    cluster: Cluster,
    prefix: str,
    serves: ServeFactory,
    scripted: tuple[ScriptedUpstream, str],
    stripe_fake: StripeFake,
) -> None:
    """A real `python -m proxy serve` with `redis.cluster: true`, seeded with one node, one
    tenant on each master, `fail_mode: closed` (a store error would refuse, never admit):
    start-up loads the scripts on every master; exactly the limit succeeds per tenant; every
    reservation is released; a plan changed by the CLI (another process) is enforced."""
    upstream, upstream_url = scripted
    tenants = [ids[0] for ids in spread_tenants(cluster, per_node=1).values()]
    keys = await make_tenants(cluster, prefix, tenants, plan="small")
    cluster.cold_scripts()
    config = serve_config(
        upstream_url=upstream_url,
        key_prefix=prefix,
        plans={"small": {"included_units": 3}, "large": {"included_units": 6}},
        redis_section={"cluster": True, "timeout_ms": 2000, "fail_mode": "closed"},
    )
    proxy = serves("cluster", config, serve_env(cluster.seed, stripe_fake))
    proxy.start()
    rids = itertools.count()
    owner: dict[str, str] = {}

    async def call(http: aiohttp.ClientSession, tenant: str) -> Any:
        rid = f"r{next(rids)}"
        owner[rid] = tenant
        return await tool_call(http, proxy.url, keys[tenant], rid)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        await proxy.ready(http)
        await until(lambda: cluster.scripts_cached(QUOTA_SCRIPTS), 10, "scripts on every master")
        assert (await proxy.readyz(http))["components"]["redis"] == "ok"

        replies = await asyncio.gather(*(call(http, t) for t in tenants for _ in range(5)))
        for tenant in tenants:
            mine = [r for r in replies if owner[r.rid] == tenant]
            assert (sum(r.ok for r in mine), sum(r.refused for r in mine)) == (3, 2), [
                (r.status, r.doc, r.error) for r in mine
            ]
        storage_keys = KeySpace(prefix)
        rc = RedisCluster(host="127.0.0.1", port=cluster.ports[0], decode_responses=True)
        try:

            async def released() -> bool:
                held = [await rc.zcard(storage_keys.reservations(t)) for t in tenants]
                return held == [0, 0, 0]

            await until(released, 10, "the batched commits to release every reservation")
            period_start = calendar_month(time.time()).start  # the tenants have no Stripe period
            for tenant in tenants:
                assert await rc.get(storage_keys.used(tenant, period_start)) == "3"
        finally:
            await rc.aclose()

        upgraded = tenants[1]
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "tenant", "set-plan", upgraded, "large",
            cwd=proxy.dir, env=proxy.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await cli.communicate()
        assert cli.returncode == 0, err.decode()
        assert "is now on plan large" in out.decode()
        await until(lambda: _ok(call(http, upgraded)), 5, "serve to enforce the new plan")
        assert (await call(http, tenants[0])).refused  # the others keep theirs

    assert await proxy.stop() == 0
    ok = {r.rid for r in replies if r.ok}
    rows = spool_rows(proxy.spool)
    assert len(rows) == len(ok) + 1 and ok < {r.request_id for r in rows}
    assert not any(r.degraded for r in rows)
    assert len(upstream.calls()) == len(rows)  # refusals never reach the upstream
    events = Counter(e.get("event") for e in proxy.logs())
    for bad in ("tenant_store_unreachable", "quota_commit_retry", "quota_settle_failed"):
        assert events[bad] == 0, events


async def _ok(reply: Coroutine[Any, Any, Any]) -> bool:
    return bool((await reply).ok)
