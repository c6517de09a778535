"""Partition maintenance: rows in the default partition, future partitions, crash between steps."""

from __future__ import annotations

import asyncio
from datetime import date, timedelta

import asyncpg
import pytest

from helpers import EVENTS_DDL, cli, events_settings, migrate, partition_bounds
from workers import WorkerProcess

ARGS = ["--table", "events", "--partition-key", "ts", "--interval", "day", "--lock-timeout", "1"]


@pytest.fixture
async def conn(dsn: str):
    connection = await asyncpg.connect(dsn)
    yield connection
    await connection.close()


async def _stray_setup(conn: asyncpg.Connection) -> None:
    """A partitioned events table with one daily partition, a default, and a row in the default."""
    await conn.execute(
        "CREATE TABLE events (id text, ts timestamp NOT NULL, amount numeric, meta jsonb, PRIMARY KEY (id, ts)) "
        "PARTITION BY RANGE (ts)"
    )
    await conn.execute("CREATE INDEX events_meta_idx ON events USING gin (meta)")
    await conn.execute("CREATE TABLE events_p20240501 PARTITION OF events "
                       "FOR VALUES FROM ('2024-05-01') TO ('2024-05-02')")
    await conn.execute("CREATE TABLE events_pdefault PARTITION OF events DEFAULT")
    await conn.execute("INSERT INTO events VALUES ('a', '2024-05-01 09:00', 1, '{}'), "
                       "('b', '2024-05-02 08:00', 2, '{\"k\": 1}')")


async def test_row_in_default_gets_own_partition_after_kill(conn, dsn) -> None:
    """Killed between staging and attaching, maintain resumes: the row moves, nothing is lost."""
    await _stray_setup(conn)
    failing = await conn.fetchval(
        "SELECT count(*) FROM events_pdefault"
    )
    assert failing == 1
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute("CREATE TABLE events_p20240502 PARTITION OF events "
                           "FOR VALUES FROM ('2024-05-02') TO ('2024-05-03')")

    worker = WorkerProcess("maintain", "--dsn", dsn, *ARGS, "--future-partitions", "0", "--debug",
                           env={"LIVEPART_TEST_PAUSE": "maintain.between_steps=5"})
    paused = await asyncio.to_thread(
        worker.wait_for, lambda e: e.get("event") == "test.pause" and e.get("point") == "maintain.between_steps", 60)
    assert paused is not None
    worker.kill()
    staged = await conn.fetchval("SELECT obj_description('events_p20240502'::regclass, 'pg_class')")
    assert staged == "livepart staging partition, not attached yet"
    assert await conn.fetchval("SELECT count(*) FROM events") == 2

    result = cli("maintain", "--dsn", dsn, *ARGS, "--future-partitions", "0")

    assert result.returncode == 0, result.stderr
    placed = await conn.fetch("SELECT id, tableoid::regclass::text AS part FROM events ORDER BY id")
    assert [tuple(r) for r in placed] == [("a", "events_p20240501"), ("b", "events_p20240502")]
    assert await conn.fetchval("SELECT count(*) FROM events") == 2
    assert await conn.fetchval("SELECT count(*) FROM events_pdefault") == 0
    bounds = await partition_bounds(conn, "events")
    assert bounds["events_p20240502"] == "FOR VALUES FROM ('2024-05-02 00:00:00') TO ('2024-05-03 00:00:00')"
    comment = await conn.fetchval("SELECT obj_description('events_p20240502'::regclass, 'pg_class')")
    assert comment is None
    index = await conn.fetchval(
        "SELECT count(*) FROM pg_index WHERE indrelid = 'events_p20240502'::regclass "
        "AND indexrelid::regclass::text LIKE '%meta%'")
    assert index == 1


async def test_maintain_creates_future_partitions(conn, dsn) -> None:
    await _stray_setup(conn)
    result = cli("maintain", "--dsn", dsn, *ARGS, "--future-partitions", "2")

    assert result.returncode == 0, result.stderr
    bounds = await partition_bounds(conn, "events")
    today = date.today()
    for offset in range(3):
        day = today + timedelta(days=offset)
        assert f"events_p{day:%Y%m%d}" in bounds
    assert "partitions created: 4; rows moved out of the default partition: 1" in result.stdout

    again = cli("maintain", "--dsn", dsn, *ARGS, "--future-partitions", "2")
    assert "partitions created: 0; rows moved out of the default partition: 0" in again.stdout


async def test_maintain_after_migration_moves_stray_rows(conn, dsn) -> None:
    """A row beyond the premade partitions lands in the default and moves out with maintain."""
    await conn.execute(EVENTS_DDL)
    today = date.today()
    await conn.execute("INSERT INTO events VALUES ('a', $1::date - 1, 1, '{}')", today)
    await migrate(events_settings(dsn, future_partitions=1))
    far = today + timedelta(days=10)
    await conn.execute("INSERT INTO events VALUES ('far', $1::date + time '06:00', 2, '{}')", far)
    assert await conn.fetchval("SELECT tableoid::regclass::text FROM events WHERE id = 'far'") == "events_pdefault"

    result = cli("maintain", "--dsn", dsn, *ARGS, "--future-partitions", "1")

    assert result.returncode == 0, result.stderr
    part = await conn.fetchval("SELECT tableoid::regclass::text FROM events WHERE id = 'far'")
    assert part == f"events_p{far:%Y%m%d}"
    # The reverse trigger keeps the old table in step; moving rows between partitions is not a write.
    assert await conn.fetchval("SELECT count(*) FROM events_lp_old WHERE id = 'far'") == 1
    assert await conn.fetchval("SELECT count(*) FROM events") == 2


async def test_maintain_rejects_plain_table(conn, dsn) -> None:
    await conn.execute(EVENTS_DDL)
    result = cli("maintain", "--dsn", dsn, *ARGS)

    assert result.returncode == 2
    assert "is not a partitioned table" in result.stderr
