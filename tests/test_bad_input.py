"""Bad input stops before the first change, with one clear line and a non-zero exit."""

from __future__ import annotations

import asyncpg
import pytest

from helpers import EVENTS_DDL, catalog_snapshot, cli

EVENTS_ARGS = ["--table", "events", "--partition-key", "ts", "--interval", "day"]


async def _run_and_snapshot(dsn: str, setup: list[str], args: list[str]):
    conn = await asyncpg.connect(dsn)
    try:
        for sql in setup:
            await conn.execute(sql)
        before = await catalog_snapshot(conn)
        result = cli("run", "--dsn", dsn, *args)
        after = await catalog_snapshot(conn)
    finally:
        await conn.close()
    return result, before, after


CASES = {
    "missing_table": ([], EVENTS_ARGS, 'table "public"."events" not found'),
    "no_primary_key": (
        ["CREATE TABLE events (id text, ts timestamp NOT NULL)"], EVENTS_ARGS, "has no primary key"),
    "nulls_in_key": (
        ["CREATE TABLE events (id text PRIMARY KEY, ts timestamp)",
         "INSERT INTO events VALUES ('a', now()), ('b', NULL)"],
        EVENTS_ARGS, "contains NULL values"),
    "missing_key_column": ([EVENTS_DDL], ["--table", "events", "--partition-key", "created"],
                           'column "created" not found'),
    "text_key": ([EVENTS_DDL], ["--table", "events", "--partition-key", "id"], "has type text"),
    "interval_for_time_key": ([EVENTS_DDL], ["--table", "events", "--partition-key", "ts", "--interval", "1000"],
                              "does not fit"),
    "interval_unknown": ([EVENTS_DDL], ["--table", "events", "--partition-key", "ts", "--interval", "fortnight"],
                         "invalid --interval"),
    "foreign_key_points_at_table": (
        [EVENTS_DDL, "CREATE TABLE refunds (id int PRIMARY KEY, event_id text REFERENCES events (id))"],
        EVENTS_ARGS, 'foreign key "refunds_event_id_fkey" on public.refunds references'),
    "already_partitioned": (
        ["CREATE TABLE events (id text, ts timestamp NOT NULL, PRIMARY KEY (id, ts)) PARTITION BY RANGE (ts)"],
        EVENTS_ARGS, "already partitioned"),
    "unique_without_key": (
        [EVENTS_DDL, "ALTER TABLE events ADD COLUMN ext text UNIQUE"], EVENTS_ARGS,
        'unique index "events_ext_key" does not contain the partition key'),
    "too_many_partitions": (
        [EVENTS_DDL, "INSERT INTO events VALUES ('old', '1970-01-01', 1, '{}'), ('new', now(), 1, '{}')"],
        EVENTS_ARGS, "more than --max-partitions"),
    "infinite_key": (
        [EVENTS_DDL, "INSERT INTO events VALUES ('x', 'infinity', 1, '{}')"], EVENTS_ARGS, "infinite values"),
    "key_beyond_calendar": (
        [EVENTS_DDL, "INSERT INTO events VALUES ('x', '9999-12-31', 1, '{}'), ('y', now(), 1, '{}')"],
        EVENTS_ARGS + ["--interval", "month"], "outside the years 1 to 9998"),
    "name_taken": ([EVENTS_DDL, "CREATE TABLE events_lp_new (x int)"], EVENTS_ARGS,
                   '"public"."events_lp_new" already exists'),
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_bad_input_changes_nothing(dsn: str, case: str) -> None:
    setup, args, expected = CASES[case]
    result, before, after = await _run_and_snapshot(dsn, setup, args)
    lines = result.stderr.strip().splitlines()

    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert expected in lines[0]
    assert after == before


def test_unreachable_dsn_exits_two() -> None:
    result = cli("run", "--dsn", "postgresql://someone:secret-password@127.0.0.1:1/nothing", *EVENTS_ARGS)
    lines = result.stderr.strip().splitlines()

    assert result.returncode == 2
    assert len(lines) == 1
    assert "cannot connect to postgresql://someone:***@127.0.0.1:1/nothing" in lines[0]
    assert "secret-password" not in result.stderr + result.stdout


def test_missing_dsn_exits_two() -> None:
    result = cli("run", *EVENTS_ARGS, env={"DATABASE_URL": ""})

    assert result.returncode == 2
    assert "no database given: pass --dsn or set DATABASE_URL" in result.stderr


async def test_plan_changes_nothing(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(EVENTS_DDL)
        await conn.execute("CREATE VIEW event_ids AS SELECT id FROM events")
        await conn.execute("INSERT INTO events VALUES ('a', now() - interval '2 days', 1, '{}')")
        before = await catalog_snapshot(conn)
        result = cli("plan", "--dsn", dsn, *EVENTS_ARGS)
        as_json = cli("plan", "--dsn", dsn, *EVENTS_ARGS, "--json")
        after = await catalog_snapshot(conn)
    finally:
        await conn.close()

    assert result.returncode == 0, result.stderr
    assert after == before
    assert "CREATE TABLE \"public\".\"events_lp_new\"" in result.stdout
    assert "LOCK TABLE \"public\".\"events\" IN ACCESS EXCLUSIVE MODE;" in result.stdout
    assert "CREATE OR REPLACE VIEW \"public\".\"event_ids\"" in result.stdout
    assert as_json.returncode == 0
    assert '"ok": true' in as_json.stdout


async def test_plan_reports_failed_checks(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(EVENTS_DDL)
        await conn.execute("CREATE TABLE refunds (id int PRIMARY KEY, event_id text REFERENCES events (id))")
    finally:
        await conn.close()

    result = cli("plan", "--dsn", dsn, *EVENTS_ARGS)

    assert result.returncode == 2
    assert "refunds_event_id_fkey" in result.stdout
    assert "checks failed" in result.stdout


async def test_state_schema_without_access(dsn: str) -> None:
    """A role that cannot use an existing livepart schema gets one line, not a permission traceback."""
    from livepart.state import ensure_state_schema

    conn = await asyncpg.connect(dsn)
    role = "owner_" + await conn.fetchval("SELECT current_database()")
    try:
        await ensure_state_schema(conn)
        await conn.execute(f"CREATE ROLE {role} LOGIN")
        await conn.execute(f"GRANT CREATE ON SCHEMA public TO {role}")
        await conn.execute(EVENTS_DDL)
        await conn.execute(f"ALTER TABLE events OWNER TO {role}")
        before = await catalog_snapshot(conn)
        role_dsn = dsn.replace("postgresql://postgres@", f"postgresql://{role}@")
        result = cli("run", "--dsn", role_dsn, *EVENTS_ARGS)
        after = await catalog_snapshot(conn)
        await conn.execute("DROP TABLE events")
        await conn.execute(f"REVOKE CREATE ON SCHEMA public FROM {role}")
        await conn.execute(f"DROP ROLE {role}")
    finally:
        await conn.close()

    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "cannot use the livepart schema" in result.stderr
    assert after == before
