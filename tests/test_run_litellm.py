"""End to end: LiteLLM_SpendLogs becomes partitioned while a proxy-like writer keeps writing."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import asyncpg

from helpers import index_names, partition_bounds, views_reading
from livepart.orchestrator import run_migration
from livepart.settings import Settings
from livepart.workload.compare import compare_with_control
from livepart.workload.litellm import INDEX_NAMES, TABLE, VIEW_NAMES, RowGenerator, create_legacy_schema, load_rows
from livepart.workload.writer import Writer, create_control_table

CONTROL = "spendlogs_control"


async def _load(conn: asyncpg.Connection, rows: int, seed: int) -> None:
    await create_legacy_schema(conn)
    await create_control_table(conn, TABLE, "public", CONTROL, copy_rows=False)
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    generator = RowGenerator(seed, now - timedelta(days=100), now - timedelta(days=1))
    await load_rows(conn, generator.rows(rows), control=CONTROL)


async def test_migration_with_writer_keeps_every_row(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await _load(conn, 3000, seed=11)
        stop = asyncio.Event()
        writer = Writer(dsn, seed=12, pause=0.002, retention_fraction=0.3, update_fraction=0.1)
        writing = asyncio.create_task(writer.run(stop))
        await asyncio.sleep(0.3)

        result = await run_migration(Settings(dsn=dsn, batch_size=250))
        await asyncio.sleep(0.5)  # keep writing into the new table
        stop.set()
        await writing

        assert result.phase.value == "swapped"
        assert writer.stats.errors == 0
        assert writer.stats.inserts > 0
        assert writer.stats.deletes > 0
        comparison = await compare_with_control(conn, TABLE, CONTROL)
        assert comparison.lost == 0, comparison.lost_samples
        assert comparison.ghost == 0, comparison.ghost_samples
        assert comparison.stale == 0, comparison.stale_samples
        assert comparison.rows_table == comparison.rows_control
        assert not comparison.missing_columns
    finally:
        await conn.close()


async def test_migration_result_shape(dsn: str) -> None:
    """Partitioned by month with bounds at midnight, indexes and views under their old names."""
    conn = await asyncpg.connect(dsn)
    try:
        await _load(conn, 400, seed=21)
        low, high = await conn.fetchrow(f'SELECT min("startTime"), max("startTime") FROM "{TABLE}"')
        before_indexes = await index_names(conn, TABLE)
        role = "reporting_" + await conn.fetchval("SELECT current_database()")
        await conn.execute(f"CREATE ROLE {role}")
        await conn.execute(f'GRANT SELECT ON "{TABLE}" TO {role}')

        result = await run_migration(Settings(dsn=dsn, batch_size=100, future_partitions=2))
        assert result.already_done is False

        kind = await conn.fetchval(f"SELECT relkind::text FROM pg_class WHERE oid = '\"{TABLE}\"'::regclass")
        assert kind == "p"
        key = await conn.fetchval(f"SELECT pg_get_partkeydef('\"{TABLE}\"'::regclass)")
        assert key == 'RANGE ("startTime")'

        bounds = await partition_bounds(conn, TABLE)
        assert bounds.pop(f"{TABLE}_pdefault") == "DEFAULT"
        month = datetime(low.year, low.month, 1)
        expected = {}
        today = datetime.now(timezone.utc).replace(tzinfo=None)
        last = datetime(max(high, today).year, max(high, today).month, 1)
        for _ in range(2):
            last = datetime(last.year + last.month // 12, last.month % 12 + 1, 1)
        while month <= last:
            following = datetime(month.year + month.month // 12, month.month % 12 + 1, 1)
            expected[f"{TABLE}_p{month:%Y%m%d}"] = (
                f"FOR VALUES FROM ('{month:%Y-%m-%d %H:%M:%S}') TO ('{following:%Y-%m-%d %H:%M:%S}')"
            )
            month = following
        assert bounds == expected

        after_indexes = await index_names(conn, TABLE)
        assert after_indexes == before_indexes
        assert set(INDEX_NAMES) <= after_indexes
        old_indexes = await index_names(conn, f"{TABLE}_lp_old")
        assert old_indexes == {f"{name}_lp_old" for name in before_indexes}

        assert await views_reading(conn, TABLE) == set(VIEW_NAMES)
        assert await views_reading(conn, f"{TABLE}_lp_old") == set()

        pk = await conn.fetchval(
            f"SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = '{TABLE}_pkey'"
        )
        assert pk == 'PRIMARY KEY (request_id, "startTime")'
        column_type = await conn.fetchval(
            f"SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
            f"WHERE attrelid = '\"{TABLE}\"'::regclass AND attname = 'startTime'"
        )
        assert column_type == "timestamp(3) without time zone"
        can_read = await conn.fetchval(f"SELECT has_table_privilege($1, '\"{TABLE}\"', 'SELECT')", role)
        assert can_read is True
        await conn.execute(f'DROP OWNED BY {role}')
        await conn.execute(f"DROP ROLE {role}")

        again = await run_migration(Settings(dsn=dsn, batch_size=100, future_partitions=2))
        assert again.already_done is True
    finally:
        await conn.close()
