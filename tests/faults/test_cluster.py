"""The quota contract on a real 3-master Redis Cluster (loopback, no replicas).

1. Every test of tests/contract/test_quota_contract.py that runs on a `rig` runs here
   unchanged, with the rig's client a `redis.asyncio.cluster.RedisCluster`: block, exactness,
   refunds, idempotency, weights, overage, GCRA, reaping, periods, expiry, hash tags, batched
   commits.
2. Tenants chosen so their hash tags land on all three masters (checked against the servers'
   own CLUSTER KEYSLOT and CLUSTER NODES, and by reading each key on the node that owns it):
   concurrent exactness per tenant, every operation on every node, no CROSSSLOT error.
3. The gaps, as strict xfails (they turn into failures, so the marks go, once fixed):
   - batched commits (`QuotaStorage.commit_many`) use a pipeline of EVALSHA, which redis-py's
     ClusterPipeline refuses (`RedisClusterException`, not a `RedisError`, so the StoreGuard
     does not catch it either);
   - `proxy.store.connect` only builds a plain `Redis` client: `serve` cannot use a cluster.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import shutil
import subprocess
import tempfile
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import MovedError, RedisClusterException

from proxy.breaker import BreakerState
from proxy.clock import ManualClock
from proxy.config import parse_config
from proxy.keys import KeySpace
from proxy.quota.engine import QuotaEngine
from proxy.quota.policy import Outcome, Period
from proxy.quota.storage import Reservation
from proxy.store import connect
from tests.conftest import PEPPER
from tests.contract import test_quota_contract as contract
from tests.contract.conftest import Rig, aligned_clock, build_engine, make_plan
from tests.faults.conftest import free_ports, need, wait_for

pytestmark = [pytest.mark.redis, pytest.mark.timeout(240)]

SLOTS = 16384
GAP_PIPELINE = (
    "GAP: QuotaStorage.commit_many pipelines EVALSHA; redis-py's ClusterPipeline blocks "
    "EVALSHA (PIPELINE_BLOCKED_COMMANDS) and raises RedisClusterException, which StoreGuard "
    "does not catch"
)
GAP_COLD_SCRIPTS = (
    "GAP: on NOSCRIPT every concurrent caller SCRIPT LOADs (fanned out to all masters): "
    "MaxConnectionsError, calls refused or degraded; preload at start-up and single-flight it"
)
GAP_CONNECT = (
    "GAP: no redis.cluster setting; proxy.store.connect builds redis.asyncio.Redis only, and a "
    "cluster node answers MOVED for every tenant whose slot another master owns"
)


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
            text = str(client.execute_command("CLUSTER", "INFO"))
        except redis.RedisError:
            return {}
        finally:
            client.close()
        return dict(line.split(":", 1) for line in text.split() if ":" in line)

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
            ranges = client.execute_command("CLUSTER", "SLOTS")
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
            return int(client.execute_command("CLUSTER", "KEYSLOT", key))
        finally:
            client.close()


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
    _copy = _on_cluster(getattr(contract, _name))
    if _name == "test_batched_commits_release_reservations_without_recounting":
        # flush() raises the committer's error, or (if that task had already died unseen)
        # returns with the reservations still held: either way the commits never happen.
        _copy = pytest.mark.xfail(
            strict=True, raises=(RedisClusterException, AssertionError), reason=GAP_PIPELINE
        )(_copy)
    globals()[_name] = _copy


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
                assert client.get_node_from_key(key).port == port
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
    """One reserve and refund: the NOSCRIPT fallback SCRIPT LOADs both scripts on every
    master (what a start-up preload would do; see test_cold_script_cache_under_load)."""
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


@pytest.mark.xfail(strict=True, reason=GAP_COLD_SCRIPTS)
async def test_cold_script_cache_under_load(
    cluster: Cluster, client: RedisCluster, prefix: str
) -> None:
    """A master's script cache is empty after a restart or a failover. 240 concurrent
    reserves (6 tenants, 80 per master) then each get NOSCRIPT, and each fallback SCRIPT LOAD
    fans out to all three masters: 240 concurrent commands per node on a 100-connection pool."""
    for port in cluster.ports:  # this test's own cluster: only the script cache is flushed
        node = cluster.node(port)
        try:
            node.script_flush()
        finally:
            node.close()
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


@pytest.mark.xfail(strict=True, raises=(RedisClusterException, AssertionError), reason=GAP_PIPELINE)
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


@pytest.mark.xfail(strict=True, reason=GAP_CONNECT)
async def test_serve_store_clients_on_a_cluster(cluster: Cluster, prefix: str) -> None:
    """What `serve` builds from its config, pointed at one node of the cluster. Today
    `redis.cluster` is an unknown key; without it `connect` returns a plain client, which
    the node answers MOVED for every tenant another master owns (fail open: DEGRADED)."""
    config = parse_config(
        {
            "redis": {
                "url": f"redis://127.0.0.1:{cluster.ports[0]}/0",
                "key_prefix": prefix,
                "cluster": True,
            }
        },
        {"MQP_KEY_PEPPER": PEPPER},
    )
    stores = connect(config.redis)
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
