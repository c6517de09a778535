"""A concurrent writer that imitates the LiteLLM proxy, with a control table.

The writer changes "LiteLLM_SpendLogs" the way the proxy does while a migration
runs, and applies every change to a control table in the same transaction. The
control table is a plain copy that the migration never touches, so after the
migration compare_with_control() can check that no write was lost, duplicated or
altered.

What the writer imitates:

* Inserts: batches of at most 100 rows as INSERT ... ON CONFLICT DO NOTHING with
  no conflict target, the columns named in the Prisma model order.
* Retention cleanup: DELETE ... WHERE request_id IN (SELECT request_id ... WHERE
  "startTime" < cutoff LIMIT 1000), which removes the oldest rows.
* Rare updates: an operator clearing messages and response to '{}'.

Stress options that the proxy does not have: updates of non-key columns, updates
that move "startTime" by whole days, and deletes aimed at a "startTime" range
that a callback chooses (for example the chunk that a backfill copies right now).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Any

import asyncpg
import structlog

from livepart.db import describe_error, is_connection_error
from livepart.ident import column_list, qualified, quote_ident
from livepart.workload.litellm import (
    COLUMN_TYPES,
    KEY_COLUMN,
    MODEL_COLUMNS,
    TABLE,
    TIME_COLUMN,
    RowGenerator,
    to_record,
)

log = structlog.get_logger()

CONTROL_TABLE = "spendlogs_control"

# The proxy's cleanup job runs each statement with these timeouts.
DEFAULT_TIMEOUT_S = 30.0

# Errors that mean a cached prepared statement no longer fits the table, for
# example after a rename put another table with other column types under the
# same name. asyncpg drops its statement cache when it raises them, so the
# transaction is retried once.
CACHED_STATEMENT_ERRORS = (
    asyncpg.exceptions.InvalidCachedStatementError,
    asyncpg.exceptions.OutdatedSchemaCacheError,
)

OPERATION_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)

# Each error class is logged on its first occurrences and then only every
# ERROR_LOG_EVERY-th time, with the running count.
ERROR_LOG_FIRST = 10
ERROR_LOG_EVERY = 100

# Size of the in-memory sample of existing keys that updates, deletes and
# duplicate inserts pick from.
KEY_POOL_SIZE = 20_000

# Rows of the control table sampled to place the retention cutoffs.
CUTOFF_SAMPLE_ROWS = 100_000

# Milliseconds between a request's start and the proxy's flush of its row.
FLUSH_DELAY_MS = 5_000

INSERT = "insert"
RETENTION_DELETE = "retention_delete"
CLEAR_PAYLOAD = "clear_payload"
FIELD_UPDATE = "field_update"
TIME_SHIFT = "time_shift"
TARGETED_DELETE = "targeted_delete"
OPERATION_KINDS = (INSERT, RETENTION_DELETE, CLEAR_PAYLOAD, FIELD_UPDATE, TIME_SHIFT, TARGETED_DELETE)

TargetRange = Callable[[], Awaitable[tuple[str, str] | None]]


async def create_control_table(
    conn: asyncpg.Connection,
    table: str,
    schema: str,
    control_name: str,
    *,
    key: str = KEY_COLUMN,
    copy_rows: bool = True,
) -> int:
    """Create the control table as a copy of `table` and return the number of rows copied.

    The control table gets the same columns and defaults (LIKE ... INCLUDING
    DEFAULTS) and a primary key on `key`, but no other index, trigger or
    partitioning. Create it before the migration starts, under a name that the
    migration does not touch. It is a logged table, so it survives a server crash
    like the real one.

    With copy_rows, the existing rows are copied while a SHARE lock on `table`
    blocks writers, so the two tables are equal when this returns.
    """
    source = qualified(schema, table)
    control = qualified(schema, control_name)
    async with conn.transaction():
        await conn.execute(f"CREATE TABLE {control} (LIKE {source} INCLUDING DEFAULTS)")
        await conn.execute(f"ALTER TABLE {control} ADD PRIMARY KEY ({quote_ident(key)})")
        if not copy_rows:
            return 0
        await conn.execute(f"LOCK TABLE {source} IN SHARE MODE")
        names = await conn.fetchval(
            """
            SELECT array_agg(attname::text ORDER BY attnum)
            FROM pg_catalog.pg_attribute
            WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped
            """,
            control,
        )
        columns = column_list(names)
        status = await conn.execute(f"INSERT INTO {control} ({columns}) SELECT {columns} FROM {source}")
    return int(status.rsplit(" ", 1)[-1])


@dataclass
class WriterStats:
    """Counts of committed changes, failures and transaction latencies of one Writer."""

    inserts: int = 0
    """Rows the table accepted."""
    skipped: int = 0
    """Rows that ON CONFLICT DO NOTHING skipped."""
    deletes: int = 0
    updates: int = 0
    errors: int = 0
    """Transactions that failed and were not retried, and failed reconnects."""
    retries: int = 0
    """Transactions retried after a cached statement became invalid."""
    retention_deletes: int = 0
    """Rows removed by retention deletes, also counted in `deletes`."""
    operations: Counter[str] = field(default_factory=Counter)
    """Committed transactions by operation kind."""
    latencies: dict[str, list[float]] = field(default_factory=dict)
    """Seconds from the start of each committed transaction (with its retry) to its commit, by kind."""

    def percentile(self, fraction: float, operation: str | None = None) -> float | None:
        """Return the latency in seconds at `fraction` (0.5 for p50) of one kind or of all kinds."""
        if operation is None:
            values = sorted(value for series in self.latencies.values() for value in series)
        else:
            values = sorted(self.latencies.get(operation, ()))
        if not values:
            return None
        # Nearest-rank percentile.
        index = min(len(values) - 1, max(0, math.ceil(fraction * len(values)) - 1))
        return values[index]

    def summary(self) -> dict[str, Any]:
        """Return the counts and the p50 and p99 latencies in milliseconds, for logs and reports."""
        result: dict[str, Any] = {
            "inserts": self.inserts,
            "skipped": self.skipped,
            "deletes": self.deletes,
            "updates": self.updates,
            "errors": self.errors,
            "retries": self.retries,
            "transactions": sum(self.operations.values()),
        }
        for quantile, name in ((0.5, "p50_ms"), (0.99, "p99_ms")):
            value = self.percentile(quantile)
            result[name] = None if value is None else round(value * 1000, 2)
        return result


@dataclass
class _Effect:
    """What one committed transaction changed, applied to the stats and the key pool after the commit."""

    inserted: list[tuple[str, datetime]] = field(default_factory=list)
    skipped: int = 0
    deleted: list[str] = field(default_factory=list)
    updated: int = 0
    moved: list[tuple[str, datetime]] = field(default_factory=list)
    retention_limit: int = 0


class _KeyPool:
    """A bounded random sample of existing keys with their "startTime" values."""

    def __init__(self, capacity: int, rng: random.Random) -> None:
        self.capacity = capacity
        self._rng = rng
        self._keys: list[str] = []
        self._times: list[datetime] = []
        self._index: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: str, start_time: datetime) -> None:
        """Add a key, replacing a random one when the pool is full."""
        if key in self._index:
            self._times[self._index[key]] = start_time
            return
        if len(self._keys) < self.capacity:
            self._index[key] = len(self._keys)
            self._keys.append(key)
            self._times.append(start_time)
            return
        slot = self._rng.randrange(self.capacity)
        del self._index[self._keys[slot]]
        self._keys[slot] = key
        self._times[slot] = start_time
        self._index[key] = slot

    def discard(self, key: str) -> None:
        slot = self._index.pop(key, None)
        if slot is None:
            return
        last_key = self._keys.pop()
        last_time = self._times.pop()
        if slot < len(self._keys):
            self._keys[slot] = last_key
            self._times[slot] = last_time
            self._index[last_key] = slot

    def sample(self, count: int) -> list[tuple[str, datetime]]:
        """Return up to `count` distinct (key, startTime) pairs."""
        slots = self._rng.sample(range(len(self._keys)), min(count, len(self._keys)))
        return [(self._keys[slot], self._times[slot]) for slot in slots]


class _Retention:
    """The moving cutoff and the row budget of the retention deletes.

    `cutoffs` are rising percentiles of "startTime", the last one at
    retention_max_fraction. The cutoff moves to the next one whenever a delete
    returns fewer rows than its LIMIT. The deletes stop after the last cutoff or
    after `budget` rows, whichever comes first, and no delete's LIMIT exceeds
    what the budget has left.
    """

    def __init__(self, cutoffs: list[datetime], budget: int) -> None:
        self.cutoffs = cutoffs
        self.budget = budget
        self.deleted = 0
        self._step = 0

    @property
    def done(self) -> bool:
        return self._step >= len(self.cutoffs) or self.deleted >= self.budget

    @property
    def cutoff(self) -> datetime:
        return self.cutoffs[self._step]

    def next_limit(self, batch: int) -> int:
        return min(batch, self.budget - self.deleted)

    def record(self, deleted: int, limit: int) -> None:
        self.deleted += deleted
        if deleted < limit:
            self._step += 1


class Writer:
    """Write to a LiteLLM spend-log table like the proxy does, mirroring each change into a control table.

    Every transaction changes the table and the control table together: the
    statement on the table returns the affected keys (RETURNING), and exactly
    those rows get the same change in the control table. So at every commit the
    two tables agree, unless the table itself (for example a half-migrated one)
    lost, duplicated or altered a row.

    The table is always addressed by its schema-qualified name, never by OID, so
    when a migration renames a new table into its place the writer simply goes on
    writing to the new one. If a cached prepared statement stops fitting after
    such a rename, the transaction is retried once and counted in stats.retries.
    Any other failed transaction is counted in stats.errors and logged with its
    error class and message, never with row contents.

    Each loop iteration runs one transaction. Its kind is drawn at random: each
    `*_fraction` argument is the share of iterations of that kind, and inserts
    get the rest. A kind that has nothing to do (retention that reached its
    budget, updates before any key is known) runs as an insert instead.

    Several Writers may share one table and control table if their seeds differ
    (Writers with one seed generate the same request_ids). Within one Writer
    nothing runs concurrently.

    Arguments:
        batch_size: rows per insert (the proxy sends at most 100).
        duplicate_fraction: share of each insert batch that reuses an existing
            request_id, like a batch the proxy sends again. By default a reused
            key keeps its stored "startTime".
        duplicate_shift_fraction: share of those duplicates that get a new
            "startTime" instead. A table partitioned on "startTime" whose unique
            key is (request_id, "startTime") does not see them as conflicts.
        retention_fraction: share of iterations that run a retention delete.
        retention_max_fraction: maximum share of rows that retention may delete,
            relative to the control table's row count when run() starts.
        retention_batch: rows per retention delete (the proxy uses 1,000).
        retention_steps: number of positions the retention cutoff moves through.
        update_fraction: share of iterations that clear messages and response.
        update_rows: rows per update.
        field_update_fraction: share of iterations that change spend, status and
            metadata.
        time_shift_fraction: share of iterations that move "startTime", "endTime"
            and "completionStartTime" by 1 to time_shift_max_days days, earlier
            or later.
        target_range: callback that returns a (low, high) pair of "startTime"
            values as text, or None to skip. Required for targeted deletes.
        targeted_delete_fraction: share of iterations that delete
            targeted_delete_rows rows with "startTime" between low and high,
            starting from a random point in that range.
        insert_time: callback that returns the "startTime" of the next new row;
            by default the current UTC time less up to 5 seconds.
        row_generator: source of new rows, for example one with other large-row
            options; by default a RowGenerator seeded with `seed`.
        pause: seconds to wait after each transaction.
        timeout: lock_timeout and statement_timeout in seconds.
    """

    def __init__(
        self,
        dsn: str,
        schema: str = "public",
        table: str = TABLE,
        control: str = CONTROL_TABLE,
        seed: int = 0,
        *,
        batch_size: int = 100,
        duplicate_fraction: float = 0.05,
        duplicate_shift_fraction: float = 0.0,
        retention_fraction: float = 0.05,
        retention_max_fraction: float = 0.1,
        retention_batch: int = 1000,
        retention_steps: int = 20,
        update_fraction: float = 0.02,
        update_rows: int = 10,
        field_update_fraction: float = 0.0,
        time_shift_fraction: float = 0.0,
        time_shift_max_days: int = 7,
        target_range: TargetRange | None = None,
        targeted_delete_fraction: float = 0.0,
        targeted_delete_rows: int = 5,
        insert_time: Callable[[], datetime] | None = None,
        row_generator: RowGenerator | None = None,
        pause: float = 0.01,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        fractions = {
            "duplicate_fraction": duplicate_fraction,
            "duplicate_shift_fraction": duplicate_shift_fraction,
            "retention_fraction": retention_fraction,
            "retention_max_fraction": retention_max_fraction,
            "update_fraction": update_fraction,
            "field_update_fraction": field_update_fraction,
            "time_shift_fraction": time_shift_fraction,
            "targeted_delete_fraction": targeted_delete_fraction,
        }
        for name, value in fractions.items():
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        counts = {
            "batch_size": batch_size,
            "retention_batch": retention_batch,
            "retention_steps": retention_steps,
            "update_rows": update_rows,
            "time_shift_max_days": time_shift_max_days,
            "targeted_delete_rows": targeted_delete_rows,
        }
        for name, value in counts.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if targeted_delete_fraction > 0 and target_range is None:
            raise ValueError(
                f"targeted_delete_fraction={targeted_delete_fraction} requires a target_range "
                "callback: pass target_range= or set targeted_delete_fraction=0"
            )
        if pause < 0 or timeout <= 0:
            raise ValueError(f"pause must be >= 0 and timeout > 0, got pause={pause} timeout={timeout}")

        self.dsn = dsn
        self.schema = schema
        self.table = table
        self.control = control
        self.batch_size = batch_size
        self.duplicate_fraction = duplicate_fraction
        self.duplicate_shift_fraction = duplicate_shift_fraction
        self.retention_max_fraction = retention_max_fraction
        self.retention_batch = retention_batch
        self.retention_steps = retention_steps
        self.update_rows = update_rows
        self.time_shift_max_days = time_shift_max_days
        self.target_range = target_range
        self.targeted_delete_rows = targeted_delete_rows
        self.insert_time = insert_time or self._recent_utc_time
        self.pause = pause
        self.timeout = timeout
        self.stats = WriterStats()

        self._operation_shares = (
            (RETENTION_DELETE, retention_fraction),
            (CLEAR_PAYLOAD, update_fraction),
            (FIELD_UPDATE, field_update_fraction),
            (TIME_SHIFT, time_shift_fraction),
            (TARGETED_DELETE, targeted_delete_fraction),
        )
        total_share = sum(share for _, share in self._operation_shares)
        if total_share > 1:
            raise ValueError(
                f"the operation fractions add up to {total_share:g}, but must add up to at most 1 "
                "because inserts get the rest"
            )

        # Seeds derived from `seed` keep both random streams apart from a
        # RowGenerator(seed) that loaded the table. Two generators with one seed
        # read the same sequence of random numbers, so the writer's new rows could
        # line up with loaded rows and repeat their request_ids.
        self._rng = random.Random(f"livepart-writer-{seed}")
        if row_generator is None:
            # The generator's range only matters for rows without a given
            # "startTime", and the writer always gives one.
            now = datetime.now(timezone.utc).replace(tzinfo=None)
            row_generator = RowGenerator(_derived_seed(seed), now - timedelta(days=1), now)
        self._rows = row_generator
        self._pool = _KeyPool(KEY_POOL_SIZE, self._rng)
        self._retention: _Retention | None = None
        self._conn: asyncpg.Connection | None = None
        self._error_counts: Counter[tuple[str, str]] = Counter()
        self._log = log.bind(table=f"{schema}.{table}", control=f"{schema}.{control}")
        self._sql = _Statements(qualified(schema, table), qualified(schema, control))

    # -- main loop ----------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Write until `stop` is set, then finish the current transaction and close the connection.

        Raises if the first connection or the initial reads of the control table
        fail, and passes on exceptions from the target_range and insert_time
        callbacks. Later connection failures are counted as errors and the writer
        reconnects once a second until `stop` is set.
        """
        self._conn = await self._connect()
        try:
            await self._load_state(self._conn)
            self._log.info(
                "writer.started",
                known_keys=len(self._pool),
                retention_budget=self._retention.budget if self._retention else 0,
            )
            while not stop.is_set():
                if self._conn is None and not await self._reconnect(stop):
                    break
                await self._run_operation(self._choose_operation())
                if self.pause > 0:
                    await _wait_for_stop(stop, self.pause)
                else:
                    await asyncio.sleep(0)
        finally:
            await self._close()
            self._log.info("writer.stopped", **self.stats.summary())

    async def _connect(self) -> asyncpg.Connection:
        timeout_ms = str(int(self.timeout * 1000))
        return await asyncpg.connect(
            self.dsn,
            server_settings={
                "application_name": "livepart workload writer",
                "lock_timeout": timeout_ms,
                "statement_timeout": timeout_ms,
                "TimeZone": "UTC",
            },
        )

    async def _reconnect(self, stop: asyncio.Event) -> bool:
        """Connect again, once a second, until it works (True) or `stop` is set (False)."""
        while not stop.is_set():
            try:
                self._conn = await self._connect()
            except OPERATION_ERRORS as error:
                self._record_error("connect", error)
                await _wait_for_stop(stop, 1.0)
                continue
            self._log.info("writer.reconnected")
            return True
        return False

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None or conn.is_closed():
            return
        try:
            await asyncio.wait_for(conn.close(), timeout=5)
        except OPERATION_ERRORS:
            conn.terminate()

    async def _load_state(self, conn: asyncpg.Connection) -> None:
        """Sample existing keys and plan the retention cutoffs from the control table.

        The row count is exact, because it sets the retention budget. The cutoffs
        are percentiles of a sample of about CUTOFF_SAMPLE_ROWS rows, which is
        enough because the budget, not the last cutoff, bounds the deletes.
        """
        fractions = [
            self.retention_max_fraction * step / self.retention_steps
            for step in range(1, self.retention_steps + 1)
        ]
        async with conn.transaction():
            # Counting a large control table can take longer than the writer's timeout.
            await conn.execute("SET LOCAL statement_timeout = 0")
            count = await conn.fetchval(self._sql.count_control)
            if count == 0:
                return
            cutoff_percent = min(100.0, 100.0 * CUTOFF_SAMPLE_ROWS / count)
            cutoffs = await conn.fetchval(self._sql.sample_cutoffs, fractions, cutoff_percent)
            key_percent = min(100.0, 200.0 * KEY_POOL_SIZE / count)
            sampled_keys = await conn.fetch(self._sql.sample_keys, key_percent, KEY_POOL_SIZE)

        for key, start_time in sampled_keys:
            self._pool.add(key, start_time)
        budget = int(count * self.retention_max_fraction)
        if budget > 0 and cutoffs:
            self._retention = _Retention(list(cutoffs), budget)

    def _choose_operation(self) -> str:
        draw = self._rng.random()
        for kind, share in self._operation_shares:
            if draw < share:
                return kind if self._can_run(kind) else INSERT
            draw -= share
        return INSERT

    def _can_run(self, kind: str) -> bool:
        if kind == RETENTION_DELETE:
            return self._retention is not None and not self._retention.done
        if kind in (CLEAR_PAYLOAD, FIELD_UPDATE, TIME_SHIFT):
            return len(self._pool) > 0
        return True

    async def _run_operation(self, kind: str) -> None:
        """Run one transaction of `kind`, retry it once after a cached-statement error, and record the outcome."""
        operation = await self._bind_operation(kind)
        if operation is None:
            return
        started = time.perf_counter()
        for attempt in (1, 2):
            conn = self._conn
            try:
                async with conn.transaction():
                    effect = await operation(conn)
            except CACHED_STATEMENT_ERRORS as error:
                if attempt == 1:
                    self.stats.retries += 1
                    self._log.info("writer.retry", operation=kind, error=describe_error(error))
                    continue
                self._record_error(kind, error)
                return
            except OPERATION_ERRORS as error:
                self._record_error(kind, error)
                if is_connection_error(error) or conn.is_closed():
                    await self._close()
                return
            self._apply(kind, effect, time.perf_counter() - started)
            return

    async def _bind_operation(
        self, kind: str
    ) -> Callable[[asyncpg.Connection], Awaitable[_Effect]] | None:
        """Return the coroutine function for `kind`, or None when a targeted delete has no range.

        New rows and target ranges are made here, before the transaction opens.
        """
        if kind == TARGETED_DELETE:
            bounds = await self.target_range()
            if bounds is None:
                return None
            return partial(self._targeted_delete, bounds=bounds)
        if kind == INSERT:
            return partial(self._insert, rows=self._new_rows())
        return {
            RETENTION_DELETE: self._retention_delete,
            CLEAR_PAYLOAD: self._clear_payload,
            FIELD_UPDATE: self._field_update,
            TIME_SHIFT: self._time_shift,
        }[kind]

    def _apply(self, kind: str, effect: _Effect, seconds: float) -> None:
        """Record a committed transaction in the stats and the key pool."""
        stats = self.stats
        stats.operations[kind] += 1
        stats.latencies.setdefault(kind, []).append(seconds)
        stats.inserts += len(effect.inserted)
        stats.skipped += effect.skipped
        stats.deletes += len(effect.deleted)
        stats.updates += effect.updated
        for key, start_time in effect.inserted:
            self._pool.add(key, start_time)
        for key in effect.deleted:
            self._pool.discard(key)
        for key, start_time in effect.moved:
            self._pool.add(key, start_time)
        if kind == RETENTION_DELETE and self._retention is not None:
            stats.retention_deletes += len(effect.deleted)
            self._retention.record(len(effect.deleted), effect.retention_limit)

    def _record_error(self, kind: str, error: BaseException) -> None:
        self.stats.errors += 1
        name = type(error).__name__
        self._error_counts[kind, name] += 1
        occurrences = self._error_counts[kind, name]
        if occurrences <= ERROR_LOG_FIRST or occurrences % ERROR_LOG_EVERY == 0:
            self._log.warning(
                "writer.error", operation=kind, error=describe_error(error), occurrences=occurrences
            )

    # -- operations: each runs inside the transaction that _run_operation opened

    async def _insert(self, conn: asyncpg.Connection, rows: list[dict[str, Any]]) -> _Effect:
        returned = await conn.fetch(self._sql.insert_table, *_column_arrays(rows))
        accepted_keys = {record[0] for record in returned}
        accepted_rows = [row for row in rows if row[KEY_COLUMN] in accepted_keys]
        if accepted_rows:
            await conn.execute(self._sql.insert_control, *_column_arrays(accepted_rows))
        return _Effect(
            inserted=[(row[KEY_COLUMN], row[TIME_COLUMN]) for row in accepted_rows],
            skipped=len(rows) - len(accepted_rows),
        )

    async def _retention_delete(self, conn: asyncpg.Connection) -> _Effect:
        limit = self._retention.next_limit(self.retention_batch)
        returned = await conn.fetch(self._sql.retention_delete, self._retention.cutoff, limit)
        keys = [record[0] for record in returned]
        await conn.execute(self._sql.delete_control, keys)
        return _Effect(deleted=keys, retention_limit=limit)

    async def _clear_payload(self, conn: asyncpg.Connection) -> _Effect:
        returned = await conn.fetch(self._sql.clear_payload_table, self._pick_keys())
        keys = [record[0] for record in returned]
        await conn.execute(self._sql.clear_payload_control, keys)
        return _Effect(updated=len(keys))

    async def _field_update(self, conn: asyncpg.Connection) -> _Effect:
        spend_delta = round(self._rng.uniform(-0.001, 0.01), 6)
        status = self._rng.choice(("success", "failure", "retried"))
        note = _metadata_note(self._rng.randrange(10**6))
        returned = await conn.fetch(self._sql.field_update_table, self._pick_keys(), spend_delta, status, note)
        keys = [record[0] for record in returned]
        await conn.execute(self._sql.field_update_control, keys, spend_delta, status, note)
        return _Effect(updated=len(keys))

    async def _time_shift(self, conn: asyncpg.Connection) -> _Effect:
        days = self._rng.randint(1, self.time_shift_max_days) * self._rng.choice((-1, 1))
        keys = self._pick_keys(limit=3)
        returned = await conn.fetch(self._sql.time_shift_table, keys, days)
        moved = [(record[0], record[1]) for record in returned]
        await conn.execute(self._sql.time_shift_control, [key for key, _ in moved], days)
        return _Effect(updated=len(moved), moved=moved)

    async def _targeted_delete(self, conn: asyncpg.Connection, bounds: tuple[str, str]) -> _Effect:
        low, high = bounds
        position = self._rng.random()
        returned = await conn.fetch(
            self._sql.targeted_delete, low, high, position, self.targeted_delete_rows
        )
        keys = [record[0] for record in returned]
        await conn.execute(self._sql.delete_control, keys)
        return _Effect(deleted=keys)

    # -- helpers ------------------------------------------------------------

    def _recent_utc_time(self) -> datetime:
        """Return the current UTC wall-clock time less up to FLUSH_DELAY_MS, like a row the proxy flushes now."""
        delay = timedelta(milliseconds=self._rng.randrange(FLUSH_DELAY_MS))
        return datetime.now(timezone.utc).replace(tzinfo=None) - delay

    def _new_rows(self) -> list[dict[str, Any]]:
        """Generate one insert batch, some rows of which reuse known keys."""
        rows = [self._rows.row(self.insert_time()) for _ in range(self.batch_size)]
        duplicates = sum(self._rng.random() < self.duplicate_fraction for _ in rows)
        for row, (key, start_time) in zip(rows, self._pool.sample(duplicates)):
            row[KEY_COLUMN] = key
            if self._rng.random() >= self.duplicate_shift_fraction:
                shift = start_time - row[TIME_COLUMN]
                row[TIME_COLUMN] = start_time
                row["endTime"] += shift
                if row["completionStartTime"] is not None:
                    row["completionStartTime"] += shift
        return rows

    def _pick_keys(self, limit: int | None = None) -> list[str]:
        """Return distinct known keys, sorted so that concurrent Writers tend to lock rows in the same order."""
        count = self.update_rows if limit is None else min(limit, self.update_rows)
        return sorted(key for key, _ in self._pool.sample(count))


def _derived_seed(seed: int) -> int:
    """Return a 64-bit seed derived from `seed` for the writer's own RowGenerator."""
    digest = hashlib.sha256(f"livepart-writer-rows-{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _metadata_note(number: int) -> str:
    """Return the JSON object that field updates merge into metadata."""
    return f'{{"livepart_writer_update": {number}}}'


def _column_arrays(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Transpose rows into one value array per column of MODEL_COLUMNS, JSON as text."""
    return list(zip(*(to_record(row) for row in rows)))


async def _wait_for_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        pass


class _Statements:
    """SQL text of the writer's statements for one table and control table.

    Columns are always named, because the table's physical column order differs
    from the order in which the proxy names them.
    """

    def __init__(self, table: str, control: str) -> None:
        key = quote_ident(KEY_COLUMN)
        start = quote_ident(TIME_COLUMN)
        columns = column_list(list(MODEL_COLUMNS))
        arrays = ", ".join(
            f"${number}::{COLUMN_TYPES[name]}[]" for number, name in enumerate(MODEL_COLUMNS, start=1)
        )
        rows = f"SELECT * FROM unnest({arrays})"

        self.insert_table = (
            f"INSERT INTO {table} ({columns}) {rows} ON CONFLICT DO NOTHING RETURNING {key}"
        )
        # The control table skips keys it already has, so a duplicate that the table
        # accepted shows up in compare_with_control as a ghost row, not as an error here.
        self.insert_control = f"INSERT INTO {control} ({columns}) {rows} ON CONFLICT ({key}) DO NOTHING"

        self.retention_delete = (
            f"DELETE FROM {table} WHERE {key} IN "
            f"(SELECT {key} FROM {table} WHERE {start} < $1 LIMIT $2) RETURNING {key}"
        )
        # Rows with "startTime" from a random point between low and high up to high.
        self.targeted_delete = (
            f"DELETE FROM {table} WHERE {key} IN "
            f"(SELECT {key} FROM {table} "
            f"WHERE {start} >= $1::text::timestamp + ($2::text::timestamp - $1::text::timestamp) * $3::float8 "
            f"AND {start} <= $2::text::timestamp LIMIT $4::int) RETURNING {key}"
        )
        self.delete_control = f"DELETE FROM {control} WHERE {key} = ANY($1::text[])"

        clear = "SET \"messages\" = '{}'::jsonb, \"response\" = '{}'::jsonb"
        self.clear_payload_table = f"UPDATE {table} {clear} WHERE {key} = ANY($1::text[]) RETURNING {key}"
        self.clear_payload_control = f"UPDATE {control} {clear} WHERE {key} = ANY($1::text[])"

        fields = (
            'SET "spend" = "spend" + $2::float8, "status" = $3::text, '
            "\"metadata\" = coalesce(\"metadata\", '{}'::jsonb) || $4::jsonb"
        )
        self.field_update_table = f"UPDATE {table} {fields} WHERE {key} = ANY($1::text[]) RETURNING {key}"
        self.field_update_control = f"UPDATE {control} {fields} WHERE {key} = ANY($1::text[])"

        shift = ", ".join(
            f"{quote_ident(name)} = {quote_ident(name)} + make_interval(days => $2::int)"
            for name in ("startTime", "endTime", "completionStartTime")
        )
        self.time_shift_table = f"UPDATE {table} SET {shift} WHERE {key} = ANY($1::text[]) RETURNING {key}, {start}"
        self.time_shift_control = f"UPDATE {control} SET {shift} WHERE {key} = ANY($1::text[])"

        self.count_control = f"SELECT count(*) FROM {control}"
        self.sample_cutoffs = (
            f"SELECT percentile_disc($1::float8[]) WITHIN GROUP (ORDER BY {start}) "
            f"FROM {control} TABLESAMPLE SYSTEM ($2::float4)"
        )
        self.sample_keys = f"SELECT {key}, {start} FROM {control} TABLESAMPLE SYSTEM ($1::float4) LIMIT $2"
