"""Failure scenarios reported against other migration tools, on a small `events` table.

The table is events(id text PRIMARY KEY, ts timestamp NOT NULL, amount numeric,
meta jsonb), partitioned by range on ts with daily partitions and primary key
(id, ts).
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from helpers import EVENTS_DDL, events_settings, index_names, migrate, partition_bounds, views_reading
from livepart import worker as worker_module


@pytest.fixture
async def conn(dsn: str):
    connection = await asyncpg.connect(dsn)
    yield connection
    await connection.close()


@pytest.fixture
def hooks():
    """Register in-process coroutines to run at named points of the migration."""
    worker_module.test_hooks.clear()
    yield worker_module.test_hooks
    worker_module.test_hooks.clear()


# Daily partitions run from the oldest row to today, so the rows sit a few days back.
DAY = date.today() - timedelta(days=3)
NEXT = DAY + timedelta(days=1)
AFTER = DAY + timedelta(days=2)


def at(day: date, clock: str) -> str:
    return f"{day:%Y-%m-%d} {clock}"


def partition(day: date) -> str:
    return f"events_p{day:%Y%m%d}"


async def _partition_of(conn: asyncpg.Connection, row_id: str) -> list[str]:
    rows = await conn.fetch("SELECT tableoid::regclass::text AS part FROM events WHERE id = $1", row_id)
    return [r["part"] for r in rows]


async def test_updates_and_deletes_after_copy(conn, dsn, hooks) -> None:
    """A row changed and a row deleted after the backfill copied them end up right."""
    await conn.execute(EVENTS_DDL)
    await conn.execute(
        "INSERT INTO events VALUES ('a1', $1::text::timestamp, 1.00, '{}'), ('b1', $2::text::timestamp, 5.00, '{}')",
        at(DAY, "10:00"), at(DAY, "11:00"),
    )

    async def change_after_copy() -> None:
        copied = await conn.fetchval("SELECT count(*) FROM events_lp_new")
        assert copied == 2
        await conn.execute("UPDATE events SET amount = 1.50 WHERE id = 'a1'")
        await conn.execute("DELETE FROM events WHERE id = 'b1'")

    hooks["phase.verify"] = change_after_copy
    await migrate(events_settings(dsn))

    rows = await conn.fetch("SELECT id, amount FROM events ORDER BY id")
    assert [(r["id"], str(r["amount"])) for r in rows] == [("a1", "1.50")]


async def test_partition_key_update_moves_row(conn, dsn, hooks) -> None:
    """Changing ts moves the row to the next day's partition, leaving one copy."""
    await conn.execute(EVENTS_DDL)
    await conn.execute("INSERT INTO events VALUES ('a1', $1::text::timestamp, 1.00, '{}')", at(DAY, "10:00"))

    async def move_after_copy() -> None:
        await conn.execute("UPDATE events SET amount = 1.50 WHERE id = 'a1'")
        await conn.execute("UPDATE events SET ts = ts + interval '1 day' WHERE id = 'a1'")

    hooks["phase.verify"] = move_after_copy
    await migrate(events_settings(dsn))

    assert await _partition_of(conn, "a1") == [partition(NEXT)]
    row = await conn.fetchrow("SELECT ts::text, amount::text FROM events WHERE id = 'a1'")
    assert row["ts"] == at(NEXT, "10:00:00")
    assert row["amount"] == "1.50"

    await conn.execute("UPDATE events SET ts = ts + interval '1 day' WHERE id = 'a1'")
    assert await _partition_of(conn, "a1") == [partition(AFTER)]
    old_ts = await conn.fetchval("SELECT ts::text FROM events_lp_old WHERE id = 'a1'")
    assert old_ts == at(AFTER, "10:00:00")


async def test_indexes_keep_canonical_names(conn, dsn) -> None:
    await conn.execute(EVENTS_DDL)
    await conn.execute("CREATE INDEX events_meta_idx ON events USING gin (meta)")
    await conn.execute("CREATE INDEX events_amount_partial_idx ON events (amount) WHERE amount > 100")
    await conn.execute("CREATE INDEX events_lower_id_idx ON events (lower(id))")
    await conn.execute("COMMENT ON INDEX events_meta_idx IS 'searches meta'")
    await conn.execute("INSERT INTO events VALUES ('a1', $1::text::timestamp, 1, '{\"k\": 1}')", at(DAY, "10:00"))
    before = await index_names(conn, "events")

    await migrate(events_settings(dsn))

    assert await index_names(conn, "events") == before
    assert await index_names(conn, "events_lp_old") == {f"{name}_lp_old" for name in before}
    definition = await conn.fetchval("SELECT pg_get_indexdef('events_meta_idx'::regclass)")
    assert definition == "CREATE INDEX events_meta_idx ON ONLY public.events USING gin (meta)"
    partial = await conn.fetchval("SELECT pg_get_indexdef('events_amount_partial_idx'::regclass)")
    assert partial.endswith("USING btree (amount) WHERE (amount > (100)::numeric)")
    comment = await conn.fetchval("SELECT obj_description('events_meta_idx'::regclass, 'pg_class')")
    assert comment == "searches meta"
    # A later CREATE INDEX IF NOT EXISTS under the canonical name must find the new table's index.
    status = await conn.execute("CREATE INDEX IF NOT EXISTS events_meta_idx ON events USING gin (meta)")
    assert status == "CREATE INDEX"
    owner_table = await conn.fetchval(
        "SELECT indrelid::regclass::text FROM pg_index WHERE indexrelid = 'events_meta_idx'::regclass"
    )
    assert owner_table == "events"


async def test_views_and_grants_follow_table(conn, dsn) -> None:
    await conn.execute(EVENTS_DDL)
    await conn.execute("CREATE VIEW daily_amount AS SELECT ts::date AS day, sum(amount) AS amount "
                       "FROM events GROUP BY 1")
    await conn.execute("CREATE VIEW big_events WITH (security_barrier) AS SELECT id FROM events WHERE amount > 10")
    role = "reporting_" + await conn.fetchval("SELECT current_database()")
    await conn.execute(f"CREATE ROLE {role}")
    await conn.execute(f"GRANT SELECT ON events TO {role}")
    await conn.execute(f"GRANT UPDATE (amount) ON events TO {role}")
    await conn.execute("INSERT INTO events VALUES ('a1', $1::text::timestamp, 1, '{}')", at(DAY, "10:00"))

    await migrate(events_settings(dsn))
    await conn.execute("INSERT INTO events VALUES ('a2', $1::text::timestamp, 20, '{}')", at(DAY, "12:00"))

    assert await views_reading(conn, "events") == {"daily_amount", "big_events"}
    total = await conn.fetchval("SELECT amount FROM daily_amount WHERE day = $1", DAY)
    assert total == 21
    barrier = await conn.fetchval("SELECT reloptions FROM pg_class WHERE relname = 'big_events'")
    assert barrier == ["security_barrier=true"]
    assert await conn.fetchval("SELECT has_table_privilege($1, 'events', 'SELECT')", role) is True
    assert await conn.fetchval("SELECT has_column_privilege($1, 'events', 'amount', 'UPDATE')", role) is True
    assert await conn.fetchval("SELECT has_column_privilege($1, 'events', 'meta', 'UPDATE')", role) is False

    await migrate_finalize(dsn)
    await conn.execute("DROP TABLE events_lp_old")  # no CASCADE: nothing depends on it any more
    assert await conn.fetchval("SELECT count(*) FROM events") == 2
    await conn.execute("DROP VIEW daily_amount, big_events")
    await conn.execute("DROP TABLE events")
    await conn.execute(f"DROP ROLE {role}")


async def migrate_finalize(dsn: str) -> None:
    from livepart.commands import finalize_command
    import asyncio

    await finalize_command(events_settings(dsn), asyncio.Event(), drop_old=False)


async def test_column_order_differs(conn, dsn, hooks) -> None:
    """Columns are matched by name when the physical order differs from the model."""
    await conn.execute("CREATE TABLE events (id text PRIMARY KEY, ts timestamp NOT NULL, amount numeric, "
                       "meta jsonb, dropped int)")
    await conn.execute("ALTER TABLE events DROP COLUMN amount")
    await conn.execute("ALTER TABLE events DROP COLUMN dropped")
    await conn.execute("ALTER TABLE events ADD COLUMN amount numeric")  # order now (id, ts, meta, amount)
    await conn.execute("INSERT INTO events (id, ts, amount, meta) VALUES "
                       "('a1', $1::text::timestamp, 1.25, '{\"x\": 1}'), ('b1', $2::text::timestamp, 2.5, '[1, 2]')",
                       at(DAY, "10:00"), at(DAY, "11:00"))

    async def write_through_trigger() -> None:
        await conn.execute("INSERT INTO events (id, ts, amount, meta) VALUES ('c1', $1::text::timestamp, 3.75, "
                           "'{\"y\": \"z\"}')", at(DAY, "12:00"))
        await conn.execute("UPDATE events SET amount = 9.5, meta = '{\"u\": true}' WHERE id = 'a1'")

    hooks["phase.backfill"] = write_through_trigger
    await migrate(events_settings(dsn))

    rows = await conn.fetch("SELECT id, ts::text, amount::text, meta::text FROM events ORDER BY id")
    assert [tuple(r) for r in rows] == [
        ("a1", at(DAY, "10:00:00"), "9.5", '{"u": true}'),
        ("b1", at(DAY, "11:00:00"), "2.5", "[1, 2]"),
        ("c1", at(DAY, "12:00:00"), "3.75", '{"y": "z"}'),
    ]
    order = await conn.fetch("SELECT attname FROM pg_attribute WHERE attrelid = 'events'::regclass "
                             "AND attnum > 0 AND NOT attisdropped ORDER BY attnum")
    assert [r["attname"] for r in order] == ["id", "ts", "meta", "amount"]


def last_dst_change(zone: str = "America/New_York") -> date:
    """Return the most recent day on which the zone's UTC offset changed."""
    tz = ZoneInfo(zone)
    day = date.today()
    while True:
        before = datetime(day.year, day.month, day.day, tzinfo=tz).utcoffset()
        after = datetime(day.year, day.month, day.day, 23, tzinfo=tz).utcoffset()
        if before != after:
            return day
        day -= timedelta(days=1)


@pytest.mark.parametrize("session_zone", ["Asia/Seoul", "America/New_York"])
async def test_time_zone_does_not_move_values(pg_server, make_dsn, session_zone) -> None:
    """Bounds and values are identical whatever the session and database TimeZone."""
    change = last_dst_change()
    eve = change - timedelta(days=1)
    values = [at(eve, "23:59:59.999"), at(change, "00:00:00"), at(change, "01:30:00"),
              at(change, "02:30:00"), at(eve, "23:59:59.999999")]
    reference_bounds = None
    for zone in ("UTC", session_zone):
        dsn = make_dsn(zone.replace("/", "_"))
        conn = await asyncpg.connect(dsn, server_settings={"TimeZone": zone})
        try:
            database = await conn.fetchval("SELECT current_database()")
            await conn.execute(f"ALTER DATABASE {database} SET TimeZone = '{zone}'")
            await conn.execute(EVENTS_DDL)
            for number, value in enumerate(values):
                await conn.execute("INSERT INTO events VALUES ($1, $2::text::timestamp, 1, '{}')",
                                   f"r{number}", value)

            await migrate(events_settings(dsn, future_partitions=0))

            column_type = await conn.fetchval(
                "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                "WHERE attrelid = 'events'::regclass AND attname = 'ts'")
            assert column_type == "timestamp without time zone"
            copied = await conn.fetch("SELECT n.ts = o.ts AS same FROM events n "
                                      "JOIN events_lp_old o USING (id) ORDER BY n.id")
            assert [r["same"] for r in copied] == [True] * len(values)
            texts = await conn.fetch("SELECT ts::text FROM events ORDER BY id")
            assert [r["ts"] for r in texts] == values
            placed = await conn.fetch("SELECT tableoid::regclass::text AS part FROM events ORDER BY id")
            assert [r["part"] for r in placed] == [partition(eve), partition(change), partition(change),
                                                   partition(change), partition(eve)]
            bounds = await partition_bounds(conn, "events")
        finally:
            await conn.close()
        if reference_bounds is None:
            reference_bounds = bounds
        else:
            assert bounds == reference_bounds
    following = change + timedelta(days=1)
    assert reference_bounds[partition(change)] == (
        f"FOR VALUES FROM ('{change:%Y-%m-%d} 00:00:00') TO ('{following:%Y-%m-%d} 00:00:00')")
