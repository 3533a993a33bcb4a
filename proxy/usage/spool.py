"""The local usage spool: an SQLite file (WAL) that is the billing audit log of one replica.

Appends are group-committed: the rows appended in one turn of the event loop become one
transaction, committed by a callback at the end of that turn (or, while a group is on SQLite's
thread, the next transaction after it), and each caller resumes only once its row is
committed. Nothing leaves the spool before Stripe has accepted it.

With `synchronous=normal` a group is committed on the event loop's thread when the file is
free: one INSERT into the WAL, no fsync, tens of microseconds, where a trip to SQLite's
thread and back costs more than that and adds latency to every call. Nothing there may wait:
that connection never waits for a lock (busy_timeout 0) and never checkpoints. A group that
meets a lock (the drainer's, a checkpoint's) goes to SQLite's thread and waits there;
checkpoints run there too, every `checkpoint_commits` commits; `synchronous=full` (an fsync per
commit) always goes there.

Durability: with `synchronous=normal` (WAL) a committed row survives the process being
killed at any instant (it is in the WAL, in the OS page cache); a power loss or kernel crash
can lose the last few commits. `synchronous=full` fsyncs every commit and survives those too,
at the price of one fsync per group commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import secrets
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiosqlite
import structlog

from .sink import UsageEvent

log = structlog.get_logger(__name__)

MIGRATIONS: tuple[str, ...] = (
    # 1: events, batches and the meter events each batch becomes.
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        tenant_id TEXT NOT NULL,
        stripe_customer TEXT,
        plan TEXT NOT NULL,
        method TEXT NOT NULL,
        tool TEXT,
        units INTEGER NOT NULL,
        tokens INTEGER,
        request_id TEXT NOT NULL,
        rpc_id TEXT NOT NULL,
        session_id TEXT,
        replica_id TEXT NOT NULL,
        outcome TEXT NOT NULL,
        degraded INTEGER NOT NULL,
        billable INTEGER NOT NULL,
        batch_id INTEGER,
        reported_at REAL
    );
    CREATE INDEX events_unclaimed ON events (id) WHERE batch_id IS NULL AND billable = 1;
    CREATE INDEX events_batch ON events (batch_id);
    CREATE INDEX events_tenant_ts ON events (tenant_id, ts);
    CREATE TABLE batches (
        id INTEGER PRIMARY KEY,
        created_at REAL NOT NULL,
        reported_at REAL
    );
    CREATE TABLE batch_groups (
        batch_id INTEGER NOT NULL,
        stripe_customer TEXT NOT NULL,
        event_name TEXT NOT NULL,
        value INTEGER NOT NULL,
        timestamp INTEGER NOT NULL,
        identifier TEXT NOT NULL UNIQUE,
        state TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        sent_at REAL,
        PRIMARY KEY (batch_id, stripe_customer, event_name)
    );
    """,
    # 2: what the drainer process last did, read by the proxy for /health and /metrics.
    """
    CREATE TABLE drain_state (key TEXT PRIMARY KEY, value REAL NOT NULL);
    """,
    # 3: batch ids are never reused. Without AUTOINCREMENT, pruning the newest batches let
    # SQLite hand out their ids again, and with them their meter-event identifiers: Stripe
    # took the new batch for the old one and its usage went unbilled. A spool that may have
    # reused ids already gets a new spool id, so no identifier made from now on matches one
    # made before; the identifiers of claimed groups are stored and re-sent unchanged.
    """
    CREATE TABLE batches_v3 (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        created_at REAL NOT NULL,
        reported_at REAL
    );
    INSERT INTO batches_v3 (id, created_at, reported_at)
        SELECT id, created_at, reported_at FROM batches;
    DROP TABLE batches;
    ALTER TABLE batches_v3 RENAME TO batches;
    UPDATE meta SET value = lower(hex(randomblob(6))) WHERE key = 'spool_id';
    """,
    # 4: the end of the quota period each call was counted in, so that one meter event never
    # carries usage of two billing periods (its timestamp decides the invoice).
    """
    ALTER TABLE events ADD COLUMN period_end INTEGER;
    """,
)

INSERT_EVENT = """
    INSERT INTO events (ts, tenant_id, stripe_customer, plan, method, tool, units, tokens,
        request_id, rpc_id, session_id, replica_id, outcome, degraded, billable, period_end)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
MAX_GROUP_COMMIT = 1024
# Inline commits between checkpoints: ~1,000 WAL pages (SQLite's own autocheckpoint), as a
# one-row commit writes about five (the row and its indexes).
CHECKPOINT_COMMITS = 200
_COLUMNS = INSERT_EVENT[INSERT_EVENT.index("(") : INSERT_EVENT.index(")") + 1]
_ROW = "(" + ",".join("?" * INSERT_EVENT.count("?")) + ")"


@functools.lru_cache(maxsize=64)
def _insert_rows(count: int) -> str:
    """One INSERT of `count` rows: atomic and committed as one statement in autocommit."""
    return f"INSERT INTO events {_COLUMNS} VALUES " + ",".join([_ROW] * count)


class SpoolError(RuntimeError):
    """The spool could not record an event; the caller must not release the result."""


def _settle(waiters: list[asyncio.Future[None]], error: Exception | None) -> None:
    """Wake a group's callers: committed, or failed together (one transaction)."""
    for done in waiters:
        if done.done():
            continue  # its caller was cancelled; the row is committed (or failed) all the same
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(SpoolError(f"spool write failed: {error}"))


@dataclass(frozen=True, slots=True)
class Group:
    """One meter event to send: a batch's total for one customer and meter."""

    batch_id: int
    stripe_customer: str
    event_name: str
    value: int
    timestamp: int
    identifier: str
    state: str
    attempts: int


@dataclass(frozen=True, slots=True)
class Backlog:
    unreported: int  # billable events not yet accepted by Stripe
    oldest_unreported_ts: float | None
    unbillable: int  # kept, never sent (no Stripe customer, or an unbilled plan)
    rejected_groups: int


@dataclass(frozen=True, slots=True)
class TenantUsage:
    units: int
    reported: int
    pending: int
    unbillable: int
    tokens: int


def row_of(event: UsageEvent, replica_id: str) -> tuple[object, ...]:
    """The row `Spool.append` inserts for `event`, in INSERT_EVENT's column order."""
    return (
        event.timestamp,
        event.tenant_id,
        event.stripe_customer,
        event.plan,
        event.method,
        event.tool,
        event.units,
        event.tokens,
        event.request_id,
        event.rpc_id,
        event.session_id,
        replica_id,
        event.outcome,
        int(event.degraded),
        int(event.billable),
        event.period_end,
    )


def identifier_for(spool_id: str, batch_id: int, customer: str, event_name: str) -> str:
    """Deterministic per (spool file, batch, customer, meter): a re-send after a crash reuses
    it, so Stripe's duplicate answer means "already delivered". The spool id is random per
    file, so a replica that restarts with a fresh spool can never reuse an old identifier."""
    digest = hashlib.sha256(f"{customer}\x00{event_name}".encode()).hexdigest()[:20]
    return f"mqp-{spool_id}-{batch_id}-{digest}"


def meter_timestamp(newest: float, period_end: int | None) -> int:
    """A group's meter-event timestamp: its newest call, but inside the quota period its calls
    were counted in (a call reserved before the period ended may settle just after)."""
    stamp = int(newest)
    return stamp if period_end is None else min(stamp, period_end - 1)


class Spool:
    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: str,
        replica_id: str,
        checkpoint_commits: int = CHECKPOINT_COMMITS,
    ) -> None:
        self._path = Path(path)
        self._synchronous = synchronous.upper()
        self._inline: sqlite3.Connection | None = None  # opened by the first inline commit
        self._checkpoint_commits = checkpoint_commits
        self._uncheckpointed = 0
        self._checkpoint: asyncio.Task[None] | None = None
        self.inline_commits = 0  # groups committed on the loop's thread (for tests and stats)
        self.replica_id = replica_id
        self.spool_id = ""
        self._db: aiosqlite.Connection | None = None
        self._open = False
        # Rows waiting for the next group commit, with the futures their callers await. No
        # queue and no writer task: a call_soon per group is all the hot path pays for.
        self._rows: list[tuple[object, ...]] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._flush_due = False
        self._off_loop: asyncio.Task[None] | None = None  # a group on SQLite's thread

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise SpoolError("the spool is not open")
        return self._db

    async def open(self) -> None:
        """Open (creating it if need be) and migrate the file; raises SpoolError naming the
        path when it cannot be made, opened or read as a spool."""
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit: a group commit is then one multi-row INSERT, one trip to SQLite's
            # thread; multi-statement work opens its own BEGIN IMMEDIATE.
            self._db = await aiosqlite.connect(self._path, isolation_level=None)
            await self._db.execute("PRAGMA journal_mode=WAL")
            await self._db.execute(f"PRAGMA synchronous={self._synchronous}")
            # Proxy and drainer are two processes on one file: wait for the other's lock.
            await self._db.execute("PRAGMA busy_timeout=10000")
            await self._migrate()
        except BaseException as exc:
            # Close the connection: its thread would otherwise keep the process alive.
            if self._db is not None:
                with contextlib.suppress(Exception):
                    await self._db.close()
                self._db = None
            if isinstance(exc, OSError | sqlite3.Error):
                raise SpoolError(f"cannot open the spool {self._path}: {exc}") from exc
            raise
        self._open = True

    async def close(self) -> None:
        self._open = False
        # Commit what was appended before stopping: each of those callers awaits its row.
        while self._waiters or self._off_loop is not None:
            if self._off_loop is not None:
                await asyncio.wait([self._off_loop])
            else:
                await asyncio.wait(list(self._waiters))
        if self._checkpoint is not None:
            with contextlib.suppress(Exception):
                await self._checkpoint
        if self._inline is not None:
            self._inline.close()
            self._inline = None
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def _migrate(self) -> None:
        """Bring the schema up to date and read the spool id in one write transaction: a
        proxy and a drainer starting together on one file must not both run a migration."""
        db = self.db
        await db.execute("BEGIN IMMEDIATE")
        try:
            version = (await (await db.execute("PRAGMA user_version")).fetchone() or (0,))[0]
            if version > len(MIGRATIONS):
                raise SpoolError(
                    f"the spool {self._path} has schema {version}, newer than this version's "
                    f"{len(MIGRATIONS)}: run a newer mcp-quota-proxy, or point spool.path "
                    "elsewhere"
                )
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in script.split(";"):  # none of them holds a ';' of its own
                    if statement.strip():
                        await db.execute(statement)
                await db.execute(f"PRAGMA user_version={number}")
            await db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('spool_id', ?)",
                (secrets.token_hex(6),),
            )
            cur = await db.execute("SELECT value FROM meta WHERE key='spool_id'")
            row = await cur.fetchone()
            await db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                await db.execute("ROLLBACK")
            raise
        assert row is not None
        self.spool_id = str(row[0])

    # --- the hot path ----------------------------------------------------------------------

    async def append(self, event: UsageEvent) -> None:
        """Returns once the event is committed (group commit with concurrent appends)."""
        if not self._open:
            raise SpoolError("the spool is not open")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._rows.append(row_of(event, self.replica_id))
        self._waiters.append(done)
        self._schedule_flush()
        await done

    def _flush(self) -> None:
        """Commit the rows appended so far as one group: inline when that cannot wait,
        otherwise on SQLite's thread, with later rows waiting for the group after it."""
        self._flush_due = False
        rows, self._rows = self._rows[:MAX_GROUP_COMMIT], self._rows[MAX_GROUP_COMMIT:]
        waiters = self._waiters[:MAX_GROUP_COMMIT]
        del self._waiters[:MAX_GROUP_COMMIT]
        sql, values = _insert_rows(len(rows)), [v for row in rows for v in row]
        try:
            if not self._commit_inline(sql, values):
                self._off_loop = asyncio.get_running_loop().create_task(
                    self._commit_off_loop(sql, values, waiters), name="spool-commit"
                )
                return
        except Exception as exc:  # any failure fails every caller of this group
            _settle(waiters, exc)
        else:
            _settle(waiters, None)
        self._schedule_flush()

    async def _commit_off_loop(
        self, sql: str, values: list[object], waiters: list[asyncio.Future[None]]
    ) -> None:
        try:
            await self.db.execute(sql, values)
        except Exception as exc:
            _settle(waiters, exc)
        else:
            _settle(waiters, None)
        finally:
            self._off_loop = None
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        """One flush per loop turn, and none while a group is on SQLite's thread (the rows
        appended meanwhile become the group after it)."""
        if self._rows and not self._flush_due and self._off_loop is None:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _commit_inline(self, sql: str, values: list[object]) -> bool:
        """Commit on the loop's thread if that cannot wait; False: use SQLite's thread."""
        if self._synchronous != "NORMAL":
            return False  # an fsync per commit must not run on the loop
        checkpointing = self._checkpoint is not None and not self._checkpoint.done()
        if checkpointing and self._uncheckpointed >= 4 * self._checkpoint_commits:
            return False  # the checkpoint lags (a busy machine): queue behind it, not ahead
        if self._inline is None:
            self._inline = sqlite3.connect(self._path, isolation_level=None)
            self._inline.execute("PRAGMA synchronous=NORMAL")
            self._inline.execute("PRAGMA busy_timeout=0")
            self._inline.execute("PRAGMA wal_autocheckpoint=0")
        try:
            self._inline.execute(sql, values)
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                return False  # the drainer holds the write lock: wait for it off the loop
            raise
        self.inline_commits += 1
        self._uncheckpointed += 1
        if self._uncheckpointed >= self._checkpoint_commits and not checkpointing:
            self._uncheckpointed = 0
            self._checkpoint = asyncio.create_task(self._checkpoint_wal(), name="spool-checkpoint")
        return True

    async def _checkpoint_wal(self) -> None:
        # RESTART, so that the WAL is reused from its start instead of growing: while it runs,
        # inline commits meet a busy file and queue on SQLite's thread behind it.
        try:
            await self.db.execute("PRAGMA wal_checkpoint(RESTART)")
        except Exception as exc:  # the next checkpoint will try again
            log.warning("spool_checkpoint_failed", error=str(exc))

    # --- the drainer's side ----------------------------------------------------------------

    async def claim_batch(
        self, now: float, max_events: int, meters: Sequence[tuple[str, str]]
    ) -> int | None:
        """Move up to max_events unclaimed billable events into a new batch and write the
        meter events it becomes, in one transaction committed before anything is sent.
        `meters` pairs a meter event name with the column it sums ("units" or "tokens")."""
        db = self.db
        await db.execute("BEGIN IMMEDIATE")
        try:
            cur = await db.execute("INSERT INTO batches (created_at) VALUES (?)", (now,))
            batch_id = cur.lastrowid
            assert batch_id is not None
            # The oldest unclaimed events, but of each customer only those of its earliest
            # period among them: the rest wait for the next batch. (The WITH goes inside: the
            # sqlite3 module reports no rowcount for a statement that starts with one.)
            cur = await db.execute(
                "UPDATE events SET batch_id = ? WHERE id IN ("
                "WITH picked AS (SELECT id, stripe_customer, COALESCE(period_end, 0) AS p "
                "FROM events WHERE batch_id IS NULL AND billable = 1 ORDER BY id LIMIT ?), "
                "first AS (SELECT stripe_customer, MIN(p) AS p FROM picked "
                "GROUP BY stripe_customer) "
                "SELECT picked.id FROM picked JOIN first "
                "ON first.stripe_customer IS picked.stripe_customer AND first.p = picked.p)",
                (batch_id, max_events),
            )
            if cur.rowcount == 0:
                await db.rollback()
                return None
            for event_name, column in meters:
                if column not in ("units", "tokens"):  # interpolated below: a fixed set only
                    raise ValueError(f"cannot meter column {column!r}")
                rows = await db.execute_fetchall(
                    f"SELECT stripe_customer, SUM({column}), MAX(ts), MAX(period_end) "
                    "FROM events WHERE batch_id = ? GROUP BY stripe_customer",
                    (batch_id,),
                )
                for customer, total, newest, period_end in rows:
                    await db.execute(
                        "INSERT INTO batch_groups (batch_id, stripe_customer, event_name, value, "
                        "timestamp, identifier, state) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (
                            batch_id,
                            customer,
                            event_name,
                            int(total or 0),
                            meter_timestamp(newest, period_end),
                            identifier_for(self.spool_id, batch_id, customer, event_name),
                            "pending" if total else "sent",  # nothing to bill: done
                        ),
                    )
            await db.commit()
        except BaseException:
            await db.rollback()
            raise
        return batch_id

    async def open_groups(self) -> list[Group]:
        """Meter events of claimed batches that Stripe has not accepted yet, oldest first."""
        rows = await self.db.execute_fetchall(
            "SELECT batch_id, stripe_customer, event_name, value, timestamp, identifier, state, "
            "attempts FROM batch_groups WHERE state = 'pending' ORDER BY batch_id, identifier"
        )
        return [Group(*row) for row in rows]

    async def mark_group(
        self, group: Group, *, state: str, now: float, error: str | None = None
    ) -> None:
        await self.db.execute(
            "UPDATE batch_groups SET state = ?, attempts = attempts + 1, last_error = ?, "
            "sent_at = CASE WHEN ? = 'sent' THEN ? ELSE sent_at END "
            "WHERE batch_id = ? AND stripe_customer = ? AND event_name = ?",
            (state, error, state, now, group.batch_id, group.stripe_customer, group.event_name),
        )
        await self.db.commit()

    async def note_attempt(self, group: Group, error: str) -> None:
        await self.db.execute(
            "UPDATE batch_groups SET attempts = attempts + 1, last_error = ? "
            "WHERE batch_id = ? AND stripe_customer = ? AND event_name = ?",
            (error, group.batch_id, group.stripe_customer, group.event_name),
        )
        await self.db.commit()

    async def finish_batches(self, now: float) -> int:
        """Mark as reported each event whose customer's meter events in its batch were all
        accepted, and each batch whose meter events all were; returns the batches finished.
        (One customer's rejected usage must not hold back another's.)"""
        db = self.db
        await db.execute("BEGIN IMMEDIATE")
        try:
            await db.execute(
                "UPDATE events SET reported_at = ? WHERE reported_at IS NULL "
                "AND batch_id IN (SELECT batch_id FROM batch_groups WHERE state = 'sent') "
                "AND NOT EXISTS (SELECT 1 FROM batch_groups g WHERE g.batch_id = events.batch_id "
                "AND g.stripe_customer = events.stripe_customer AND g.state != 'sent')",
                (now,),
            )
            cur = await db.execute(
                "UPDATE batches SET reported_at = ? WHERE reported_at IS NULL AND NOT EXISTS ("
                "SELECT 1 FROM batch_groups g WHERE g.batch_id = batches.id AND g.state != 'sent')",
                (now,),
            )
            finished = cur.rowcount
            await db.commit()
        except BaseException:
            await db.rollback()
            raise
        return finished

    async def prune(self, before: float) -> int:
        """Delete reported events (and their batches) reported before `before`."""
        db = self.db
        cur = await db.execute(
            "DELETE FROM events WHERE reported_at IS NOT NULL AND reported_at < ?", (before,)
        )
        deleted = cur.rowcount
        await db.execute(
            "DELETE FROM batch_groups WHERE batch_id IN (SELECT id FROM batches "
            "WHERE reported_at IS NOT NULL AND reported_at < ?)",
            (before,),
        )
        await db.execute(
            "DELETE FROM batches WHERE reported_at IS NOT NULL AND reported_at < ?", (before,)
        )
        await db.commit()
        return deleted

    async def backlog(self) -> Backlog:
        rows = await self.db.execute_fetchall(
            "SELECT "
            "(SELECT COUNT(*) FROM events WHERE billable = 1 AND reported_at IS NULL), "
            "(SELECT MIN(ts) FROM events WHERE billable = 1 AND reported_at IS NULL), "
            "(SELECT COUNT(*) FROM events WHERE billable = 0), "
            "(SELECT COUNT(*) FROM batch_groups WHERE state = 'rejected')"
        )
        unreported, oldest, unbillable, rejected = next(iter(rows))
        return Backlog(int(unreported), oldest, int(unbillable), int(rejected))

    async def tenant_usage(self, tenant_id: str, start: float, end: float) -> TenantUsage:
        rows = await self.db.execute_fetchall(
            "SELECT COALESCE(SUM(units), 0), "
            "COALESCE(SUM(CASE WHEN reported_at IS NOT NULL THEN units END), 0), "
            "COALESCE(SUM(CASE WHEN billable = 1 AND reported_at IS NULL THEN units END), 0), "
            "COALESCE(SUM(CASE WHEN billable = 0 THEN units END), 0), "
            "COALESCE(SUM(tokens), 0) "
            "FROM events WHERE tenant_id = ? AND ts >= ? AND ts < ?",
            (tenant_id, start, end),
        )
        return TenantUsage(*(int(v) for v in next(iter(rows))))

    async def record_drain(self, increments: dict[str, float], values: dict[str, float]) -> None:
        """Add to the drainer's counters and set its gauges, in one transaction."""
        db = self.db
        await db.execute("BEGIN IMMEDIATE")
        for key, delta in increments.items():
            await db.execute(
                "INSERT INTO drain_state (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = value + excluded.value",
                (key, delta),
            )
        for key, value in values.items():
            await db.execute(
                "INSERT INTO drain_state (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )
        await db.commit()

    async def drain_state(self) -> dict[str, float]:
        rows = await self.db.execute_fetchall("SELECT key, value FROM drain_state")
        return {str(k): float(v) for k, v in rows}

    async def unreported_before(self, ts: float) -> int:
        rows = await self.db.execute_fetchall(
            "SELECT COUNT(*) FROM events WHERE billable = 1 AND reported_at IS NULL AND ts < ?",
            (ts,),
        )
        return int(next(iter(rows))[0])

    async def check_writable(self) -> None:
        """Take and release the write lock on a connection of its own (on the writer's, its
        rollback could discard a group commit running in between): raises when the file
        cannot be written."""
        async with aiosqlite.connect(self._path, isolation_level=None) as probe:
            await probe.execute("PRAGMA busy_timeout=1000")
            await probe.execute("BEGIN IMMEDIATE")
            await probe.execute("ROLLBACK")

    async def reported_totals(self, start: float, end: float) -> dict[tuple[str, str], int]:
        """Accepted meter-event values per (customer, event name) by meter-event timestamp."""
        rows = await self.db.execute_fetchall(
            "SELECT stripe_customer, event_name, SUM(value) FROM batch_groups "
            "WHERE state = 'sent' AND timestamp >= ? AND timestamp < ? "
            "GROUP BY stripe_customer, event_name",
            (start, end),
        )
        return {(c, e): int(v) for c, e, v in rows}
