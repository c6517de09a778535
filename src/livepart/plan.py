"""Phase 1, plan: introspect the table, run the preflight checks, derive every name.

Nothing here changes the database. `build_plan` returns a Plan, and a failed
check in it stops `run` before the first change. `plan_statements` renders the
DDL that the later phases will run, in order, with the lock each one takes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from . import ddl
from .catalog import Column, Table, load_table, relation_exists
from .errors import InvalidInput
from .ident import derived_name, qualified, quote_ident
from .partitions import PartitionSpec, default_partition_name, key_kind, planned_partitions
from .settings import TIME_INTERVALS, Settings
from .trigger import TriggerSpec, install_statements

MINIMUM_SERVER_VERSION = 120000
# Above this many partitions, plan points at outliers as the likely cause.
MANY_PARTITIONS = 100
OLD_SUFFIX = "_lp_old"
NEW_SUFFIX = "_lp_new"


@dataclass
class Check:
    name: str
    status: str  # "ok", "warn" or "fail"
    message: str


@dataclass(frozen=True)
class Names:
    """Every name the migration creates, fixed at prepare time and persisted."""

    table: str
    shadow: str
    old: str
    default_partition: str
    primary_key: str  # canonical primary key constraint name
    primary_key_temporary: str
    primary_key_old: str
    indexes: dict[str, list[str]]  # canonical -> [temporary name on shadow, name on old table]
    identity_sequences: dict[str, list[str]]  # column -> [canonical name, name on old table]
    function_prefix: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> "Names":
        return cls(**values)

    @classmethod
    def derive(cls, table: Table) -> "Names":
        primary = table.primary_key_name or derived_name(table.name, "_pkey")
        indexes = {
            index.name: [derived_name(index.name, NEW_SUFFIX), derived_name(index.name, OLD_SUFFIX)]
            for index in table.indexes
            if not index.is_primary and index.is_valid
        }
        identity = {
            sequence.column: [sequence.name, derived_name(sequence.name, OLD_SUFFIX)]
            for sequence in table.sequences
            if sequence.dependency == "i"
        }
        return cls(
            table=table.name,
            shadow=derived_name(table.name, NEW_SUFFIX),
            old=derived_name(table.name, OLD_SUFFIX),
            default_partition=default_partition_name(table.name),
            primary_key=primary,
            primary_key_temporary=derived_name(primary, NEW_SUFFIX),
            primary_key_old=derived_name(primary, OLD_SUFFIX),
            indexes=indexes,
            identity_sequences=identity,
            function_prefix=f"{table.schema}_{table.name}",
        )

    def created_relations(self, partitions: list[PartitionSpec]) -> list[str]:
        names = [self.shadow, self.old, self.default_partition, self.primary_key_temporary,
                 self.primary_key_old]
        names += [temporary for temporary, _ in self.indexes.values()]
        names += [old for _, old in self.indexes.values()]
        names += [old for _, old in self.identity_sequences.values()]
        names += [spec.name for spec in partitions]
        return names


@dataclass
class Plan:
    settings: Settings
    table: Table
    key: Column
    names: Names
    partitions: list[PartitionSpec]
    partition_count: int
    minimum: str | None
    maximum: str | None
    order_columns: list[str]
    shadow_primary_key: list[str]
    checks: list[Check]
    server_version: str
    view_definitions: list[tuple[str, str, tuple[str, ...]]] = field(default_factory=list)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    def raise_on_failure(self) -> None:
        failures = self.failures
        if not failures:
            return
        more = f" ({len(failures) - 1} more problems: run livepart plan)" if len(failures) > 1 else ""
        raise InvalidInput(failures[0].message + more)

    def forward_trigger(self) -> TriggerSpec:
        return forward_trigger_spec(self.table, self.names, self.shadow_primary_key)

    def reverse_trigger(self) -> TriggerSpec:
        return reverse_trigger_spec(self.table, self.names)


def forward_trigger_spec(table: Table, names: Names, shadow_primary_key: list[str]) -> TriggerSpec:
    return TriggerSpec(
        source=qualified(table.schema, names.table),
        target=qualified(table.schema, names.shadow),
        columns=tuple(table.copied_columns),
        match_columns=tuple(shadow_primary_key),
        has_identity=any(c.identity for c in table.columns),
        trigger_prefix="livepart_fwd",
        function_prefix=f"{names.function_prefix}_fwd",
        state_schema_value=table.schema,
        state_table_value=names.table,
    )


def reverse_trigger_spec(table: Table, names: Names) -> TriggerSpec:
    return TriggerSpec(
        source=qualified(table.schema, names.table),
        target=qualified(table.schema, names.old),
        columns=tuple(table.copied_columns),
        match_columns=tuple(table.primary_key),
        has_identity=any(c.identity for c in table.columns),
        trigger_prefix="livepart_rev",
        function_prefix=f"{names.function_prefix}_rev",
        state_schema_value=table.schema,
        state_table_value=names.table,
    )


def choose_order_columns(table: Table, key: str) -> list[str]:
    """Pick the keyset order for backfill and verify.

    (partition key, primary key...) copies the oldest rows first, which suits
    time-ordered retention. It needs one index that serves exactly that order,
    so without one the primary key's own index is used.
    """
    wanted = [key] + [c for c in table.primary_key if c != key]
    for index in table.indexes:
        usable = index.is_valid and not index.has_expressions and not index.is_partial
        if usable and list(index.key_columns[: len(wanted)]) == wanted:
            return wanted
    return list(table.primary_key)


async def build_plan(conn: asyncpg.Connection, settings: Settings, *, resuming: bool = False) -> Plan:
    """Introspect the table and run every preflight check. Changes nothing."""
    version_num = int(await conn.fetchval("SHOW server_version_num"))
    server_version = await conn.fetchval("SHOW server_version")
    if version_num < MINIMUM_SERVER_VERSION:
        raise InvalidInput(f"PostgreSQL {server_version} is too old: livepart needs 12 or newer")

    table = await load_table(conn, settings.schema, settings.table)
    target = qualified(settings.schema, settings.table)
    if table is None:
        raise InvalidInput(f"table {target} not found; check --schema and --table")
    if table.kind == "p":
        raise InvalidInput(f"table {target} is already partitioned; nothing to migrate")
    if table.kind != "r":
        raise InvalidInput(f"{target} is not a regular table (relkind {table.kind!r}); pass a table to --table")

    key = table.column(settings.partition_key)
    if key is None:
        raise InvalidInput(
            f"column {quote_ident(settings.partition_key)} not found in {target}; "
            f"check --partition-key (columns: {', '.join(table.column_names)})"
        )

    checks: list[Check] = []
    _check_table_shape(table, key, settings, checks)
    minimum, maximum, minimum_text, maximum_text = await _key_range(conn, table, key, checks)
    now = await conn.fetchval("SELECT (pg_catalog.now() AT TIME ZONE 'UTC')::timestamp")
    partitions, count = _plan_partitions(table, key, settings, minimum, maximum, now, checks)
    await _check_key_outliers(conn, table, key, settings, now, checks)
    names = Names.derive(table)
    shadow_primary_key = list(table.primary_key) + (
        [key.name] if key.name not in table.primary_key else []
    )
    if not resuming:
        await _check_name_collisions(conn, table.schema, names, partitions, checks)
    await _check_privileges(conn, table, checks)
    await _check_long_transactions(conn, checks)

    return Plan(
        settings=settings,
        table=table,
        key=key,
        names=names,
        partitions=partitions,
        partition_count=count,
        minimum=minimum_text,
        maximum=maximum_text,
        order_columns=choose_order_columns(table, key.name) if table.primary_key else [],
        shadow_primary_key=shadow_primary_key,
        checks=checks,
        server_version=server_version,
        view_definitions=await view_definitions(conn, table),
    )


def _check_table_shape(table: Table, key: Column, settings: Settings, checks: list[Check]) -> None:
    target = qualified(table.schema, table.name)
    add = checks.append

    if table.persistence == "t":
        add(Check("table", "fail", f"{target} is a temporary table; only permanent tables can be migrated"))
    elif table.persistence == "u":
        add(Check("table", "warn", f"{target} is UNLOGGED; the partitioned table will be logged"))
    if table.is_partition or table.has_inheritance:
        add(Check("inheritance", "fail",
                  f"{target} takes part in inheritance or is a partition; detach it first"))

    if not table.primary_key:
        add(Check("primary key", "fail",
                  f"{target} has no primary key; add one (the copy pages through it and the "
                  "partitioned table's key is built from it)"))
    else:
        add(Check("primary key", "ok", f"primary key ({', '.join(table.primary_key)})"))

    kind = key_kind(key.type_name)
    column = quote_ident(key.name)
    if kind is None:
        add(Check("partition key", "fail",
                  f"partition key {column} has type {key.type_sql}; use a timestamp, timestamptz, "
                  "date, smallint, integer or bigint column in --partition-key"))
    elif kind == "time" and settings.interval not in TIME_INTERVALS:
        add(Check("interval", "fail",
                  f"--interval {settings.interval} does not fit the {key.type_sql} column {column}; "
                  "use day, week or month"))
    elif kind == "integer" and settings.integer_interval is None:
        add(Check("interval", "fail",
                  f"--interval {settings.interval} does not fit the {key.type_sql} column {column}; "
                  "give the partition width as a whole number, for example --interval 1000000"))
    else:
        add(Check("partition key", "ok", f"{column} {key.type_sql}, interval {settings.interval}"))
    if key.generated:
        add(Check("partition key", "fail", f"partition key {column} is a generated column; choose another"))

    for name, referencing in table.incoming_foreign_keys:
        add(Check("foreign keys", "fail",
                  f"foreign key {quote_ident(name)} on {referencing} references {target}; a partitioned "
                  f"table cannot hold the unique key on the primary key alone that it needs: drop the "
                  "constraint before migrating"))
    for index in table.indexes:
        _check_index(table, index, key.name, checks)
    for view in table.views:
        if view.kind == "m":
            add(Check("views", "fail",
                      f"materialized view {qualified(view.schema, view.name)} reads {target} and would "
                      "keep reading the old table; drop it before migrating and create it again after"))
        else:
            add(Check("views", "ok", f"view {qualified(view.schema, view.name)} will read the new table"))
    if table.rules:
        add(Check("rules", "fail", f"{target} has rules ({', '.join(table.rules)}); drop them first"))
    for trigger in table.user_triggers:
        add(Check("triggers", "warn",
                  f"trigger {quote_ident(trigger)} on {target} is not copied; create it on the new "
                  "table after the swap"))
    for publication in table.publications:
        add(Check("publications", "warn",
                  f"{target} is in publication {quote_ident(publication)}; add the new table to it after "
                  "the swap (ALTER PUBLICATION ... ADD TABLE)"))
    for statistics in table.statistics_objects:
        add(Check("statistics", "warn",
                  f"extended statistics {quote_ident(statistics)} are not copied; create them again"))
    if table.row_security:
        add(Check("row security", "warn", f"{target} has row-level security; policies are not copied"))
    for constraint in table.constraints:
        if not constraint.validated:
            add(Check("constraints", "warn",
                      f"NOT VALID constraint {quote_ident(constraint.name)} is not copied; add it to the "
                      "new table after the swap"))
    if not key.not_null:
        add(Check("partition key", "warn",
                  f"partition key {column} allows NULL; the partitioned table cannot store NULL in its "
                  "key, so a NULL written during the migration is recorded as a trigger error and "
                  "blocks the swap: add NOT NULL to the column"))


def _check_index(table: Table, index, key: str, checks: list[Check]) -> None:
    name = quote_ident(index.name)
    if not index.is_valid:
        checks.append(Check("indexes", "warn", f"index {name} is invalid and will not be copied"))
        return
    if index.constraint_type == "x":
        checks.append(Check("indexes", "fail",
                            f"exclusion constraint {name} cannot be kept on a partitioned table; drop it first"))
        return
    if index.is_unique and not index.is_primary and (index.has_expressions or key not in index.key_columns):
        checks.append(Check("indexes", "fail",
                            f"unique index {name} does not contain the partition key {quote_ident(key)}; "
                            "a partitioned table cannot enforce it: drop it or add the column to it"))
        return
    if not index.is_primary and index.definition_tail() is None:
        checks.append(Check("indexes", "fail",
                            f"index {name} has a definition livepart cannot rewrite: {index.definition}"))


async def _key_range(
    conn: asyncpg.Connection, table: Table, key: Column, checks: list[Check]
) -> tuple[Any, Any, str | None, str | None]:
    target = qualified(table.schema, table.name)
    column = quote_ident(key.name)
    if key_kind(key.type_name) is None:
        return None, None, None, None
    if not key.not_null:
        has_nulls = await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {target} WHERE {column} IS NULL)")
        if has_nulls:
            checks.append(Check("partition key", "fail",
                                f"partition key {column} of {target} contains NULL values; a partition "
                                "key cannot be NULL: set those rows to a value and add NOT NULL"))
    texts = await conn.fetchrow(
        f"SELECT min({column})::text AS low, max({column})::text AS high FROM {target}"
    )
    low_text, high_text = texts["low"], texts["high"]
    if low_text is not None and "infinity" in f"{low_text} {high_text}":
        checks.append(Check("partition key", "fail",
                            f"partition key {column} holds infinite values ({low_text} .. {high_text}); "
                            "range partitions cannot cover them: replace them with real values"))
        return None, None, low_text, high_text
    try:
        row = await conn.fetchrow(f"SELECT min({column}) AS low, max({column}) AS high FROM {target}")
    except (OverflowError, ValueError):
        row = None
    if row is None or _beyond_calendar(row["high"]):
        checks.append(Check("partition key", "fail",
                            f"partition key {column} holds values outside the years 1 to 9998 "
                            f"({low_text} .. {high_text}); partitions cannot be computed for them: fix "
                            "those outliers first"))
        return None, None, low_text, high_text
    return row["low"], row["high"], low_text, high_text


def _beyond_calendar(value: Any) -> bool:
    """Return whether a key is too close to year 9999 for the next bound to exist in Python's calendar."""
    return getattr(value, "year", 0) >= 9999


def _plan_partitions(
    table: Table, key: Column, settings: Settings, minimum: Any, maximum: Any, now: datetime,
    checks: list[Check],
) -> tuple[list[PartitionSpec], int]:
    if any(c.status == "fail" and c.name in ("partition key", "interval") for c in checks):
        return [], 0
    partitions, count = planned_partitions(
        table=table.name,
        type_name=key.type_name,
        interval=settings.interval,
        minimum=minimum,
        maximum=maximum,
        now=now,
        future=settings.future_partitions,
    )
    width = f"one {settings.interval}" if settings.integer_interval is None else f"width {settings.interval}"
    if count > settings.max_partitions:
        checks.append(Check("partitions", "fail",
                            f"partition key {quote_ident(key.name)} spans {minimum} to {maximum}, which needs "
                            f"{count} partitions of {width}, more than --max-partitions "
                            f"{settings.max_partitions}: fix far-past or far-future outliers, choose a wider "
                            "--interval, or raise --max-partitions"))
        return [], count
    checks.append(Check("partitions", "ok",
                        f"{count} partitions of {width} from {partitions[0].lower} to {partitions[-1].upper}, "
                        "plus a default partition"))
    if count > MANY_PARTITIONS:
        checks.append(Check("partitions", "warn",
                            f"{count} partitions are needed to cover {minimum} to {maximum}; if a few old or "
                            "far-future rows cause that, fix them first (or cap with --max-partitions)"))
    return partitions, count


async def _check_key_outliers(
    conn: asyncpg.Connection, table: Table, key: Column, settings: Settings, now: datetime,
    checks: list[Check],
) -> None:
    """Warn about rows dated after today: usually clock or parsing bugs worth a look."""
    if key_kind(key.type_name) != "time" or not _has_leading_index(table, key.name):
        return
    column = quote_ident(key.name)
    count = await conn.fetchval(
        f"SELECT count(*) FROM {qualified(table.schema, table.name)} "
        f"WHERE {column} > ($1::timestamp + interval '1 day')::{key.type_sql}",
        now,
    )
    if count:
        checks.append(Check("outliers", "warn",
                            f"{count} rows have {column} more than a day in the future; partitions are "
                            "created for them, check that the values are right"))


def _has_leading_index(table: Table, column: str) -> bool:
    return any(i.is_valid and i.key_columns[:1] == (column,) for i in table.indexes)


async def _check_name_collisions(
    conn: asyncpg.Connection, schema: str, names: Names, partitions: list[PartitionSpec],
    checks: list[Check],
) -> None:
    for name in names.created_relations(partitions):
        if await relation_exists(conn, schema, name):
            checks.append(Check("names", "fail",
                                f"{qualified(schema, name)} already exists and livepart needs that name; "
                                "rename or drop it (or resume the migration that created it)"))


async def _check_privileges(conn: asyncpg.Connection, table: Table, checks: list[Check]) -> None:
    row = await conn.fetchrow(
        """
        SELECT pg_catalog.pg_has_role(current_user, c.relowner, 'MEMBER') AS owns,
               pg_catalog.has_schema_privilege(current_user, c.relnamespace, 'CREATE') AS can_create,
               (pg_catalog.to_regnamespace('livepart') IS NOT NULL
                OR pg_catalog.has_database_privilege(pg_catalog.current_database(), 'CREATE'))
                   AS can_create_state
        FROM pg_catalog.pg_class c WHERE c.oid = $1
        """,
        table.oid,
    )
    target = qualified(table.schema, table.name)
    if not row["owns"]:
        checks.append(Check("privileges", "fail",
                            f"the current user does not own {target} (owner {quote_ident(table.owner)}); "
                            "connect as the owner or a member of its role"))
    if not row["can_create"]:
        checks.append(Check("privileges", "fail",
                            f"the current user cannot create tables in schema {quote_ident(table.schema)}; "
                            "grant CREATE on it"))
    if not row["can_create_state"]:
        checks.append(Check("privileges", "fail",
                            "the current user cannot create the livepart schema; grant CREATE on the database"))


async def _check_long_transactions(conn: asyncpg.Connection, checks: list[Check]) -> None:
    count = await conn.fetchval(
        """
        SELECT count(*) FROM pg_catalog.pg_stat_activity
        WHERE datname = pg_catalog.current_database() AND pid <> pg_catalog.pg_backend_pid()
          AND xact_start < pg_catalog.now() - interval '5 minutes'
        """
    )
    if count:
        checks.append(Check("transactions", "warn",
                            f"{count} transactions have been open for more than 5 minutes; they delay "
                            "the trigger install and the swap, which wait for their locks"))


async def view_definitions(conn: asyncpg.Connection, table: Table) -> list[tuple[str, str, tuple[str, ...]]]:
    """Return (qualified view, definition, options) for the plain views that read the table."""
    result = []
    for view in table.views:
        if view.kind != "v":
            continue
        name = qualified(view.schema, view.name)
        definition = await conn.fetchval("SELECT pg_catalog.pg_get_viewdef($1::regclass, false)", name)
        result.append((name, definition, view.options))
    return result


def shadow_statements(plan: Plan) -> list[ddl.Statement]:
    """Build the shadow table, its indexes and its default partition, in order."""
    table, names = plan.table, plan.names
    index_names = {canonical: temporary for canonical, (temporary, _) in names.indexes.items()}
    none = ddl.NO_APP_LOCK
    statements = [
        ddl.Statement(
            ddl.create_shadow_sql(table, names.shadow, plan.key.name, plan.shadow_primary_key,
                                  names.primary_key_temporary),
            none,
        )
    ]
    statements += [ddl.Statement(sql, none) for sql in ddl.foreign_key_sql(table, names.shadow)]
    statements += [ddl.Statement(sql, none) for sql in ddl.index_sql(table, names.shadow, index_names)]
    statements += [ddl.Statement(sql, none) for sql in ddl.comment_sql(table, names.shadow)]
    statements.append(
        ddl.Statement(
            ddl.partition_sql(table.schema, names.shadow, None, names.default_partition, table.reloptions),
            none,
        )
    )
    return statements


def range_partition_statements(plan: Plan) -> list[ddl.Statement]:
    table = plan.table
    return [
        ddl.Statement(
            ddl.partition_sql(table.schema, plan.names.shadow, spec, spec.name, table.reloptions),
            ddl.NO_APP_LOCK,
        )
        for spec in plan.partitions
    ]


def plan_statements(plan: Plan) -> list[ddl.Statement]:
    """Build every statement of prepare and swap, in order, for `livepart plan` to print."""
    from .swap import swap_statements  # the swap phase owns its SQL

    table = qualified(plan.table.schema, plan.table.name)
    statements = shadow_statements(plan) + range_partition_statements(plan)
    trigger_lock = f"SHARE ROW EXCLUSIVE on {table}, bounded by lock_timeout, retried"
    statements += [
        ddl.Statement(sql, trigger_lock if sql.startswith(("CREATE TRIGGER", "ALTER TABLE")) else ddl.NO_APP_LOCK)
        for sql in install_statements(plan.forward_trigger(), plan.table.owner)
    ]
    statements.append(
        ddl.Statement(
            f"-- backfill: INSERT INTO {qualified(plan.table.schema, plan.names.shadow)} (...) "
            f"SELECT ... FROM {table} WHERE ({', '.join(quote_ident(c) for c in plan.order_columns)}) "
            "> checkpoint ... FOR SHARE NOWAIT ON CONFLICT DO NOTHING, in batches",
            f"ROW SHARE on {table}; FOR SHARE row locks on the batch's rows until it commits",
        )
    )
    statements.append(
        ddl.Statement(
            "-- verify: count and checksum per key range in one REPEATABLE READ snapshot",
            f"ACCESS SHARE on {table}",
        )
    )
    statements += swap_statements(plan)
    return statements
