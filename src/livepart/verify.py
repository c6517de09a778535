"""Phase 4, verify: compare the copy with the live table by content, range by range.

Counting rows proves little, because a lost row and a ghost row cancel out.
Each key range is compared by row count and by an order-independent checksum
(the sum of a 64-bit hash of every column, matched by name) on both tables
inside one REPEATABLE READ snapshot. The dual-write trigger writes both tables
in the application's own transaction, so a snapshot contains either both
writes or neither.

A range that differs is repaired: its live rows are locked FOR SHARE, the
copy's rows in the range are deleted and copied again, and the range is
compared again.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import asyncpg

from .backfill import KeysetQuery
from .catalog import Table
from .errors import VerificationFailed
from .ident import column_list, qualified, quote_ident
from .plan import Plan
from .state import MigrationState, Phase, count_trigger_errors, update_state
from .worker import Worker

MAX_REPAIR_ROUNDS = 3


@dataclass
class VerifyReport:
    ranges_checked: int = 0
    rows_checked: int = 0
    differences_found: int = 0
    ranges_repaired: int = 0
    seconds: float = 0.0

    @property
    def rows_per_second(self) -> float:
        return self.rows_checked / self.seconds if self.seconds > 0 else 0.0

    @property
    def clean(self) -> bool:
        return self.differences_found == self.ranges_repaired

    def to_json(self) -> dict[str, object]:
        values = asdict(self)
        values["rows_per_second"] = round(self.rows_per_second, 1)
        values["clean"] = self.clean
        return values


@dataclass(frozen=True)
class Pair:
    """The live table (the truth) and its copy, with their qualified names."""

    live: str
    copy: str


def checksum_sql(table: Table, alias: str, *, record_hash: bool) -> str:
    """count(*) and the sum of a 64-bit hash of all columns in name order.

    hash_record_extended (PostgreSQL 14+) hashes each value with its type's own
    hash function, about three times faster than hashing the row's text form
    (0.6 s against 1.8 to 2.3 s for 20,000 LiteLLM rows on PostgreSQL 15, 2-core
    VM, measured with psql). Equal values hash alike there, so 1.0 and 1.00 in a
    numeric column count as equal; the text form tells them apart.
    """
    names = sorted(table.column_names)
    row = f"ROW({column_list(names, alias)})"
    hashed = (f"pg_catalog.hash_record_extended({row}, 0)" if record_hash
              else f"pg_catalog.hashtextextended({row}::text, 0)")
    return f"SELECT count(*) AS row_count, coalesce(sum({hashed}::numeric), 0) AS checksum"


async def supports_record_hash(conn: asyncpg.Connection, table: Table) -> bool:
    """Whether every column type has an extended hash function (checked on NULLs, no data read)."""
    if int(await conn.fetchval("SHOW server_version_num")) < 140000:
        return False
    nulls = ", ".join(f"NULL::{column.type_sql}" for column in table.columns)
    try:
        async with conn.transaction():
            await conn.fetchval(f"SELECT pg_catalog.hash_record_extended(ROW({nulls}), 0)")
    except asyncpg.PostgresError:
        return False
    return True


class RangeVerifier:
    def __init__(self, worker: Worker, plan: Plan, pair: Pair, *, repair: bool) -> None:
        self.worker = worker
        self.plan = plan
        self.pair = pair
        self.repair = repair
        self.keyset = KeysetQuery(plan.table, "t", plan.order_columns)
        self.width = len(plan.order_columns)
        self.report = VerifyReport()
        self.record_hash = False

    def _predicate(self, has_lower: bool, has_upper: bool) -> str:
        """Parameters: lower bound first (if any), then upper bound (if any)."""
        parts = []
        if has_lower:
            parts.append(self.keyset.after(1))
        if has_upper:
            parts.append(self.keyset.at_most(1 + (self.width if has_lower else 0)))
            if self.plan.order_columns[0] == self.plan.key.name:
                # Lets the planner prune partitions of a partitioned table.
                key = f"t.{quote_ident(self.plan.key.name)}"
                lower = f" AND {key} >= $1::text::{self.plan.key.type_sql}" if has_lower else ""
                upper_index = 1 + (self.width if has_lower else 0)
                parts.append(f"{key} <= ${upper_index}::text::{self.plan.key.type_sql}{lower}")
        return " AND ".join(parts) if parts else "TRUE"

    async def _next_upper(self, conn: asyncpg.Connection, lower: list[str] | None) -> list[str] | None:
        where = self.keyset.after(1) if lower else "TRUE"
        sql = (
            f"SELECT {', '.join(f'sub.{quote_ident(c)}::text' for c in self.plan.order_columns)} FROM ("
            f"SELECT {self.keyset.columns()} FROM {self.pair.live} AS t WHERE {where} "
            f"ORDER BY {self.keyset.order_by()} LIMIT ${1 + (self.width if lower else 0)}) AS sub "
            f"ORDER BY {', '.join(f'sub.{quote_ident(c)} DESC' for c in self.plan.order_columns)} LIMIT 1"
        )
        row = await conn.fetchrow(sql, *(lower or []), self.worker.settings.verify_batch_size)
        if row is None:
            return None
        return list(row.values())

    async def _compare(
        self, conn: asyncpg.Connection, lower: list[str] | None, upper: list[str] | None
    ) -> tuple[int, bool]:
        """Return (live row count, equal?) for one range, in the caller's snapshot."""
        where = self._predicate(lower is not None, upper is not None)
        arguments = (lower or []) + (upper or [])
        checksum = checksum_sql(self.plan.table, "t", record_hash=self.record_hash)
        live = await conn.fetchrow(f"{checksum} FROM {self.pair.live} AS t WHERE {where}", *arguments)
        copy = await conn.fetchrow(f"{checksum} FROM {self.pair.copy} AS t WHERE {where}", *arguments)
        equal = live["row_count"] == copy["row_count"] and live["checksum"] == copy["checksum"]
        return live["row_count"], equal

    async def verify_range(self, lower: list[str] | None) -> list[str] | None:
        """Verify (and repair) the range after `lower`; return its upper bound, None at the end."""

        async def work(conn: asyncpg.Connection) -> tuple[list[str] | None, int, bool]:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                upper = await self._next_upper(conn, lower)
                rows, equal = await self._compare(conn, lower, upper)
                await self.worker.pause_point("verify.range")
            return upper, rows, equal

        upper, rows, equal = await self.worker.db.run("verify.range", work)
        self.report.ranges_checked += 1
        self.report.rows_checked += rows
        if equal:
            return upper
        self.report.differences_found += 1
        self.worker.log.warning("verify.difference", range_number=self.report.ranges_checked)
        if not self.repair:
            return upper
        await self._repair(lower, upper)
        self.report.ranges_repaired += 1
        return upper

    async def _repair(self, lower: list[str] | None, upper: list[str] | None) -> None:
        where = self._predicate(lower is not None, upper is not None)
        arguments = (lower or []) + (upper or [])
        columns = self.plan.table.copied_columns
        overriding = " OVERRIDING SYSTEM VALUE" if any(c.identity for c in self.plan.table.columns) else ""

        async def work(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                await conn.execute(f"SELECT 1 FROM {self.pair.live} AS t WHERE {where} FOR SHARE OF t NOWAIT",
                                   *arguments)
                await conn.execute(f"DELETE FROM {self.pair.copy} AS t WHERE {where}", *arguments)
                await conn.execute(
                    f"INSERT INTO {self.pair.copy} ({column_list(columns)}){overriding} "
                    f"SELECT {column_list(columns, 't')} FROM {self.pair.live} AS t WHERE {where} "
                    f"FOR SHARE OF t NOWAIT ON CONFLICT DO NOTHING",
                    *arguments,
                )

        for round_number in range(1, MAX_REPAIR_ROUNDS + 1):
            await self.worker.db.run("verify.repair", work)

            async def recheck(conn: asyncpg.Connection) -> bool:
                async with conn.transaction(isolation="repeatable_read", readonly=True):
                    return (await self._compare(conn, lower, upper))[1]

            if await self.worker.db.run("verify.recheck", recheck):
                self.worker.log.info("verify.repaired", range_number=self.report.ranges_checked,
                                     rounds=round_number)
                return
        raise VerificationFailed(
            f"range {self.report.ranges_checked} of {self.pair.live} still differs from "
            f"{self.pair.copy} after {MAX_REPAIR_ROUNDS} repairs; the run stopped before the swap: "
            "check livepart.trigger_error and run livepart verify --repair"
        )


def pair_for(plan: Plan, phase: Phase) -> Pair:
    """Before the swap the old table is live; after it, the new one is."""
    schema, names = plan.table.schema, plan.names
    if phase in (Phase.SWAPPED, Phase.FINALIZED):
        return Pair(live=qualified(schema, names.table), copy=qualified(schema, names.old))
    return Pair(live=qualified(schema, names.table), copy=qualified(schema, names.shadow))


async def verify_all(worker: Worker, plan: Plan, pair: Pair, *, repair: bool,
                     start: list[str] | None = None, on_range=None) -> VerifyReport:
    """Verify every range from `start` to the end of the live table."""
    verifier = RangeVerifier(worker, plan, pair, repair=repair)
    verifier.record_hash = await worker.db.run(
        "verify.hash", lambda conn: supports_record_hash(conn, plan.table)
    )
    started = time.monotonic()
    lower = start
    while True:
        await worker.throttler.wait(worker.stop)
        upper = await verifier.verify_range(lower)
        verifier.report.seconds = time.monotonic() - started
        if on_range is not None:
            await on_range(upper, verifier.report)
        if upper is None:
            return verifier.report
        lower = upper


async def run_verify_phase(worker: Worker, plan: Plan, state: MigrationState) -> VerifyReport:
    """Verify during `run`: resumable by checkpoint, repairs, and must end clean."""
    table = plan.table
    errors_at_start = await worker.db.run(
        "verify.errors", lambda conn: count_trigger_errors(conn, table.schema, table.name)
    )
    start = list(state.verify_checkpoint) if state.verify_checkpoint else None

    async def save(upper: list[str] | None, report: VerifyReport) -> None:
        async def work(conn: asyncpg.Connection) -> None:
            await update_state(
                conn, table.schema, table.name, verify_checkpoint=upper,
                verify_ranges=report.ranges_checked, verify_rows=report.rows_checked,
                verify_differences=report.differences_found, verify_repaired=report.ranges_repaired,
            )

        await worker.db.run("verify.checkpoint", work)

    report = await verify_all(worker, plan, pair_for(plan, Phase.VERIFY), repair=True, start=start,
                              on_range=save)

    async def finish(conn: asyncpg.Connection) -> None:
        await update_state(conn, table.schema, table.name, phase=Phase.SWAP, verify_checkpoint=None,
                           verified_at=await conn.fetchval("SELECT now()"),
                           trigger_errors_seen=errors_at_start)

    await worker.db.run("verify.finish", finish)
    worker.log.info("verify.done", **report.to_json())
    return report
