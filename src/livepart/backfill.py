"""Phase 3, backfill: copy the rows that existed when the trigger went live.

Batches page through the old table by keyset on the plan's order columns,
never by OFFSET. They stop at an upper bound frozen at the start, so the copy
ends even while the application keeps inserting, because rows above the bound
reach the shadow through the trigger. Each batch commits together with its
checkpoint.

The race: a batch reads a row, a concurrent DELETE (or an UPDATE that moves the
row to another partition) commits and its trigger finds nothing to delete in
the shadow, then the batch inserts the stale row, a ghost. Batches therefore
lock the rows they copy with FOR SHARE: a DELETE or UPDATE of a row in the
batch waits until the batch commits and then its trigger sees the copied row,
and a row deleted before the batch reached it is skipped. NOWAIT makes the
batch give up (and retry after a backoff) instead of waiting for a row the
application holds, so the batch can never take part in a deadlock with it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import asyncpg

from .catalog import Table, estimate_rows
from .ident import column_list, qualified, quote_ident
from .plan import Plan
from .state import MigrationState, Phase, update_state
from .worker import Worker, test_pauses

PROGRESS_INTERVAL_SECONDS = 10.0


@dataclass(frozen=True)
class KeysetQuery:
    """SQL fragments for paging through a table in `order_columns` order."""

    table: Table
    alias: str
    order_columns: list[str]

    def _types(self) -> list[str]:
        return [self.table.column(name).type_sql for name in self.order_columns]

    def columns(self) -> str:
        return column_list(self.order_columns, self.alias)

    def as_text(self) -> str:
        return ", ".join(f"{self.alias}.{quote_ident(c)}::text" for c in self.order_columns)

    def parameters(self, first: int) -> str:
        """Row of parameters, passed as text and cast to each column's type."""
        return ", ".join(f"${first + i}::text::{t}" for i, t in enumerate(self._types()))

    def after(self, first: int) -> str:
        return f"({self.columns()}) > ({self.parameters(first)})"

    def at_most(self, first: int) -> str:
        return f"({self.columns()}) <= ({self.parameters(first)})"

    def order_by(self, descending: bool = False) -> str:
        direction = " DESC" if descending else ""
        return ", ".join(f"{self.alias}.{quote_ident(c)}{direction}" for c in self.order_columns)


def stored_size_sql(table: Table, alias: str) -> str:
    """Stored bytes of a row: compressed or TOAST-ed sizes, read without detoasting."""
    return " + ".join(
        f"coalesce(pg_catalog.pg_column_size({alias}.{quote_ident(c.name)})::bigint, 0)"
        for c in table.columns
    )


async def freeze_upper_bound(conn: asyncpg.Connection, plan: Plan) -> list[str]:
    """Return the last row in keyset order; every row older than the trigger is at or below it."""
    keyset = KeysetQuery(plan.table, "src", plan.order_columns)
    row = await conn.fetchrow(
        f"SELECT {keyset.as_text()} FROM {qualified(plan.table.schema, plan.names.table)} AS src "
        f"ORDER BY {keyset.order_by(descending=True)} LIMIT 1"
    )
    return list(row.values()) if row else []


async def run_backfill(worker: Worker, plan: Plan, state: MigrationState) -> None:
    table = plan.table
    upper_bound = state.upper_bound
    if upper_bound is None:

        async def freeze(conn: asyncpg.Connection) -> list[str]:
            bound = await freeze_upper_bound(conn, plan)
            await update_state(
                conn, table.schema, table.name, upper_bound=bound,
                backfill_started_at=await conn.fetchval("SELECT now()"),
                rows_estimated=await estimate_rows(conn, table.schema, plan.names.table),
            )
            return bound

        upper_bound = await worker.db.run("backfill.freeze", freeze)
        worker.log.info("backfill.start", estimated_rows=table.estimated_rows,
                        order=plan.order_columns)

    copier = BatchCopier(worker, plan, list(upper_bound))
    if upper_bound:
        await copier.copy_all()

    async def finish(conn: asyncpg.Connection) -> None:
        await update_state(conn, table.schema, table.name, phase=Phase.VERIFY, throttle=None)

    await worker.db.run("backfill.finish", finish)
    worker.log.info("backfill.done")


class BatchCopier:
    def __init__(self, worker: Worker, plan: Plan, upper_bound: list[str]) -> None:
        self.worker = worker
        self.plan = plan
        self.upper_bound = upper_bound
        self.keyset = KeysetQuery(plan.table, "src", plan.order_columns)
        self.source = qualified(plan.table.schema, plan.names.table)
        self.target = qualified(plan.table.schema, plan.names.shadow)
        self.width = len(plan.order_columns)
        self.lock_rows = not worker.settings.unsafe_no_row_locks
        self._throttle_reason: str | None = None

    def _range_predicate(self, has_lower: bool) -> str:
        """`lower < row <= upper`; parameters: upper first, then lower."""
        upper = self.keyset.at_most(1)
        if not has_lower:
            return upper
        return f"{self.keyset.after(1 + self.width)} AND {upper}"

    def _cut_sql(self, has_lower: bool) -> str:
        limit = 1 + self.width * (2 if has_lower else 1)
        return (
            f"SELECT {self.keyset.as_text()}, {stored_size_sql(self.plan.table, 'src')} AS stored_bytes "
            f"FROM {self.source} AS src WHERE {self._range_predicate(has_lower)} "
            f"ORDER BY {self.keyset.order_by()} LIMIT ${limit}"
        )

    def _copy_sql(self, has_lower: bool) -> str:
        columns = self.plan.table.copied_columns
        overriding = " OVERRIDING SYSTEM VALUE" if any(c.identity for c in self.plan.table.columns) else ""
        locking = " FOR SHARE OF src NOWAIT" if self.lock_rows else ""
        pause = test_pauses().get("backfill.inside_batch")
        # Test hook: sleep after the statement's snapshot is taken and before
        # any row is read, which widens the race window the row locks close.
        delay = f" AND (SELECT 1 FROM pg_catalog.pg_sleep({float(pause)})) = 1" if pause else ""
        return (
            f"INSERT INTO {self.target} ({column_list(columns)}){overriding} "
            f"SELECT {column_list(columns, 'src')} FROM {self.source} AS src "
            f"WHERE {self._range_predicate(has_lower)}{delay}{locking} "
            f"ON CONFLICT DO NOTHING"
        )

    async def copy_all(self) -> None:
        started = time.monotonic()
        last_progress = started
        copied_this_run = 0
        while True:
            await self._throttle()
            result = await self.worker.db.run("backfill.batch", self._batch)
            if result is None:
                return
            rows, inserted, stored_bytes, seconds = result
            copied_this_run += rows
            self.worker.log.info(
                "backfill.batch", rows=rows, inserted=inserted, stored_bytes=stored_bytes,
                ms=round(seconds * 1000, 1),
            )
            now = time.monotonic()
            if now - last_progress >= PROGRESS_INTERVAL_SECONDS:
                last_progress = now
                rate = copied_this_run / max(now - started, 1e-6)
                self.worker.log.info("backfill.progress", rows_this_run=copied_this_run,
                                     rows_per_second=round(rate, 1),
                                     throttle=self.worker.throttler.state.reason)

    async def _throttle(self) -> None:
        state = self.worker.throttler.state
        if state.reason != self._throttle_reason:
            self._throttle_reason = state.reason
            self.worker.log.info("throttle.changed", throttled=state.throttled, reason=state.reason)

            async def record(conn: asyncpg.Connection) -> None:
                await update_state(conn, self.plan.table.schema, self.plan.table.name, throttle=state.reason)

            await self.worker.db.run("backfill.throttle", record)
        await self.worker.throttler.wait(self.worker.stop)

    async def _batch(self, conn: asyncpg.Connection) -> tuple[int, int, int, float] | None:
        """Copy one batch; return (rows, inserted, bytes, seconds) or None when done.

        The checkpoint is read from the state row, not kept in memory: after a lost
        connection the previous COMMIT may have succeeded without its acknowledgement.
        """
        settings = self.worker.settings
        started = time.monotonic()
        async with conn.transaction():
            checkpoint = await conn.fetchval(
                "SELECT checkpoint FROM livepart.migration WHERE table_schema = $1 AND table_name = $2 "
                "FOR UPDATE",
                self.plan.table.schema, self.plan.table.name,
            )
            has_lower = checkpoint is not None
            arguments = list(self.upper_bound) + (list(checkpoint) if has_lower else [])
            candidates = await conn.fetch(self._cut_sql(has_lower), *arguments, settings.batch_size)
            if not candidates:
                return None
            cut, rows, stored_bytes = self._cut(candidates, settings.max_batch_bytes)
            self.worker.log.debug("backfill.read", rows=rows)
            await self.worker.pause_point("backfill.before_copy")
            status = await conn.execute(
                self._copy_sql(has_lower), *(list(cut) + (list(checkpoint) if has_lower else []))
            )
            inserted = int(status.split()[-1])
            await conn.execute(
                "UPDATE livepart.migration SET checkpoint = $3, rows_copied = rows_copied + $4, "
                "batches = batches + 1, checkpoint_at = now(), updated_at = now() "
                "WHERE table_schema = $1 AND table_name = $2",
                self.plan.table.schema, self.plan.table.name, cut, rows,
            )
            await self.worker.pause_point("backfill.before_commit")
        return rows, inserted, stored_bytes, time.monotonic() - started

    def _cut(self, candidates: list[asyncpg.Record], max_bytes: int) -> tuple[list[str], int, int]:
        """Take the longest prefix within the byte cap, and always at least one row."""
        total = 0
        taken = 0
        for record in candidates:
            size = record["stored_bytes"]
            if taken and total + size > max_bytes:
                break
            total += size
            taken += 1
        last = candidates[taken - 1]
        return [last[i] for i in range(self.width)], taken, total
