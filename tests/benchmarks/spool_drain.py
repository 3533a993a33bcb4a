"""Spool append and drain throughput on this machine: a benchmark, not a test.

    python -m tests.benchmarks.spool_drain [--events N] [--rounds R] [--customers C]
        [--append-events M] [--appenders K,K,...]

1. Appends. The real ``Spool.append`` (group commit: one writer task commits whatever queued
   while the previous commit was in flight) driven by K concurrent appender tasks, and by one
   sequential appender, against a baseline that commits once per event: aiosqlite on the same
   schema and PRAGMAs, ``execute(INSERT_EVENT)`` + ``commit()`` awaited per event. Both with
   ``synchronous=normal`` and ``full``. Every run uses a fresh spool file.
2. Drain. A spool pre-filled with N billable events over C customers (filled directly with
   one ``executemany`` into the events table, not through ``append``) is drained by
   ``Drainer.cycle()`` against the in-process Stripe fake until its backlog is empty; the
   fake's accepted totals must equal the spooled units per customer (exit status 1 if not).

Each figure is the median over R rounds, timed with ``time.perf_counter()``. Spool files live
in a temporary directory under $TMPDIR, deleted at exit; its filesystem is printed because
``synchronous=full`` costs one fsync per commit there.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import random
import shlex
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import aiosqlite

from proxy.clock import SystemClock
from proxy.config import BillingConfig, DrainConfig, SpoolConfig
from proxy.usage.drainer import MAX_BATCHES_PER_CYCLE, Drainer
from proxy.usage.meter import StripeMeterClient
from proxy.usage.sink import UsageEvent
from proxy.usage.spool import INSERT_EVENT, Spool, row_of
from tests.fakes.stripe_fake import run_stripe_fake

MODULE = "tests.benchmarks.spool_drain"
SYNC_MODES = ("normal", "full")
REPLICA = "bench"
KEY = "sk_test_benchmark_0123456789"
METER = "mcp_tool_calls"
METER_CALL = ("POST", "/v1/billing/meter_events")
DRAIN = DrainConfig(max_batch=10_000, max_calls_per_second=10_000.0)
DRAIN_SYNC = "normal"
APPEND_EVENTS_CAP = 20_000  # default append run size: min(--events, this)
APPEND_CUSTOMERS = 50


# --- inputs ----------------------------------------------------------------------------------


def make_events(count: int, customers: Sequence[str], seed: int) -> list[UsageEvent]:
    """Billable tool calls of the last hour, spread at random over `customers`."""
    rng = random.Random(seed)
    now = time.time()
    events: list[UsageEvent] = []
    for i in range(count):
        k = rng.randrange(len(customers))
        events.append(
            UsageEvent(
                tenant_id=f"tenant-{k}",
                stripe_customer=customers[k],
                plan="pro",
                method="tools/call",
                tool="add",
                units=rng.randint(1, 5),
                timestamp=now - rng.uniform(0.0, 3600.0),
                request_id=f"req-{seed}-{i}",
                rpc_id=str(i),
                session_id=f"sess-{k}",
                outcome="ok",
                degraded=False,
                billable=True,
                period_end=int(now) + 86_400,  # one quota period, as in a normal hour
            )
        )
    return events


def remove_db(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


async def count_events(db: aiosqlite.Connection) -> int:
    rows = list(await db.execute_fetchall("SELECT COUNT(*) FROM events"))
    return int(rows[0][0])


# --- 1. appends ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AppendSample:
    per_second: float
    p50_us: float
    p99_us: float


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def sample(count: int, seconds: float, latencies: list[float]) -> AppendSample:
    latencies.sort()
    return AppendSample(
        per_second=count / seconds,
        p50_us=percentile(latencies, 50) * 1e6,
        p99_us=percentile(latencies, 99) * 1e6,
    )


async def group_commit(
    path: Path, sync: str, events: Sequence[UsageEvent], appenders: int
) -> AppendSample:
    """`appenders` tasks share the events and each awaits `Spool.append` one event at a time."""
    spool = Spool(path, synchronous=sync, replica_id=REPLICA)
    await spool.open()
    latencies: list[float] = []
    clock = time.perf_counter

    async def appender(share: Sequence[UsageEvent]) -> None:
        for event in share:
            start = clock()
            await spool.append(event)
            latencies.append(clock() - start)

    shares = [events[i::appenders] for i in range(appenders)]
    try:
        start = clock()
        async with asyncio.TaskGroup() as group:
            for share in shares:
                group.create_task(appender(share))
        seconds = clock() - start
        stored = await count_events(spool.db)
    finally:
        await spool.close()
    if stored != len(events):
        raise RuntimeError(f"group commit stored {stored} of {len(events)} events")
    return sample(len(events), seconds, latencies)


async def one_commit_per_event(path: Path, sync: str, events: Sequence[UsageEvent]) -> AppendSample:
    """Baseline: the spool's schema and PRAGMAs, one INSERT + COMMIT awaited per event."""
    schema = Spool(path, synchronous=sync, replica_id=REPLICA)
    await schema.open()  # creates the schema exactly as the proxy does
    await schema.close()
    db = await aiosqlite.connect(path)
    latencies: list[float] = []
    clock = time.perf_counter
    try:
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute(f"PRAGMA synchronous={sync.upper()}")
        await db.execute("PRAGMA busy_timeout=10000")
        start = clock()
        for event in events:
            began = clock()
            await db.execute(INSERT_EVENT, row_of(event, REPLICA))
            await db.commit()
            latencies.append(clock() - began)
        seconds = clock() - start
        stored = await count_events(db)
    finally:
        await db.close()
    if stored != len(events):
        raise RuntimeError(f"baseline stored {stored} of {len(events)} events")
    return sample(len(events), seconds, latencies)


# --- 2. drain --------------------------------------------------------------------------------


@dataclass(slots=True)
class DrainSample:
    events: int
    customers: int
    fill_seconds: float = 0.0
    seconds: float = 0.0  # summed Drainer.cycle() time
    cycles: int = 0
    batches: int = 0
    meter_calls: int = 0
    retries: int = 0
    spooled_units: int = 0
    accepted_units: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    @property
    def calls_per_1k(self) -> float:
        return self.meter_calls * 1000.0 / self.events


async def drain_round(
    path: Path, events_count: int, customers_count: int, seed: int
) -> DrainSample:
    result = DrainSample(events_count, customers_count)
    async with run_stripe_fake() as fake:
        fake.add_meter(METER)
        customers = [fake.add_customer(name=f"bench-{i}")["id"] for i in range(customers_count)]
        rows = [row_of(e, REPLICA) for e in make_events(events_count, customers, seed)]
        spool = Spool(path, synchronous=DRAIN_SYNC, replica_id=REPLICA)
        await spool.open()
        client = StripeMeterClient(KEY, fake.url)
        try:
            start = time.perf_counter()
            await spool.db.executemany(INSERT_EVENT, rows)  # pre-fill: one transaction
            await spool.db.commit()
            result.fill_seconds = time.perf_counter() - start
            spooled = {
                str(customer): int(units)
                for customer, units in await spool.db.execute_fetchall(
                    "SELECT stripe_customer, SUM(units) FROM events WHERE billable = 1 "
                    "GROUP BY stripe_customer"
                )
            }
            drainer = Drainer(
                spool,
                client,
                drain=DRAIN,
                billing=BillingConfig(meter_event_name=METER),
                spool_config=SpoolConfig(),
                clock=SystemClock(),
            )
            needed = math.ceil(events_count / (DRAIN.max_batch * MAX_BATCHES_PER_CYCLE))
            while True:
                start = time.perf_counter()
                report = await drainer.cycle()
                result.seconds += time.perf_counter() - start
                result.cycles += 1
                result.batches += report.claimed_batches
                result.retries += report.retries
                if report.rejected:
                    result.problems.append(f"{report.rejected} meter events rejected")
                unreported = (await spool.backlog()).unreported
                if unreported == 0:
                    break
                if result.cycles >= needed + 10:
                    result.problems.append(f"{unreported} events still unreported")
                    break
        finally:
            await client.close()
            await spool.close()
        result.meter_calls = sum(1 for call in fake.calls if call == METER_CALL)
        result.spooled_units = sum(spooled.values())
        result.accepted_units = fake.total(event_name=METER)
        wrong = [c for c in customers if fake.total(c, METER) != spooled.get(c, 0)]
        if wrong:
            result.problems.append(f"{len(wrong)} customers' totals differ, e.g. {wrong[0]}")
    return result


# --- reporting -------------------------------------------------------------------------------


def filesystem_of(path: Path) -> str:
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "unknown filesystem"
    target = str(path.resolve())
    best = ("", "unknown", "?")
    for line in mounts:
        device, mount, fstype, *_ = line.split()
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best[0]):
            best = (mount, fstype, device)
    return f"{best[1]} ({best[2]} mounted on {best[0]})"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def print_header(args: argparse.Namespace, argv: Sequence[str], workdir: Path) -> None:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    print("mcp-quota-proxy: spool append and drain benchmark")
    print(f"command:   python -m {MODULE} {shlex.join(argv)}".rstrip())
    print(f"           (interpreter {sys.executable}, cwd {Path.cwd()})")
    print(f"machine:   nproc {os.cpu_count()} (usable {affinity}), {cpu_model()}")
    print(f"           {platform.platform()}")
    print(
        f"software:  Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
        f"aiosqlite {version('aiosqlite')}, stripe {version('stripe')}"
    )
    print(f"spool dir: {workdir} on {filesystem_of(workdir)}")
    print(
        f"settings:  rounds {args.rounds} (medians reported), append events {args.append_events}"
        f", appenders {','.join(map(str, args.appenders))}, drain events {args.events}"
        f" over {args.customers} customers"
    )


def print_appends(
    results: dict[tuple[str, str], list[AppendSample]], args: argparse.Namespace
) -> None:
    print()
    print(
        f"1. Spool appends: {args.append_events} events per run, fresh spool file per run, "
        f"median of {args.rounds}"
    )
    print("   latency = one awaited append (group commit: queue wait + shared commit)")
    header = f"   {'sync':<7} {'mode':<34} {'appenders':>9} {'appends/s':>11} "
    print(header + f"{'p50 µs':>9} {'p99 µs':>9}")
    print("   " + "-" * (len(header) + 17))
    rates: dict[tuple[str, str], float] = {}
    for sync in SYNC_MODES:
        rows: list[tuple[str, str, str]] = [
            (f"gc{k}", "group commit (Spool.append)", str(k)) for k in args.appenders
        ]
        rows.append(("gc1", "group commit, sequential", "1"))
        rows.append(("one", "one commit per event (aiosqlite)", "1"))
        for key, label, appenders in rows:
            samples = results[(sync, key)]
            rate = median([s.per_second for s in samples])
            rates[(sync, key)] = rate
            p50 = median([s.p50_us for s in samples])
            p99 = median([s.p99_us for s in samples])
            print(
                f"   {sync:<7} {label:<34} {appenders:>9} {rate:>11,.0f} {p50:>9,.0f} {p99:>9,.0f}"
            )
    print("   group commit / one commit per event (appends/s):")
    for sync in SYNC_MODES:
        base = rates[(sync, "one")]
        ratios = [f"{rates[(sync, f'gc{k}')] / base:.1f}x at {k}" for k in args.appenders]
        ratios.append(f"{rates[(sync, 'gc1')] / base:.2f}x sequential")
        print(f"     {sync:<7} " + ", ".join(ratios))


def print_drain(samples: Sequence[DrainSample], args: argparse.Namespace) -> None:
    print()
    print(
        f"2. Drain: {args.events} events over {args.customers} customers, pre-filled by one "
        "executemany into events (not append)"
    )
    print(
        f"   synchronous={DRAIN_SYNC}, max_batch {DRAIN.max_batch}, max_calls_per_second "
        f"{DRAIN.max_calls_per_second:g}; Stripe fake in-process on the same event loop"
    )
    print("   drain s = sum of Drainer.cycle() calls until the backlog is empty; median of rounds")
    header = (
        f"   {'round':<6} {'fill s':>7} {'drain s':>8} {'events/s':>10} {'cycles':>6} "
        f"{'batches':>7} {'meter calls':>11} {'calls/1k ev':>11} {'retries':>7}"
    )
    print(header)
    print("   " + "-" * (len(header) - 3))

    def line(name: str, fill: float, drain: float, rate: float, s: DrainSample) -> str:
        return (
            f"   {name:<6} {fill:>7.2f} {drain:>8.3f} {rate:>10,.0f} {s.cycles:>6} "
            f"{s.batches:>7} {s.meter_calls:>11,} {s.calls_per_1k:>11.2f} {s.retries:>7}"
        )

    for number, s in enumerate(samples, start=1):
        print(line(str(number), s.fill_seconds, s.seconds, s.per_second, s))
    mid = sorted(samples, key=lambda s: s.per_second)[len(samples) // 2]
    print(
        line(
            "median",
            median([s.fill_seconds for s in samples]),
            median([s.seconds for s in samples]),
            median([s.per_second for s in samples]),
            mid,
        )
    )
    for number, s in enumerate(samples, start=1):
        verdict = "OK" if not s.problems else "FAIL: " + "; ".join(s.problems)
        print(
            f"   totals check, round {number}: spooled {s.spooled_units:,} units, Stripe fake "
            f"accepted {s.accepted_units:,} across {s.customers} customers: {verdict}"
        )


# --- main ------------------------------------------------------------------------------------


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def counts(text: str) -> list[int]:
    return [positive(part) for part in text.split(",") if part]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--events", type=positive, default=100_000, help="drain events per round")
    parser.add_argument("--rounds", type=positive, default=3, help="rounds; medians reported")
    parser.add_argument("--customers", type=positive, default=50, help="drain customers")
    parser.add_argument(
        "--append-events",
        type=positive,
        default=None,
        help=f"events per append run (default: min(--events, {APPEND_EVENTS_CAP}))",
    )
    parser.add_argument(
        "--appenders", type=counts, default=[256, 64], help="concurrent appender counts"
    )
    args = parser.parse_args(argv)
    if args.append_events is None:
        args.append_events = min(args.events, APPEND_EVENTS_CAP)
    return args


async def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mqp-bench-") as tmp:
        workdir = Path(tmp)
        print_header(args, argv, workdir)
        sys.stdout.flush()
        append_customers = [f"cus_bench{i}" for i in range(APPEND_CUSTOMERS)]
        results: dict[tuple[str, str], list[AppendSample]] = {}
        for round_ in range(args.rounds):
            events = make_events(args.append_events, append_customers, seed=round_)
            for sync in SYNC_MODES:
                for appenders in [*args.appenders, 1]:
                    path = workdir / f"append-{round_}-{sync}-{appenders}.db"
                    got = await group_commit(path, sync, events, appenders)
                    results.setdefault((sync, f"gc{appenders}"), []).append(got)
                    remove_db(path)
                path = workdir / f"append-{round_}-{sync}-one.db"
                results.setdefault((sync, "one"), []).append(
                    await one_commit_per_event(path, sync, events)
                )
                remove_db(path)
            print(f"appends: round {round_ + 1}/{args.rounds} done", file=sys.stderr)
        print_appends(results, args)
        sys.stdout.flush()

        drains: list[DrainSample] = []
        for round_ in range(args.rounds):
            path = workdir / f"drain-{round_}.db"
            drains.append(await drain_round(path, args.events, args.customers, seed=1000 + round_))
            remove_db(path)
            print(f"drain: round {round_ + 1}/{args.rounds} done", file=sys.stderr)
        print_drain(drains, args)
    failed = any(s.problems for s in drains)
    print()
    verdict = "FAIL: see the totals check above" if failed else "all totals checks passed"
    print(f"{verdict}; total wall time {time.perf_counter() - began:.1f} s")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return asyncio.run(run(parse_args(argv), argv))


if __name__ == "__main__":
    sys.exit(main())
