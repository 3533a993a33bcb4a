"""Soak: mixed traffic through real `serve` processes while faults come and go, then the
billing and quota invariants. Not collected by pytest; run by hand or on a schedule:

    python -m tests.soak --minutes 10            # from the repository root

What runs (all on 127.0.0.1, all in a temporary directory removed at the end):
  * a private redis-server with AOF (appendfsync always), SIGKILLed and restarted as a fault;
  * the Stripe fake and the scripted MCP upstream, in this process;
  * --replicas `python -m proxy serve` processes (each with its drainer child and spool);
  * --workers clients: tools/call (JSON and SSE), tools/list, calls that end in a JSON-RPC
    error, for several tenants, plus signed Stripe webhooks (each delivered twice, to two
    replicas, and redelivered on 5xx as Stripe would).
Every --fault-interval seconds (the first after half an interval) the next fault in rotation:
Redis SIGKILL + restart, Stripe answering 500 for 10 s, a serve SIGKILLed (with its drainer)
and restarted, Stripe answering 429 for 10 s, Stripe unreachable for 10 s.

After --minutes the traffic stops and a bounded drain phase starts: faults are cleared, every
reservation a fault may have orphaned passes its deadline (redis.reservation_ttl_s, 60 s min)
and is reaped by one probe call per tenant, the drainers empty the spools, and the serves get
SIGTERM. Then the checks, each PASS or FAIL; the exit status is 1 if any failed:
  1. billed == spooled: what the fake accepted per customer equals the billable units spooled;
  2. every success the clients saw is spooled, and everything spooled is a success or in doubt
     (the client lost the answer): successes <= spooled <= successes + in doubt;
  3. no duplicate: no request spooled twice, no meter-event identifier accepted twice;
  4. Redis counters == committed units per tenant (spooled units not decided degraded), or
     below it by at most the reservations Redis reaped and never saw committed (their serve was
     SIGKILLed between spooling and the batched commit);
  5. no reservation held;
  6. webhooks: no event applied twice, each acknowledged, each tenant on its newest event's plan;
  7. every serve exited 0 on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis
import redis.asyncio
from aiohttp import web

from proxy.keys import KeySpace
from tests.fakes.stripe_fake import Fault, StripeFake
from tests.fakes.upstream import ScriptedUpstream
from tests.ops_support import (
    RedisProcess,
    Serve,
    create_tenant,
    free_ports,
    make_serve,
    poll,
    post_webhook,
    sign_webhook,
    spool_rows,
    stripe_event,
    unreported,
)

PEPPER = "soak-pepper-0123456789abcdef"
STRIPE_KEY = "sk_test_soak_0123456789"
WEBHOOK_SECRET = "whsec_soak_0123456789abcdef"
METER = "mcp_tool_calls"
KEY_PREFIX = "soak"
RESERVATION_TTL_S = 60  # the smallest redis.reservation_ttl_s the config accepts
FAULT_SECONDS = 10.0  # how long a Stripe fault lasts
REQUEST_TIMEOUT_S = 15.0
DRAIN_LIMIT_S = 150.0  # the drain phase's own bound, on top of the reservation deadline
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
PLANS = ("pro", "plus")
FAULTS = ("redis_restart", "stripe_500", "proxy_kill", "stripe_429", "stripe_down")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- processes ---------------------------------------------------------------------------------


async def start_replica(replica: Serve, http: aiohttp.ClientSession) -> None:
    replica.start()
    await replica.ready(http, 30)


async def terminate(replica: Serve, limit: float = 60) -> int | None:
    """SIGTERM and its exit code; None if it was not running or had to be killed."""
    if replica.proc is None:
        return None
    try:
        return await replica.stop(limit)
    except AssertionError:  # it did not exit within the limit
        replica.kill()
        return None


def log_tail(replica: Serve, lines: int) -> list[str]:
    path = replica.log_path
    text = path.read_text(errors="replace") if path.exists() else ""
    return [line[:300] for line in text.splitlines()[-lines:]]


def log_sum(replica: Serve, event: str, key: str) -> int:
    """Sum of one numeric field over the log lines of one event."""
    return sum(int(doc.get(key) or 0) for doc in replica.events(event))


def log_counts(replica: Serve, names: tuple[str, ...]) -> Counter[str]:
    counts: Counter[str] = Counter()
    path = replica.log_path
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            doc = json.loads(line)
        except ValueError:
            counts["(non-JSON line)"] += 1
            continue
        if isinstance(doc, dict):
            if doc.get("event") in names:
                counts[str(doc["event"])] += 1
            if doc.get("level") == "error":
                counts[f"error:{doc.get('event', '')[:60]}"] += 1
    return counts


# --- traffic -----------------------------------------------------------------------------------


@dataclass
class Tenant:
    id: str
    customer: str
    key: str
    webhook_created: int = 0
    last_plan: str | None = None  # the plan of the newest webhook event sent


@dataclass
class CallRecord:
    rid: str
    tenant: str
    tool: str
    replica: str
    outcome: str  # ok | nonbillable | refused | clean_error | in_doubt
    detail: str = ""
    t: float = 0.0  # when it was sent, seconds since traffic started


@dataclass
class WebhookRecord:
    event_id: str
    tenant: str
    plan: str
    created: int
    results: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class Ledger:
    calls: list[CallRecord] = field(default_factory=list)
    lists: Counter[str] = field(default_factory=Counter)
    webhooks: list[WebhookRecord] = field(default_factory=list)
    faults: list[tuple[float, str, str]] = field(default_factory=list)  # (t, fault, note)


def _responses(raw: bytes, ctype: str) -> list[dict[str, Any]]:
    if ctype.startswith("text/event-stream"):
        docs = []
        for line in raw.decode("utf-8", "replace").splitlines():
            if line.startswith("data:") and line[5:].strip():
                with contextlib.suppress(ValueError):
                    docs.append(json.loads(line[5:]))
        return [d for d in docs if isinstance(d, dict)]
    doc = json.loads(raw)
    return doc if isinstance(doc, list) else [doc]


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.rng = random.Random(args.seed)
        self.ledger = Ledger()
        self.fake = StripeFake()
        self.upstream = ScriptedUpstream()
        (port,) = free_ports(1)
        self.redis = RedisProcess(port, workdir / "redis", persistent=True)
        self.replicas: list[Serve] = []
        self.tenants: list[Tenant] = []
        self.stop_traffic = asyncio.Event()
        self.seq = 0
        self.traffic_end = 0.0
        self.started = time.monotonic()
        self.period_start = int(time.time()) - 86400
        self.exit_codes: dict[str, int | None] = {}
        self._upstream_runner: web.AppRunner | None = None
        self._fault_tasks: set[asyncio.Task[None]] = set()
        self._active_stripe_fault: Fault | None = None

    # --- set-up and teardown ----------------------------------------------------------------

    async def setup(self, http: aiohttp.ClientSession) -> None:
        if shutil.which("redis-server") is None:
            raise SystemExit("redis-server is not installed (apt-get install redis-server)")
        (self.workdir / "redis").mkdir()
        await asyncio.to_thread(self.redis.start, 20)
        await self.fake.start()
        self.fake.add_meter(METER)
        runner = web.AppRunner(self.upstream.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._upstream_runner = runner
        upstream_url = f"http://127.0.0.1:{runner.addresses[0][1]}"

        for i in range(self.args.tenants):
            customer = self.fake.add_customer(name=f"soak-{i}")["id"]
            tid = f"tenant-{i}"
            key = await create_tenant(
                self.redis.url,
                KEY_PREFIX,
                tid,
                plan="pro",
                customer=customer,
                label="soak",
                pepper=PEPPER,
            )
            self.tenants.append(Tenant(tid, customer, key))

        plans = {
            name: {
                "included_units": 1_000_000_000,
                "overage": "bill",
                "stripe_lookup_keys": [f"mqp_{name}"],
            }
            for name in PLANS
        }
        for i in range(self.args.replicas):
            name = f"r{i}"
            config = {
                "upstream": {"url": upstream_url},
                "redis": {"key_prefix": KEY_PREFIX, "reservation_ttl_s": RESERVATION_TTL_S},
                "plans": plans,
                "default_plan": "pro",
                "spool": {"replica_id": name},  # make_serve adds the path
                "drain": {"interval_s": 0.5, "max_calls_per_second": 200},
                "billing": {"enabled": True, "meter_event_name": METER},
                "ops": {"readiness_delay_s": 0, "shutdown_grace_s": 15},
                "log_level": "warning",
            }
            env = {
                "REDIS_URL": self.redis.url,
                "MQP_KEY_PEPPER": PEPPER,
                "STRIPE_SECRET_KEY": STRIPE_KEY,
                "STRIPE_API_BASE": self.fake.url,
                "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
            }
            replica = make_serve(self.workdir, name, config, env)
            await start_replica(replica, http)
            self.replicas.append(replica)

    async def teardown(self) -> None:
        for task in list(self._fault_tasks):
            task.cancel()
        for replica in self.replicas:
            replica.kill()
        self.redis.kill()
        with contextlib.suppress(Exception):
            await self.fake.stop()
        if self._upstream_runner is not None:
            await self._upstream_runner.cleanup()

    # --- traffic ----------------------------------------------------------------------------

    def _replica(self) -> Serve:
        live = [r for r in self.replicas if r.alive()] or self.replicas
        return self.rng.choice(live)

    async def tool_call(self, http: aiohttp.ClientSession, tenant: Tenant, tool: str) -> None:
        self.seq += 1
        rid = f"{tenant.id}-{self.seq}"
        replica = self._replica()
        body = {
            "jsonrpc": "2.0",
            "id": rid,
            "method": "tools/call",
            "params": {"name": tool, "arguments": {"n": self.seq}},
        }
        headers = {**ACCEPT, "Authorization": f"Bearer {tenant.key}", "X-Request-Id": rid}
        record = CallRecord(
            rid, tenant.id, tool, replica.name, "in_doubt", t=time.monotonic() - self.started
        )
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                async with http.post(replica.url, json=body, headers=headers) as r:
                    raw = await r.read()
                    ctype = r.headers.get("Content-Type", "")
                    status = r.status
            if status != 200:
                doc = json.loads(raw) if ctype.startswith("application/json") else None
                clean = isinstance(doc, dict) and isinstance(doc.get("error"), dict)
                # The proxy's own JSON-RPC errors (401, 502, 503...) are decided before or
                # instead of forwarding: nothing was spooled. Anything else: unknown.
                record.outcome = "clean_error" if clean else "in_doubt"
                record.detail = f"HTTP {status}"
            else:
                mine = [m for m in _responses(raw, ctype) if m.get("id") == rid]
                if not mine:
                    record.detail = "200 without a result (truncated)"
                elif "error" in mine[0]:
                    record.outcome, record.detail = "nonbillable", "rpc error"
                elif mine[0]["result"].get("isError") is True:
                    text = json.dumps(mine[0]["result"])
                    record.outcome = "refused" if "Quota" in text else "nonbillable"
                else:
                    record.outcome = "ok"
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            record.detail = type(exc).__name__
        self.ledger.calls.append(record)

    async def list_call(self, http: aiohttp.ClientSession, tenant: Tenant) -> None:
        replica = self._replica()
        body = {"jsonrpc": "2.0", "id": "l", "method": "tools/list"}
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                headers = {**ACCEPT, "Authorization": f"Bearer {tenant.key}"}
                async with http.post(replica.url, json=body, headers=headers) as r:
                    await r.read()
                    self.ledger.lists[f"HTTP {r.status}"] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.ledger.lists[type(exc).__name__] += 1

    async def worker(self, http: aiohttp.ClientSession) -> None:
        actions = [("add", 10), ("sse_ok", 4), ("list", 3), ("rpc_error", 1), ("tool_error", 1)]
        names = [a for a, _ in actions]
        weights = [w for _, w in actions]
        while not self.stop_traffic.is_set():
            tenant = self.rng.choice(self.tenants)
            action = self.rng.choices(names, weights)[0]
            if action == "list":
                await self.list_call(http, tenant)
            else:
                await self.tool_call(http, tenant, action)
            await asyncio.sleep(self.rng.uniform(0, 0.02))  # pacing, not synchronisation

    # --- webhooks ---------------------------------------------------------------------------

    def _event(self, tenant: Tenant, plan: str) -> tuple[str, bytes, int]:
        tenant.webhook_created += 1
        created = tenant.webhook_created
        evt_id = f"evt_{tenant.id}_{created}"
        sub = {
            "id": f"sub_{tenant.id}",
            "object": "subscription",
            "customer": tenant.customer,
            "status": "active",
            "metadata": {},
            "items": {
                "object": "list",
                "data": [
                    {
                        "id": "si_1",
                        "price": {"id": f"price_{plan}", "lookup_key": f"mqp_{plan}"},
                        # One subscription period for the whole soak: the tenant's quota
                        # period changes once, at its first event (Stripe renews monthly).
                        "current_period_start": self.period_start,
                        "current_period_end": self.period_start + 30 * 86400,
                    }
                ],
            },
        }
        body = stripe_event(evt_id, "customer.subscription.updated", created, sub)
        return evt_id, body, created

    async def deliver(
        self, http: aiohttp.ClientSession, record: WebhookRecord, body: bytes
    ) -> None:
        """Deliver until a 2xx, like Stripe (which retries for days; bounded here)."""
        for _ in range(60):
            replica = self._replica()
            header = sign_webhook(body, WEBHOOK_SECRET)
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    status, doc = await post_webhook(
                        http, replica.base, body, header, content_type=None
                    )
                record.results.append((status, str(doc.get("result"))))
                if status < 300:
                    return
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                record.results.append((0, type(exc).__name__))
            await asyncio.sleep(0.5)  # Stripe's retry backoff, much shortened

    async def webhooks(self, http: aiohttp.ClientSession) -> None:
        while not self.stop_traffic.is_set():
            tenant = self.rng.choice(self.tenants)
            plan = PLANS[(tenant.webhook_created + 1) % 2]
            evt_id, body, created = self._event(tenant, plan)
            record = WebhookRecord(evt_id, tenant.id, plan, created)
            tenant.last_plan = plan
            self.ledger.webhooks.append(record)
            # Stripe may deliver one event more than once, to whichever replica.
            await asyncio.gather(self.deliver(http, record, body), self.deliver(http, record, body))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.rng.uniform(1.0, 3.0)):
                    await self.stop_traffic.wait()

    # --- faults -----------------------------------------------------------------------------

    def _note(self, fault: str, note: str) -> None:
        t = time.monotonic() - self.started
        self.ledger.faults.append((t, fault, note))
        log(f"fault {fault}: {note}")

    async def _stripe_fault(self, kind: str) -> None:
        if kind == "stripe_down":
            self.fake.set_down(True)
        else:
            status = "status_500" if kind == "stripe_500" else "status_429"
            fault = Fault("POST /v1/billing/meter_events", status, count=None)  # type: ignore[arg-type]
            self._active_stripe_fault = self.fake.inject(fault)
        self._note(kind, f"for {FAULT_SECONDS:.0f} s")
        try:
            await asyncio.sleep(FAULT_SECONDS)
        finally:
            self._clear_stripe()
            self._note(kind, "cleared")

    def _clear_stripe(self) -> None:
        self.fake.set_down(False)
        self.fake.clear_faults()
        self._active_stripe_fault = None

    async def inject(self, kind: str, http: aiohttp.ClientSession, kills: int) -> None:
        if kind == "redis_restart":
            began = time.monotonic()
            await asyncio.to_thread(self.redis.kill)
            self._note(kind, "redis-server SIGKILLed")
            await asyncio.to_thread(self.redis.start, 20)
            self._note(kind, f"back after {time.monotonic() - began:.2f} s (AOF replayed)")
        elif kind == "proxy_kill":
            replica = self.replicas[kills % len(self.replicas)]
            began = time.monotonic()
            await asyncio.to_thread(replica.kill)
            self._note(kind, f"serve {replica.name} and its drainer SIGKILLed")
            await start_replica(replica, http)
            self._note(kind, f"serve {replica.name} back after {time.monotonic() - began:.2f} s")
        else:
            task = asyncio.create_task(self._stripe_fault(kind))
            self._fault_tasks.add(task)
            task.add_done_callback(self._fault_tasks.discard)

    async def faults(self, http: aiohttp.ClientSession) -> None:
        interval = self.args.fault_interval
        order = [f for f in self.args.faults.split(",") if f]
        kills = 0
        n = 0
        next_at = self.started + interval / 2
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_at - time.monotonic())):
                    await self.stop_traffic.wait()
            if self.stop_traffic.is_set():
                return
            kind = order[n % len(order)]
            await self.inject(kind, http, kills)
            kills += kind == "proxy_kill"
            n += 1
            next_at += interval

    # --- the run ----------------------------------------------------------------------------

    async def run(self) -> bool:
        connector = aiohttp.TCPConnector(limit=200)
        async with aiohttp.ClientSession(connector=connector) as http:
            try:
                log(f"setting up in {self.workdir}")
                await self.setup(http)
                self.started = time.monotonic()
                log(
                    f"traffic for {self.args.minutes} min: {self.args.workers} workers, "
                    f"{len(self.tenants)} tenants, {len(self.replicas)} replicas, "
                    f"a fault every {self.args.fault_interval:.0f} s"
                )
                tasks = [asyncio.create_task(self.worker(http)) for _ in range(self.args.workers)]
                tasks.append(asyncio.create_task(self.webhooks(http)))
                faults = asyncio.create_task(self.faults(http))
                # The fault task ends early only if it fails; wait() does not cancel it.
                await asyncio.wait({faults}, timeout=self.args.minutes * 60)
                self.stop_traffic.set()
                await faults
                async with asyncio.timeout(REQUEST_TIMEOUT_S + 40):
                    await asyncio.gather(*tasks)
                self.traffic_end = time.monotonic()
                log(f"traffic stopped after {time.monotonic() - self.started:.0f} s; draining")
                async with asyncio.timeout(DRAIN_LIMIT_S + RESERVATION_TTL_S):
                    await self.drain(http)
                return self.report()
            finally:
                await self.teardown()

    async def drain(self, http: aiohttp.ClientSession) -> None:
        for task in list(self._fault_tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._clear_stripe()
        if self.redis.proc is None:
            await asyncio.to_thread(self.redis.start, 20)
        for replica in self.replicas:
            if not replica.alive():
                await start_replica(replica, http)
        # An orphaned reservation (its serve was killed, or its commit or refund failed while
        # the store was away or slow: that can happen without an injected fault) is refunded
        # once its deadline has passed, by the next reservation of its tenant. Every one was
        # made before the traffic stopped: wait out the deadline, then make that reservation.
        wait = self.traffic_end + RESERVATION_TTL_S + 2 - time.monotonic()
        if wait > 0:
            log(f"waiting {wait:.0f} s for orphaned reservations to pass their deadline")
            await asyncio.sleep(wait)
        for tenant in self.tenants:
            await self.tool_call(http, tenant, "add")  # the reap probe: a call like any other
        client = redis.asyncio.Redis.from_url(self.redis.url, decode_responses=True)
        try:
            keys = KeySpace(KEY_PREFIX)

            async def released() -> bool:
                held = [await client.zcard(keys.reservations(t.id)) for t in self.tenants]
                return sum(held) == 0

            await poll(released, 15, every=0.05)  # what is still held, the checks report
        finally:
            await client.aclose()

        async def drained() -> bool:
            return sum(unreported(r.spool) for r in self.replicas) == 0

        await poll(drained, 90, every=0.05)  # what is left unreported, the checks report
        for replica in self.replicas:
            self.exit_codes[replica.name] = await terminate(replica)

    # --- checks -----------------------------------------------------------------------------

    def report(self) -> bool:
        rows = [row for r in self.replicas for row in spool_rows(r.spool)]
        calls = self.ledger.calls
        by_outcome = Counter(c.outcome for c in calls)
        elapsed = time.monotonic() - self.started
        print()
        print("=" * 78)
        print(
            f"soak: {elapsed:.0f} s, {len(calls)} tool calls, {sum(self.ledger.lists.values())} "
            f"list calls, {len(self.ledger.webhooks)} webhook events"
        )
        print(f"tool calls by outcome: {dict(by_outcome)}")
        details = Counter(c.detail for c in calls if c.outcome in ("in_doubt", "clean_error"))
        print(f"  in doubt / clean errors: {dict(details)}")
        print(f"list calls: {dict(self.ledger.lists)}")
        picks: list[tuple[str, Callable[[CallRecord], bool]]] = [
            ("HTTP 503", lambda c: c.detail == "HTTP 503"),
            ("in doubt", lambda c: c.outcome == "in_doubt"),
        ]
        for label, pick in picks:
            print(f"  {label} at t = {windows([c.t for c in calls if pick(c)])}")
        print("faults:")
        for at, fault, note in self.ledger.faults:
            print(f"  t={at:6.1f}s {fault:14} {note}")
        for replica in self.replicas:
            counts = log_counts(
                replica,
                (
                    "quota_commit_failed",  # older releases: the commit was dropped
                    "quota_commit_retry",
                    "quota_commits_abandoned",  # left at shutdown: the deadline refunds them
                    "quota_settle_failed",
                    "upstream_stream_broken",
                    "invalidation_channel_lost",
                    "meter_event_retry",
                    "drainer_exited",
                ),
            )
            print(
                f"serve {replica.name}: starts={replica.starts} "
                f"exit={self.exit_codes.get(replica.name)} log={dict(counts)}"
            )
            if self.exit_codes.get(replica.name) not in (0, None):
                print(f"  tail of {replica.name}'s log:")
                for line in log_tail(replica, 40):
                    print(f"    {line}")
        print("-" * 78)

        checks: list[tuple[str, bool, str]] = []

        # 1. billed == spooled
        spooled_billable: Counter[str] = Counter()
        for row in rows:
            if row.billable and row.stripe_customer:
                spooled_billable[row.stripe_customer] += row.units
        billed = {t.customer: self.fake.total(t.customer, METER) for t in self.tenants}
        unrep = sum(unreported(r.spool) for r in self.replicas)
        ok1 = all(billed[t.customer] == spooled_billable[t.customer] for t in self.tenants)
        checks.append(
            (
                "billed (Stripe fake) == spooled billable units, per customer",
                ok1 and unrep == 0,
                f"billed={sum(billed.values())} spooled={sum(spooled_billable.values())} "
                f"unreported={unrep}"
                + (
                    "" if ok1 else f" per customer billed={billed} spooled={dict(spooled_billable)}"
                ),
            )
        )

        # 2. successes <= spooled <= successes + in doubt (as sets of request ids)
        spooled_ids = Counter(row.request_id for row in rows)
        ok_ids = {c.rid for c in calls if c.outcome == "ok"}
        doubt_ids = {c.rid for c in calls if c.outcome == "in_doubt"}
        other_ids = {c.rid for c in calls if c.outcome not in ("ok", "in_doubt")}
        missing = ok_ids - set(spooled_ids)
        unexpected = set(spooled_ids) - ok_ids - doubt_ids
        per_tenant = []
        for t in self.tenants:
            s = sum(row.units for row in rows if row.tenant_id == t.id)
            k = sum(1 for c in calls if c.tenant == t.id and c.outcome == "ok")
            d = sum(1 for c in calls if c.tenant == t.id and c.outcome == "in_doubt")
            per_tenant.append((t.id, k, s, k + d, k <= s <= k + d))
        checks.append(
            (
                "received successes <= spooled units <= successes + in doubt, per tenant",
                all(p[4] for p in per_tenant) and not missing and not unexpected,
                "; ".join(f"{tid}: {k} <= {s} <= {kd}" for tid, k, s, kd, _ in per_tenant)
                + (f"; successes not spooled: {sorted(missing)[:5]}" if missing else "")
                + (
                    f"; spooled but refused/errored/unknown: {sorted(unexpected)[:5]}"
                    if unexpected
                    else ""
                )
                + (
                    f" (of which clean errors/non-billable: {len(unexpected & other_ids)})"
                    if unexpected
                    else ""
                ),
            )
        )

        # 3. no duplicates
        dup_requests = [rid for rid, n in spooled_ids.items() if n > 1]
        identifiers = self.fake.identifiers()
        dup_identifiers = [i for i, n in Counter(identifiers).items() if n > 1]
        group_ids = [g for r in self.replicas for g in batch_identifiers(r.spool)]
        dup_groups = [i for i, n in Counter(group_ids).items() if n > 1]
        checks.append(
            (
                "no duplicate: request spooled once, meter-event identifiers unique",
                not dup_requests and not dup_identifiers and not dup_groups,
                f"{len(rows)} spooled rows, {len(identifiers)} accepted meter events; "
                f"duplicates: requests={dup_requests[:5]} identifiers={dup_identifiers[:5]} "
                f"groups={dup_groups[:5]}",
            )
        )

        # 4 and 5: Redis
        sync = redis.Redis.from_url(self.redis.url, decode_responses=True)
        keys = KeySpace(KEY_PREFIX)
        try:
            counters = {}
            held = {}
            reaped = {}
            for t in self.tenants:
                pattern = keys.used(t.id, 0).rsplit(":", 1)[0] + ":*"
                counters[t.id] = sum(int(sync.get(k) or 0) for k in sync.scan_iter(match=pattern))
                held[t.id] = int(sync.zcard(keys.reservations(t.id)))
                # Members are "id:period:cost": refunded as overdue, never committed late.
                reaped[t.id] = sum(
                    int(str(m).rsplit(":", 1)[1]) for m in sync.zrange(keys.reaped(t.id), 0, -1)
                )
            plans = {t.id: sync.hget(keys.tenant(t.id), "plan") for t in self.tenants}
        finally:
            sync.close()
        committed: Counter[str] = Counter()
        degraded: Counter[str] = Counter()
        for row in rows:
            if row.degraded:
                degraded[row.tenant_id] += row.units
            else:
                committed[row.tenant_id] += row.units
        # A serve SIGKILLed between spooling a call and its batched commit loses the commit:
        # the reservation is reaped (refunded) instead, and Redis keeps it in the reaped set.
        # So the counter may sit below committed by at most those reaped units, never above.
        ok4 = all(
            committed[t.id] - reaped[t.id] <= counters[t.id] <= committed[t.id]
            for t in self.tenants
        )
        dropped = sum(
            log_sum(r, event, "reservations")
            for r in self.replicas
            for event in ("quota_commit_failed", "quota_commits_abandoned")
        )
        checks.append(
            (
                "Redis counters == committed (spooled, not degraded) units, per tenant",
                ok4,
                "; ".join(
                    f"{t.id}: counter={counters[t.id]} committed={committed[t.id]} "
                    f"(diff {counters[t.id] - committed[t.id]:+d}, reaped and never committed "
                    f"{reaped[t.id]}) degraded={degraded[t.id]}"
                    for t in self.tenants
                )
                + f"; commits dropped (quota_commit_failed/quota_commits_abandoned): {dropped}"
                + "; a serve SIGKILLed between spooling and its batched commit loses that commit"
                + " too (its reservation is reaped: the counter ends below committed, by at most"
                + " the reaped units)",
            )
        )
        checks.append(
            (
                "no reservation held",
                sum(held.values()) == 0,
                f"held={held}",
            )
        )

        # 6. webhooks
        applied_twice = [
            w.event_id
            for w in self.ledger.webhooks
            if sum(1 for _, r in w.results if r in ("applied", "recorded", "stale")) > 1
        ]
        unacked = [
            w.event_id for w in self.ledger.webhooks if not any(s == 200 for s, _ in w.results)
        ]
        wrong_plan = [
            (t.id, plans[t.id], t.last_plan)
            for t in self.tenants
            if t.last_plan is not None and plans[t.id] != t.last_plan
        ]
        results = Counter(r for w in self.ledger.webhooks for _, r in w.results)
        checks.append(
            (
                "webhooks: none applied twice, all acknowledged, tenants on the newest plan",
                not applied_twice and not unacked and not wrong_plan,
                f"deliveries={dict(results)} applied_twice={applied_twice[:5]} "
                f"unacknowledged={unacked[:5]} wrong_plan={wrong_plan}",
            )
        )

        # 7. clean exits
        checks.append(
            (
                "every serve exited 0 on SIGTERM",
                all(code == 0 for code in self.exit_codes.values()),
                f"exit codes={self.exit_codes}",
            )
        )

        for name, ok, detail in checks:
            print(f"{'PASS' if ok else 'FAIL'}  {name}")
            print(f"      {detail}")
        passed = all(ok for _, ok, _ in checks)
        print("=" * 78)
        print("soak: all checks passed" if passed else "soak: SOME CHECKS FAILED")
        return passed


def windows(times: list[float], gap: float = 1.0) -> str:
    """'5.0-9.8 s (1234), 25.0-25.1 s (3)': runs of events no more than `gap` apart."""
    out: list[list[float]] = []
    for t in sorted(times):
        if out and t - out[-1][1] <= gap:
            out[-1][1] = t
            out[-1][2] += 1
        else:
            out.append([t, t, 1])
    return ", ".join(f"{a:.1f}-{b:.1f} s ({int(n)})" for a, b, n in out) or "never"


# --- spools ------------------------------------------------------------------------------------


def batch_identifiers(path: Path) -> list[str]:
    if not path.exists():
        return []
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as db:
        return [str(r[0]) for r in db.execute("SELECT identifier FROM batch_groups")]


# --- entry point -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="traffic duration")
    parser.add_argument("--fault-interval", type=float, default=30.0, help="seconds between faults")
    parser.add_argument(
        "--faults", default=",".join(FAULTS), help=f"rotation order (default {','.join(FAULTS)})"
    )
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    unknown = set(args.faults.split(",")) - set(FAULTS)
    if unknown:
        parser.error(f"unknown faults {sorted(unknown)}; choose from {', '.join(FAULTS)}")
    return args


async def amain(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="mqp-soak-"))
    try:
        soak = Soak(args, workdir)
        return 0 if await soak.run() else 1
    finally:
        if args.keep:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(amain(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
