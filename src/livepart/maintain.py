"""Phase 7, maintain: premake future partitions and empty the default partition.

A row whose key has no partition lands in the default partition, and from then
on PostgreSQL refuses to create the partition it belongs to ("updated
partition constraint for default partition would be violated"). Every new
partition is therefore created in two steps:

1. create an empty staging table shaped like the parent, and commit;
2. in one transaction holding the default partition's lock: copy the default
   partition's rows of that range into the staging table, delete them from the
   default partition, and attach the staging table as the new partition.

A crash between the steps leaves an unattached staging table, which the next
run empties and reuses. A crash inside step 2 rolls it back entirely.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from .errors import InvalidInput, StateMismatch
from .ident import column_list, qualified, quote_ident, quote_literal
from .partitions import (
    PartitionSpec,
    floor_time,
    integer_partitions,
    key_kind,
    next_time,
    time_partitions,
    to_utc_naive,
)
from .worker import Worker

STAGING_COMMENT = "livepart staging partition, not attached yet"


@dataclass
class MaintainReport:
    created: int = 0
    moved_rows: int = 0


@dataclass(frozen=True)
class Target:
    schema: str
    parent: str  # the partitioned table to maintain
    naming: str  # table name that partition names derive from
    key: str
    key_type: str  # pg_type.typname of the key
    key_type_sql: str
    default_partition: str | None
    owner: str


async def load_target(conn: asyncpg.Connection, schema: str, parent: str, naming: str) -> Target:
    row = await conn.fetchrow(
        """
        SELECT a.attname::text AS key, t.typname::text AS key_type,
               pg_catalog.format_type(a.atttypid, a.atttypmod) AS key_type_sql,
               pg_catalog.pg_get_userbyid(c.relowner) AS owner,
               (SELECT d.relname::text FROM pg_catalog.pg_class d
                WHERE d.oid = p.partdefid) AS default_partition,
               p.partstrat::text AS strategy, p.partnatts
        FROM pg_catalog.pg_class c
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_catalog.pg_partitioned_table p ON p.partrelid = c.oid
        JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum = p.partattrs[0]
        JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
        WHERE n.nspname = $1 AND c.relname = $2
        """,
        schema,
        parent,
    )
    if row is None:
        raise InvalidInput(
            f"{qualified(schema, parent)} is not a partitioned table; run livepart run first, or pass "
            "the partitioned table to --table"
        )
    if row["strategy"] != "r" or row["partnatts"] != 1 or key_kind(row["key_type"]) is None:
        raise InvalidInput(
            f"{qualified(schema, parent)} is not range-partitioned by one time or integer column; "
            "livepart maintain cannot manage it"
        )
    return Target(schema, parent, naming, row["key"], row["key_type"], row["key_type_sql"],
                  row["default_partition"], row["owner"])


def _bucket_sql(target: Target, interval: str) -> str:
    """SQL expression mapping a key value to the lower bound of its partition, as text."""
    key = quote_ident(target.key)
    if key_kind(target.key_type) == "integer":
        width = int(interval)
        return f"(floor({key}::numeric / {width}) * {width})::bigint::text"
    unit = quote_literal(interval)
    if target.key_type == "timestamptz":
        return f"pg_catalog.date_trunc({unit}, {key}, 'UTC')::text"
    return f"pg_catalog.date_trunc({unit}, {key}::timestamp)::text"


def _spec_for_bucket(target: Target, interval: str, lower: str) -> PartitionSpec:
    if key_kind(target.key_type) == "integer":
        value = int(lower)
        return integer_partitions(target.naming, int(interval), value, value)[0]
    start = to_utc_naive(datetime.fromisoformat(lower))
    return time_partitions(target.naming, target.key_type, interval, start, start)[0]


def future_specs(target: Target, interval: str, now: datetime, future: int, maximum: object) -> list[PartitionSpec]:
    if key_kind(target.key_type) == "integer":
        width = int(interval)
        high = int(maximum) if maximum is not None else 0
        return integer_partitions(target.naming, width, high, high + width * future)
    last = floor_time(now, interval)
    for _ in range(future):
        last = next_time(last, interval)
    return time_partitions(target.naming, target.key_type, interval, now, last)


async def run_maintain(worker: Worker, target: Target, interval: str, future: int) -> MaintainReport:
    report = MaintainReport()
    conn = worker.db.conn
    if target.default_partition:
        buckets = await worker.db.run(
            "maintain.scan_default",
            lambda c: c.fetch(
                f"SELECT DISTINCT {_bucket_sql(target, interval)} AS lower "
                f"FROM {qualified(target.schema, target.default_partition)} ORDER BY 1"
            ),
        )
        for row in buckets:
            await create_partition(worker, target, _spec_for_bucket(target, interval, row["lower"]), report)
    now = await conn.fetchval("SELECT (pg_catalog.now() AT TIME ZONE 'UTC')::timestamp")
    maximum = await conn.fetchval(
        f"SELECT max({quote_ident(target.key)}) FROM {qualified(target.schema, target.parent)}"
    ) if key_kind(target.key_type) == "integer" else None
    for spec in future_specs(target, interval, now, future, maximum):
        await create_partition(worker, target, spec, report)
    worker.log.info("maintain.done", created=report.created, moved_rows=report.moved_rows)
    return report


async def _partition_state(conn: asyncpg.Connection, target: Target, name: str) -> str:
    """Return 'attached', 'staging', 'absent', or 'foreign' for a candidate partition name."""
    row = await conn.fetchrow(
        """
        SELECT c.relispartition,
               EXISTS (SELECT 1 FROM pg_catalog.pg_inherits i
                       JOIN pg_catalog.pg_class p ON p.oid = i.inhparent
                       WHERE i.inhrelid = c.oid AND p.relname = $3) AS ours,
               pg_catalog.obj_description(c.oid, 'pg_class') AS comment
        FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = $1 AND c.relname = $2
        """,
        target.schema,
        name,
        target.parent,
    )
    if row is None:
        return "absent"
    if row["ours"]:
        return "attached"
    if not row["relispartition"] and row["comment"] == STAGING_COMMENT:
        return "staging"
    return "foreign"


async def create_partition(worker: Worker, target: Target, spec: PartitionSpec, report: MaintainReport) -> None:
    """Create one partition in the two crash-safe steps described in the module docstring."""
    staging = qualified(target.schema, spec.name)
    parent = qualified(target.schema, target.parent)
    existing = await worker.db.run("maintain.inspect", lambda c: _partition_state(c, target, spec.name))
    if existing == "attached":
        return
    if existing == "foreign":
        raise StateMismatch(
            f"{staging} exists but is neither a partition of {parent} nor a livepart staging table; "
            "rename it so livepart can create that partition"
        )
    if await _overlaps(worker, target, spec):
        return

    if existing == "absent":
        async def step_one(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                await conn.execute(
                    f"CREATE TABLE {staging} (LIKE {parent} INCLUDING DEFAULTS INCLUDING GENERATED "
                    "INCLUDING CONSTRAINTS INCLUDING STORAGE INCLUDING COMPRESSION)"
                )
                await conn.execute(f"COMMENT ON TABLE {staging} IS {quote_literal(STAGING_COMMENT)}")
                if target.owner != await conn.fetchval("SELECT current_user::text"):
                    await conn.execute(f"ALTER TABLE {staging} OWNER TO {quote_ident(target.owner)}")

        await worker.db.run("maintain.stage", step_one)
    await worker.pause_point("maintain.between_steps")

    columns = await worker.db.run("maintain.columns", lambda c: _insertable_columns(c, target))
    key = quote_ident(target.key)
    in_range = f"{key} >= {spec.lower} AND {key} < {spec.upper}"

    async def step_two(conn: asyncpg.Connection) -> int:
        async with conn.transaction():
            moved = 0
            await conn.execute(f"DELETE FROM {staging}")
            if target.default_partition:
                default = qualified(target.schema, target.default_partition)
                await conn.execute(f"LOCK TABLE {default} IN ACCESS EXCLUSIVE MODE")
                status = await conn.execute(
                    f"INSERT INTO {staging} ({column_list(columns)}) "
                    f"SELECT {column_list(columns)} FROM {default} WHERE {in_range}"
                )
                moved = int(status.split()[-1])
                await conn.execute(f"DELETE FROM {default} WHERE {in_range}")
            await conn.execute(f"ALTER TABLE {parent} ATTACH PARTITION {staging} {spec.bound_sql()}")
            await conn.execute(f"COMMENT ON TABLE {staging} IS NULL")
            return moved

    moved = await worker.db.run("maintain.attach", step_two)
    report.created += 1
    report.moved_rows += moved
    worker.log.info("maintain.partition_created", partition=spec.name, moved_rows=moved)


async def _insertable_columns(conn: asyncpg.Connection, target: Target) -> list[str]:
    rows = await conn.fetch(
        """
        SELECT a.attname FROM pg_catalog.pg_attribute a
        WHERE a.attrelid = pg_catalog.to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
          AND a.attgenerated = ''
        ORDER BY a.attnum
        """,
        qualified(target.schema, target.parent),
    )
    return [r["attname"] for r in rows]


async def _overlaps(worker: Worker, target: Target, spec: PartitionSpec) -> bool:
    """Whether an existing partition (perhaps made by another tool) already covers part of the range."""

    async def work(conn: asyncpg.Connection) -> bool:
        bounds = await conn.fetch(
            """
            SELECT pg_catalog.pg_get_expr(c.relpartbound, c.oid) AS bound
            FROM pg_catalog.pg_inherits i JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = pg_catalog.to_regclass($1)
            """,
            qualified(target.schema, target.parent),
        )
        for row in bounds:
            bound = row["bound"]
            if bound == "DEFAULT" or "MINVALUE" in bound or "MAXVALUE" in bound:
                continue
            lower, upper = _split_bound(bound)
            overlap = await conn.fetchval(
                f"SELECT {lower}::{target.key_type_sql} < {spec.upper}::{target.key_type_sql} "
                f"AND {upper}::{target.key_type_sql} > {spec.lower}::{target.key_type_sql}"
            )
            if overlap:
                return True
        return False

    return await worker.db.run("maintain.overlap", work)


def _split_bound(bound: str) -> tuple[str, str]:
    """Split `FOR VALUES FROM (x) TO (y)` into the literals x and y."""
    head, _, tail = bound.partition(") TO (")
    return head.removeprefix("FOR VALUES FROM ("), tail.removesuffix(")")
