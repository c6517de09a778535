"""`livepart demo`: the whole migration on a throwaway local PostgreSQL.

It loads a LiteLLM-like table, keeps a proxy-like writer running throughout,
migrates, and compares the result with a control table that the writer kept
in step, row by row and column by column.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import asyncpg
from rich.console import Console
from rich.table import Table as RichTable

from .orchestrator import run_migration
from .pgserver import LocalPostgres
from .settings import Settings
from .state import load_state
from .workload.compare import Comparison, compare_with_control
from .workload.litellm import TABLE, RowGenerator, create_legacy_schema, load_rows
from .workload.writer import CONTROL_TABLE, Writer, create_control_table

# Seconds the writer keeps writing into the partitioned table after the swap.
WRITES_AFTER_SWAP_SECONDS = 2.0


@dataclass
class DemoSummary:
    rows_loaded: int
    rows_copied: int
    copy_rows_per_second: float
    swap_lock_ms: float | None
    migration_seconds: float
    writer_transactions: int
    writer_errors: int
    writer_p99_ms: float | None
    partitions: int
    comparison: Comparison
    server_version: str

    @property
    def ok(self) -> bool:
        return self.comparison.ok and self.writer_errors == 0


async def run_demo(*, rows: int, batch_size: int, seed: int, stop: asyncio.Event, console: Console) -> DemoSummary:
    console.print("starting a throwaway PostgreSQL on 127.0.0.1 ...")
    with LocalPostgres() as server:
        dsn = server.create_database("livepart_demo")
        console.print(f"PostgreSQL {server.server_version()} on port {server.port}")
        summary = await _migrate_under_load(dsn, rows=rows, batch_size=batch_size, seed=seed, stop=stop,
                                            console=console, server_version=server.server_version())
    _print_summary(console, summary)
    return summary


async def _migrate_under_load(
    dsn: str, *, rows: int, batch_size: int, seed: int, stop: asyncio.Event, console: Console,
    server_version: str,
) -> DemoSummary:
    conn = await asyncpg.connect(dsn)
    try:
        await create_legacy_schema(conn)
        await create_control_table(conn, TABLE, "public", CONTROL_TABLE, copy_rows=False)
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        generator = RowGenerator(seed, now - timedelta(days=90), now - timedelta(minutes=5))
        console.print(f"loading {rows} legacy rows (about 4 KB each, a few up to 1 MB) ...")
        loaded = await load_rows(conn, generator.iter_rows(rows), control=CONTROL_TABLE)

        writer_stop = asyncio.Event()
        writer = Writer(dsn, seed=seed + 1, pause=0.02, retention_fraction=0.05, update_fraction=0.03)
        writing = asyncio.create_task(writer.run(writer_stop))
        console.print("writer started: 100-row inserts, retention deletes, updates; migrating ...")
        started = time.monotonic()
        try:
            await run_migration(Settings(dsn=dsn, batch_size=batch_size), stop)
            migration_seconds = time.monotonic() - started
            console.print(f"swapped after {migration_seconds:.1f} s; the writer goes on for "
                          f"{WRITES_AFTER_SWAP_SECONDS:g} s against the partitioned table")
            await asyncio.sleep(WRITES_AFTER_SWAP_SECONDS)
        finally:
            writer_stop.set()
            await writing

        comparison = await compare_with_control(conn, TABLE, CONTROL_TABLE)
        state = await load_state(conn, "public", TABLE)
        elapsed = (state.checkpoint_at - state.backfill_started_at).total_seconds() if state.checkpoint_at else 0
        partitions = await conn.fetchval(
            f"SELECT count(*) FROM pg_inherits WHERE inhparent = '\"{TABLE}\"'::regclass"
        )
        p99 = writer.stats.percentile(0.99)
        return DemoSummary(
            rows_loaded=loaded,
            rows_copied=state.rows_copied,
            copy_rows_per_second=state.rows_copied / elapsed if elapsed > 0 else 0.0,
            swap_lock_ms=state.swap_lock_ms,
            migration_seconds=migration_seconds,
            writer_transactions=sum(writer.stats.operations.values()),
            writer_errors=writer.stats.errors,
            writer_p99_ms=p99 * 1000 if p99 is not None else None,
            partitions=partitions,
            comparison=comparison,
            server_version=server_version,
        )
    finally:
        await conn.close()


def _print_summary(console: Console, summary: DemoSummary) -> None:
    comparison = summary.comparison
    table = RichTable(show_header=False, title="livepart demo")
    rows = [
        ("rows loaded before the migration", str(summary.rows_loaded)),
        ("rows copied by the backfill", str(summary.rows_copied)),
        ("copy rate", f"{summary.copy_rows_per_second:.0f} rows/s"),
        ("migration time", f"{summary.migration_seconds:.1f} s"),
        ("swap lock held", f"{summary.swap_lock_ms:.1f} ms" if summary.swap_lock_ms is not None else "n/a"),
        ("partitions (with default)", str(summary.partitions)),
        ("writer transactions", str(summary.writer_transactions)),
        ("writer errors", str(summary.writer_errors)),
        ("writer p99 latency", f"{summary.writer_p99_ms:.0f} ms" if summary.writer_p99_ms else "n/a"),
        ("rows in table / control", f"{comparison.rows_table} / {comparison.rows_control}"),
        ("differences (lost, ghost, stale)", f"{comparison.lost}, {comparison.ghost}, {comparison.stale}"),
        ("PostgreSQL", summary.server_version),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    if summary.ok:
        console.print("[green]OK: the partitioned table equals the control table, with no writer errors[/green]")
    else:
        console.print("[red]FAILED: the partitioned table differs from the control table, or the writer "
                      "saw errors[/red]")
