"""Interruptions of every kind end in the same table: kills, restarts, signals, rivals."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest

from helpers import catalog_snapshot, cli
from livepart.workload.compare import compare_with_control
from livepart.workload.litellm import TABLE, RowGenerator, create_legacy_schema, load_rows
from livepart.workload.writer import Writer, create_control_table
from workers import WorkerProcess

CONTROL = "spendlogs_control"
BATCH = 100


async def load_litellm(dsn: str, rows: int, seed: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await create_legacy_schema(conn)
        await create_control_table(conn, TABLE, "public", CONTROL, copy_rows=False)
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        generator = RowGenerator(seed, now - timedelta(days=60), now - timedelta(hours=1), large_row_fraction=0)
        await load_rows(conn, generator.rows(rows), control=CONTROL)
        await conn.execute(f'ANALYZE "{TABLE}"')
    finally:
        await conn.close()


async def state_row(conn: asyncpg.Connection) -> asyncpg.Record | None:
    exists = await conn.fetchval("SELECT to_regclass('livepart.migration') IS NOT NULL")
    if not exists:
        return None
    return await conn.fetchrow("SELECT * FROM livepart.migration WHERE table_name = $1", TABLE)


async def assert_equal_to_control(conn: asyncpg.Connection) -> None:
    comparison = await compare_with_control(conn, TABLE, CONTROL)
    assert comparison.lost == 0, comparison.lost_samples
    assert comparison.ghost == 0, comparison.ghost_samples
    assert comparison.stale == 0, comparison.stale_samples
    assert comparison.rows_table == comparison.rows_control


def run_args(dsn: str, *extra: str) -> list[str]:
    return ["run", "--dsn", dsn, "--batch-size", str(BATCH), "--verify-batch-size", "500",
            "--lock-timeout", "1", "--debug", *extra]


def is_event(name: str, **fields: object):
    return lambda event: event.get("event") == name and all(event.get(k) == v for k, v in fields.items())


# Where each kill lands: the event that arms it and a random delay range after it.
KILL_POINTS = {
    "prepare": [is_event("prepare.shadow_ready"), is_event("test.pause", point="prepare.before_trigger")],
    "backfill": [is_event("backfill.read"), is_event("test.pause", point="backfill.before_commit"),
                 is_event("backfill.batch")],
    "verify": [is_event("test.pause", point="verify.range")],
    "swap": [is_event("swap.lock_acquired"), is_event("test.pause", point="swap.before_commit")],
}
SCHEDULE = ["prepare"] * 2 + ["backfill"] * 13 + ["verify"] * 3 + ["swap"] * 3
PAUSES = ("prepare.before_trigger=0.2,backfill.before_commit=0.03,verify.range=0.1,"
          "swap.locked=0.2,swap.before_commit=0.2")


@pytest.mark.slow
async def test_kill_at_random_moments_resumes(dsn: str) -> None:
    """SIGKILL the worker 21 times over every phase under a writer; the result equals the control."""
    rng = random.Random(2026)
    await load_litellm(dsn, rows=3000, seed=5)
    conn = await asyncpg.connect(dsn)
    stop = asyncio.Event()
    writer = Writer(dsn, seed=6, pause=0.01, retention_fraction=0.1, update_fraction=0.05)
    writing = asyncio.create_task(writer.run(stop))
    kills: list[str] = []
    reread: list[int] = []
    try:
        schedule = list(SCHEDULE)
        while True:
            before = await state_row(conn)
            copied_before = before["rows_copied"] if before else 0
            worker = WorkerProcess(*run_args(dsn), env={"LIVEPART_TEST_PAUSE": PAUSES})
            outcome = None
            if schedule:
                phase = schedule[0]
                trigger = rng.choice(KILL_POINTS[phase])
                armed = await asyncio.to_thread(worker.wait_for, trigger, 120)
                if armed is not None:
                    await asyncio.sleep(rng.uniform(0, 0.04))
                    if worker.process.poll() is None:
                        worker.kill()
                        kills.append(phase)
                        schedule.pop(0)
                        outcome = "killed"
            if outcome is None:
                code = await asyncio.to_thread(worker.finish)
                if code == 3:  # the killed worker's session had not ended yet
                    await asyncio.sleep(0.5)
                    continue
                assert code == 0, worker.other_lines[-5:] + [str(e) for e in worker.events[-5:]]
                if not schedule:
                    break
                # The migration finished before the schedule was used up.
                pytest.fail(f"migration finished after {len(kills)} kills; remaining {schedule}")
            after = await state_row(conn)
            copied_after = after["rows_copied"] if after else 0
            read = sum(e["rows"] for e in worker.named("backfill.read"))
            reread.append(read - (copied_after - copied_before))
    finally:
        stop.set()
        await writing

    try:
        assert len(kills) >= 20
        assert set(kills) == {"prepare", "backfill", "verify", "swap"}
        assert max(reread) <= BATCH, reread
        assert min(reread) >= 0, reread
        assert writer.stats.errors == 0
        state = await state_row(conn)
        assert state["phase"] == "swapped"
        await assert_equal_to_control(conn)
        print(f"kills per phase: { {p: kills.count(p) for p in set(kills)} }; rows read again after each "
              f"kill: {reread}")
    finally:
        await conn.close()


@pytest.mark.slow
async def test_server_restart_during_backfill(pg_server, dsn: str) -> None:
    await load_litellm(dsn, rows=2000, seed=8)
    worker = WorkerProcess(*run_args(dsn), env={"LIVEPART_TEST_PAUSE": "backfill.before_commit=0.05"})
    batches = await asyncio.to_thread(worker.wait_for, is_event("backfill.batch"), 60)
    assert batches is not None
    await asyncio.to_thread(pg_server.restart, "immediate")
    code = await asyncio.to_thread(worker.finish)
    if code != 0:  # exiting cleanly is allowed too, as long as the next run completes
        assert code in (1, 3), worker.other_lines
        assert cli(*run_args(dsn)).returncode == 0
    retries = [e for e in worker.events if e.get("event") == "retry"]
    conn = await asyncpg.connect(dsn)
    try:
        state = await state_row(conn)
        assert state["phase"] == "swapped"
        await assert_equal_to_control(conn)
    finally:
        await conn.close()
    assert code != 0 or retries, "the worker neither retried nor failed"


async def test_two_workers_only_one_proceeds(dsn: str) -> None:
    await load_litellm(dsn, rows=300, seed=9)
    env = {"LIVEPART_TEST_PAUSE": "phase.prepare=1.5"}
    first = WorkerProcess(*run_args(dsn), env=env)
    second = WorkerProcess(*run_args(dsn), env=env)
    codes = sorted([await asyncio.to_thread(first.finish), await asyncio.to_thread(second.finish)])

    assert codes == [0, 3]
    loser = first if first.process.returncode == 3 else second
    message = "\n".join(loser.other_lines)
    assert "another livepart worker is already migrating public.LiteLLM_SpendLogs" in message
    assert "pid" in message
    assert "since" in message
    assert loser.named("phase.start") == []


async def test_settings_mismatch_stops_before_change(dsn: str) -> None:
    await load_litellm(dsn, rows=500, seed=10)
    worker = WorkerProcess(*run_args(dsn, "--interval", "week"))
    assert await asyncio.to_thread(worker.wait_for, is_event("backfill.batch"), 60) is not None
    worker.kill()
    conn = await asyncpg.connect(dsn)
    try:
        before = await catalog_snapshot(conn)
        state_before = dict(await state_row(conn))
        result = cli(*run_args(dsn, "--interval", "month"))
        after = await catalog_snapshot(conn)
        state_after = dict(await state_row(conn))
    finally:
        await conn.close()

    assert result.returncode == 2
    assert "started with other settings (interval 'week' -> 'month')" in result.stderr
    assert after == before
    assert state_after["checkpoint"] == state_before["checkpoint"]
    assert state_after["phase"] == state_before["phase"]


async def test_dropped_trigger_stops_resume(dsn: str) -> None:
    """A trigger dropped while livepart was away stops the resume; reinstalling repairs the gap."""
    await load_litellm(dsn, rows=800, seed=11)
    worker = WorkerProcess(*run_args(dsn))
    assert await asyncio.to_thread(worker.wait_for, is_event("backfill.batch"), 60) is not None
    worker.kill()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP TRIGGER livepart_fwd_delete ON "{TABLE}"')
        await conn.execute(f'ALTER TABLE "{TABLE}" DISABLE TRIGGER livepart_fwd_update')
        # Writes made while the trigger is gone: only verification can bring them over.
        await conn.execute(f'DELETE FROM "{TABLE}" WHERE request_id IN (SELECT request_id FROM "{TABLE}" '
                           f'ORDER BY "startTime" LIMIT 5)')
        await conn.execute(f'DELETE FROM "{CONTROL}" WHERE request_id NOT IN (SELECT request_id FROM "{TABLE}")')
        await conn.execute(f'UPDATE "{TABLE}" SET spend = spend + 1 WHERE request_id IN '
                           f'(SELECT request_id FROM "{TABLE}" ORDER BY "startTime" LIMIT 3)')
        await conn.execute(f'UPDATE "{CONTROL}" c SET spend = t.spend FROM "{TABLE}" t '
                           f'WHERE t.request_id = c.request_id')

        refused = cli(*run_args(dsn))
        assert refused.returncode == 6
        assert "livepart_fwd_delete is missing" in refused.stderr
        assert "livepart_fwd_update is disabled" in refused.stderr
        assert "--reinstall-trigger" in refused.stderr

        repaired = cli(*run_args(dsn, "--reinstall-trigger"))
        assert repaired.returncode == 0, repaired.stderr[-2000:]
        state = await state_row(conn)
        assert state["phase"] == "swapped"
        assert state["verify_differences"] >= 1
        await assert_equal_to_control(conn)
    finally:
        await conn.close()


async def test_sigterm_stops_at_batch_boundary(dsn: str) -> None:
    await load_litellm(dsn, rows=1500, seed=12)
    worker = WorkerProcess(*run_args(dsn), env={"LIVEPART_TEST_PAUSE": "backfill.before_commit=0.05"})
    assert await asyncio.to_thread(worker.wait_for, is_event("backfill.batch"), 60) is not None
    worker.signal(signal.SIGTERM)
    code = await asyncio.to_thread(worker.finish)

    assert code == 4
    assert any("run the same command again to resume" in line for line in worker.other_lines)
    conn = await asyncpg.connect(dsn)
    try:
        state = await state_row(conn)
        assert state["phase"] == "backfill"
        assert state["rows_copied"] % BATCH == 0  # stopped between batches, none half-done
        locks = await conn.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
        assert locks == 0

        status = cli("status", "--dsn", dsn, "--json")
        assert status.returncode == 0
        assert '"phase": "backfill"' in status.stdout
        assert '"running": false' in status.stdout

        assert cli(*run_args(dsn)).returncode == 0
        await assert_equal_to_control(conn)
    finally:
        await conn.close()


async def test_status_reports_progress(dsn: str) -> None:
    import json

    await load_litellm(dsn, rows=1000, seed=13)
    worker = WorkerProcess(*run_args(dsn), env={"LIVEPART_TEST_PAUSE": "backfill.before_commit=0.2"})
    assert await asyncio.to_thread(worker.wait_for, is_event("backfill.batch"), 60) is not None
    await asyncio.sleep(0.3)
    status = cli("status", "--dsn", dsn, "--json")
    worker.signal(signal.SIGINT)
    assert await asyncio.to_thread(worker.finish) == 4

    report = json.loads(status.stdout)
    assert report["phase"] == "backfill"
    assert report["rows_copied"] >= BATCH
    assert report["rows_estimated"] == 1000
    assert report["rows_per_second"] > 0
    assert report["eta_seconds"] >= 0
    assert report["checkpoint_age_seconds"] >= 0
    assert report["trigger"] == {"name": "livepart_fwd_*", "present": True, "enabled": True,
                                 "expected": True}
    assert report["worker"]["running"] is True
    assert report["throttle"] == "not throttled"
    assert report["last_error"] is None

    text = cli("status", "--dsn", dsn)
    assert "backfill" in text.stdout
    assert "present and enabled" in text.stdout


async def test_lost_connection_after_swap_commit(dsn: str) -> None:
    """After a connection lost around the swap's COMMIT, the retry reads the catalog and does not swap again."""
    import structlog

    from helpers import EVENTS_DDL, events_settings, migrate
    from livepart import worker as worker_module

    admin = await asyncpg.connect(dsn)
    calls = []

    async def lose_connection() -> None:
        calls.append(time.monotonic())
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE application_name LIKE 'livepart %' AND pid <> pg_backend_pid()")
        raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation")

    try:
        await admin.execute(EVENTS_DDL)
        await admin.execute("INSERT INTO events VALUES ('a', now() - interval '1 day', 1, '{}')")
        worker_module.test_hooks["swap.after_commit"] = lose_connection
        with structlog.testing.capture_logs() as logs:
            result = await migrate(events_settings(dsn))
    finally:
        worker_module.test_hooks.clear()

    try:
        assert len(calls) == 1
        assert result.phase.value == "swapped"
        events = [entry["event"] for entry in logs]
        assert "retry" in events
        assert "swap.already_committed" in events
        assert await admin.fetchval("SELECT relkind::text FROM pg_class WHERE relname = 'events'") == "p"
        assert await admin.fetchval("SELECT count(*) FROM events") == 1
        assert await admin.fetchval("SELECT count(*) FROM events_lp_old") == 1
    finally:
        await admin.close()


async def test_interrupted_restart_hint_drops_restart(dsn: str) -> None:
    """After --restart, the resume hint must not send the user back to discarding the progress."""
    await load_litellm(dsn, rows=300, seed=14)
    worker = WorkerProcess(*run_args(dsn, "--restart"), env={"LIVEPART_TEST_PAUSE": "phase.backfill=5"})
    paused = await asyncio.to_thread(worker.wait_for, is_event("test.pause", point="phase.backfill"), 60)
    assert paused is not None
    worker.signal(signal.SIGINT)

    assert await asyncio.to_thread(worker.finish) == 4
    assert any("without --restart" in line for line in worker.other_lines), worker.other_lines
