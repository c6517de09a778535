"""Command line: `livepart plan|run|status|verify|rollback|finalize|maintain|demo`.

Errors print one line on stderr and exit non-zero (see EXIT CODES in --help);
`--debug` adds the traceback.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from . import __version__
from .errors import Interrupted, InvalidInput, LivepartError
from .log import configure_logging
from .settings import Settings, unsafe_no_row_locks_from_env

T = TypeVar("T")

EXIT_CODES = """Exit codes: 0 done; 1 failed (state saved, run again to resume);
2 invalid input or failed preflight check (nothing changed); 3 another worker holds the table;
4 interrupted by SIGINT/SIGTERM (run again to resume); 5 verification found differences;
6 catalog and migration state disagree."""

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Convert a large, live PostgreSQL table into a range-partitioned one, online.\n\n" + EXIT_CODES,
)
# soft_wrap keeps one message on one line when output goes to a pipe or a log.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

DsnOption = typer.Option(
    None, "--dsn", envvar="DATABASE_URL", show_default=False, show_envvar=True,
    help="PostgreSQL connection URL, e.g. postgresql://user@host:5432/db.",
)
SchemaOption = typer.Option("public", help="Schema of the table.")
TableOption = typer.Option("LiteLLM_SpendLogs", help="Table to partition.")
KeyOption = typer.Option("startTime", "--partition-key", help="Time or integer column to partition by.")
IntervalOption = typer.Option(
    "month", help="Partition width: day, week or month for a time column; a whole number for an integer one."
)
StateKeyOption = typer.Option(
    None, "--partition-key", show_default=False,
    help="Partition key; by default the one the migration was started with.",
)
StateIntervalOption = typer.Option(
    None, "--interval", show_default=False,
    help="Partition width; by default the one the migration was started with.",
)
DebugOption = typer.Option(False, "--debug", help="Print tracebacks and debug logs.")
JsonOption = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")
LockTimeoutOption = typer.Option(
    2.0, "--lock-timeout", help="Seconds any lock wait may last before it is abandoned and retried."
)


def _explicit(**values: str | None) -> tuple[dict[str, str], set[str]]:
    """Split optional key and interval options into the values given and their names."""
    given = {name: value for name, value in values.items() if value is not None}
    return given, set(given)


def _settings(**values: Any) -> Settings:
    """Build the frozen settings; invalid values print one line and exit 2."""
    values["dsn"] = values.get("dsn") or ""
    try:
        return Settings(unsafe_no_row_locks=unsafe_no_row_locks_from_env(), **values)
    except InvalidInput as error:
        err.print(f"error: {error}", markup=False, soft_wrap=True)
        raise typer.Exit(InvalidInput.exit_code) from None


RESUME_HINT = "run the same command again to resume"


def _execute(
    factory: Callable[[asyncio.Event], Awaitable[T]], *, debug: bool, resume_hint: str = RESUME_HINT
) -> T:
    """Run a coroutine with signal handling and map errors to one line and an exit code."""
    configure_logging(level="debug" if debug else "info")

    async def main() -> T:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def request_stop(name: str) -> None:
            if not stop.is_set():
                err.print(f"{name} received: stopping at the next safe point (send it again to force)",
                          soft_wrap=True)
                stop.set()
            else:
                raise KeyboardInterrupt

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, request_stop, sig.name)
        return await factory(stop)

    try:
        return asyncio.run(main())
    except Interrupted as error:
        err.print(f"interrupted ({error}); {resume_hint}", markup=False, soft_wrap=True)
        raise typer.Exit(Interrupted.exit_code) from None
    except LivepartError as error:
        if debug:
            traceback.print_exc()
        err.print(f"error: {error}", markup=False, soft_wrap=True)
        raise typer.Exit(error.exit_code) from None
    except KeyboardInterrupt:
        err.print(f"interrupted; {resume_hint}", markup=False, soft_wrap=True)
        raise typer.Exit(Interrupted.exit_code) from None
    except Exception as error:  # noqa: BLE001 - the CLI's last line of defence
        if debug:
            traceback.print_exc()
        from .db import describe_error

        err.print(f"error: {describe_error(error)} (run with --debug for the traceback)", markup=False,
                  soft_wrap=True)
        raise typer.Exit(1) from None


@app.command()
def run(
    dsn: str = DsnOption,
    schema: str = SchemaOption,
    table: str = TableOption,
    partition_key: str = KeyOption,
    interval: str = IntervalOption,
    future_partitions: int = typer.Option(3, help="Partitions to create beyond the newest value and today."),
    max_partitions: int = typer.Option(1000, help="Stop if covering the existing values needs more partitions."),
    batch_size: int = typer.Option(1000, help="Rows per backfill batch (see benchmarks/ to choose)."),
    max_batch_bytes: int = typer.Option(
        8 * 1024 * 1024,
        help="Cap on the stored bytes of one batch. A batch locks its rows until it commits, "
        "and copying takes about 60 ms per MB on a small machine (see docs/benchmarks.md).",
    ),
    sleep: float = typer.Option(0.0, help="Seconds to pause between batches, to throttle the copy."),
    verify_batch_size: int = typer.Option(10000, help="Rows per verified key range."),
    lock_timeout: float = LockTimeoutOption,
    retries: int = typer.Option(20, help="Attempts per step on transient errors (lost connection, lock timeout)."),
    swap_attempts: int = typer.Option(30, help="Attempts to take the swap's lock."),
    restart: bool = typer.Option(False, "--restart", help="Discard an unfinished migration and start over."),
    reinstall_trigger: bool = typer.Option(
        False, "--reinstall-trigger",
        help="Reinstall a dual-write trigger that was dropped or disabled, then verify every range.",
    ),
    debug: bool = DebugOption,
) -> None:
    """Migrate the table: prepare, backfill, verify and swap. Resumes where it stopped."""
    from .orchestrator import run_migration

    settings = _settings(
        dsn=dsn, schema=schema, table=table, partition_key=partition_key, interval=interval,
        future_partitions=future_partitions, max_partitions=max_partitions, batch_size=batch_size,
        max_batch_bytes=max_batch_bytes, sleep=sleep, verify_batch_size=verify_batch_size,
        lock_timeout=lock_timeout, retries=retries, swap_attempts=swap_attempts, restart=restart,
        reinstall_trigger=reinstall_trigger,
    )
    hint = RESUME_HINT + (" (without --restart, which would discard the progress)" if restart else "")
    result = _execute(lambda stop: run_migration(settings, stop), debug=debug, resume_hint=hint)
    if result.already_done:
        out.print(f"{settings.migration_id} is already migrated (phase {result.phase.value}); nothing to do")
    else:
        lock = f"{result.swap_lock_ms:.1f} ms" if result.swap_lock_ms is not None else "unknown"
        out.print(f"{settings.migration_id} is partitioned: {result.rows_copied} rows copied, "
                  f"swap held its lock for {lock}")


@app.command()
def plan(
    dsn: str = DsnOption,
    schema: str = SchemaOption,
    table: str = TableOption,
    partition_key: str = KeyOption,
    interval: str = IntervalOption,
    future_partitions: int = typer.Option(3, help="Partitions to create beyond the newest value and today."),
    max_partitions: int = typer.Option(1000, help="Fail if covering the existing values needs more partitions."),
    as_json: bool = JsonOption,
    debug: bool = DebugOption,
) -> None:
    """Print the checks, the partitions and the DDL in order, with their locks. Changes nothing."""
    from .render import plan_to_json, print_plan
    from .db import connect_or_explain
    from .plan import build_plan, plan_statements
    from .state import load_state

    settings = _settings(dsn=dsn, schema=schema, table=table, partition_key=partition_key,
                         interval=interval, future_partitions=future_partitions,
                         max_partitions=max_partitions)

    async def work(stop: asyncio.Event) -> tuple[Any, Any, Any]:
        conn = await connect_or_explain(settings.dsn, lock_timeout_ms=settings.lock_timeout_ms)
        try:
            state = await load_state(conn, settings.schema, settings.table)
            built = await build_plan(conn, settings, resuming=state is not None)
            return built, plan_statements(built), state
        finally:
            await conn.close()

    built, statements, state = _execute(work, debug=debug)
    if as_json:
        out.print_json(json.dumps(plan_to_json(built, statements, state), default=str))
    else:
        print_plan(out, built, statements, state)
    if built.failures:
        raise typer.Exit(InvalidInput.exit_code)


@app.command()
def status(
    dsn: str = DsnOption,
    schema: str = SchemaOption,
    table: str = TableOption,
    as_json: bool = JsonOption,
    debug: bool = DebugOption,
) -> None:
    """Show the phase, progress, rate, ETA, trigger health, throttle and last error."""
    from .db import connect_or_explain
    from .render import print_status
    from .status import collect_status

    settings = _settings(dsn=dsn, schema=schema, table=table)

    async def work(stop: asyncio.Event) -> dict[str, Any]:
        conn = await connect_or_explain(settings.dsn, lock_timeout_ms=settings.lock_timeout_ms)
        try:
            return await collect_status(conn, settings.schema, settings.table)
        finally:
            await conn.close()

    report = _execute(work, debug=debug)
    if as_json:
        out.print_json(json.dumps(report))
    else:
        print_status(out, report)


@app.command()
def verify(
    dsn: str = DsnOption,
    schema: str = SchemaOption,
    table: str = TableOption,
    partition_key: str | None = StateKeyOption,
    interval: str | None = StateIntervalOption,
    repair: bool = typer.Option(False, "--repair", help="Copy ranges that differ again, then re-check them."),
    verify_batch_size: int = typer.Option(10000, help="Rows per verified key range."),
    sleep: float = typer.Option(0.0, help="Seconds to pause between ranges, to throttle the check."),
    lock_timeout: float = LockTimeoutOption,
    as_json: bool = JsonOption,
    debug: bool = DebugOption,
) -> None:
    """Compare the old and the new table range by range (counts and checksums of every column)."""
    from .commands import verify_command

    given, explicit = _explicit(partition_key=partition_key, interval=interval)
    settings = _settings(dsn=dsn, schema=schema, table=table, verify_batch_size=verify_batch_size, sleep=sleep,
                         lock_timeout=lock_timeout, **given)
    report = _execute(lambda stop: verify_command(settings, stop, repair=repair, explicit=explicit), debug=debug)
    if as_json:
        out.print_json(json.dumps(report.to_json()))
    else:
        out.print(
            f"ranges checked {report.ranges_checked}, rows checked {report.rows_checked}, "
            f"differences found {report.differences_found}, repaired {report.ranges_repaired}, "
            f"{report.rows_per_second:.0f} rows/s"
        )
    if not report.clean:
        raise typer.Exit(5)


@app.command()
def rollback(
    dsn: str = DsnOption,
    schema: str = SchemaOption,
    table: str = TableOption,
    partition_key: str | None = StateKeyOption,
    interval: str | None = StateIntervalOption,
    lock_timeout: float = LockTimeoutOption,
    debug: bool = DebugOption,
) -> None:
    """Swap back to the old table, keeping every write made since the swap."""
    from .commands import rollback_command

    given, explicit = _explicit(partition_key=partition_key, interval=interval)
    settings = _settings(dsn=dsn, schema=schema, table=table, lock_timeout=lock_timeout, **given)
    lock_ms = _execute(lambda stop: rollback_command(settings, stop, explicit=explicit), debug=debug)
    out.print(f"{settings.migration_id} is the old table again (lock held {lock_ms:.1f} ms); "
              "the partitioned table is kept in sync, run livepart run to swap again")


@app.command()
def finalize(
    dsn: str = DsnOption,
    schema: str = SchemaOption,
    table: str = TableOption,
    partition_key: str | None = StateKeyOption,
    interval: str | None = StateIntervalOption,
    drop_old: bool = typer.Option(False, "--drop-old", help="Also drop the old table."),
    lock_timeout: float = LockTimeoutOption,
    debug: bool = DebugOption,
) -> None:
    """End the rollback window: drop the reverse trigger (and the old table with --drop-old)."""
    from .commands import finalize_command

    given, explicit = _explicit(partition_key=partition_key, interval=interval)
    settings = _settings(dsn=dsn, schema=schema, table=table, lock_timeout=lock_timeout, **given)
    _execute(lambda stop: finalize_command(settings, stop, drop_old=drop_old, explicit=explicit), debug=debug)
    out.print(f"{settings.migration_id} finalized" + (" and the old table dropped" if drop_old else ""))


@app.command()
def maintain(
    dsn: str = DsnOption,
    schema: str = SchemaOption,
    table: str = TableOption,
    partition_key: str | None = StateKeyOption,
    interval: str | None = StateIntervalOption,
    future_partitions: int = typer.Option(3, help="Keep this many partitions ahead of today."),
    lock_timeout: float = LockTimeoutOption,
    debug: bool = DebugOption,
) -> None:
    """Create future partitions and move rows out of the default partition into their own."""
    from .commands import maintain_command

    given, explicit = _explicit(partition_key=partition_key, interval=interval)
    settings = _settings(dsn=dsn, schema=schema, table=table, future_partitions=future_partitions,
                         lock_timeout=lock_timeout, **given)
    report = _execute(lambda stop: maintain_command(settings, stop, explicit=explicit), debug=debug)
    out.print(f"partitions created: {report.created}; rows moved out of the default partition: "
              f"{report.moved_rows}")


@app.command()
def demo(
    rows: int = typer.Option(20000, help="Legacy rows to load before the migration starts."),
    batch_size: int = typer.Option(1000, help="Rows per backfill batch."),
    seed: int = typer.Option(7, help="Seed of the row generator and the writer."),
    debug: bool = DebugOption,
) -> None:
    """Migrate a LiteLLM-like table on a throwaway local PostgreSQL while a writer keeps writing."""
    from .demo import run_demo

    if rows < 0:
        raise typer.BadParameter("must be 0 or more", param_hint="--rows")
    summary = _execute(lambda stop: run_demo(rows=rows, batch_size=batch_size, seed=seed, stop=stop,
                                             console=out), debug=debug)
    if not summary.ok:
        raise typer.Exit(1)


@app.command()
def version() -> None:
    """Print the livepart version."""
    out.print(__version__)


def main() -> None:  # pragma: no cover - console script entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
