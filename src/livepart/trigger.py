"""Dual-write triggers: keep a target table equal to a source table, write by write.

The forward trigger (old table -> shadow) runs from prepare until the swap; the
reverse trigger (new table -> old table) runs from the swap until finalize, so a
rollback keeps every write. Both are statement-level AFTER triggers with
transition tables: one set-based statement per application statement instead
of one per row, which matters for the proxy's 100-row INSERTs (see
docs/benchmarks.md for the measurement).

Three rules hold for every trigger built here:
- Columns are named everywhere, never `SELECT *` or `NEW.*`, because the two
  tables may have different physical column orders.
- A failed shadow write does not fail the application's statement. The
  EXCEPTION block (a subtransaction) rolls the shadow write back and records
  the failure in livepart.trigger_error. Verification then repairs the
  affected rows, and the swap refuses to run while unverified errors exist.
  Two cases still reach the application: a query cancel, which PL/pgSQL's
  OTHERS does not catch, and a failure of the recording insert itself.
- Functions are SECURITY DEFINER with a pinned search_path, owned by the table
  owner, so an application role that may write the old table needs no
  privilege on the shadow table.
"""

from __future__ import annotations

from dataclasses import dataclass

from .ident import column_list, derived_name, quote_ident, quote_literal
from .state import STATE_SCHEMA

EVENTS = ("INSERT", "UPDATE", "DELETE", "TRUNCATE")


@dataclass(frozen=True)
class TriggerSpec:
    """Mapping of one dual-write direction from the source's rows onto the target."""

    source: str  # qualified source table
    target: str  # qualified target table
    columns: tuple[str, ...]  # columns written (generated columns excluded)
    match_columns: tuple[str, ...]  # the target's primary key, present in both tables
    has_identity: bool  # whether the target has identity columns (needs OVERRIDING)
    trigger_prefix: str  # e.g. livepart_fwd; trigger names are <prefix>_<event>
    function_prefix: str  # function names in the livepart schema
    state_schema_value: str  # schema and table recorded with errors
    state_table_value: str


def trigger_name(spec: TriggerSpec, event: str) -> str:
    return f"{spec.trigger_prefix}_{event.lower()}"


def function_name(spec: TriggerSpec, event: str) -> str:
    name = derived_name(spec.function_prefix, "_" + event.lower())
    return f"{STATE_SCHEMA}.{quote_ident(name)}"


def _upsert(spec: TriggerSpec, rows: str) -> str:
    columns = column_list(list(spec.columns))
    overriding = " OVERRIDING SYSTEM VALUE" if spec.has_identity else ""
    updatable = [c for c in spec.columns if c not in spec.match_columns]
    if updatable:
        assignments = ", ".join(f"{quote_ident(c)} = EXCLUDED.{quote_ident(c)}" for c in updatable)
        conflict = f"DO UPDATE SET {assignments}"
    else:
        conflict = "DO NOTHING"
    return (
        f"INSERT INTO {spec.target} ({columns}){overriding}\n"
        f"    SELECT {columns} FROM {rows}\n"
        f"    ON CONFLICT ({column_list(list(spec.match_columns))}) {conflict};"
    )


def _match(left: str, right: str, columns: tuple[str, ...]) -> str:
    return " AND ".join(f"{left}.{quote_ident(c)} = {right}.{quote_ident(c)}" for c in columns)


def _body(spec: TriggerSpec, event: str) -> str:
    if event == "INSERT":
        return _upsert(spec, "new_rows")
    if event == "UPDATE":
        # Rows whose key changed (a move to another partition, or a new primary
        # key) leave their old version behind unless it is deleted first.
        return (
            f"DELETE FROM {spec.target} AS t USING old_rows AS o\n"
            f"    WHERE {_match('t', 'o', spec.match_columns)}\n"
            f"      AND NOT EXISTS (SELECT 1 FROM new_rows AS n "
            f"WHERE {_match('n', 'o', spec.match_columns)});\n"
            f"{_upsert(spec, 'new_rows')}"
        )
    if event == "DELETE":
        return (
            f"DELETE FROM {spec.target} AS t USING old_rows AS o\n"
            f"    WHERE {_match('t', 'o', spec.match_columns)};"
        )
    if event == "TRUNCATE":
        return f"TRUNCATE {spec.target};"
    raise ValueError(f"unknown trigger event {event!r}")


def create_function_sql(spec: TriggerSpec, event: str) -> str:
    record_error = (
        f"INSERT INTO {STATE_SCHEMA}.trigger_error "
        f"(table_schema, table_name, operation, sqlstate, message)\n"
        f"        VALUES ({quote_literal(spec.state_schema_value)}, "
        f"{quote_literal(spec.state_table_value)}, TG_OP, SQLSTATE, SQLERRM);"
    )
    return (
        f"CREATE OR REPLACE FUNCTION {function_name(spec, event)}() RETURNS trigger\n"
        f"LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $livepart$\n"
        f"BEGIN\n"
        f"    {_body(spec, event)}\n"
        f"    RETURN NULL;\n"
        f"EXCEPTION WHEN OTHERS THEN\n"
        f"    {record_error}\n"
        f"    RETURN NULL;\n"
        f"END\n"
        f"$livepart$"
    )


def create_trigger_sql(spec: TriggerSpec, event: str) -> str:
    referencing = {
        "INSERT": "REFERENCING NEW TABLE AS new_rows ",
        "UPDATE": "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows ",
        "DELETE": "REFERENCING OLD TABLE AS old_rows ",
        "TRUNCATE": "",
    }[event]
    return (
        f"CREATE TRIGGER {quote_ident(trigger_name(spec, event))} AFTER {event} ON {spec.source} "
        f"{referencing}FOR EACH STATEMENT EXECUTE FUNCTION {function_name(spec, event)}()"
    )


def enable_always_sql(spec: TriggerSpec, event: str) -> str:
    """Fire even under session_replication_role = replica (restores, logical replication)."""
    return (
        f"ALTER TABLE {spec.source} ENABLE ALWAYS TRIGGER {quote_ident(trigger_name(spec, event))}"
    )


def install_statements(spec: TriggerSpec, owner: str) -> list[str]:
    statements = []
    for event in EVENTS:
        statements.append(create_function_sql(spec, event))
        statements.append(f"ALTER FUNCTION {function_name(spec, event)}() OWNER TO {quote_ident(owner)}")
    for event in EVENTS:
        statements.append(create_trigger_sql(spec, event))
        statements.append(enable_always_sql(spec, event))
    return statements


def drop_statements(spec: TriggerSpec) -> list[str]:
    statements = [
        f"DROP TRIGGER IF EXISTS {quote_ident(trigger_name(spec, event))} ON {spec.source}"
        for event in EVENTS
    ]
    statements += [f"DROP FUNCTION IF EXISTS {function_name(spec, event)}()" for event in EVENTS]
    return statements


def row_level_function_sql(spec: TriggerSpec) -> str:
    """Build a row-level equivalent of the four statement triggers.

    NOTE: not used by the migration; benchmarks/trigger_cost.py measures it
    against the statement-level triggers that the migration installs.
    """
    columns = column_list(list(spec.columns))
    values = column_list(list(spec.columns), "NEW")
    overriding = " OVERRIDING SYSTEM VALUE" if spec.has_identity else ""
    updatable = [c for c in spec.columns if c not in spec.match_columns]
    conflict = (
        "DO UPDATE SET " + ", ".join(f"{quote_ident(c)} = EXCLUDED.{quote_ident(c)}" for c in updatable)
        if updatable
        else "DO NOTHING"
    )
    upsert = (
        f"INSERT INTO {spec.target} ({columns}){overriding} VALUES ({values}) "
        f"ON CONFLICT ({column_list(list(spec.match_columns))}) {conflict};"
    )
    old_match = " AND ".join(f"{quote_ident(c)} = OLD.{quote_ident(c)}" for c in spec.match_columns)
    old_key = column_list(list(spec.match_columns), "OLD")
    new_key = column_list(list(spec.match_columns), "NEW")
    return (
        f"CREATE OR REPLACE FUNCTION {function_name(spec, 'row')}() "
        f"RETURNS trigger\n"
        f"LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $livepart$\n"
        f"BEGIN\n"
        f"    IF TG_OP = 'INSERT' THEN\n        {upsert}\n"
        f"    ELSIF TG_OP = 'UPDATE' THEN\n"
        f"        IF ({old_key}) IS DISTINCT FROM ({new_key}) THEN\n"
        f"            DELETE FROM {spec.target} WHERE {old_match};\n"
        f"        END IF;\n        {upsert}\n"
        f"    ELSE\n        DELETE FROM {spec.target} WHERE {old_match};\n"
        f"    END IF;\n"
        f"    RETURN NULL;\n"
        f"EXCEPTION WHEN OTHERS THEN\n"
        f"    INSERT INTO {STATE_SCHEMA}.trigger_error (table_schema, table_name, operation, sqlstate, message)\n"
        f"        VALUES ({quote_literal(spec.state_schema_value)}, {quote_literal(spec.state_table_value)}, "
        f"TG_OP, SQLSTATE, SQLERRM);\n"
        f"    RETURN NULL;\n"
        f"END\n"
        f"$livepart$"
    )
