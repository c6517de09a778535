"""Catalog introspection: everything the migration needs to know about a table.

The worker session runs with an empty search_path, so every name that the
pg_get_* functions print is schema-qualified and can be replayed as-is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import asyncpg

from .ident import qualified

TIME_TYPES = ("timestamp", "timestamptz", "date")
# pg_trigger.tgenabled values that fire for ordinary sessions (origin and always).
ENABLED_TRIGGER_FLAGS = ("O", "A")
INTEGER_TYPES = ("int2", "int4", "int8")


@dataclass(frozen=True)
class Column:
    name: str
    attnum: int
    type_sql: str
    type_name: str
    not_null: bool
    default_sql: str | None
    identity: str  # '' | 'a' (ALWAYS) | 'd' (BY DEFAULT)
    generated: str  # '' | 's' (STORED)
    generation_sql: str | None
    collation_sql: str | None
    comment: str | None

    @property
    def is_copied(self) -> bool:
        """Generated columns are computed by the target, never written."""
        return self.generated == ""


@dataclass(frozen=True)
class Index:
    name: str
    is_primary: bool
    is_unique: bool
    is_valid: bool
    constraint_name: str | None
    constraint_type: str | None
    constraint_definition: str | None
    key_columns: tuple[str, ...]
    has_expressions: bool
    is_partial: bool
    definition: str
    definition_prefix: str
    comment: str | None

    def definition_tail(self) -> str | None:
        """Return the part after `USING `, or None if the definition has an unexpected shape."""
        if not self.definition.startswith(self.definition_prefix):
            return None
        return self.definition[len(self.definition_prefix):]


@dataclass(frozen=True)
class Constraint:
    name: str
    type: str  # 'c' check, 'f' foreign key
    definition: str
    validated: bool


@dataclass(frozen=True)
class Grant:
    grantee: str  # quoted role name or PUBLIC
    privilege: str
    grantable: bool
    column: str | None = None


@dataclass(frozen=True)
class DependentView:
    schema: str
    name: str
    kind: str  # 'v' view, 'm' materialized view
    options: tuple[str, ...]


@dataclass(frozen=True)
class OwnedSequence:
    qualified_name: str
    name: str
    column: str
    dependency: str  # 'a' OWNED BY (serial), 'i' identity


@dataclass(frozen=True)
class Table:
    oid: int
    schema: str
    name: str
    kind: str
    persistence: str
    owner: str
    comment: str | None
    reloptions: tuple[str, ...]
    estimated_rows: int
    total_bytes: int
    is_partition: bool
    has_inheritance: bool
    row_security: bool
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    primary_key_name: str | None
    indexes: tuple[Index, ...]
    constraints: tuple[Constraint, ...]
    incoming_foreign_keys: tuple[tuple[str, str], ...]
    user_triggers: tuple[str, ...]
    views: tuple[DependentView, ...]
    sequences: tuple[OwnedSequence, ...]
    grants: tuple[Grant, ...]
    publications: tuple[str, ...]
    statistics_objects: tuple[str, ...]
    rules: tuple[str, ...]

    def column(self, name: str) -> Column | None:
        return next((c for c in self.columns if c.name == name), None)

    @property
    def copied_columns(self) -> list[str]:
        return [c.name for c in self.columns if c.is_copied]

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]


async def load_table(conn: asyncpg.Connection, schema: str, name: str) -> Table | None:
    """Read a table's definition from the catalog, or None when it does not exist."""
    row = await conn.fetchrow(
        """
        SELECT c.oid, c.relkind::text AS relkind, c.relpersistence::text AS relpersistence, pg_catalog.pg_get_userbyid(c.relowner) AS owner,
               pg_catalog.obj_description(c.oid, 'pg_class') AS comment,
               coalesce(c.reloptions, '{}') AS reloptions,
               greatest(c.reltuples, 0)::bigint AS estimated_rows,
               pg_catalog.pg_total_relation_size(c.oid) AS total_bytes,
               c.relispartition, c.relrowsecurity,
               EXISTS (SELECT 1 FROM pg_catalog.pg_inherits i
                       WHERE i.inhrelid = c.oid OR i.inhparent = c.oid) AS has_inheritance
        FROM pg_catalog.pg_class c
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = $1 AND c.relname = $2
        """,
        schema,
        name,
    )
    if row is None:
        return None
    oid = row["oid"]
    indexes = await _load_indexes(conn, oid)
    primary = next((i for i in indexes if i.is_primary), None)
    return Table(
        oid=oid,
        schema=schema,
        name=name,
        kind=row["relkind"],
        persistence=row["relpersistence"],
        owner=row["owner"],
        comment=row["comment"],
        reloptions=tuple(row["reloptions"]),
        estimated_rows=row["estimated_rows"],
        total_bytes=row["total_bytes"],
        is_partition=row["relispartition"],
        has_inheritance=row["has_inheritance"],
        row_security=row["relrowsecurity"],
        columns=await _load_columns(conn, oid),
        primary_key=primary.key_columns if primary else (),
        primary_key_name=primary.constraint_name if primary else None,
        indexes=indexes,
        constraints=await _load_constraints(conn, oid),
        incoming_foreign_keys=await _load_incoming_foreign_keys(conn, oid),
        user_triggers=await _load_user_triggers(conn, oid),
        views=await _load_dependent_views(conn, oid),
        sequences=await _load_owned_sequences(conn, oid),
        grants=await _load_grants(conn, oid),
        publications=await _load_publications(conn, oid),
        statistics_objects=await _load_statistics_objects(conn, oid),
        rules=await _load_rules(conn, oid),
    )


async def _load_columns(conn: asyncpg.Connection, oid: int) -> tuple[Column, ...]:
    rows = await conn.fetch(
        """
        SELECT a.attname, a.attnum, pg_catalog.format_type(a.atttypid, a.atttypmod) AS type_sql,
               CASE WHEN t.typtype = 'd' THEN bt.typname ELSE t.typname END AS type_name,
               a.attnotnull, a.attidentity::text AS attidentity, a.attgenerated::text AS attgenerated,
               CASE WHEN a.attgenerated = '' THEN pg_catalog.pg_get_expr(d.adbin, d.adrelid) END
                   AS default_sql,
               CASE WHEN a.attgenerated <> '' THEN pg_catalog.pg_get_expr(d.adbin, d.adrelid) END
                   AS generation_sql,
               CASE WHEN a.attcollation <> 0 AND a.attcollation <> t.typcollation THEN
                   (SELECT pg_catalog.quote_ident(cn.nspname) || '.' || pg_catalog.quote_ident(co.collname)
                    FROM pg_catalog.pg_collation co
                    JOIN pg_catalog.pg_namespace cn ON cn.oid = co.collnamespace
                    WHERE co.oid = a.attcollation) END AS collation_sql,
               pg_catalog.col_description(a.attrelid, a.attnum) AS comment
        FROM pg_catalog.pg_attribute a
        JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
        LEFT JOIN pg_catalog.pg_type bt ON bt.oid = t.typbasetype
        LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attnum
        """,
        oid,
    )
    return tuple(
        Column(
            name=r["attname"],
            attnum=r["attnum"],
            type_sql=r["type_sql"],
            type_name=r["type_name"],
            not_null=r["attnotnull"],
            default_sql=r["default_sql"],
            identity=r["attidentity"],
            generated=r["attgenerated"],
            generation_sql=r["generation_sql"],
            collation_sql=r["collation_sql"],
            comment=r["comment"],
        )
        for r in rows
    )


async def _load_indexes(conn: asyncpg.Connection, oid: int) -> tuple[Index, ...]:
    rows = await conn.fetch(
        """
        SELECT ic.relname AS name, i.indisprimary, i.indisunique, i.indisvalid,
               con.conname, con.contype::text AS contype,
               CASE WHEN con.oid IS NOT NULL THEN pg_catalog.pg_get_constraintdef(con.oid) END AS condef,
               ARRAY(SELECT a.attname
                     FROM unnest(i.indkey[0:i.indnkeyatts - 1]) WITH ORDINALITY AS k(attnum, ord)
                     JOIN pg_catalog.pg_attribute a
                       ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                     ORDER BY k.ord) AS key_columns,
               (i.indexprs IS NOT NULL OR 0 = ANY (i.indkey[0:i.indnkeyatts - 1])) AS has_expressions,
               i.indpred IS NOT NULL AS is_partial,
               pg_catalog.pg_get_indexdef(i.indexrelid) AS definition,
               pg_catalog.format('CREATE %sINDEX %s ON %s.%s USING ',
                      CASE WHEN i.indisunique THEN 'UNIQUE ' ELSE '' END,
                      pg_catalog.quote_ident(ic.relname), pg_catalog.quote_ident(n.nspname),
                      pg_catalog.quote_ident(c.relname)) AS definition_prefix,
               pg_catalog.obj_description(i.indexrelid, 'pg_class') AS comment
        FROM pg_catalog.pg_index i
        JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
        JOIN pg_catalog.pg_class c ON c.oid = i.indrelid
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_catalog.pg_constraint con
               ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid
              AND con.contype IN ('p', 'u', 'x')
        WHERE i.indrelid = $1
        ORDER BY ic.relname
        """,
        oid,
    )
    return tuple(
        Index(
            name=r["name"],
            is_primary=r["indisprimary"],
            is_unique=r["indisunique"],
            is_valid=r["indisvalid"],
            constraint_name=r["conname"],
            constraint_type=r["contype"],
            constraint_definition=r["condef"],
            key_columns=tuple(r["key_columns"]),
            has_expressions=r["has_expressions"],
            is_partial=r["is_partial"],
            definition=r["definition"],
            definition_prefix=r["definition_prefix"],
            comment=r["comment"],
        )
        for r in rows
    )


async def _load_constraints(conn: asyncpg.Connection, oid: int) -> tuple[Constraint, ...]:
    rows = await conn.fetch(
        """
        SELECT conname, contype::text AS contype, pg_catalog.pg_get_constraintdef(oid) AS definition, convalidated
        FROM pg_catalog.pg_constraint
        WHERE conrelid = $1 AND contype IN ('c', 'f')
        ORDER BY conname
        """,
        oid,
    )
    return tuple(
        Constraint(r["conname"], r["contype"], r["definition"], r["convalidated"]) for r in rows
    )


async def _load_incoming_foreign_keys(
    conn: asyncpg.Connection, oid: int
) -> tuple[tuple[str, str], ...]:
    rows = await conn.fetch(
        """
        SELECT conname, conrelid::regclass::text AS referencing_table
        FROM pg_catalog.pg_constraint
        WHERE confrelid = $1 AND contype = 'f' AND conrelid <> $1
        ORDER BY conname
        """,
        oid,
    )
    return tuple((r["conname"], r["referencing_table"]) for r in rows)


async def _load_user_triggers(conn: asyncpg.Connection, oid: int) -> tuple[str, ...]:
    rows = await conn.fetch(
        """
        SELECT tgname FROM pg_catalog.pg_trigger
        WHERE tgrelid = $1 AND NOT tgisinternal AND tgname NOT LIKE 'livepart\\_%'
        ORDER BY tgname
        """,
        oid,
    )
    return tuple(r["tgname"] for r in rows)


async def _load_dependent_views(conn: asyncpg.Connection, oid: int) -> tuple[DependentView, ...]:
    rows = await conn.fetch(
        """
        SELECT DISTINCT vn.nspname, v.relname, v.relkind::text AS relkind, coalesce(v.reloptions, '{}') AS options
        FROM pg_catalog.pg_depend d
        JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid
        JOIN pg_catalog.pg_class v ON v.oid = r.ev_class
        JOIN pg_catalog.pg_namespace vn ON vn.oid = v.relnamespace
        WHERE d.classid = 'pg_catalog.pg_rewrite'::regclass
          AND d.refclassid = 'pg_catalog.pg_class'::regclass
          AND d.refobjid = $1 AND v.oid <> $1
        ORDER BY vn.nspname, v.relname
        """,
        oid,
    )
    return tuple(
        DependentView(r["nspname"], r["relname"], r["relkind"], tuple(r["options"])) for r in rows
    )


async def _load_owned_sequences(conn: asyncpg.Connection, oid: int) -> tuple[OwnedSequence, ...]:
    rows = await conn.fetch(
        """
        SELECT pg_catalog.quote_ident(sn.nspname) || '.' || pg_catalog.quote_ident(s.relname) AS qualified,
               s.relname, a.attname, d.deptype::text AS deptype
        FROM pg_catalog.pg_depend d
        JOIN pg_catalog.pg_class s ON s.oid = d.objid AND s.relkind = 'S'
        JOIN pg_catalog.pg_namespace sn ON sn.oid = s.relnamespace
        JOIN pg_catalog.pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
        WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.refobjid = $1
          AND d.deptype IN ('a', 'i')
        ORDER BY a.attnum
        """,
        oid,
    )
    return tuple(
        OwnedSequence(r["qualified"], r["relname"], r["attname"], r["deptype"]) for r in rows
    )


async def _load_grants(conn: asyncpg.Connection, oid: int) -> tuple[Grant, ...]:
    rows = await conn.fetch(
        """
        SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                    ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(a.grantee)) END AS grantee,
               a.privilege_type, a.is_grantable, NULL::name AS column_name
        FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
        WHERE c.oid = $1 AND a.grantee <> c.relowner
        UNION ALL
        SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                    ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(a.grantee)) END,
               a.privilege_type, a.is_grantable, att.attname
        FROM pg_catalog.pg_attribute att, pg_catalog.aclexplode(att.attacl) a
        WHERE att.attrelid = $1 AND att.attnum > 0 AND NOT att.attisdropped
        ORDER BY 4 NULLS FIRST, 1, 2
        """,
        oid,
    )
    return tuple(
        Grant(r["grantee"], r["privilege_type"], r["is_grantable"], r["column_name"]) for r in rows
    )


async def _load_publications(conn: asyncpg.Connection, oid: int) -> tuple[str, ...]:
    rows = await conn.fetch(
        """
        SELECT p.pubname FROM pg_catalog.pg_publication_rel pr
        JOIN pg_catalog.pg_publication p ON p.oid = pr.prpubid
        WHERE pr.prrelid = $1 ORDER BY 1
        """,
        oid,
    )
    return tuple(r["pubname"] for r in rows)


async def _load_statistics_objects(conn: asyncpg.Connection, oid: int) -> tuple[str, ...]:
    rows = await conn.fetch(
        "SELECT stxname FROM pg_catalog.pg_statistic_ext WHERE stxrelid = $1 ORDER BY 1", oid
    )
    return tuple(r["stxname"] for r in rows)


async def _load_rules(conn: asyncpg.Connection, oid: int) -> tuple[str, ...]:
    rows = await conn.fetch(
        """
        SELECT rulename FROM pg_catalog.pg_rewrite
        WHERE ev_class = $1 AND rulename <> '_RETURN' ORDER BY 1
        """,
        oid,
    )
    return tuple(r["rulename"] for r in rows)


async def relation_exists(conn: asyncpg.Connection, schema: str, name: str) -> bool:
    return await conn.fetchval(
        """
        SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_class c
                       JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                       WHERE n.nspname = $1 AND c.relname = $2)
        """,
        schema,
        name,
    )


async def partition_bounds(conn: asyncpg.Connection, schema: str, parent: str) -> list[tuple[str, str]]:
    """Return (partition name, bound expression) for each partition of a partitioned table."""
    rows = await conn.fetch(
        """
        SELECT c.relname, pg_catalog.pg_get_expr(c.relpartbound, c.oid) AS bound
        FROM pg_catalog.pg_inherits i
        JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
        JOIN pg_catalog.pg_class p ON p.oid = i.inhparent
        JOIN pg_catalog.pg_namespace n ON n.oid = p.relnamespace
        WHERE n.nspname = $1 AND p.relname = $2
        ORDER BY c.relname
        """,
        schema,
        parent,
    )
    return [(r["relname"], r["bound"]) for r in rows]


async def trigger_state(conn: asyncpg.Connection, schema: str, table: str, trigger: str) -> str | None:
    """Return the trigger's tgenabled flag ('O' enabled, 'D' disabled, ...) or None if absent."""
    return await conn.fetchval(
        """
        SELECT t.tgenabled::text FROM pg_catalog.pg_trigger t
        JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = $1 AND c.relname = $2 AND t.tgname = $3
        """,
        schema,
        table,
        trigger,
    )


async def estimate_rows(conn: asyncpg.Connection, schema: str, name: str) -> int:
    """Return the planner's row estimate, which also covers never-analyzed tables."""
    plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) SELECT 1 FROM {qualified(schema, name)}")
    document = json.loads(plan) if isinstance(plan, str) else plan
    return int(document[0]["Plan"]["Plan Rows"])
