"""Tests of the LiteLLM workload: legacy schema, row generator, writer and control comparison.

All tests except the pure-Python ones run against a real PostgreSQL server through
the `dsn` fixture, one empty database per test.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest
import structlog

from livepart.workload.compare import compare_with_control
from livepart.workload.litellm import (
    INDEX_NAMES,
    JSON_COLUMNS,
    MODEL_COLUMNS,
    TABLE,
    VIEW_NAMES,
    RowGenerator,
    create_legacy_schema,
    load_rows,
)
from livepart.workload.writer import OPERATION_KINDS, Writer, WriterStats, create_control_table

SCHEMA = "public"
CONTROL = "spendlogs_control"
QUALIFIED = f'"{SCHEMA}"."{TABLE}"'

# Physical order written out independently of the module, as migrations built it.
EXPECTED_PHYSICAL_ORDER = [
    "request_id", "call_type", "api_key", "spend", "total_tokens", "prompt_tokens",
    "completion_tokens", "startTime", "endTime", "completionStartTime", "model",
    "model_id", "model_group", "custom_llm_provider", "api_base", "user", "metadata",
    "cache_hit", "cache_key", "request_tags", "team_id", "end_user",
    "requester_ip_address", "messages", "response",
    "proxy_server_request", "session_id", "status", "mcp_namespaced_tool_name",
    "organization_id", "agent_id", "request_duration_ms", "litellm_call_id",
]

EXPECTED_VIEW_COLUMNS = {
    "MonthlyGlobalSpend": ["date", "spend"],
    "Last30dKeysBySpend": ["api_key", "total_spend"],
    "Last30dModelsBySpend": ["model", "total_spend"],
    "MonthlyGlobalSpendPerKey": ["date", "spend", "api_key"],
    "MonthlyGlobalSpendPerUserPerKey": ["date", "spend", "api_key", "user"],
    "DailyTagSpend": ["individual_request_tag", "spend_date", "log_count", "total_spend"],
    "Last30dTopEndUsersSpend": ["end_user", "total_events", "total_spend"],
}

STORED_JSON_SIZE = " + ".join(
    f'coalesce(octet_length("{name}"::text), 0)' for name in sorted(JSON_COLUMNS)
)


def utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def json_bytes(value) -> int:
    return len(json.dumps(value, ensure_ascii=False).encode("utf-8"))


def run(coroutine):
    return asyncio.run(coroutine)


async def connect(dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(dsn)


async def prepare_loaded(dsn: str, count: int, seed: int = 1) -> tuple[asyncpg.Connection, list[dict]]:
    """Create the legacy schema and the control table, and load `count` rows of the last 20 days."""
    conn = await connect(dsn)
    await create_legacy_schema(conn)
    await create_control_table(conn, TABLE, SCHEMA, CONTROL)
    now = utc_now()
    rows = RowGenerator(seed, now - timedelta(days=20), now).rows(count)
    await load_rows(conn, rows, control=CONTROL)
    return conn, rows


async def run_writer(writer: Writer, seconds: float, until=None, max_seconds: float = 30.0) -> None:
    """Run the writer for `seconds`, and longer (up to max_seconds) until `until(writer.stats)` is true."""
    stop = asyncio.Event()
    task = asyncio.create_task(writer.run(stop))
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.sleep(seconds)
    while until is not None and not until(writer.stats) and loop.time() - started < max_seconds:
        if task.done():
            break
        await asyncio.sleep(0.1)
    stop.set()
    await asyncio.wait_for(task, timeout=60)


# -- legacy schema --------------------------------------------------------------


def test_legacy_schema_column_order(dsn):
    async def check():
        conn = await connect(dsn)
        await create_legacy_schema(conn)
        names = await conn.fetch(
            "SELECT attname::text FROM pg_attribute WHERE attrelid = $1::regclass "
            "AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            QUALIFIED,
        )
        await conn.close()
        return [record[0] for record in names]

    physical = run(check())
    assert physical == EXPECTED_PHYSICAL_ORDER
    assert sorted(MODEL_COLUMNS) == sorted(physical)
    assert list(MODEL_COLUMNS) != physical


def test_legacy_schema_indexes(dsn):
    async def check():
        conn = await connect(dsn)
        await create_legacy_schema(conn)
        records = await conn.fetch(
            "SELECT indexname::text, indexdef FROM pg_indexes WHERE schemaname = $1 AND tablename = $2",
            SCHEMA, TABLE,
        )
        await conn.close()
        return {name: definition for name, definition in records}

    indexes = run(check())
    assert sorted(indexes) == sorted(INDEX_NAMES)
    assert len(indexes) == 7
    assert '("startTime", request_id)' in indexes["LiteLLM_SpendLogs_startTime_request_id_idx"]
    assert '(api_key, "startTime", spend)' in indexes["LiteLLM_SpendLogs_api_key_startTime_spend_idx"]
    assert "UNIQUE" in indexes["LiteLLM_SpendLogs_pkey"]


def test_legacy_schema_views(dsn):
    async def check():
        conn, _ = await prepare_loaded(dsn, 500)
        views = await conn.fetch("SELECT viewname::text FROM pg_views WHERE schemaname = $1", SCHEMA)
        columns = {}
        row_counts = {}
        for name in VIEW_NAMES:
            statement = await conn.prepare(f'SELECT * FROM "{SCHEMA}"."{name}"')
            columns[name] = [attribute.name for attribute in statement.get_attributes()]
            row_counts[name] = len(await statement.fetch())
        await conn.close()
        return sorted(record[0] for record in views), columns, row_counts

    views, columns, row_counts = run(check())
    assert views == sorted(EXPECTED_VIEW_COLUMNS)
    assert sorted(VIEW_NAMES) == sorted(EXPECTED_VIEW_COLUMNS)
    assert columns == EXPECTED_VIEW_COLUMNS
    for name, count in row_counts.items():
        assert count > 0, f"view {name} returned no rows over 500 rows of the last 20 days"


def test_legacy_schema_other_schema(dsn):
    async def check():
        conn = await connect(dsn)
        search_path = await conn.fetchval("SHOW search_path")
        await create_legacy_schema(conn, "Spend Logs")
        tables = await conn.fetch(
            "SELECT schemaname::text FROM pg_tables WHERE tablename = $1", TABLE
        )
        views = await conn.fetchval(
            "SELECT count(*) FROM pg_views WHERE schemaname = 'Spend Logs'"
        )
        search_path_after = await conn.fetchval("SHOW search_path")
        await conn.close()
        return [record[0] for record in tables], views, search_path, search_path_after

    schemas, views, search_path, search_path_after = run(check())
    assert schemas == ["Spend Logs"]
    assert views == 7
    assert search_path_after == search_path


# -- row generator --------------------------------------------------------------


def test_generator_same_seed_same_rows():
    start, end = datetime(2025, 1, 1), datetime(2025, 2, 1)
    first = RowGenerator(42, start, end).rows(300)
    second = RowGenerator(42, start, end).rows(300)
    other = RowGenerator(43, start, end).rows(300)
    assert first == second
    assert {row["request_id"] for row in first}.isdisjoint(row["request_id"] for row in other)


def test_generator_time_range_and_precision():
    start = datetime(2025, 1, 1, 0, 0, 0, 123456)
    end = datetime(2025, 1, 8)
    generator = RowGenerator(5, start, end)
    ordered = generator.rows(2000)
    scattered = [generator.row() for _ in range(500)]
    first_ms = datetime(2025, 1, 1, 0, 0, 0, 124000)

    start_times = [row["startTime"] for row in ordered]
    assert start_times == sorted(start_times)
    for row in ordered + scattered:
        assert first_ms <= row["startTime"] < end
        assert row["startTime"].tzinfo is None
        for name in ("startTime", "endTime", "completionStartTime"):
            value = row[name]
            assert value is None or value.microsecond % 1000 == 0, name
        assert row["endTime"] >= row["startTime"]
        if row["completionStartTime"] is not None:
            assert row["startTime"] <= row["completionStartTime"] <= row["endTime"]
        assert row["request_duration_ms"] == (row["endTime"] - row["startTime"]) // timedelta(milliseconds=1)
        assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]
        assert set(row) == set(MODEL_COLUMNS)
    assert start_times[-1] - start_times[0] > timedelta(days=6)


def test_generator_accepts_aware_times():
    start = datetime(2025, 1, 1, 2, 0, tzinfo=timezone(timedelta(hours=2)))
    end = datetime(2025, 1, 1, 1, 0, tzinfo=timezone.utc)
    rows = RowGenerator(9, start, end).rows(50)
    for row in rows:
        assert datetime(2025, 1, 1, 0, 0) <= row["startTime"] < datetime(2025, 1, 1, 1, 0)


def test_generator_rejects_empty_range():
    moment = datetime(2025, 1, 1)
    with pytest.raises(ValueError, match="start must be before end"):
        RowGenerator(1, moment, moment)


def test_generator_value_variety():
    rows = RowGenerator(11, datetime(2025, 1, 1), datetime(2025, 1, 2)).rows(2000)
    text = json.dumps([row["messages"] for row in rows], ensure_ascii=False)

    assert any(row["team_id"] is None for row in rows)
    assert any(row["end_user"] == "" for row in rows)
    assert any(row["end_user"] is None for row in rows)
    assert any(row["request_tags"] is None for row in rows)
    assert any(isinstance(row["request_tags"], list) and row["request_tags"] for row in rows)
    assert any(row["status"] == "failure" for row in rows)
    assert any(row["completionStartTime"] is None for row in rows)
    assert any(row["messages"] == {} for row in rows)
    assert "é" in text
    assert "数据库" in text
    assert any(row["spend"] > 0 for row in rows)
    chat = next(row for row in rows if isinstance(row["messages"], list) and len(row["messages"]) > 1)
    assert {message["role"] for message in chat["messages"]} >= {"system", "user"}
    answered = next(row for row in rows if row["response"].get("choices"))
    assert answered["response"]["usage"]["total_tokens"] == answered["total_tokens"]
    assert "user_api_key" in rows[0]["metadata"]


def test_generator_large_row_options():
    start, end = datetime(2025, 1, 1), datetime(2025, 1, 2)
    small_tail = RowGenerator(3, start, end, large_row_min_bytes=20_000, large_row_max_bytes=40_000).rows(3000)
    no_tail = RowGenerator(3, start, end, large_row_fraction=0).rows(3000)

    small_sizes = sorted(json_bytes(row["messages"]) for row in small_tail)
    assert 20_000 <= small_sizes[-3]
    assert small_sizes[-1] < 60_000
    assert max(json_bytes(row["messages"]) for row in no_tail) < 100_000


# -- loading --------------------------------------------------------------------


def test_load_rows_round_trip(dsn):
    async def check():
        conn, rows = await prepare_loaded(dsn, 400)
        stored = await conn.fetch(f"SELECT * FROM {QUALIFIED}")
        control_count = await conn.fetchval(f'SELECT count(*) FROM "{SCHEMA}"."{CONTROL}"')
        await conn.close()
        return rows, stored, control_count

    rows, stored, control_count = run(check())
    assert len(stored) == 400
    assert control_count == 400
    by_key = {record["request_id"]: record for record in stored}
    for row in rows:
        record = by_key[row["request_id"]]
        for name in MODEL_COLUMNS:
            value = record[name]
            if name in JSON_COLUMNS and value is not None:
                value = json.loads(value)
            assert value == row[name], name


def test_generated_rows_stored_size(dsn):
    async def check():
        conn, _ = await prepare_loaded(dsn, 3000)
        average, largest = await conn.fetchrow(
            f"SELECT avg({STORED_JSON_SIZE}), max({STORED_JSON_SIZE}) FROM {QUALIFIED}"
        )
        await conn.close()
        return float(average), largest

    average, largest = run(check())
    assert 2_000 <= average <= 8_000
    assert largest >= 200_000


# -- control table and writer ---------------------------------------------------


def test_control_table_copies_rows(dsn):
    async def check():
        conn = await connect(dsn)
        await create_legacy_schema(conn)
        now = utc_now()
        await load_rows(conn, RowGenerator(2, now - timedelta(days=1), now).rows(200))
        copied = await create_control_table(conn, TABLE, SCHEMA, CONTROL)
        indexes = await conn.fetch(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = $1 AND tablename = $2", SCHEMA, CONTROL
        )
        relkind = await conn.fetchval("SELECT relkind::text FROM pg_class WHERE oid = $1::regclass", CONTROL)
        comparison = await compare_with_control(conn, TABLE, CONTROL)
        await conn.close()
        return copied, [record[0] for record in indexes], relkind, comparison

    copied, indexes, relkind, comparison = run(check())
    assert copied == 200
    assert len(indexes) == 1
    assert "UNIQUE" in indexes[0]
    assert "(request_id)" in indexes[0]
    assert relkind == "r"
    assert comparison.ok
    assert comparison.rows_control == 200


def test_writer_all_operations_match_control(dsn):
    now = utc_now()
    target = (str(now - timedelta(days=12)), str(now - timedelta(days=10)))

    async def target_range():
        return target

    async def check():
        conn, _ = await prepare_loaded(dsn, 3000)
        writer = Writer(
            dsn, SCHEMA, TABLE, CONTROL, seed=7,
            batch_size=50,
            duplicate_fraction=0.2,
            duplicate_shift_fraction=0.3,
            retention_fraction=0.15,
            retention_max_fraction=0.1,
            update_fraction=0.1,
            field_update_fraction=0.1,
            time_shift_fraction=0.1,
            target_range=target_range,
            targeted_delete_fraction=0.1,
            pause=0,
        )
        await run_writer(writer, 2.5, until=lambda stats: all(stats.operations[kind] for kind in OPERATION_KINDS))
        comparison = await compare_with_control(conn, TABLE, CONTROL)
        await conn.close()
        return writer.stats, comparison

    stats, comparison = run(check())
    assert stats.errors == 0
    for kind in OPERATION_KINDS:
        assert stats.operations[kind] > 0, kind
    assert stats.inserts > 0
    assert stats.skipped > 0
    assert stats.deletes > stats.retention_deletes > 0
    assert stats.retention_deletes <= 300
    assert stats.updates > 0
    assert stats.percentile(0.99, "insert") is not None
    assert comparison.lost == 0
    assert comparison.ghost == 0
    assert comparison.stale == 0
    assert comparison.ok
    assert comparison.rows_table == 3000 + stats.inserts - stats.deletes


def test_writer_retention_deletes_oldest(dsn):
    async def check():
        conn, rows = await prepare_loaded(dsn, 2000)
        writer = Writer(
            dsn, SCHEMA, TABLE, CONTROL, seed=3,
            retention_fraction=0.9, retention_max_fraction=0.05, retention_batch=20,
            update_fraction=0, batch_size=5, pause=0,
        )
        await run_writer(writer, 1.0, until=lambda stats: stats.retention_deletes >= 90)
        remaining = await conn.fetchval(f'SELECT min("startTime") FROM {QUALIFIED}')
        await conn.close()
        return rows, writer.stats, remaining

    rows, stats, remaining = run(check())
    oldest_first = sorted(row["startTime"] for row in rows)
    assert stats.errors == 0
    # The last cutoff is the 5% percentile, so up to 100 of the 2,000 rows go.
    assert 90 <= stats.retention_deletes <= 100
    assert remaining == oldest_first[stats.retention_deletes]


def test_writer_survives_table_swap(dsn):
    """Renaming a new table into place under the writer costs retries, not errors.

    The new table's request_id is varchar, so cached statements that return it no
    longer fit and the writer must retry them.
    """
    new = f'"{SCHEMA}"."LiteLLM_SpendLogs_new"'

    async def swap(conn):
        async with conn.transaction():
            await conn.execute(f"LOCK TABLE {QUALIFIED} IN ACCESS EXCLUSIVE MODE")
            await conn.execute(f"CREATE TABLE {new} (LIKE {QUALIFIED} INCLUDING ALL)")
            await conn.execute(f"ALTER TABLE {new} ALTER COLUMN request_id TYPE varchar")
            await conn.execute(f"INSERT INTO {new} SELECT * FROM {QUALIFIED}")
            await conn.execute(f'ALTER TABLE {QUALIFIED} RENAME TO "LiteLLM_SpendLogs_old"')
            await conn.execute(f'ALTER TABLE {new} RENAME TO "{TABLE}"')
            return await conn.fetchval(f"SELECT count(*) FROM {QUALIFIED}")

    async def check():
        conn, _ = await prepare_loaded(dsn, 1000)
        writer = Writer(dsn, SCHEMA, TABLE, CONTROL, seed=5, update_fraction=0.2, pause=0)
        stop = asyncio.Event()
        task = asyncio.create_task(writer.run(stop))
        await asyncio.sleep(1.0)
        swapped_rows = await swap(conn)
        inserts_at_swap = writer.stats.inserts
        await asyncio.sleep(1.0)
        for _ in range(300):
            if writer.stats.inserts > inserts_at_swap and writer.stats.retries or task.done():
                break
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.wait_for(task, timeout=60)
        request_id_type = await conn.fetchval(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = $1::regclass AND attname = 'request_id'",
            QUALIFIED,
        )
        rows_now = await conn.fetchval(f"SELECT count(*) FROM {QUALIFIED}")
        comparison = await compare_with_control(conn, TABLE, CONTROL)
        await conn.close()
        return writer.stats, inserts_at_swap, swapped_rows, rows_now, request_id_type, comparison

    stats, inserts_at_swap, swapped_rows, rows_now, request_id_type, comparison = run(check())
    assert request_id_type == "character varying"
    assert stats.errors == 0
    assert stats.retries >= 1
    assert stats.inserts > inserts_at_swap
    assert rows_now > swapped_rows
    assert comparison.ok


def test_writer_shifted_duplicates_become_ghosts(dsn):
    """On a table partitioned by "startTime", a reused key with a new "startTime" is no conflict."""

    async def check():
        conn = await connect(dsn)
        await create_legacy_schema(conn)
        await conn.execute(f'ALTER TABLE {QUALIFIED} RENAME TO "LiteLLM_SpendLogs_legacy"')
        await conn.execute(
            f'CREATE TABLE {QUALIFIED} (LIKE "LiteLLM_SpendLogs_legacy" INCLUDING DEFAULTS) '
            'PARTITION BY RANGE ("startTime")'
        )
        await conn.execute(f'ALTER TABLE {QUALIFIED} ADD PRIMARY KEY (request_id, "startTime")')
        boundary = utc_now() - timedelta(days=10)
        await conn.execute(
            f'CREATE TABLE spendlogs_old PARTITION OF {QUALIFIED} FOR VALUES FROM (MINVALUE) TO (\'{boundary}\')'
        )
        await conn.execute(f"CREATE TABLE spendlogs_rest PARTITION OF {QUALIFIED} DEFAULT")
        await create_control_table(conn, TABLE, SCHEMA, CONTROL)
        now = utc_now()
        await load_rows(conn, RowGenerator(4, now - timedelta(days=20), now).rows(1000), control=CONTROL)

        writer = Writer(
            dsn, SCHEMA, TABLE, CONTROL, seed=8,
            duplicate_fraction=0.3, duplicate_shift_fraction=1.0,
            time_shift_fraction=0.2, time_shift_max_days=15, pause=0,
        )
        await run_writer(writer, 1.5, until=lambda stats: stats.operations["time_shift"] > 0)
        comparison = await compare_with_control(conn, TABLE, CONTROL)
        await conn.close()
        return writer.stats, comparison

    stats, comparison = run(check())
    assert stats.errors == 0
    assert stats.operations["time_shift"] > 0
    assert comparison.duplicates > 0
    assert comparison.ghost == comparison.duplicates
    assert comparison.lost == 0
    assert comparison.stale == 0
    assert len(comparison.ghost_samples) == min(5, comparison.ghost)


def test_writer_counts_errors_without_row_contents(dsn):
    async def check():
        conn, _ = await prepare_loaded(dsn, 300)
        # Every new or updated row now fails the check, so inserts and updates fail.
        await conn.execute(f'ALTER TABLE {QUALIFIED} ADD CONSTRAINT spend_negative CHECK (spend < 0) NOT VALID')
        with structlog.testing.capture_logs() as logs:
            writer = Writer(dsn, SCHEMA, TABLE, CONTROL, seed=2, retention_fraction=0, update_fraction=0.3, pause=0)
            await run_writer(writer, 1.0)
        comparison = await compare_with_control(conn, TABLE, CONTROL)
        await conn.close()
        return writer.stats, logs, comparison

    stats, logs, comparison = run(check())
    errors = [entry for entry in logs if entry["event"] == "writer.error"]
    assert stats.errors > 0
    assert stats.inserts == 0
    assert errors
    assert "CheckViolationError" in errors[0]["error"]
    # Up to 10 log lines per operation kind and error class, then one per 100.
    assert len(errors) <= min(stats.errors, 2 * 10 + stats.errors // 100)
    for entry in logs:
        assert "Failing row" not in json.dumps(entry, default=str)
    assert comparison.ok


# -- comparison -----------------------------------------------------------------


def test_compare_reports_planted_differences(dsn):
    async def check():
        conn, rows = await prepare_loaded(dsn, 100)
        lost_key, stale_key, extra_source = rows[10]["request_id"], rows[20]["request_id"], rows[30]["request_id"]
        await conn.execute(f"DELETE FROM {QUALIFIED} WHERE request_id = $1", lost_key)
        await conn.execute(
            f"UPDATE {QUALIFIED} SET metadata = jsonb_set(metadata, '{{user_api_key}}', '\"changed\"') "
            "WHERE request_id = $1",
            stale_key,
        )
        await conn.execute(
            f"INSERT INTO {QUALIFIED} SELECT 'extra-row', call_type, api_key, spend, total_tokens, "
            "prompt_tokens, completion_tokens, \"startTime\", \"endTime\", \"completionStartTime\", model, "
            "model_id, model_group, custom_llm_provider, api_base, \"user\", metadata, cache_hit, cache_key, "
            "request_tags, team_id, end_user, requester_ip_address, messages, response, proxy_server_request, "
            "session_id, status, mcp_namespaced_tool_name, organization_id, agent_id, request_duration_ms, "
            f"litellm_call_id FROM {QUALIFIED} WHERE request_id = $1",
            extra_source,
        )
        comparison = await compare_with_control(conn, TABLE, CONTROL)
        await conn.close()
        return comparison, lost_key, stale_key

    comparison, lost_key, stale_key = run(check())
    assert comparison.lost == 1
    assert comparison.stale == 1
    assert comparison.ghost == 1
    assert comparison.duplicates == 0
    assert not comparison.ok
    assert comparison.lost_samples == [lost_key]
    assert comparison.stale_samples == [stale_key]
    assert comparison.ghost_samples == ["extra-row"]
    assert comparison.rows_table == 100
    assert comparison.rows_control == 100
    assert lost_key not in repr(comparison)


def test_compare_counts_duplicate_keys(dsn):
    async def check():
        conn, rows = await prepare_loaded(dsn, 50)
        key = rows[5]["request_id"]
        await conn.execute(f'ALTER TABLE {QUALIFIED} DROP CONSTRAINT "LiteLLM_SpendLogs_pkey"')
        await conn.execute(f"INSERT INTO {QUALIFIED} SELECT * FROM {QUALIFIED} WHERE request_id = $1", key)
        comparison = await compare_with_control(conn, TABLE, CONTROL)
        await conn.close()
        return comparison, key

    comparison, key = run(check())
    assert comparison.ghost == 1
    assert comparison.duplicates == 1
    assert comparison.lost == 0
    assert comparison.stale == 0
    assert comparison.ghost_samples == [key]


def test_compare_matches_columns_by_name(dsn):
    async def check():
        conn, _ = await prepare_loaded(dsn, 50)
        # A copy with the columns in the Prisma model order and with "user" stored as varchar.
        columns = ", ".join(f'"{name}"' for name in MODEL_COLUMNS)
        await conn.execute(f'CREATE TABLE reordered AS SELECT {columns} FROM {QUALIFIED}')
        await conn.execute('ALTER TABLE reordered ALTER COLUMN "user" TYPE varchar(200)')
        same = await compare_with_control(conn, "reordered", CONTROL)
        await conn.execute("UPDATE reordered SET \"user\" = NULL WHERE \"user\" = '' ")
        await conn.execute("ALTER TABLE reordered DROP COLUMN agent_id")
        changed = await compare_with_control(conn, "reordered", CONTROL)
        await conn.close()
        return same, changed

    same, changed = run(check())
    assert same.ok
    assert len(same.columns) == len(MODEL_COLUMNS)
    assert changed.stale > 0
    assert changed.missing_columns == ("agent_id",)
    assert not changed.ok


def test_compare_json_semantics_and_nulls(dsn):
    async def check():
        conn = await connect(dsn)
        await conn.execute("CREATE TABLE a (id text PRIMARY KEY, doc jsonb, note text)")
        await conn.execute("CREATE TABLE b (id text PRIMARY KEY, doc jsonb, note text)")
        await conn.execute(
            """INSERT INTO a VALUES ('1', '{"x": 1, "y": [1, 2]}', NULL), ('2', NULL, ''), ('3', '{}', 'n')"""
        )
        await conn.execute(
            """INSERT INTO b VALUES ('1', '{"y":[1,2],"x":1}', NULL), ('2', NULL, NULL), ('3', '{}', 'n')"""
        )
        comparison = await compare_with_control(conn, "a", "b", key="id")
        await conn.close()
        return comparison

    comparison = run(check())
    assert comparison.stale == 1
    assert comparison.stale_samples == ["2"]
    assert comparison.lost == 0
    assert comparison.ghost == 0


def test_compare_rejects_missing_table(dsn):
    async def check():
        conn = await connect(dsn)
        await conn.execute("CREATE TABLE b (id text PRIMARY KEY)")
        try:
            with pytest.raises(ValueError, match="not found"):
                await compare_with_control(conn, "missing", "b", key="id")
            with pytest.raises(ValueError, match="key column"):
                await compare_with_control(conn, "b", "b", key="request_id")
        finally:
            await conn.close()

    run(check())


def test_writer_stats_percentiles():
    stats = WriterStats()
    stats.latencies["insert"] = [0.001 * value for value in range(1, 101)]
    stats.latencies["clear_payload"] = [1.0]
    assert stats.percentile(0.5, "insert") == pytest.approx(0.050)
    assert stats.percentile(0.99, "insert") == pytest.approx(0.099)
    assert stats.percentile(1.0) == 1.0
    assert stats.percentile(0.5, "time_shift") is None
    # Nearest rank over all 101 values: the 100th smallest, 0.1 s.
    assert stats.summary()["p99_ms"] == pytest.approx(100.0)


def test_writer_rejects_invalid_options():
    with pytest.raises(ValueError, match="duplicate_fraction"):
        Writer("postgresql://unused", duplicate_fraction=1.5)
    with pytest.raises(ValueError, match="target_range"):
        Writer("postgresql://unused", targeted_delete_fraction=0.1)
    with pytest.raises(ValueError, match="at most 1"):
        Writer("postgresql://unused", update_fraction=0.6, retention_fraction=0.6)
