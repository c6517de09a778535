"""Shared helpers of the benchmark scripts: server, databases, rows, statistics, results.

The benchmarks are scripts run by hand, not tests. Each one starts its own
throwaway PostgreSQL server on 127.0.0.1 (livepart.pgserver.LocalPostgres),
prints a readable summary and writes JSON to benchmarks/results/<name>.json
together with the machine, server and Python versions that every number needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import structlog

from livepart import __version__ as livepart_version
from livepart import worker as worker_module
from livepart.orchestrator import run_migration
from livepart.pgserver import LocalPostgres
from livepart.settings import Settings
from livepart.workload.litellm import TABLE, RowGenerator, create_legacy_schema, load_rows
from livepart.workload.writer import CONTROL_TABLE, Writer, create_control_table

BENCHMARKS_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCHMARKS_DIR / "results"
REPOSITORY_DIR = BENCHMARKS_DIR.parent

# Server settings shared by every benchmark. Autovacuum is off, so that no
# background vacuum lands in one measurement and not in another. The scripts run
# VACUUM and CHECKPOINT themselves, between measurements.
SERVER_SETTINGS = {
    "autovacuum": "off",
    "max_wal_size": "4GB",
    "checkpoint_timeout": "30min",
}


class StopMigration(Exception):
    """Raised from a livepart test hook to end run_migration at a chosen phase."""


# -- machine and versions ---------------------------------------------------


def cpu_model() -> str:
    """Return the first "model name" of /proc/cpuinfo, or platform.processor() without it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str | None:
    """Return the commit of the working tree, with "+changes" when it has uncommitted changes."""
    try:
        commit = subprocess.run(["git", "-C", str(REPOSITORY_DIR), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPOSITORY_DIR), "status", "--porcelain", "--", "src"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+changes in src" if dirty else "")


def source_digest() -> str:
    """Return a short SHA-256 over livepart's source files, to tie results to the code they measured."""
    digest = hashlib.sha256()
    for path in sorted((REPOSITORY_DIR / "src" / "livepart").rglob("*")):
        if path.suffix in (".py", ".sql"):
            digest.update(path.relative_to(REPOSITORY_DIR).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def machine_info(server: LocalPostgres | None = None) -> dict[str, Any]:
    """Describe the machine, the software versions and the time of the run."""
    info: dict[str, Any] = {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "load_average_at_start": load_average(),
        "memory_gib": _memory_gib(),
        "python": platform.python_version(),
        "livepart": livepart_version,
        "livepart_commit": git_commit(),
        "livepart_source_sha256": source_digest(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    if server is not None:
        info["postgresql"] = server.server_version()
        info["server_settings"] = dict(SERVER_SETTINGS)
    return info


def load_average() -> list[float]:
    """Return the 1, 5 and 15 minute load averages; other processes share the cores."""
    return [round(value, 2) for value in os.getloadavg()]


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def print_machine(info: dict[str, Any]) -> None:
    print(f"machine: {info['cpu_model']}, {info['cpu_cores']} cores, {info['memory_gib']} GiB, "
          f"load average at start {info['load_average_at_start']}")
    versions = (f"Python {info['python']}, livepart {info['livepart']} "
                f"(commit {info['livepart_commit']}, source sha256 {info['livepart_source_sha256']})")
    if "postgresql" in info:
        versions = f"PostgreSQL {info['postgresql']}, " + versions
    print(f"software: {versions}")
    print(f"date: {info['date_utc']}")


# -- server and databases ---------------------------------------------------


@contextlib.contextmanager
def local_server() -> Iterator[LocalPostgres]:
    """Start a throwaway server on 127.0.0.1 with SERVER_SETTINGS; stop and delete it afterwards."""
    with LocalPostgres(settings=SERVER_SETTINGS) as server:
        yield server


def litellm_generator(seed: int, *, large_row_fraction: float, days: int = 60) -> RowGenerator:
    """Return a row generator whose "startTime" values span the `days` days before the last hour."""
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    return RowGenerator(seed, now - timedelta(days=days), now - timedelta(hours=1),
                        large_row_fraction=large_row_fraction)


async def load_litellm(dsn: str, rows: int, seed: int, *, large_row_fraction: float,
                       schema: str = "public", control: bool = True) -> int:
    """Create the legacy LiteLLM table and its control table, load `rows` rows, then VACUUM and CHECKPOINT.

    The same seed gives the same rows, apart from "startTime" values, which are
    placed relative to the current time.
    """
    conn = await asyncpg.connect(dsn)
    try:
        await create_legacy_schema(conn, schema)
        control_name = None
        if control:
            await create_control_table(conn, TABLE, schema, CONTROL_TABLE, copy_rows=False)
            control_name = CONTROL_TABLE
        generator = litellm_generator(seed, large_row_fraction=large_row_fraction)
        loaded = await load_rows(conn, generator.iter_rows(rows), schema=schema, control=control_name)
        await conn.execute("VACUUM (ANALYZE)")
        await conn.execute("CHECKPOINT")
        return loaded
    finally:
        await conn.close()


# -- migration phases -------------------------------------------------------


PhaseHook = Callable[[], Awaitable[None]]


async def run_migration_with_hooks(settings: Settings, hooks: dict[str, PhaseHook]) -> bool:
    """Run the migration with livepart's test hooks installed; return False if a hook stopped it.

    A hook stops the run by raising StopMigration. The hooks are removed
    afterwards, also when the run raises.
    """
    worker_module.test_hooks.clear()
    worker_module.test_hooks.update(hooks)
    try:
        await run_migration(settings)
    except StopMigration:
        return False
    finally:
        worker_module.test_hooks.clear()
    return True


async def prepare_only(settings: Settings, *, backfill: bool) -> None:
    """Run the real prepare phase (and the backfill if `backfill`), then stop.

    This builds the partitioned shadow table, its partitions, the state schema
    and the dual-write triggers exactly as `livepart run` does.
    """
    stop_at = "phase.verify" if backfill else "phase.backfill"

    async def stop() -> None:
        raise StopMigration(stop_at)

    finished = await run_migration_with_hooks(settings, {stop_at: stop})
    if finished:
        raise RuntimeError(f"the migration of {settings.migration_id} ran to the end instead of stopping "
                           f"at {stop_at}")


# -- measurements -----------------------------------------------------------


async def wal_lsn(conn: asyncpg.Connection) -> str:
    return await conn.fetchval("SELECT pg_catalog.pg_current_wal_lsn()::text")


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Return the nearest-rank percentile (the same rule as WriterStats.percentile)."""
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
    return ordered[index]


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Return the median, quartiles, minimum, maximum and count of `values`."""
    if not values:
        return {"n": 0, "median": None, "p25": None, "p75": None, "min": None, "max": None}
    quartiles = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {
        "n": len(values),
        "median": statistics.median(values),
        "p25": quartiles[0],
        "p75": quartiles[2],
        "min": min(values),
        "max": max(values),
    }


def rounded(value: Any, digits: int = 3) -> Any:
    """Round floats, also inside dicts and lists, so that the JSON stays readable."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(item, digits) for item in value]
    return value


def format_spread(summary: dict[str, Any], unit: str = "", digits: int = 1) -> str:
    """Format a spread() result as "median [p25 .. p75]"."""
    if summary["median"] is None:
        return "-"
    return (f"{summary['median']:.{digits}f}{unit} "
            f"[{summary['p25']:.{digits}f} .. {summary['p75']:.{digits}f}]")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a plain text table with right-aligned columns."""
    cells = [[str(header) for header in headers]] + [["-" if cell is None else str(cell) for cell in row]
                                                     for row in rows]
    widths = [max(len(row[column]) for row in cells) for column in range(len(headers))]
    for number, row in enumerate(cells):
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
        if number == 0:
            print("  ".join("-" * width for width in widths))


class Stopwatch:
    """Seconds since creation, from time.perf_counter()."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.started


# -- marks taken while a writer runs -----------------------------------------


@dataclass
class Mark:
    """Clock time, WAL position, writer rows inserted and lengths of the writer's latency lists."""

    seconds: float
    lsn: str
    writer_inserts: int
    latency_counts: dict[str, int]


@dataclass
class Recorder:
    """Marks taken at phase boundaries from a monitoring connection, and what happened between two."""

    conn: asyncpg.Connection
    writer: Writer
    marks: dict[str, Mark] = field(default_factory=dict)

    async def take(self, name: str) -> None:
        self.marks[name] = Mark(time.perf_counter(), await wal_lsn(self.conn), self.writer.stats.inserts,
                                {kind: len(values) for kind, values in self.writer.stats.latencies.items()})

    def seconds(self, start: str, end: str) -> float:
        return self.marks[end].seconds - self.marks[start].seconds

    def writer_inserts(self, start: str, end: str) -> int:
        return self.marks[end].writer_inserts - self.marks[start].writer_inserts

    async def wal(self, start: str, end: str) -> int:
        return int(await self.conn.fetchval("SELECT pg_catalog.pg_wal_lsn_diff($1::text::pg_lsn, $2::text::pg_lsn)",
                                            self.marks[end].lsn, self.marks[start].lsn))

    def latencies_ms(self, start: str, end: str, kind: str | None = None) -> list[float]:
        """Return the writer's transaction latencies (ms) that completed between two marks."""
        first, last = self.marks[start].latency_counts, self.marks[end].latency_counts
        values: list[float] = []
        for name, series in self.writer.stats.latencies.items():
            if kind is None or name == kind:
                values += series[first.get(name, 0):last.get(name, len(series))]
        return [value * 1000 for value in values]


def latency_summary(values: list[float]) -> dict[str, Any]:
    return {"transactions": len(values), "p50_ms": percentile(values, 0.5),
            "p99_ms": percentile(values, 0.99), "max_ms": max(values) if values else None}


# -- logs -------------------------------------------------------------------


@contextlib.contextmanager
def quiet_logs() -> Iterator[list[dict[str, Any]]]:
    """Capture livepart's and the writer's structlog events instead of printing them.

    The events are kept in memory for the benchmark to read (batch durations,
    retries). They contain counts, durations and error classes, never row contents.
    """
    with structlog.testing.capture_logs() as events:
        yield events


def events_named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [event for event in events if event.get("event") == name]


# -- results ----------------------------------------------------------------


def write_results(name: str, payload: dict[str, Any], path: Path | None = None) -> Path:
    """Write `payload` as JSON to benchmarks/results/<name>.json (or `path`), replacing it atomically."""
    target = path or RESULTS_DIR / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text(json.dumps(rounded(payload), indent=2, default=str) + "\n", encoding="utf-8")
    temporary.replace(target)
    return target


def run(main: Callable[[], Awaitable[int]]) -> None:
    """Run an async main() and exit with its return code."""
    sys.exit(asyncio.run(main()))
