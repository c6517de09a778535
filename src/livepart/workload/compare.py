"""Compare a table with its control table row by row and column by column."""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg

from livepart.ident import qualified, quote_ident
from livepart.workload.litellm import KEY_COLUMN

SAMPLE_SIZE = 5


@dataclass
class Comparison:
    """Differences between a table and its control table, seen in one snapshot.

    Each control key is matched with the table rows that have the same key.
    `lost` is the number of control rows whose key is missing from the table.
    `ghost` is the number of table rows beyond one per control key: rows whose key
    is not in the control table, plus the extra copies of a key that appears more
    than once. Such copies can exist because a partitioned table's unique key may
    include another column. `duplicates` counts those extra copies alone.
    `stale` is the number of keys present in both tables where no table row with
    that key equals the control row in every compared column.

    The sample fields contain up to five keys of each kind for debugging. They are
    left out of repr() so that logging a Comparison does not log keys.
    """

    rows_table: int
    rows_control: int
    lost: int
    ghost: int
    stale: int
    duplicates: int
    columns: tuple[str, ...]
    """Columns compared: those that both tables have."""
    missing_columns: tuple[str, ...] = ()
    """Columns of the control table that the table lacks."""
    lost_samples: list[str] = field(default_factory=list, repr=False)
    ghost_samples: list[str] = field(default_factory=list, repr=False)
    stale_samples: list[str] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        """True when the table contains exactly the control rows and has every control column."""
        return not (self.lost or self.ghost or self.stale or self.missing_columns)

    def summary(self) -> dict[str, int]:
        """Return the counts only, safe to log."""
        return {
            "rows_table": self.rows_table,
            "rows_control": self.rows_control,
            "lost": self.lost,
            "ghost": self.ghost,
            "stale": self.stale,
            "duplicates": self.duplicates,
            "missing_columns": len(self.missing_columns),
        }


async def compare_with_control(
    conn: asyncpg.Connection,
    table: str,
    control: str,
    schema: str = "public",
    key: str = KEY_COLUMN,
    *,
    control_schema: str | None = None,
) -> Comparison:
    """Compare every row and column of `table` with `control` in one snapshot.

    Columns are matched by name, whatever their physical order, and compared
    with IS DISTINCT FROM, so NULL equals NULL. jsonb compares as jsonb (key
    order and whitespace do not matter), json is cast to jsonb, and timestamps
    and floats must be exactly equal. Where the two tables declare a column with
    different types, the table's value is cast to the control's type.

    `key` must be unique in `control`, as the primary key that
    create_control_table adds makes it. All queries run in one REPEATABLE READ
    transaction, so a writer that changes both tables in one transaction is seen
    either before or after each of its commits.

    Raises ValueError if either table does not exist or lacks the key column.
    """
    target = qualified(schema, table)
    reference = qualified(control_schema or schema, control)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        table_types = await _column_types(conn, target)
        control_types = await _column_types(conn, reference)
        for name, types in ((target, table_types), (reference, control_types)):
            if key not in types:
                raise ValueError(f"key column {key!r} not found in {name}; pass the key column name as key=")

        columns = tuple(name for name in control_types if name in table_types)
        missing = tuple(name for name in control_types if name not in table_types)
        queries = _Queries(target, reference, key, columns, table_types, control_types)

        rows_table, rows_control, matched, duplicates = await conn.fetchrow(queries.counts)
        stale, stale_samples = await conn.fetchrow(queries.stale)
        lost = rows_control - matched
        ghost = rows_table - matched
        lost_samples = await conn.fetchval(queries.lost_samples) if lost else []
        ghost_samples = await conn.fetchval(queries.ghost_samples) if ghost else []

    return Comparison(
        rows_table=rows_table,
        rows_control=rows_control,
        lost=lost,
        ghost=ghost,
        stale=stale,
        duplicates=duplicates,
        columns=columns,
        missing_columns=missing,
        lost_samples=list(lost_samples or []),
        ghost_samples=list(ghost_samples or []),
        stale_samples=list(stale_samples or []),
    )


async def _column_types(conn: asyncpg.Connection, relation: str) -> dict[str, str]:
    """Return {column name: type} for `relation`, in physical order."""
    oid = await conn.fetchval("SELECT to_regclass($1)::oid", relation)
    if oid is None:
        raise ValueError(f"table {relation} not found; check the schema and table names")
    records = await conn.fetch(
        """
        SELECT attname::text, format_type(atttypid, atttypmod)
        FROM pg_catalog.pg_attribute
        WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped
        ORDER BY attnum
        """,
        oid,
    )
    return {name: sql_type for name, sql_type in records}


def _differs(name: str, table_type: str, control_type: str) -> str:
    """Return an SQL condition that is true when column `name` differs between t and c."""
    column = quote_ident(name)
    if control_type == "json":
        return f"t.{column}::jsonb IS DISTINCT FROM c.{column}::jsonb"
    if table_type != control_type:
        return f"t.{column}::{control_type} IS DISTINCT FROM c.{column}"
    return f"t.{column} IS DISTINCT FROM c.{column}"


class _Queries:
    """SQL text of the comparison queries; t is the table and c the control table."""

    def __init__(
        self,
        table: str,
        control: str,
        key: str,
        columns: tuple[str, ...],
        table_types: dict[str, str],
        control_types: dict[str, str],
    ) -> None:
        k = quote_ident(key)
        in_table = f"EXISTS (SELECT 1 FROM {table} t WHERE t.{k} = c.{k})"
        any_column_differs = " OR ".join(
            _differs(name, table_types[name], control_types[name]) for name in columns
        )
        equal_row_in_table = (
            f"EXISTS (SELECT 1 FROM {table} t WHERE t.{k} = c.{k} AND NOT ({any_column_differs}))"
        )

        self.counts = f"""
            SELECT (SELECT count(*) FROM {table}),
                   (SELECT count(*) FROM {control}),
                   (SELECT count(*) FROM {control} c WHERE {in_table}),
                   (SELECT coalesce(sum(copies - 1), 0)::bigint
                    FROM (SELECT count(*) AS copies FROM {table} GROUP BY {k} HAVING count(*) > 1) d)
        """
        self.stale = f"""
            WITH stale AS (
                SELECT c.{k}::text AS key FROM {control} c
                WHERE {in_table} AND NOT {equal_row_in_table}
            )
            SELECT (SELECT count(*) FROM stale),
                   (SELECT array_agg(key) FROM (SELECT key FROM stale ORDER BY key LIMIT {SAMPLE_SIZE}) s)
        """
        self.lost_samples = f"""
            SELECT array_agg(key) FROM (
                SELECT c.{k}::text AS key FROM {control} c WHERE NOT {in_table}
                ORDER BY 1 LIMIT {SAMPLE_SIZE}) s
        """
        self.ghost_samples = f"""
            SELECT array_agg(key) FROM (
                SELECT key FROM (
                    SELECT t.{k}::text AS key FROM {table} t
                    WHERE NOT EXISTS (SELECT 1 FROM {control} c WHERE c.{k} = t.{k})
                    UNION
                    SELECT {k}::text FROM {table} GROUP BY {k} HAVING count(*) > 1
                ) g
                ORDER BY 1 LIMIT {SAMPLE_SIZE}) s
        """
