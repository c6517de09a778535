"""Rollback keeps every write made after the swap; finalize ends the rollback window."""

from __future__ import annotations

import asyncpg

from helpers import EVENTS_DDL, cli, index_names, views_reading

ARGS = ["--table", "events", "--partition-key", "ts", "--interval", "day", "--lock-timeout", "1"]


async def _snapshot(conn: asyncpg.Connection, table: str) -> list[tuple]:
    rows = await conn.fetch(f"SELECT id, ts::text, amount::text, meta::text FROM {table} ORDER BY id, ts")
    return [tuple(r) for r in rows]


async def test_rollback_keeps_writes_and_swaps_again(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(EVENTS_DDL)
        await conn.execute("CREATE VIEW event_ids AS SELECT id FROM events")
        await conn.execute("INSERT INTO events SELECT 'e' || g, now() - interval '2 days' + g * interval '1 hour', "
                           "g, '{}' FROM generate_series(1, 20) g")
        original_indexes = await index_names(conn, "events")
        assert cli("run", "--dsn", dsn, *ARGS).returncode == 0

        # Writes into the partitioned table, including a move to another partition.
        await conn.execute("INSERT INTO events VALUES ('after-swap', now() - interval '1 hour', 99, '{\"a\": 1}')")
        await conn.execute("UPDATE events SET amount = amount * 10 WHERE id = 'e1'")
        await conn.execute("UPDATE events SET ts = ts + interval '1 day' WHERE id = 'e2'")
        await conn.execute("DELETE FROM events WHERE id = 'e3'")
        expected = await _snapshot(conn, "events")

        rolled_back = cli("rollback", "--dsn", dsn, *ARGS)
        assert rolled_back.returncode == 0, rolled_back.stderr
        assert await conn.fetchval("SELECT relkind::text FROM pg_class WHERE relname = 'events'") == "r"
        assert await _snapshot(conn, "events") == expected
        assert await index_names(conn, "events") == original_indexes
        assert await views_reading(conn, "events") == {"event_ids"}

        # Writes into the old table again reach the partitioned one through the forward trigger.
        await conn.execute("INSERT INTO events VALUES ('after-rollback', now() - interval '30 minutes', 7, '{}')")
        await conn.execute("DELETE FROM events WHERE id = 'e4'")
        expected = await _snapshot(conn, "events")
        assert await _snapshot(conn, "events_lp_new") == expected

        status = cli("status", "--dsn", dsn, "--table", "events", "--json")
        assert '"phase": "rolled_back"' in status.stdout

        again = cli("run", "--dsn", dsn, *ARGS)
        assert again.returncode == 0, again.stderr
        assert await conn.fetchval("SELECT relkind::text FROM pg_class WHERE relname = 'events'") == "p"
        assert await _snapshot(conn, "events") == expected
        assert await views_reading(conn, "events") == {"event_ids"}

        finalized = cli("finalize", "--dsn", dsn, *ARGS, "--drop-old")
        assert finalized.returncode == 0, finalized.stderr
        assert await conn.fetchval("SELECT to_regclass('events_lp_old')") is None
        assert await conn.fetchval("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'livepart%'") == 0
        assert await _snapshot(conn, "events") == expected

        refused = cli("rollback", "--dsn", dsn, *ARGS)
        assert refused.returncode == 2
        assert "cannot be rolled back in phase finalized" in refused.stderr
        assert cli("run", "--dsn", dsn, *ARGS).returncode == 0  # nothing left to do
    finally:
        await conn.close()


async def test_commands_take_key_and_interval_from_state(dsn: str) -> None:
    """After `run`, verify, rollback and finalize need only the table; a different key is rejected."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(EVENTS_DDL)
        await conn.execute("INSERT INTO events VALUES ('a', now() - interval '1 day', 1, '{}')")
        assert cli("run", "--dsn", dsn, *ARGS).returncode == 0
    finally:
        await conn.close()

    assert cli("verify", "--dsn", dsn, "--table", "events").returncode == 0
    wrong = cli("verify", "--dsn", dsn, "--table", "events", "--interval", "week")
    assert wrong.returncode == 2
    assert "uses --interval day, not week; leave --interval out or pass day" in wrong.stderr
    assert cli("rollback", "--dsn", dsn, "--table", "events").returncode == 0
    assert cli("run", "--dsn", dsn, *ARGS).returncode == 0
    assert cli("finalize", "--dsn", dsn, "--table", "events").returncode == 0
