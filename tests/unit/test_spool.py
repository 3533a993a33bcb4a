"""The spool on a real SQLite file: group commit, claims, identifiers, retention."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from proxy.usage.sink import UsageEvent
from proxy.usage.spool import MIGRATIONS, Spool, SpoolError, identifier_for, meter_timestamp

METERS = [("mcp_tool_calls", "units"), ("mcp_tokens", "tokens")]
T0 = 1_767_225_600.0


def event(
    tenant: str = "acme",
    customer: str | None = "cus_A",
    units: int = 1,
    tokens: int | None = None,
    billable: bool = True,
    ts: float = T0,
    period_end: int | None = None,
) -> UsageEvent:
    return UsageEvent(
        tenant_id=tenant,
        stripe_customer=customer,
        plan="pro",
        method="tools/call",
        tool="add",
        units=units,
        timestamp=ts,
        request_id="r1",
        rpc_id="1",
        session_id=None,
        outcome="ok",
        degraded=False,
        tokens=tokens,
        billable=billable,
        period_end=period_end,
    )


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    s = Spool(tmp_path / "usage.db", synchronous="normal", replica_id="pod-a")
    await s.open()
    yield s
    await s.close()


async def test_appends_are_durable_when_append_returns(spool: Spool, tmp_path: Path) -> None:
    await asyncio.gather(*(spool.append(event(units=i)) for i in range(1, 201)))
    # A second, independent connection sees every row: they are committed, not just queued.
    with sqlite3.connect(tmp_path / "usage.db") as other:
        count, total = other.execute("SELECT COUNT(*), SUM(units) FROM events").fetchone()
    assert (count, total) == (200, sum(range(1, 201)))


def count_thread_inserts(spool: Spool) -> list[int]:
    """Counts the group INSERTs sent to SQLite's thread (the rest are committed inline)."""
    sent = [0]
    original = spool.db.execute

    def counting(sql: str, *args: Any, **kwargs: Any) -> Any:
        if sql.startswith("INSERT INTO events"):
            sent[0] += 1
        return original(sql, *args, **kwargs)

    spool.db.execute = counting  # type: ignore[method-assign]
    return sent


async def test_concurrent_appends_share_commits(spool: Spool) -> None:
    thread = count_thread_inserts(spool)
    await asyncio.gather(*(spool.append(event()) for _ in range(500)))
    groups = spool.inline_commits + thread[0]
    assert 0 < groups < 50, f"{groups} commits for 500 concurrent appends"
    assert (await spool.backlog()).unreported == 500


async def test_normal_commits_inline_and_waits_off_the_loop_when_the_drainer_holds_the_lock(
    spool: Spool, tmp_path: Path
) -> None:
    thread = count_thread_inserts(spool)
    await spool.append(event(units=1))
    assert (spool.inline_commits, thread[0]) == (1, 0)
    # The drainer (another process) takes the write lock for a claim.
    drainer = sqlite3.connect(tmp_path / "usage.db", isolation_level=None)
    drainer.execute("BEGIN IMMEDIATE")
    try:
        appended = asyncio.ensure_future(spool.append(event(units=2)))
        ticks = 0
        while thread[0] == 0:  # the loop keeps running while the append waits for the lock
            ticks += 1
            await asyncio.sleep(0.01)
            assert ticks < 500, "the append never reached SQLite's thread"
        assert not appended.done()
    finally:
        drainer.execute("COMMIT")
        drainer.close()
    await asyncio.wait_for(appended, 10)
    assert (spool.inline_commits, thread[0]) == (1, 1)
    with sqlite3.connect(tmp_path / "usage.db") as other:
        assert other.execute("SELECT SUM(units) FROM events").fetchone()[0] == 3


@pytest.mark.parametrize("synchronous", ["normal", "full"])
async def test_close_commits_every_append_in_flight_and_refuses_later_ones(
    tmp_path: Path, synchronous: str
) -> None:
    s = Spool(tmp_path / "u.db", synchronous=synchronous, replica_id="p")
    await s.open()
    appends = [asyncio.ensure_future(s.append(event(units=i))) for i in range(1, 51)]
    await asyncio.sleep(0)  # queued, not yet committed: close must wait for them
    assert not any(a.done() for a in appends)
    await s.close()
    assert all(a.done() and a.exception() is None for a in appends)
    with sqlite3.connect(tmp_path / "u.db") as other:
        assert other.execute("SELECT SUM(units) FROM events").fetchone()[0] == sum(range(1, 51))
    with pytest.raises(SpoolError, match="not open"):
        await s.append(event())


async def test_a_failed_group_fails_each_of_its_callers_and_the_next_group_commits(
    spool: Spool, tmp_path: Path
) -> None:
    with sqlite3.connect(tmp_path / "usage.db") as other:
        other.execute(
            "CREATE TRIGGER no_big BEFORE INSERT ON events WHEN NEW.units > 100 "
            "BEGIN SELECT RAISE(ABORT, 'too big'); END"
        )
    first = await asyncio.gather(
        spool.append(event(units=1)), spool.append(event(units=101)), return_exceptions=True
    )
    assert [type(r) for r in first] == [SpoolError, SpoolError]  # one transaction: all or none
    await asyncio.gather(spool.append(event(units=2)), spool.append(event(units=3)))
    with sqlite3.connect(tmp_path / "usage.db") as other:
        assert other.execute("SELECT SUM(units) FROM events").fetchone()[0] == 5


async def test_full_sync_never_commits_on_the_loop(tmp_path: Path) -> None:
    s = Spool(tmp_path / "u.db", synchronous="full", replica_id="pod-a")
    await s.open()
    try:
        await asyncio.gather(*(s.append(event()) for _ in range(20)))
        assert s.inline_commits == 0
        assert (await s.backlog()).unreported == 20
    finally:
        await s.close()


@pytest.mark.parametrize("checkpoint_commits", [50, 10**9], ids=["checkpointed", "never"])
async def test_inline_commits_are_checkpointed_off_the_loop(
    tmp_path: Path, checkpoint_commits: int
) -> None:
    """The inline connection never checkpoints; without the spool's own checkpoints the WAL
    would grow without bound."""
    s = Spool(
        tmp_path / "u.db",
        synchronous="normal",
        replica_id="p",
        checkpoint_commits=checkpoint_commits,
    )
    await s.open()
    try:
        for _ in range(2000):
            await s.append(event())
        assert s.inline_commits > 0
        wal = (tmp_path / "u.db-wal").stat().st_size
    finally:
        await s.close()
    if checkpoint_commits == 50:
        # At most 4 x 50 commits (~5 WAL pages each) pile up behind a lagging checkpoint.
        assert wal < 8 * 1024 * 1024, wal
    else:
        assert wal > 16 * 1024 * 1024, wal  # the control: the bound above is the checkpoints'


async def test_wal_mode_and_schema_version(spool: Spool, tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "usage.db") as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert other.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


async def test_reopening_keeps_spool_id_and_rows(tmp_path: Path) -> None:
    first = Spool(tmp_path / "u.db", synchronous="full", replica_id="pod-a")
    await first.open()
    await first.append(event())
    spool_id = first.spool_id
    await first.close()
    second = Spool(tmp_path / "u.db", synchronous="normal", replica_id="pod-a")
    await second.open()
    try:
        assert second.spool_id == spool_id and len(spool_id) == 12
        assert (await second.backlog()).unreported == 1
    finally:
        await second.close()


async def test_processes_opening_a_new_spool_together_agree_on_it(tmp_path: Path) -> None:
    """A proxy and its drainer (or a drain sidecar) may open a fresh file at once: one of
    them migrates it, and both see the same spool id."""
    spools = [Spool(tmp_path / "u.db", synchronous="normal", replica_id="p") for _ in range(4)]
    try:
        await asyncio.gather(*(s.open() for s in spools))
        assert len({s.spool_id for s in spools}) == 1
    finally:
        for s in spools:
            await s.close()


async def test_migrating_a_v2_spool_keeps_pending_identifiers_and_renews_the_rest(
    tmp_path: Path,
) -> None:
    """A v2 spool may already have reused a pruned batch id: after migrating, its claimed
    group re-sends under its stored identifier, new batches get a new spool id, and ids
    never go back down when every batch is pruned."""
    path = tmp_path / "u.db"
    with sqlite3.connect(path, isolation_level=None) as v2:
        for number, script in enumerate(MIGRATIONS[:2], start=1):
            v2.executescript(f"BEGIN;\n{script}\nPRAGMA user_version={number};\nCOMMIT;")
        v2.execute("INSERT INTO meta VALUES ('spool_id', 'aaaaaaaaaaaa')")
        v2.execute("INSERT INTO batches (id, created_at) VALUES (3, ?)", (T0,))
        old = identifier_for("aaaaaaaaaaaa", 3, "cus_A", "mcp_tool_calls")
        v2.execute(
            "INSERT INTO batch_groups (batch_id, stripe_customer, event_name, value, timestamp, "
            "identifier) VALUES (3, 'cus_A', 'mcp_tool_calls', 4, ?, ?)",
            (int(T0), old),
        )
    spool = Spool(path, synchronous="normal", replica_id="pod-a")
    await spool.open()
    try:
        assert len(spool.spool_id) == 12 and spool.spool_id != "aaaaaaaaaaaa"
        assert [g.identifier for g in await spool.open_groups()] == [old]
        for g in await spool.open_groups():
            await spool.mark_group(g, state="sent", now=T0 + 1)
        assert await spool.finish_batches(T0 + 1) == 1
        await spool.prune(before=T0 + 2)
        await spool.append(event())
        batch = await spool.claim_batch(T0 + 3, 100, METERS)
        assert batch == 4  # not 1: the pruned ids stay used
        [group] = await spool.open_groups()
        assert group.identifier == identifier_for(spool.spool_id, 4, "cus_A", "mcp_tool_calls")
    finally:
        await spool.close()


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"this is not a database" * 200, "cannot open the spool"), (None, "newer than")],
)
async def test_a_spool_file_it_cannot_use_is_a_clear_error(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "u.db"
    if content is None:  # a spool written by a newer release
        with sqlite3.connect(path) as newer:
            newer.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    else:
        path.write_bytes(content)
    spool = Spool(path, synchronous="normal", replica_id="pod-a")
    with pytest.raises(SpoolError, match=message) as raised:
        await spool.open()
    assert str(path) in str(raised.value)
    assert spool._db is None  # closed: its thread must not keep the process alive


async def test_claim_aggregates_per_customer_and_meter(spool: Spool) -> None:
    for customer, units, tokens in [("cus_A", 1, 10), ("cus_A", 3, None), ("cus_B", 2, 5)]:
        await spool.append(event(customer=customer, units=units, tokens=tokens))
    await spool.append(event(customer=None, billable=False))  # no customer: never sent
    batch = await spool.claim_batch(T0 + 10, 100, METERS)
    assert batch is not None
    groups = {(g.stripe_customer, g.event_name): g for g in await spool.open_groups()}
    assert {k: g.value for k, g in groups.items()} == {
        ("cus_A", "mcp_tool_calls"): 4,
        ("cus_A", "mcp_tokens"): 10,
        ("cus_B", "mcp_tool_calls"): 2,
        ("cus_B", "mcp_tokens"): 5,
    }
    g = groups[("cus_A", "mcp_tool_calls")]
    assert g.identifier == identifier_for(spool.spool_id, batch, "cus_A", "mcp_tool_calls")
    assert len(g.identifier) <= 100
    assert len({x.identifier for x in groups.values()}) == 4
    assert await spool.claim_batch(T0 + 10, 100, METERS) is None  # nothing left to claim
    backlog = await spool.backlog()
    assert (backlog.unreported, backlog.unbillable) == (3, 1)


async def test_a_meter_event_never_carries_two_periods_usage(spool: Spool) -> None:
    """Its timestamp decides the invoice: calls counted in the period ending at END are sent
    stamped inside it, and the next period's calls of that customer wait for the next batch,
    while other customers' calls still go in this one."""
    end = int(T0) + 100
    await spool.append(event(ts=end - 10, period_end=end))
    await spool.append(event(ts=end + 0.4, period_end=end))  # reserved before END, settled after
    await spool.append(event(customer="cus_B", ts=end + 5, period_end=end + 3600))
    await spool.append(event(ts=end + 2, period_end=end + 3600))
    await spool.append(event(ts=end - 5, period_end=end))
    stamps = []
    while await spool.claim_batch(T0 + 200, 100, METERS) is not None:
        groups = await spool.open_groups()
        stamps.append(sorted((g.stripe_customer, g.value, g.timestamp) for g in groups))
        for g in groups:
            await spool.mark_group(g, state="sent", now=T0 + 200)
    assert stamps == [
        [("cus_A", 3, end - 1), ("cus_B", 1, end + 5)],
        [("cus_A", 1, end + 2)],
    ]


@pytest.mark.parametrize(
    ("newest", "period_end", "stamp"),
    [(T0 + 5.9, None, T0 + 5), (T0 + 5.9, int(T0) + 10, T0 + 5), (T0 + 10.2, int(T0) + 10, T0 + 9)],
)
def test_meter_timestamp_stays_inside_the_period(
    newest: float, period_end: int | None, stamp: float
) -> None:
    assert meter_timestamp(newest, period_end) == int(stamp)


async def test_zero_token_groups_need_no_call(spool: Spool) -> None:
    await spool.append(event(tokens=None))
    await spool.claim_batch(T0, 100, METERS)
    assert [g.event_name for g in await spool.open_groups()] == ["mcp_tool_calls"]


async def test_claimed_batch_survives_a_restart_with_the_same_identifiers(tmp_path: Path) -> None:
    s = Spool(tmp_path / "u.db", synchronous="normal", replica_id="pod-a")
    await s.open()
    await s.append(event())
    await s.claim_batch(T0, 100, METERS)
    before = await s.open_groups()
    await s.close()  # as if killed after claiming, before sending
    s2 = Spool(tmp_path / "u.db", synchronous="normal", replica_id="pod-a")
    await s2.open()
    try:
        assert await s2.open_groups() == before
    finally:
        await s2.close()


async def test_finish_marks_events_reported_and_prune_keeps_the_rest(spool: Spool) -> None:
    await spool.append(event(customer="cus_A"))
    await spool.append(event(customer="cus_B"))
    await spool.claim_batch(T0, 100, METERS)
    a, b = sorted(await spool.open_groups(), key=lambda g: g.stripe_customer)
    await spool.mark_group(a, state="sent", now=T0 + 1)
    assert await spool.finish_batches(T0 + 1) == 0  # cus_B not accepted yet...
    assert (await spool.backlog()).unreported == 1  # ...but cus_A's event is reported
    await spool.mark_group(b, state="sent", now=T0 + 2)
    assert await spool.finish_batches(T0 + 2) == 1
    await spool.append(event(ts=T0 + 3))  # unreported
    await spool.append(event(customer=None, billable=False, ts=T0 + 3))  # never billable
    assert await spool.prune(before=T0 + 2) == 1  # cus_A's, reported at T0+1
    assert await spool.prune(before=T0 + 100) == 1
    backlog = await spool.backlog()
    assert (backlog.unreported, backlog.unbillable) == (1, 1)


async def test_rejected_groups_keep_their_events(spool: Spool) -> None:
    await spool.append(event())
    await spool.claim_batch(T0, 100, METERS)
    (g,) = await spool.open_groups()
    await spool.mark_group(g, state="rejected", now=T0, error="No such customer")
    assert await spool.finish_batches(T0) == 0
    assert await spool.prune(before=T0 + 10**9) == 0
    backlog = await spool.backlog()
    assert (backlog.unreported, backlog.rejected_groups) == (1, 1)


async def test_tenant_usage_splits_reported_pending_and_unbillable(spool: Spool) -> None:
    await spool.append(event(units=2))
    await spool.claim_batch(T0, 100, METERS)
    (g,) = await spool.open_groups()
    await spool.mark_group(g, state="sent", now=T0)
    await spool.finish_batches(T0)
    await spool.append(event(units=3, tokens=7))
    await spool.append(replace(event(units=5), billable=False))
    await spool.append(event(tenant="other", units=100))
    usage = await spool.tenant_usage("acme", T0 - 1, T0 + 1)
    assert (usage.units, usage.reported, usage.pending, usage.unbillable, usage.tokens) == (
        10,
        2,
        3,
        5,
        7,
    )


async def test_claims_respect_max_events(spool: Spool) -> None:
    for _ in range(5):
        await spool.append(event())
    first = await spool.claim_batch(T0, 2, METERS)
    second = await spool.claim_batch(T0, 2, METERS)
    third = await spool.claim_batch(T0, 2, METERS)
    assert (first, second, third) == (1, 2, 3)
    assert await spool.claim_batch(T0, 2, METERS) is None
    assert [g.value for g in await spool.open_groups()] == [2, 2, 1]
