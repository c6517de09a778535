"""Nothing lost, invented or stale under concurrent writes aimed at the batch in flight."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest
import structlog

from helpers import EVENTS_DDL, cli, events_settings, migrate
from workers import WorkerProcess
from livepart import worker as worker_module
from livepart.errors import Interrupted
from livepart.orchestrator import run_migration
from livepart.settings import Settings
from livepart.workload.compare import Comparison, compare_with_control
from livepart.workload.litellm import TABLE, RowGenerator, create_legacy_schema, load_rows
from livepart.workload.writer import TARGETED_DELETE, TIME_SHIFT, Writer, create_control_table

CONTROL = "spendlogs_control"


@pytest.fixture
def hooks():
    worker_module.test_hooks.clear()
    yield worker_module.test_hooks
    worker_module.test_hooks.clear()


@dataclass
class StressOutcome:
    comparison: Comparison
    verify_differences: int
    writer_errors: int
    targeted_deletes: int
    time_shifts: int
    deletes: int
    duplicates_skipped: int


async def stress(dsn: str, seed: int, *, unsafe: bool, monkeypatch) -> StressOutcome:
    """Migrate under writers that insert, update, move rows across partitions and delete
    rows of the batch being copied, then compare with the control table."""
    # The copy statement sleeps after taking its snapshot, so deletes land inside the batch.
    monkeypatch.setenv("LIVEPART_TEST_PAUSE", "backfill.inside_batch=0.08")
    conn = await asyncpg.connect(dsn)
    try:
        await create_legacy_schema(conn)
        await create_control_table(conn, TABLE, "public", CONTROL, copy_rows=False)
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        generator = RowGenerator(seed, now - timedelta(days=40), now - timedelta(hours=1), large_row_fraction=0)
        await load_rows(conn, generator.rows(2000), control=CONTROL)

        async def batch_in_flight() -> tuple[str, str] | None:
            """The worker's checkpoint is the last copied row; the batch in flight starts after it."""
            checkpoint = await conn.fetchval(
                "SELECT checkpoint FROM livepart.migration WHERE table_name = $1", TABLE
            ) if await conn.fetchval("SELECT to_regclass('livepart.migration') IS NOT NULL") else None
            if not checkpoint:
                return None
            low = datetime.fromisoformat(checkpoint[0])
            return checkpoint[0], (low + timedelta(days=1)).isoformat(sep=" ")

        stop = asyncio.Event()
        # Duplicates come from the writer that also moves rows, because a writer only tracks the
        # current "startTime" of the rows it moved itself. A resend with a stale "startTime" is
        # not a conflict once the key is (request_id, "startTime"), so it would be stored twice.
        proxy = Writer(dsn, seed=seed + 1, pause=0.01, duplicate_fraction=0.0, retention_fraction=0.1,
                       update_fraction=0.05)
        attacker = Writer(dsn, seed=seed + 2, pause=0.002, batch_size=10, duplicate_fraction=0.3,
                          field_update_fraction=0.2, time_shift_fraction=0.2, target_range=batch_in_flight,
                          targeted_delete_fraction=0.4, targeted_delete_rows=3)
        tasks = [asyncio.create_task(proxy.run(stop)), asyncio.create_task(attacker.run(stop))]
        try:
            await asyncio.sleep(0.2)
            settings = Settings(dsn=dsn, batch_size=60, verify_batch_size=300, lock_timeout=1.0,
                                unsafe_no_row_locks=unsafe)
            await run_migration(settings)
            await asyncio.sleep(0.3)
        finally:
            stop.set()
            await asyncio.gather(*tasks)

        state = await conn.fetchrow("SELECT * FROM livepart.migration WHERE table_name = $1", TABLE)
        assert state["phase"] == "swapped"
        return StressOutcome(
            comparison=await compare_with_control(conn, TABLE, CONTROL),
            verify_differences=state["verify_differences"],
            writer_errors=proxy.stats.errors + attacker.stats.errors,
            targeted_deletes=attacker.stats.operations[TARGETED_DELETE],
            time_shifts=attacker.stats.operations[TIME_SHIFT],
            deletes=attacker.stats.deletes,
            duplicates_skipped=attacker.stats.skipped,
        )
    finally:
        await conn.close()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [101, 202, 303])
async def test_stress_no_lost_ghost_or_stale_rows(dsn, seed, monkeypatch) -> None:
    outcome = await stress(dsn, seed, unsafe=False, monkeypatch=monkeypatch)

    assert outcome.targeted_deletes > 0
    assert outcome.time_shifts > 0
    assert outcome.deletes > 0
    assert outcome.duplicates_skipped > 0
    assert outcome.writer_errors == 0
    assert outcome.comparison.lost == 0, outcome.comparison.lost_samples
    assert outcome.comparison.ghost == 0, outcome.comparison.ghost_samples
    assert outcome.comparison.stale == 0, outcome.comparison.stale_samples
    # The row locks close the race at its source: verification had nothing to repair.
    assert outcome.verify_differences == 0


@pytest.mark.slow
async def test_stress_detects_race_without_row_locks(dsn, monkeypatch) -> None:
    """With the row locks off, the same scenario produces ghosts that only verification catches."""
    outcome = await stress(dsn, 101, unsafe=True, monkeypatch=monkeypatch)

    assert outcome.verify_differences > 0
    # Verification repaired them before the swap, so the final table is still right.
    assert outcome.comparison.ok


async def rows_differing_from_control(conn: asyncpg.Connection) -> int:
    """Count rows that are in events or events_control but not in both, duplicates included."""
    return await conn.fetchval(
        "SELECT count(*) FROM ((SELECT * FROM events EXCEPT ALL SELECT * FROM events_control) "
        "UNION ALL (SELECT * FROM events_control EXCEPT ALL SELECT * FROM events)) d")


async def _verified_events(dsn: str, hooks, rows: int = 12) -> asyncpg.Connection:
    """Migrate an events table up to the swap, then stop: the state is verified and ready."""
    conn = await asyncpg.connect(dsn)
    await conn.execute(EVENTS_DDL)
    await conn.execute(
        "INSERT INTO events SELECT 'e' || lpad(g::text, 3, '0'), date_trunc('day', now()) - interval '1 day' "
        "+ g * interval '1 hour', g, jsonb_build_object('n', g) FROM generate_series(1, $1) g", rows)

    async def stop_before_swap() -> None:
        raise Interrupted("test stops before the swap")

    hooks["phase.swap"] = stop_before_swap
    with pytest.raises(Interrupted):
        await migrate(events_settings(dsn))
    hooks.clear()
    return conn


async def test_verify_finds_and_repairs_planted_differences(dsn, hooks) -> None:
    conn = await _verified_events(dsn, hooks)
    try:
        await conn.execute("DELETE FROM events_lp_new WHERE id = 'e002'")
        await conn.execute("INSERT INTO events_lp_new VALUES ('ghost', date_trunc('day', now()), 0, '{}')")
        await conn.execute("UPDATE events_lp_new SET meta = '{\"n\": \"changed\"}' WHERE id = 'e011'")
        args = ["--dsn", dsn, "--table", "events", "--partition-key", "ts", "--interval", "day",
                "--verify-batch-size", "4", "--json"]

        found = cli("verify", *args)
        report = json.loads(found.stdout)
        assert found.returncode == 5
        assert report["differences_found"] == 3
        assert report["ranges_repaired"] == 0
        assert report["clean"] is False
        # 12 rows at 4 a range: 3 full ranges, the open last range, and the rows dated after
        # the moment the pass started.
        assert report["ranges_checked"] == 5

        repaired = cli("verify", "--repair", *args)
        report = json.loads(repaired.stdout)
        assert repaired.returncode == 0, repaired.stderr
        assert report["differences_found"] == 3
        assert report["ranges_repaired"] == 3
        assert report["rows_per_second"] > 0

        clean = cli("verify", *args)
        assert clean.returncode == 0
        assert json.loads(clean.stdout)["differences_found"] == 0
        same = await conn.fetchval(
            "SELECT count(*) FROM (SELECT * FROM events EXCEPT SELECT * FROM events_lp_new) d")
        assert same == 0
        assert await conn.fetchval("SELECT count(*) FROM events_lp_new") == 12
    finally:
        await conn.close()


async def test_run_refuses_swap_until_verification_clean(dsn, hooks) -> None:
    """A difference the trigger could not write stops the swap until verification repairs it."""
    conn = await _verified_events(dsn, hooks)
    try:
        await conn.execute("INSERT INTO livepart.trigger_error (table_schema, table_name, operation, sqlstate, "
                           "message) VALUES ('public', 'events', 'INSERT', '23502', 'planted')")
        refused = cli("run", "--dsn", dsn, "--table", "events", "--partition-key", "ts", "--interval", "day")
        assert refused.returncode == 6
        assert "trigger errors were recorded after the last verification" in refused.stderr
        assert await conn.fetchval("SELECT relkind::text FROM pg_class WHERE relname = 'events'") == "r"

        verified = cli("verify", "--repair", "--dsn", dsn, "--table", "events", "--partition-key", "ts",
                       "--interval", "day")
        assert verified.returncode == 0
        done = cli("run", "--dsn", dsn, "--table", "events", "--partition-key", "ts", "--interval", "day")
        assert done.returncode == 0, done.stderr
        assert await conn.fetchval("SELECT relkind::text FROM pg_class WHERE relname = 'events'") == "p"
    finally:
        await conn.close()


async def test_insert_between_trigger_and_first_batch(dsn, hooks) -> None:
    """A row inserted after the trigger exists but before the copy's snapshot is copied once."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(EVENTS_DDL)
        await conn.execute("INSERT INTO events VALUES ('a1', now() - interval '1 day', 1, '{}')")

        async def insert_a2() -> None:
            await conn.execute("INSERT INTO events VALUES ('a2', now() - interval '2 hours', 2, '{}')")

        hooks["phase.backfill"] = insert_a2
        with structlog.testing.capture_logs() as logs:
            await migrate(events_settings(dsn))

        assert await conn.fetchval("SELECT count(*) FROM events WHERE id = 'a2'") == 1
        assert await conn.fetchval("SELECT count(*) FROM events") == 2
        assert [e for e in logs if e["event"] == "retry"] == []
        copied = [e for e in logs if e["event"] == "backfill.batch"]
        assert sum(e["rows"] for e in copied) == 2
        assert sum(e["inserted"] for e in copied) == 1  # a2 was already there, written by the trigger
    finally:
        await conn.close()


async def test_last_writes_before_swap_are_kept(dsn, hooks) -> None:
    """Rows committed after verification, and rows waiting on the swap's lock, reach the new table."""
    conn = await asyncpg.connect(dsn)
    other = await asyncpg.connect(dsn)
    try:
        await conn.execute(EVENTS_DDL)
        await conn.execute("INSERT INTO events VALUES ('a1', now() - interval '1 day', 1, '{}')")
        waiting: list[asyncio.Task] = []

        async def insert_after_verify() -> None:
            await conn.execute("INSERT INTO events VALUES ('a3', now() - interval '1 hour', 3, '{}')")

        async def insert_while_locked() -> None:
            waiting.append(asyncio.create_task(
                other.execute("INSERT INTO events VALUES ('a4', now() - interval '30 minutes', 4, '{}')")))
            await asyncio.sleep(0.3)  # the INSERT now waits behind the swap's lock
            assert not waiting[0].done()
            present = await conn.fetchval("SELECT count(*) FROM pg_trigger WHERE tgname = 'livepart_fwd_insert'")
            assert present == 1  # dropped only inside the swap's transaction

        hooks["phase.swap"] = insert_after_verify
        hooks["swap.locked"] = insert_while_locked
        await migrate(events_settings(dsn))
        await asyncio.wait_for(waiting[0], timeout=10)

        placed = await conn.fetch("SELECT id, tableoid::regclass::text AS part FROM events ORDER BY id")
        assert [r["id"] for r in placed] == ["a1", "a3", "a4"]
        assert all(r["part"].startswith("events_p") for r in placed)
        assert await conn.fetchval("SELECT count(*) FROM events_lp_old WHERE id IN ('a3', 'a4')") == 2
    finally:
        await other.close()
        await conn.close()


async def test_swap_waits_do_not_queue_application(dsn, hooks) -> None:
    """A long reader blocks the swap; inserts queue behind it for at most about lock_timeout."""
    conn = await asyncpg.connect(dsn)
    reader = await asyncpg.connect(dsn)
    inserter = await asyncpg.connect(dsn)
    lock_timeout = 0.5
    held_for = 4.0
    waits: list[float] = []
    names_during_attempts: set[str] = set()
    try:
        await conn.execute(EVENTS_DDL)
        await conn.execute("INSERT INTO events VALUES ('a1', now() - interval '1 day', 1, '{}')")
        holding = asyncio.Event()

        async def hold_select() -> None:
            transaction = reader.transaction()
            await transaction.start()
            await reader.fetchval("SELECT count(*) FROM events")
            holding.set()
            await asyncio.sleep(held_for)
            await transaction.commit()

        async def keep_inserting() -> None:
            number = 0
            await holding.wait()
            while number < 200:
                number += 1
                started = time.monotonic()
                await inserter.execute("INSERT INTO events VALUES ($1, now() - interval '1 hour', 1, '{}')",
                                       f"w{number}")
                waits.append(time.monotonic() - started)
                kind = await inserter.fetchval("SELECT relkind::text FROM pg_class WHERE relname = 'events'")
                names_during_attempts.add(kind)
                if kind == "p":
                    return
                await asyncio.sleep(0.05)

        background: list[asyncio.Task] = []

        async def start_contention() -> None:
            background.append(asyncio.create_task(hold_select()))
            background.append(asyncio.create_task(keep_inserting()))
            await holding.wait()

        hooks["phase.swap"] = start_contention
        started = time.monotonic()
        await migrate(events_settings(dsn, lock_timeout=lock_timeout, swap_attempts=60))
        swapped_after = time.monotonic() - started
        await asyncio.gather(*background)

        assert swapped_after >= held_for * 0.9  # the swap had to wait for the reader
        # Without lock_timeout an insert would wait the reader's full 4 s.
        assert max(waits) < lock_timeout + 1.5, sorted(waits)[-3:]
        assert names_during_attempts == {"r", "p"}
        assert await conn.fetchval("SELECT count(*) FROM events") == 1 + len(waits)
    finally:
        for connection in (inserter, reader, conn):
            await connection.close()


async def test_endless_inserts_and_huge_rows(dsn, hooks, monkeypatch) -> None:
    """The copy ends after the rows that existed at its start; batches respect the byte cap."""
    conn = await asyncpg.connect(dsn)
    writer_conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(EVENTS_DDL)
        await conn.execute("CREATE TABLE events_control (LIKE events INCLUDING ALL)")
        await conn.execute(
            "INSERT INTO events VALUES ('o1', now() - interval '2 days', 1, '{}'), "
            "('o2', now() - interval '1 day', 2, jsonb_build_object('blob', "
            "(SELECT string_agg(md5(g::text), '') FROM generate_series(1, 65536) g))), "
            "('o3', now() - interval '12 hours', 3, '{}')")
        await conn.execute("INSERT INTO events_control SELECT * FROM events")
        big = await conn.fetchval(
            "SELECT pg_column_size(id) + pg_column_size(ts) + pg_column_size(amount) + pg_column_size(meta) "
            "FROM events WHERE id = 'o2'")
        assert big > 1_000_000
        cap = big  # the huge row must travel alone

        stop = asyncio.Event()
        inserted = 0

        async def insert_every_10ms() -> None:
            nonlocal inserted
            while not stop.is_set():
                async with writer_conn.transaction():
                    key = f"n{inserted}"
                    await writer_conn.execute("INSERT INTO events VALUES ($1, now(), 1, '{}')", key)
                    await writer_conn.execute("INSERT INTO events_control SELECT * FROM events WHERE id = $1", key)
                inserted += 1
                await asyncio.sleep(0.01)

        counted_at_freeze: list[int] = []

        async def count_at_backfill_start() -> None:
            counted_at_freeze.append(await conn.fetchval("SELECT count(*) FROM events"))

        hooks["phase.backfill"] = count_at_backfill_start
        monkeypatch.setenv("LIVEPART_TEST_PAUSE", "backfill.before_commit=0.2")
        writing = asyncio.create_task(insert_every_10ms())
        await asyncio.sleep(0.2)
        with structlog.testing.capture_logs() as logs:
            await migrate(events_settings(dsn, batch_size=1000, max_batch_bytes=cap))
        await asyncio.sleep(0.2)
        stop.set()
        await writing

        batches = [e for e in logs if e["event"] == "backfill.batch"]
        assert all(e["stored_bytes"] <= cap for e in batches)
        assert len(batches) >= 3  # the huge row could not share a batch with the small ones
        assert sum(e["rows"] for e in batches) <= counted_at_freeze[0] + 3
        assert inserted > sum(e["rows"] for e in batches)
        assert await rows_differing_from_control(conn) == 0
    finally:
        await writer_conn.close()
        await conn.close()


async def test_future_dated_row_does_not_stall_copy(dsn, monkeypatch) -> None:
    """A row dated after now must not let new inserts fall under the bound and keep the copy going."""
    conn = await asyncpg.connect(dsn)
    writer_conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(EVENTS_DDL)
        await conn.execute("CREATE TABLE events_control (LIKE events INCLUDING ALL)")
        await conn.execute("INSERT INTO events SELECT 'o' || g, now() - interval '2 days' + g * interval '1 minute', "
                           "g, '{}' FROM generate_series(1, 20) g")
        await conn.execute("INSERT INTO events VALUES ('future', now() + interval '5 days', 0, '{}')")
        await conn.execute("INSERT INTO events_control SELECT * FROM events")
        stop = asyncio.Event()
        inserted = 0

        async def insert_fast() -> None:
            nonlocal inserted
            while not stop.is_set():
                async with writer_conn.transaction():
                    rows = [f"n{inserted}_{i}" for i in range(20)]
                    await writer_conn.execute(
                        "INSERT INTO events SELECT id, now(), 1, '{}' FROM unnest($1::text[]) id", rows)
                    await writer_conn.execute(
                        "INSERT INTO events_control SELECT * FROM events WHERE id = ANY($1)", rows)
                inserted += 1
                await asyncio.sleep(0.005)

        # The copy runs at about 20 rows a second while the writer inserts thousands.
        monkeypatch.setenv("LIVEPART_TEST_PAUSE", "backfill.before_commit=0.1")
        writing = asyncio.create_task(insert_fast())
        await asyncio.sleep(0.2)
        with structlog.testing.capture_logs() as logs:
            await asyncio.wait_for(migrate(events_settings(dsn, batch_size=2)), timeout=120)
        stop.set()
        await writing

        # Rows that the writer commits while the bound is being frozen may be recorded too.
        starts = [e for e in logs if e["event"] == "backfill.start"]
        assert starts[0]["rows_after_time_cap"] >= 1
        pending = sum(e["rows"] for e in logs if e["event"] == "backfill.pending_batch")
        assert pending == starts[0]["rows_after_time_cap"]
        assert await conn.fetchval("SELECT count(*) FROM events WHERE id = 'future'") == 1
        assert await rows_differing_from_control(conn) == 0
    finally:
        await writer_conn.close()
        await conn.close()


async def test_verify_falls_back_to_text_hash(dsn, hooks) -> None:
    """Types without an extended hash function (json, point) are verified through their text form."""
    from livepart.catalog import load_table
    from livepart.verify import supports_record_hash

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TABLE events (id text PRIMARY KEY, ts timestamp NOT NULL, doc json, spot point)")
        await conn.execute("INSERT INTO events SELECT 'e' || g, now() - interval '1 day' + g * interval '1 minute', "
                           "json_build_object('n', g), point(g, g) FROM generate_series(1, 30) g")
        await conn.execute("CREATE TABLE plain (id int PRIMARY KEY, doc jsonb, amount numeric)")
        assert await supports_record_hash(conn, await load_table(conn, "public", "events")) is False
        assert await supports_record_hash(conn, await load_table(conn, "public", "plain")) is True

        async def stop_before_swap() -> None:
            raise Interrupted("test stops before the swap")

        hooks["phase.swap"] = stop_before_swap
        with pytest.raises(Interrupted):
            await migrate(events_settings(dsn))
        hooks.clear()
        await conn.execute("UPDATE events_lp_new SET doc = '{\"n\": \"changed\"}' WHERE id = 'e7'")

        args = ["--dsn", dsn, "--table", "events", "--partition-key", "ts", "--interval", "day", "--json"]
        found = cli("verify", *args)
        assert found.returncode == 5
        assert json.loads(found.stdout)["differences_found"] == 1
        assert cli("verify", "--repair", *args).returncode == 0
        assert cli("run", *args[:-1]).returncode == 0
        assert await conn.fetchval("SELECT doc::text FROM events WHERE id = 'e7'") == '{"n" : 7}'
    finally:
        await conn.close()


async def test_verify_ends_under_steady_inserts(dsn, hooks) -> None:
    """With --sleep between ranges and inserts arriving all along, verification still ends."""
    conn = await _verified_events(dsn, hooks, rows=60)
    writer = await asyncpg.connect(dsn)
    stop = asyncio.Event()
    inserted = 0

    async def insert_every_10ms() -> None:
        nonlocal inserted
        while not stop.is_set():
            await writer.execute("INSERT INTO events VALUES ($1, now(), 1, '{}')", f"n{inserted:06d}")
            inserted += 1
            await asyncio.sleep(0.01)

    writing = asyncio.create_task(insert_every_10ms())
    try:
        await asyncio.sleep(0.3)
        worker = WorkerProcess("verify", "--dsn", dsn, "--table", "events", "--verify-batch-size", "20",
                               "--sleep", "0.3", "--json")
        # The first throttle event follows the freeze of the pass's limit, so the rows
        # counted now are at least the rows the ranges had to cover.
        started = await asyncio.to_thread(
            worker.wait_for, lambda event: event.get("event") == "throttle.changed", 60)
        assert started is not None
        rows_at_freeze = await conn.fetchval("SELECT count(*) FROM events")
        code = await asyncio.to_thread(worker.finish, 120)
    finally:
        stop.set()
        await writing
        await writer.close()
        await conn.close()

    report = json.loads(worker.stdout)
    assert code == 0, worker.other_lines
    assert report["differences_found"] == 0
    # Full ranges of 20 over the frozen rows, the open last range and the tail after the
    # time cap, plus one range for a row whose transaction began before the freeze.
    assert report["ranges_checked"] <= rows_at_freeze // 20 + 3
    assert inserted > report["ranges_checked"] * 20


async def test_swap_gives_up_naming_lock_holder(dsn, hooks) -> None:
    """When every swap attempt times out, the one-line error names the session holding the lock."""
    conn = await _verified_events(dsn, hooks)
    reader = await asyncpg.connect(dsn)
    try:
        transaction = reader.transaction()
        await transaction.start()
        await reader.fetchval("SELECT count(*) FROM events")
        holder = await reader.fetchval("SELECT pg_backend_pid()")
        result = await asyncio.to_thread(
            cli, "run", "--dsn", dsn, "--table", "events", "--partition-key", "ts", "--interval", "day",
            "--lock-timeout", "0.2", "--swap-attempts", "2")
        kind = await conn.fetchval("SELECT relkind::text FROM pg_class WHERE relname = 'events'")
        await transaction.rollback()
    finally:
        await reader.close()
        await conn.close()

    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1
    assert len(errors) == 1
    assert f"holding locks: pid {holder} (idle in transaction, AccessShareLock" in result.stderr
    assert "the migration is verified and waits for the swap" in result.stderr
    assert kind == "r"
