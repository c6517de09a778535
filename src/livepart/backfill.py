"""Phase 3, backfill: copy the rows that existed when the trigger went live.

Batches page through the old table by keyset on the plan's order columns,
never by OFFSET. They stop at an upper bound frozen at the start, so the copy
ends even while the application keeps inserting, because rows above the bound
reach the shadow through the trigger. Each batch commits together with its
checkpoint.

With a time partition key, the copy is also capped at the server's time when
the bound is frozen: batches copy only rows dated at or before the cap. New
rows may sort below the bound (a future-dated row raises the bound, a random
or text primary key puts new keys anywhere), and without the cap the copy
could chase the insert stream forever. The rows already dated after the cap
are recorded by key when the bound is frozen, and a second pass copies
exactly those.

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
from .partitions import key_kind
from .plan import Plan
from .state import STATE_SCHEMA, MigrationState, Phase, update_state
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


def time_cap_sql(plan: Plan) -> str | None:
    """SQL for "now" in the key's own type, or None for an integer key."""
    if key_kind(plan.key.type_name) != "time":
        return None
    if plan.key.type_name == "timestamptz":
        return "pg_catalog.now()"
    return f"(pg_catalog.now() AT TIME ZONE 'UTC')::{plan.key.type_sql}"


async def freeze_upper_bound(conn: asyncpg.Connection, plan: Plan) -> tuple[list[str], str | None, int]:
    """Freeze what the copy covers; return (upper bound, time cap, rows recorded beyond the cap).

    Every row that existed when the trigger went live is at or below the bound,
    or recorded in livepart.backfill_pending because its key lies after the cap.
    """
    keyset = KeysetQuery(plan.table, "src", plan.order_columns)
    source = qualified(plan.table.schema, plan.names.table)
    key = f"src.{quote_ident(plan.key.name)}"
    cap_sql = time_cap_sql(plan)
    cap = await conn.fetchval(f"SELECT ({cap_sql})::text") if cap_sql else None
    below_cap = f"WHERE {key} <= $1::text::{plan.key.type_sql}" if cap else ""
    row = await conn.fetchrow(
        f"SELECT {keyset.as_text()} FROM {source} AS src {below_cap} "
        f"ORDER BY {keyset.order_by(descending=True)} LIMIT 1",
        *([cap] if cap else []),
    )
    bound = list(row.values()) if row else []
    pending = 0
    if cap:
        status = await conn.execute(
            f"INSERT INTO {STATE_SCHEMA}.backfill_pending (table_schema, table_name, ordinal, key) "
            f"SELECT $2, $3, row_number() OVER (ORDER BY {keyset.order_by()}), ARRAY[{keyset.as_text()}] "
            f"FROM {source} AS src WHERE {key} > $1::text::{plan.key.type_sql}",
            cap, plan.table.schema, plan.table.name,
        )
        pending = int(status.split()[-1])
    return bound, cap, pending


async def run_backfill(worker: Worker, plan: Plan, state: MigrationState) -> None:
    table = plan.table
    upper_bound, cap, pending = state.upper_bound, state.freeze_cap, state.pending_rows
    if upper_bound is None:

        async def freeze(conn: asyncpg.Connection) -> tuple[list[str], str | None, int]:
            async with conn.transaction():
                await conn.execute(
                    f"DELETE FROM {STATE_SCHEMA}.backfill_pending WHERE table_schema = $1 AND table_name = $2",
                    table.schema, table.name,
                )
                bound, cap, pending_rows = await freeze_upper_bound(conn, plan)
                await update_state(
                    conn, table.schema, table.name, upper_bound=bound, freeze_cap=cap,
                    pending_rows=pending_rows, pending_checkpoint=0,
                    backfill_started_at=await conn.fetchval("SELECT now()"),
                    rows_estimated=await estimate_rows(conn, table.schema, plan.names.table),
                )
            return bound, cap, pending_rows

        upper_bound, cap, pending = await worker.db.run("backfill.freeze", freeze)
        worker.log.info("backfill.start", order=plan.order_columns, rows_after_time_cap=pending)

    copier = BatchCopier(worker, plan, list(upper_bound), cap)
    if upper_bound:
        await copier.copy_all()
    if pending:
        await copier.copy_pending(pending)

    async def finish(conn: asyncpg.Connection) -> None:
        async with conn.transaction():
            await conn.execute(
                f"DELETE FROM {STATE_SCHEMA}.backfill_pending WHERE table_schema = $1 AND table_name = $2",
                table.schema, table.name,
            )
            await update_state(conn, table.schema, table.name, phase=Phase.VERIFY, throttle=None)

    await worker.db.run("backfill.finish", finish)
    worker.log.info("backfill.done")


class BatchCopier:
    def __init__(self, worker: Worker, plan: Plan, upper_bound: list[str], cap: str | None) -> None:
        self.worker = worker
        self.plan = plan
        self.upper_bound = upper_bound
        self.cap = cap
        self.keyset = KeysetQuery(plan.table, "src", plan.order_columns)
        self.source = qualified(plan.table.schema, plan.names.table)
        self.target = qualified(plan.table.schema, plan.names.shadow)
        self.width = len(plan.order_columns)
        self.lock_rows = not worker.settings.unsafe_no_row_locks

    def _range_predicate(self, has_lower: bool) -> str:
        """`lower < row <= upper` and `key <= cap`; parameters: upper, then lower, then the cap."""
        parts = [self.keyset.at_most(1)]
        if has_lower:
            parts.append(self.keyset.after(1 + self.width))
        if self.cap is not None:
            position = 1 + self.width * (2 if has_lower else 1)
            parts.append(f"src.{quote_ident(self.plan.key.name)} <= ${position}::text::{self.plan.key.type_sql}")
        return " AND ".join(parts)

    def _parameters(self, upper: list[str], lower: list[str] | None) -> list[str]:
        """Order the parameters as _range_predicate numbers them: upper, lower, cap."""
        parameters = list(upper)
        if lower is not None:
            parameters += lower
        if self.cap is not None:
            parameters.append(self.cap)
        return parameters

    def _cut_sql(self, has_lower: bool) -> str:
        placeholders = len(self._parameters(self.upper_bound, self.upper_bound if has_lower else None))
        limit = placeholders + 1
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
            await self.worker.throttle()
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
            arguments = self._parameters(self.upper_bound, checkpoint)
            candidates = await conn.fetch(self._cut_sql(has_lower), *arguments, settings.batch_size)
            if not candidates:
                return None
            cut, rows, stored_bytes = self._cut(candidates, settings.max_batch_bytes)
            self.worker.log.debug("backfill.read", rows=rows)
            await self.worker.pause_point("backfill.before_copy")
            status = await conn.execute(self._copy_sql(has_lower), *self._parameters(cut, checkpoint))
            inserted = int(status.split()[-1])
            await conn.execute(
                "UPDATE livepart.migration SET checkpoint = $3, rows_copied = rows_copied + $4, "
                "batches = batches + 1, checkpoint_at = now(), updated_at = now() "
                "WHERE table_schema = $1 AND table_name = $2",
                self.plan.table.schema, self.plan.table.name, cut, rows,
            )
            await self.worker.pause_point("backfill.before_commit")
        return rows, inserted, stored_bytes, time.monotonic() - started

    async def copy_pending(self, total: int) -> None:
        """Copy the rows recorded beyond the time cap, a batch of ordinals at a time."""
        while True:
            await self.worker.throttle()
            result = await self.worker.db.run("backfill.pending", self._pending_batch)
            if result is None:
                return
            rows, inserted, seconds = result
            self.worker.log.info("backfill.pending_batch", rows=rows, inserted=inserted, of=total,
                                 ms=round(seconds * 1000, 1))

    def _pending_sql(self) -> str:
        columns = self.plan.table.copied_columns
        overriding = " OVERRIDING SYSTEM VALUE" if any(c.identity for c in self.plan.table.columns) else ""
        locking = " FOR SHARE OF src NOWAIT" if self.lock_rows else ""
        match = " AND ".join(
            f"src.{quote_ident(column)} = p.key[{number}]::text::{self.plan.table.column(column).type_sql}"
            for number, column in enumerate(self.plan.order_columns, start=1)
        )
        return (
            f"INSERT INTO {self.target} ({column_list(columns)}){overriding} "
            f"SELECT {column_list(columns, 'src')} FROM {STATE_SCHEMA}.backfill_pending AS p "
            f"JOIN {self.source} AS src ON {match} "
            f"WHERE p.table_schema = $1 AND p.table_name = $2 AND p.ordinal > $3 AND p.ordinal <= $4"
            f"{locking} ON CONFLICT DO NOTHING"
        )

    async def _pending_batch(self, conn: asyncpg.Connection) -> tuple[int, int, float] | None:
        schema, name = self.plan.table.schema, self.plan.table.name
        started = time.monotonic()
        async with conn.transaction():
            done, total = await conn.fetchrow(
                f"SELECT pending_checkpoint, pending_rows FROM {STATE_SCHEMA}.migration "
                "WHERE table_schema = $1 AND table_name = $2 FOR UPDATE",
                schema, name,
            )
            if done >= total:
                return None
            last = min(done + self.worker.settings.batch_size, total)
            status = await conn.execute(self._pending_sql(), schema, name, done, last)
            await conn.execute(
                f"UPDATE {STATE_SCHEMA}.migration SET pending_checkpoint = $3, "
                "rows_copied = rows_copied + $4, checkpoint_at = now(), updated_at = now() "
                "WHERE table_schema = $1 AND table_name = $2",
                schema, name, last, last - done,
            )
        return last - done, int(status.split()[-1]), time.monotonic() - started

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
