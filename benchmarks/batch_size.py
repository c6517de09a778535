"""Measure the backfill at several --batch-size values, to choose one; or estimate one for a real table.

Local mode (the default) starts a throwaway server. For each batch size it
creates a new database and loads the same LiteLLM rows (same seed). It starts a
proxy-like Writer and runs the real prepare phase. The writer then runs alone
for a few seconds with the trigger installed, and after that the whole backfill
phase runs, stopped before verify. The script records the copy rate, the
writer's p50/p99 transaction latency with and without the copy, the WAL
generated, and every batch's duration from the worker's `backfill.batch` log
events.

A batch holds FOR SHARE row locks on its rows until it commits, so an
application UPDATE or DELETE of one of those rows waits up to one batch
duration. The rule printed at the end: take the largest batch size whose
longest batch stays under the lock wait that the application tolerates.

--dsn mode only reads: it estimates the table's rows and stored row size (on a
TABLESAMPLE sample) and prints the batch size that keeps one batch under a
byte budget. It never writes to that database: the session is read-only.

Run: .venv/bin/python benchmarks/batch_size.py [--rows 20000] [--batch-sizes 100,300,1000,3000]
     .venv/bin/python benchmarks/batch_size.py --dsn postgresql://user@host/db [--batch-bytes 4194304]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import asyncpg

import common
from livepart.backfill import stored_size_sql
from livepart.catalog import estimate_rows, load_table
from livepart.db import describe_error, mask_dsn
from livepart.ident import qualified
from livepart.settings import Settings
from livepart.workload.litellm import TABLE
from livepart.workload.writer import Writer

NAME = "batch_size"
ESTIMATE_NAME = "batch_size_estimate"
MIB = 1024 * 1024
LATENCY_BUDGETS_MS = (100, 250, 500, 1000, 2000)
BYTE_BUDGETS = (1 * MIB, 4 * MIB, 16 * MIB, 64 * MIB)
DEFAULT_BATCH_BYTES = 4 * MIB
MINIMUM_BATCH_SIZE = 100
MAXIMUM_BATCH_SIZE = 100_000


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000, help="rows loaded before each backfill (default 20000)")
    parser.add_argument("--batch-sizes", default="100,300,1000,3000",
                        help="comma-separated --batch-size values to measure (default 100,300,1000,3000)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="measurements of each batch size, in rotated order (default 2)")
    parser.add_argument("--seed", type=int, default=3, help="seed of the loaded rows and the writer (default 3)")
    parser.add_argument("--large-row-fraction", type=float, default=0.001,
                        help="share of 200 KB to 1 MB rows, as RowGenerator makes them (default 0.001)")

    parser.add_argument("--writer-pause", type=float, default=0.02,
                        help="seconds the writer waits after each transaction (default 0.02)")
    parser.add_argument("--baseline-seconds", type=float, default=3.0,
                        help="seconds the writer runs alone with the trigger installed before the copy (default 3)")
    parser.add_argument("--budget-ms", type=float, default=250.0,
                        help="maximum lock wait, in ms, that the application tolerates (default 250)")

    parser.add_argument("--dsn", help="estimate a batch size for this database instead, in a read-only session")
    parser.add_argument("--schema", default="public", help="schema of the table, with --dsn (default public)")
    parser.add_argument("--table", default=TABLE, help=f"table, with --dsn (default {TABLE})")
    parser.add_argument("--sample-rows", type=int, default=10_000,
                        help="rows sampled for the stored row size, with --dsn (default 10000)")
    parser.add_argument("--batch-bytes", type=int, default=DEFAULT_BATCH_BYTES,
                        help=f"stored bytes one batch may copy, with --dsn (default {DEFAULT_BATCH_BYTES})")

    arguments = parser.parse_args()
    try:
        arguments.batch_sizes = [int(value) for value in arguments.batch_sizes.split(",") if value.strip()]
    except ValueError:
        parser.error(f"invalid --batch-sizes {arguments.batch_sizes!r}: use whole numbers separated by commas")
    if not arguments.batch_sizes or min(arguments.batch_sizes) < 1:
        parser.error("--batch-sizes needs at least one value, each at least 1")
    for name in ("rows", "repeats", "sample_rows", "batch_bytes"):
        if getattr(arguments, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= arguments.large_row_fraction <= 1:
        parser.error("--large-row-fraction must be between 0 and 1")
    if arguments.writer_pause < 0 or arguments.baseline_seconds <= 0 or arguments.budget_ms <= 0:
        parser.error("--writer-pause must be 0 or more, --baseline-seconds and --budget-ms more than 0")
    return arguments


# -- local measurement ------------------------------------------------------


async def measure_backfill(dsn: str, batch_size: int, arguments: argparse.Namespace) -> dict[str, Any]:
    """Run prepare and the backfill under a writer; return the measurements of the backfill."""
    with common.quiet_logs() as events:
        return await _measure_backfill(dsn, batch_size, arguments, events)


async def _measure_backfill(dsn: str, batch_size: int, arguments: argparse.Namespace,
                            events: list[dict[str, Any]]) -> dict[str, Any]:
    monitor = await asyncpg.connect(dsn)
    writer = Writer(dsn, seed=arguments.seed + 1, pause=arguments.writer_pause)
    stop = asyncio.Event()
    writing = asyncio.create_task(writer.run(stop))
    recorder = common.Recorder(monitor, writer)

    async def before_backfill() -> None:
        await recorder.take("alone")
        await asyncio.sleep(arguments.baseline_seconds)
        await recorder.take("copy_start")

    async def after_backfill() -> None:
        await recorder.take("copy_end")
        raise common.StopMigration("phase.verify")

    try:
        settings = Settings(dsn=dsn, batch_size=batch_size)
        await common.run_migration_with_hooks(
            settings, {"phase.backfill": before_backfill, "phase.verify": after_backfill})
        state = await monitor.fetchrow(
            "SELECT rows_copied, batches, extract(epoch FROM checkpoint_at - backfill_started_at) AS seconds "
            "FROM livepart.migration WHERE table_schema = 'public' AND table_name = $1", TABLE)
        wal_alone = await recorder.wal("alone", "copy_start")
        wal_copy = await recorder.wal("copy_start", "copy_end")
    finally:
        stop.set()
        await writing
        await monitor.close()

    batches = common.events_named(events, "backfill.batch")
    batch_ms = [event["ms"] for event in batches]
    stored = sum(event["stored_bytes"] for event in batches)
    retries = [event for event in common.events_named(events, "retry") if event.get("operation") == "backfill.batch"]
    seconds = recorder.seconds("copy_start", "copy_end")
    alone_seconds = recorder.seconds("alone", "copy_start")
    # The writer's own WAL during the copy, estimated from its rows inserted and its
    # WAL per inserted row while it ran alone.
    writer_wal_per_row = wal_alone / max(recorder.writer_inserts("alone", "copy_start"), 1)
    writer_wal_estimate = writer_wal_per_row * recorder.writer_inserts("copy_start", "copy_end")
    rows = state["rows_copied"]
    return {
        "batch_size": batch_size,
        "rows_copied": rows,
        "batches": state["batches"],
        "backfill_seconds": seconds,
        "rows_per_second": rows / seconds,
        "rows_per_second_from_state": rows / float(state["seconds"]) if state["seconds"] else None,
        "stored_bytes_copied": stored,
        "stored_mb_per_second": stored / MIB / seconds,
        "batch_ms": common.spread(batch_ms),
        "batch_ms_p99": common.percentile(batch_ms, 0.99),
        "longest_batch_ms": max(batch_ms) if batch_ms else None,
        "longest_batch_stored_bytes": max((event["stored_bytes"] for event in batches), default=None),
        "batch_retries": len(retries),
        "wal_bytes": wal_copy,
        "wal_bytes_writer_alone_per_second": wal_alone / alone_seconds,
        "wal_bytes_per_writer_insert_alone": writer_wal_per_row,
        "writer_inserts_during_copy": recorder.writer_inserts("copy_start", "copy_end"),
        "wal_bytes_copy_estimate": wal_copy - writer_wal_estimate,
        "wal_bytes_per_copied_row_estimate": (wal_copy - writer_wal_estimate) / rows if rows else None,
        "writer_during_copy": common.latency_summary(recorder.latencies_ms("copy_start", "copy_end")),
        "writer_alone": common.latency_summary(recorder.latencies_ms("alone", "copy_start")),
        "writer_errors": writer.stats.errors,
        "batch_points": [[event["stored_bytes"], event["ms"]] for event in batches],
    }


def fit_line(points: list[list[float]]) -> tuple[float, float] | None:
    """Least-squares fit of ms = fixed + per_byte * bytes over all batches; None if degenerate."""
    if len(points) < 2:
        return None
    count = len(points)
    mean_x = sum(x for x, _ in points) / count
    mean_y = sum(y for _, y in points) / count
    variance = sum((x - mean_x) ** 2 for x, _ in points)
    if variance == 0:
        return None
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / variance
    return mean_y - slope * mean_x, slope


def median_of(runs: list[dict[str, Any]], path: tuple[str, ...]) -> float | None:
    values = []
    for run in runs:
        value: Any = run
        for key in path:
            value = value[key]
        if value is not None:
            values.append(value)
    return common.spread(values)["median"]


def summarise(runs: list[dict[str, Any]], sizes: list[int]) -> list[dict[str, Any]]:
    rows = []
    for size in sizes:
        own = [run for run in runs if run["batch_size"] == size]
        rows.append({
            "batch_size": size,
            "measurements": len(own),
            "rows_per_second": median_of(own, ("rows_per_second",)),
            "stored_mb_per_second": median_of(own, ("stored_mb_per_second",)),
            "batch_ms_median": median_of(own, ("batch_ms", "median")),
            "longest_batch_ms": median_of(own, ("longest_batch_ms",)),
            "longest_batch_ms_max": max((run["longest_batch_ms"] for run in own if run["longest_batch_ms"]),
                                        default=None),
            "longest_batch_ms_all": [run["longest_batch_ms"] for run in own],
            "batch_retries": median_of(own, ("batch_retries",)),
            "wal_mb": median_of(own, ("wal_bytes",)) / MIB,
            "wal_bytes_per_copied_row_estimate": median_of(own, ("wal_bytes_per_copied_row_estimate",)),
            "writer_p50_ms": median_of(own, ("writer_during_copy", "p50_ms")),
            "writer_p99_ms": median_of(own, ("writer_during_copy", "p99_ms")),
            "writer_alone_p50_ms": median_of(own, ("writer_alone", "p50_ms")),
            "writer_alone_p99_ms": median_of(own, ("writer_alone", "p99_ms")),
        })
    return rows


def recommend(summary: list[dict[str, Any]], budget_ms: float) -> int | None:
    """Return the largest measured batch size whose longest batch stayed under `budget_ms` in every measurement."""
    fitting = [row["batch_size"] for row in summary if row["longest_batch_ms_max"] is not None
               and row["longest_batch_ms_max"] <= budget_ms]
    return max(fitting) if fitting else None


def print_local(summary: list[dict[str, Any]], line: tuple[float, float] | None, budget_ms: float) -> None:
    print()
    print("backfill under a proxy-like writer, medians over the measurements of each batch size;")
    print("\"longest, max\" is the longest batch of any measurement, which the rule below uses;")
    print("\"copy WAL B/row\" estimates the copy's own WAL per copied row, without the writer's")
    table = []
    for row in summary:
        table.append([
            row["batch_size"], f"{row['rows_per_second']:.0f}", f"{row['stored_mb_per_second']:.1f}",
            f"{row['batch_ms_median']:.1f}", f"{row['longest_batch_ms']:.1f}",
            f"{row['longest_batch_ms_max']:.1f}", f"{row['batch_retries']:.0f}",
            f"{row['wal_mb']:.1f}", f"{row['wal_bytes_per_copied_row_estimate']:.0f}",
            f"{row['writer_p50_ms']:.1f} / {row['writer_p99_ms']:.1f}",
            f"{row['writer_alone_p50_ms']:.1f} / {row['writer_alone_p99_ms']:.1f}",
        ])
    common.print_table(["batch", "rows/s", "MB/s", "batch ms", "longest ms", "longest, max", "retries",
                        "WAL MB", "copy WAL B/row", "writer p50/p99 ms", "writer alone p50/p99"], table)
    if line is not None:
        fixed, per_byte = line
        print(f"\nfit over all batches: batch ms = {fixed:.1f} + {per_byte * MIB:.1f} per MB of stored row data")
    print("\nrule: use the largest batch size whose longest batch stays under the lock wait your application "
          "tolerates\n(an UPDATE or DELETE of a row in the batch waits until the batch commits), and set "
          "--max-batch-bytes\nso that one batch of large rows cannot exceed it either.")
    for budget in sorted({*LATENCY_BUDGETS_MS, budget_ms}):
        choice = recommend(summary, budget)
        marker = "  <- --budget-ms" if budget == budget_ms else ""
        bytes_hint = ""
        if line is not None and line[1] > 0 and budget > line[0]:
            bytes_hint = f", about {(budget - line[0]) / line[1] / MIB:.1f} MB of stored rows by the fit"
        print(f"  budget {budget:>6.0f} ms: --batch-size {choice if choice else 'below the smallest measured'}"
              f"{bytes_hint}{marker}")


async def measure_on_new_database(server, size: int, repeat: int, arguments: argparse.Namespace) -> dict[str, Any]:
    """Load the rows into a new database, measure one backfill at `size`, then drop the database."""
    name = f"batch_{size}_{repeat + 1}"
    dsn = server.create_database(name)
    loaded = await common.load_litellm(dsn, arguments.rows, arguments.seed,
                                       large_row_fraction=arguments.large_row_fraction)
    print(f"batch size {size} (measurement {repeat + 1} of {arguments.repeats}): {loaded} rows loaded, copying ...")

    result = await measure_backfill(dsn, size, arguments)
    result["measurement"] = repeat + 1
    print(f"  {result['rows_per_second']:.0f} rows/s, longest batch {result['longest_batch_ms']:.0f} ms, "
          f"writer p99 {result['writer_during_copy']['p99_ms']:.1f} ms, {result['writer_errors']} writer errors")
    server.drop_database(name)
    return result


async def run_local(arguments: argparse.Namespace) -> int:
    runs: list[dict[str, Any]] = []
    sizes = arguments.batch_sizes
    with common.local_server() as server:
        info = common.machine_info(server)
        common.print_machine(info)
        for repeat in range(arguments.repeats):
            # Rotate the order, so that no batch size always runs first or last.
            shift = repeat % len(sizes)
            for size in sizes[shift:] + sizes[:shift]:
                runs.append(await measure_on_new_database(server, size, repeat, arguments))

    summary = summarise(runs, sizes)
    # A line through the batches of one batch size alone mostly fits noise.
    points = [point for run in runs for point in run["batch_points"]]
    line = fit_line(points) if len(set(sizes)) > 1 else None
    print_local(summary, line, arguments.budget_ms)
    payload = {
        "benchmark": NAME,
        "machine": info,
        "load_average_at_end": common.load_average(),
        "parameters": vars(arguments),
        "summary": summary,
        "fit": {"fixed_ms": line[0], "ms_per_mb": line[1] * MIB} if line else None,
        "recommendation": {str(budget): recommend(summary, budget)
                           for budget in sorted({*LATENCY_BUDGETS_MS, arguments.budget_ms})},
        "runs": runs,
    }
    path = common.write_results(NAME, payload)
    print(f"results written to {path}")
    return 0


# -- read-only estimate for an operator's database --------------------------


def batch_size_for(budget_bytes: int, row_bytes: float) -> int:
    """Return how many average rows fit in `budget_bytes`, clamped to MINIMUM_BATCH_SIZE..MAXIMUM_BATCH_SIZE."""
    return int(min(MAXIMUM_BATCH_SIZE, max(MINIMUM_BATCH_SIZE, budget_bytes // max(row_bytes, 1))))


async def read_estimate(arguments: argparse.Namespace) -> dict[str, Any]:
    """Read the table's size and a sample of stored row sizes in a read-only transaction."""
    conn = await asyncpg.connect(arguments.dsn, timeout=10, server_settings={
        "application_name": "livepart batch-size estimate (read-only)",
        "default_transaction_read_only": "on",
        "statement_timeout": "120000",
        "lock_timeout": "2000",
    })
    try:
        async with conn.transaction(readonly=True):
            table = await load_table(conn, arguments.schema, arguments.table)
            if table is None:
                raise LookupError(f"table {qualified(arguments.schema, arguments.table)} not found; "
                                  "check --schema and --table")
            name = qualified(arguments.schema, arguments.table)
            sizes = await conn.fetchrow(
                "SELECT c.reltuples::bigint AS reltuples, pg_catalog.pg_relation_size(c.oid) AS heap_bytes, "
                "pg_catalog.pg_total_relation_size(c.oid) AS total_bytes, "
                "coalesce(pg_catalog.pg_total_relation_size(nullif(c.reltoastrelid, 0)), 0) AS toast_bytes, "
                "pg_catalog.pg_indexes_size(c.oid) AS index_bytes "
                "FROM pg_catalog.pg_class c WHERE c.oid = $1::regclass", name)
            planner_rows = await estimate_rows(conn, arguments.schema, arguments.table)
            rows = max(sizes["reltuples"], planner_rows, 0)
            percent = min(100.0, 100.0 * arguments.sample_rows / rows) if rows > 0 else 100.0
            sample_sql = (f"SELECT {stored_size_sql(table, 't')} AS stored FROM {name} AS t "
                          "TABLESAMPLE SYSTEM ($1::float4) LIMIT $2")
            stored = [record["stored"] for record in await conn.fetch(sample_sql, percent, arguments.sample_rows)]
            if not stored:
                # Page sampling can miss every page of a small table.
                stored = [record["stored"] for record in await conn.fetch(
                    f"SELECT {stored_size_sql(table, 't')} AS stored FROM {name} AS t LIMIT $1",
                    arguments.sample_rows)]
            server_version = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    return {
        "table": f"{arguments.schema}.{arguments.table}",
        "server_version": server_version,
        "estimated_rows": rows,
        "heap_bytes": sizes["heap_bytes"],
        "toast_bytes": sizes["toast_bytes"],
        "index_bytes": sizes["index_bytes"],
        "total_bytes": sizes["total_bytes"],
        "sample_percent": percent,
        "sampled_rows": len(stored),
        "stored_row_bytes": common.spread([float(value) for value in stored]),
        "stored_row_bytes_mean": sum(stored) / len(stored) if stored else None,
        "stored_row_bytes_p99": common.percentile(stored, 0.99),
    }


def print_estimate(estimate: dict[str, Any], budget_bytes: int) -> dict[str, int]:
    mean = estimate["stored_row_bytes_mean"]
    print(f"table {estimate['table']} on PostgreSQL {estimate['server_version']}: "
          f"about {estimate['estimated_rows']:,} rows, {estimate['total_bytes'] / MIB:,.1f} MB in total "
          f"(heap {estimate['heap_bytes'] / MIB:,.1f} MB, TOAST {estimate['toast_bytes'] / MIB:,.1f} MB, "
          f"indexes {estimate['index_bytes'] / MIB:,.1f} MB)")
    if mean is None:
        print("the table has no rows: any batch size works")
        return {}
    sizes = estimate["stored_row_bytes"]
    print(f"stored row size over {estimate['sampled_rows']} sampled rows "
          f"({estimate['sample_percent']:.3g}% of pages): mean {mean:,.0f} B, median {sizes['median']:,.0f} B, "
          f"p99 {estimate['stored_row_bytes_p99']:,.0f} B, max {sizes['max']:,.0f} B")
    choices = {}
    table = []
    for budget in sorted({*BYTE_BUDGETS, budget_bytes}):
        size = batch_size_for(budget, mean)
        choices[str(budget)] = size
        marker = "<- --batch-bytes" if budget == budget_bytes else ""
        table.append([f"{budget / MIB:.3g} MB", size, f"--batch-size {size} --max-batch-bytes {budget}", marker])
    print()
    common.print_table(["bytes per batch", "rows per batch", "options", ""], table)
    print("\nchoose the byte budget from the copy speed of your server: budget bytes = tolerated lock wait "
          "x copy MB/s\n(see docs/benchmarks.md); --max-batch-bytes caps a batch that meets unusually large rows")
    return choices


async def run_estimate(arguments: argparse.Namespace) -> int:
    info = common.machine_info()
    try:
        estimate = await read_estimate(arguments)
    except LookupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        print(f"error: reading from {mask_dsn(arguments.dsn)} failed: {describe_error(error)}", file=sys.stderr)
        return 1
    choices = print_estimate(estimate, arguments.batch_bytes)
    payload = {
        "benchmark": ESTIMATE_NAME,
        "machine_running_the_estimate": info,
        "parameters": {key: value for key, value in vars(arguments).items() if key != "dsn"},
        "estimate": estimate,
        "batch_size_by_byte_budget": choices,
    }
    path = common.write_results(ESTIMATE_NAME, payload)
    print(f"results written to {path}")
    return 0


async def main() -> int:
    arguments = parse_arguments()
    if arguments.dsn:
        return await run_estimate(arguments)
    return await run_local(arguments)


if __name__ == "__main__":
    common.run(main)
