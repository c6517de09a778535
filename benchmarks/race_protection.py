"""Compare two ways to close the backfill race: row locks in every batch, or repair in verify.

The race: a batch reads an old row. A concurrent DELETE (or an UPDATE that
moves the row to another partition) commits, and its trigger finds nothing to
delete in the shadow table. Then the batch inserts the stale row: a ghost.

  row_locks     the default: each batch locks the rows it copies with
                FOR SHARE ... NOWAIT, and verification repairs what is left
  verify_only   Settings(unsafe_no_row_locks=True): no row locks, so
                verification's repair is the only protection

Each run gets a new database with the same rows and the same writer: the
proxy-like Writer plus deletes aimed at the batch in flight (its target_range
callback reads the checkpoint from livepart.migration and returns the day after
it). The whole migration runs, swap included. Each run records the WAL written
during backfill and verify, the writer's latency and the copy rate. It also
records the ghosts in the shadow table before verification, the ranges that
verification repaired, and whether the final table equals the control table.

Run: .venv/bin/python benchmarks/race_protection.py [--rows 20000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections import Counter
from typing import Any

import asyncpg

import common
from livepart.settings import Settings
from livepart.workload.compare import compare_with_control
from livepart.workload.litellm import TABLE
from livepart.workload.writer import CONTROL_TABLE, RETENTION_DELETE, TARGETED_DELETE, Writer

NAME = "race_protection"
STRATEGIES = ("row_locks", "verify_only")
SHADOW = f"{TABLE}_lp_new"
WRITES_AFTER_SWAP_SECONDS = 0.5


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000, help="rows loaded before each run (default 20000)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each strategy, alternating which goes first (default 3)")
    parser.add_argument("--batch-size", type=int, default=1000, help="--batch-size of the migration (default 1000)")
    parser.add_argument("--seed", type=int, default=5, help="seed of the loaded rows and the writer (default 5)")

    parser.add_argument("--writer-pause", type=float, default=0.01,
                        help="seconds the writer waits after each transaction (default 0.01)")
    parser.add_argument("--targeted-delete-fraction", type=float, default=0.3,
                        help="share of writer transactions that delete rows of the batch in flight (default 0.3)")
    parser.add_argument("--targeted-delete-rows", type=int, default=5,
                        help="rows each targeted delete removes (default 5)")
    parser.add_argument("--retention-fraction", type=float, default=0.05,
                        help="share of writer transactions that run a retention delete (default 0.05)")

    parser.add_argument("--baseline-seconds", type=float, default=2.0,
                        help="seconds the writer runs alone with the trigger installed before the copy, "
                             "to estimate its WAL per inserted row (default 2)")
    parser.add_argument("--inside-batch-pause", type=float, default=0.0,
                        help="seconds each batch sleeps after its snapshot, through livepart's test pause "
                             "backfill.inside_batch; widens the race window (default 0: off)")

    arguments = parser.parse_args()
    for name in ("rows", "repeats", "batch_size", "targeted_delete_rows"):
        if getattr(arguments, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("targeted_delete_fraction", "retention_fraction"):
        if not 0 <= getattr(arguments, name) <= 1:
            parser.error(f"--{name.replace('_', '-')} must be between 0 and 1")
    if arguments.writer_pause < 0 or arguments.inside_batch_pause < 0:
        parser.error("--writer-pause and --inside-batch-pause must be 0 or more")
    if arguments.baseline_seconds <= 0:
        parser.error("--baseline-seconds must be more than 0")
    return arguments


def batch_in_flight(conn: asyncpg.Connection):
    """Return a target_range callback: the day after the backfill's checkpoint, while it copies."""

    async def target_range() -> tuple[str, str] | None:
        try:
            row = await conn.fetchrow(
                "SELECT phase, checkpoint[1] AS low, (checkpoint[1]::timestamp + interval '1 day')::text AS high "
                "FROM livepart.migration WHERE table_schema = 'public' AND table_name = $1", TABLE)
        except asyncpg.UndefinedTableError:
            return None  # prepare has not created the state schema yet
        if row is None or row["phase"] != "backfill" or row["low"] is None:
            return None
        return row["low"], row["high"]

    return target_range


async def measure_run(dsn: str, strategy: str, arguments: argparse.Namespace) -> dict[str, Any]:
    with common.quiet_logs() as events:
        return await _measure_run(dsn, strategy, arguments, events)


async def _measure_run(dsn: str, strategy: str, arguments: argparse.Namespace,
                       events: list[dict[str, Any]]) -> dict[str, Any]:
    monitor = await asyncpg.connect(dsn)
    callback_conn = await asyncpg.connect(dsn)
    writer = Writer(
        dsn, seed=arguments.seed + 1, pause=arguments.writer_pause,
        retention_fraction=arguments.retention_fraction,
        targeted_delete_fraction=arguments.targeted_delete_fraction,
        targeted_delete_rows=arguments.targeted_delete_rows,
        target_range=batch_in_flight(callback_conn),
    )
    recorder = common.Recorder(monitor, writer)
    shadow_before_verify: dict[str, int] = {}

    async def at_backfill() -> None:
        # The trigger is live but no batch has run, so no targeted delete either.
        await recorder.take("writer_alone_start")
        await asyncio.sleep(arguments.baseline_seconds)
        await recorder.take("backfill_start")

    async def at_verify() -> None:
        await recorder.take("backfill_end")
        comparison = await compare_with_control(monitor, SHADOW, CONTROL_TABLE)
        shadow_before_verify.update(comparison.summary())
        await recorder.take("verify_start")

    async def at_swap() -> None:
        await recorder.take("verify_end")

    stop = asyncio.Event()
    writing = asyncio.create_task(writer.run(stop))
    settings = Settings(dsn=dsn, batch_size=arguments.batch_size, unsafe_no_row_locks=strategy == "verify_only")
    try:
        await common.run_migration_with_hooks(
            settings, {"phase.backfill": at_backfill, "phase.verify": at_verify, "phase.swap": at_swap})
        await asyncio.sleep(WRITES_AFTER_SWAP_SECONDS)
    finally:
        stop.set()
        await writing
    try:
        final = await compare_with_control(monitor, TABLE, CONTROL_TABLE)
        state = await monitor.fetchrow(
            "SELECT phase, rows_copied, batches, verify_ranges, verify_differences, verify_repaired "
            "FROM livepart.migration WHERE table_schema = 'public' AND table_name = $1", TABLE)
        wal_backfill = await recorder.wal("backfill_start", "backfill_end")
        wal_verify = await recorder.wal("verify_start", "verify_end")
        # The writer's own WAL, estimated from its rows inserted in each phase and
        # its WAL per inserted row while it ran alone. Most of its WAL comes from the
        # 4 KB rows that each insert writes to three tables.
        writer_wal_per_row = (await recorder.wal("writer_alone_start", "backfill_start")
                              / max(recorder.writer_inserts("writer_alone_start", "backfill_start"), 1))
    finally:
        await monitor.close()
        await callback_conn.close()

    retries = Counter(event.get("operation", "unknown") for event in common.events_named(events, "retry"))
    backfill_seconds = recorder.seconds("backfill_start", "backfill_end")
    verify_seconds = recorder.seconds("verify_start", "verify_end")
    batch_ms = [event["ms"] for event in common.events_named(events, "backfill.batch")]
    return {
        "strategy": strategy,
        "phase": state["phase"],
        "rows_copied": state["rows_copied"],
        "batches": state["batches"],
        "backfill_seconds": backfill_seconds,
        "verify_seconds": verify_seconds,
        "backfill_plus_verify_seconds": backfill_seconds + verify_seconds,
        "rows_per_second": state["rows_copied"] / backfill_seconds,
        "longest_batch_ms": max(batch_ms) if batch_ms else None,
        "retries": dict(retries),
        "wal_bytes_backfill": wal_backfill,
        "wal_bytes_verify": wal_verify,
        "wal_bytes_total": wal_backfill + wal_verify,
        "wal_bytes_per_writer_insert_alone": writer_wal_per_row,
        "writer_inserts_backfill": recorder.writer_inserts("backfill_start", "backfill_end"),
        "writer_inserts_verify": recorder.writer_inserts("verify_start", "verify_end"),
        "wal_bytes_backfill_estimate": wal_backfill
        - writer_wal_per_row * recorder.writer_inserts("backfill_start", "backfill_end"),
        "wal_bytes_verify_estimate": wal_verify
        - writer_wal_per_row * recorder.writer_inserts("verify_start", "verify_end"),
        "verify_ranges": state["verify_ranges"],
        "verify_differences": state["verify_differences"],
        "ranges_repaired": state["verify_repaired"],
        "shadow_before_verify": shadow_before_verify,
        "writer_backfill": common.latency_summary(recorder.latencies_ms("backfill_start", "backfill_end")),
        "writer_backfill_targeted_delete": common.latency_summary(
            recorder.latencies_ms("backfill_start", "backfill_end", TARGETED_DELETE)),
        "writer_backfill_retention_delete": common.latency_summary(
            recorder.latencies_ms("backfill_start", "backfill_end", RETENTION_DELETE)),
        "writer_stats": writer.stats.summary(),
        "targeted_deletes_committed": writer.stats.operations[TARGETED_DELETE],
        "final_equals_control": final.ok,
        "final_comparison": final.summary(),
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    paths = {
        "rows_per_second": ("rows_per_second",),
        "backfill_seconds": ("backfill_seconds",),
        "verify_seconds": ("verify_seconds",),
        "backfill_plus_verify_seconds": ("backfill_plus_verify_seconds",),
        "wal_mb_backfill": ("wal_bytes_backfill",),
        "wal_mb_verify": ("wal_bytes_verify",),
        "wal_mb_total": ("wal_bytes_total",),
        "wal_mb_backfill_estimate": ("wal_bytes_backfill_estimate",),
        "wal_mb_verify_estimate": ("wal_bytes_verify_estimate",),
        "writer_p50_ms": ("writer_backfill", "p50_ms"),
        "writer_p99_ms": ("writer_backfill", "p99_ms"),
        "targeted_delete_p99_ms": ("writer_backfill_targeted_delete", "p99_ms"),
        "ghosts_before_verify": ("shadow_before_verify", "ghost"),
        "ranges_repaired": ("ranges_repaired",),
        "batch_retries": ("retries", "backfill.batch"),
        "longest_batch_ms": ("longest_batch_ms",),
    }
    summary: dict[str, dict[str, Any]] = {}
    for strategy in STRATEGIES:
        own = [run for run in runs if run["strategy"] == strategy]
        entry: dict[str, Any] = {"runs": len(own)}
        for name, path in paths.items():
            values = []
            for run in own:
                value: Any = run
                for key in path:
                    value = value.get(key, 0) if isinstance(value, dict) else value
                values.append(float(value or 0))
            if name.startswith("wal_mb"):
                values = [value / 1024 / 1024 for value in values]
            entry[name] = common.spread(values)
        entry["final_equals_control"] = [run["final_equals_control"] for run in own]
        summary[strategy] = entry
    return summary


def print_summary(summary: dict[str, dict[str, Any]]) -> None:
    print()
    print("medians over the runs of each strategy, [min .. max]")
    labels = [
        ("copy rows/s", "rows_per_second", 0), ("backfill s", "backfill_seconds", 1),
        ("verify s", "verify_seconds", 1), ("backfill + verify s", "backfill_plus_verify_seconds", 1),
        ("WAL MB backfill", "wal_mb_backfill", 1), ("WAL MB verify", "wal_mb_verify", 1),
        ("  less writer, backfill", "wal_mb_backfill_estimate", 1),
        ("  less writer, verify", "wal_mb_verify_estimate", 1),
        ("writer p50 ms (backfill)", "writer_p50_ms", 1), ("writer p99 ms (backfill)", "writer_p99_ms", 1),
        ("targeted delete p99 ms", "targeted_delete_p99_ms", 1), ("batch retries", "batch_retries", 0),
        ("longest batch ms", "longest_batch_ms", 0),
        ("ghosts before verify", "ghosts_before_verify", 0), ("ranges repaired", "ranges_repaired", 0),
    ]
    rows = []
    for label, key, digits in labels:
        cells = [label]
        for strategy in STRATEGIES:
            values = summary[strategy][key]
            cells.append(f"{values['median']:.{digits}f} [{values['min']:.{digits}f} .. {values['max']:.{digits}f}]")
        rows.append(cells)
    rows.append(["final table equals control"] + [
        f"{sum(summary[strategy]['final_equals_control'])} of {summary[strategy]['runs']}" for strategy in STRATEGIES])
    common.print_table(["", *STRATEGIES], rows)


async def main() -> int:
    arguments = parse_arguments()
    if arguments.inside_batch_pause > 0:
        os.environ["LIVEPART_TEST_PAUSE"] = f"backfill.inside_batch={arguments.inside_batch_pause}"
    runs: list[dict[str, Any]] = []
    with common.local_server() as server:
        info = common.machine_info(server)
        common.print_machine(info)
        for repeat in range(arguments.repeats):
            order = STRATEGIES if repeat % 2 == 0 else tuple(reversed(STRATEGIES))
            for strategy in order:
                name = f"race_{strategy}_{repeat + 1}"
                dsn = server.create_database(name)
                await common.load_litellm(dsn, arguments.rows, arguments.seed, large_row_fraction=0.001)
                print(f"{strategy} (run {repeat + 1} of {arguments.repeats}): migrating {arguments.rows} rows "
                      "under the writer ...")
                result = await measure_run(dsn, strategy, arguments)
                result["run"] = repeat + 1
                runs.append(result)
                print(f"  backfill {result['backfill_seconds']:.1f} s, verify {result['verify_seconds']:.1f} s, "
                      f"ghosts before verify {result['shadow_before_verify'].get('ghost')}, "
                      f"ranges repaired {result['ranges_repaired']}, "
                      f"final table equals control: {result['final_equals_control']}, "
                      f"writer errors {result['writer_stats']['errors']}")
                server.drop_database(name)
    summary = summarise(runs)
    print_summary(summary)
    payload = {
        "benchmark": NAME,
        "machine": info,
        "load_average_at_end": common.load_average(),
        "parameters": vars(arguments),
        "summary": summary,
        "runs": runs,
    }
    path = common.write_results(NAME, payload)
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    common.run(main)
