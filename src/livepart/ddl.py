"""SQL builders shared by `plan` (which prints them) and the phases (which run them)."""

from __future__ import annotations

from dataclasses import dataclass

from .catalog import Column, Table
from .ident import column_list, qualified, quote_ident, quote_literal
from .partitions import PartitionSpec


@dataclass(frozen=True)
class Statement:
    sql: str
    lock: str  # the lock it takes on the application's table, in words


NO_APP_LOCK = "none on the application's table"


def column_definition(column: Column) -> str:
    parts = [quote_ident(column.name), column.type_sql]
    if column.collation_sql:
        parts.append(f"COLLATE {column.collation_sql}")
    if column.generated == "s":
        parts.append(f"GENERATED ALWAYS AS ({column.generation_sql}) STORED")
    elif column.identity:
        kind = "ALWAYS" if column.identity == "a" else "BY DEFAULT"
        parts.append(f"GENERATED {kind} AS IDENTITY")
    elif column.default_sql is not None:
        parts.append(f"DEFAULT {column.default_sql}")
    if column.not_null:
        parts.append("NOT NULL")
    return " ".join(parts)


def create_shadow_sql(
    table: Table, shadow: str, key: str, primary_key: list[str], primary_key_name: str
) -> str:
    """CREATE TABLE for the partitioned shadow, columns in the old table's physical order."""
    lines = [column_definition(c) for c in table.columns]
    for constraint in table.constraints:
        if constraint.type == "c" and constraint.validated:
            lines.append(f"CONSTRAINT {quote_ident(constraint.name)} {constraint.definition}")
    lines.append(f"CONSTRAINT {quote_ident(primary_key_name)} PRIMARY KEY ({column_list(primary_key)})")
    body = ",\n    ".join(lines)
    return (
        f"CREATE TABLE {qualified(table.schema, shadow)} (\n    {body}\n) "
        f"PARTITION BY RANGE ({quote_ident(key)})"
    )


def foreign_key_sql(table: Table, shadow: str) -> list[str]:
    return [
        f"ALTER TABLE {qualified(table.schema, shadow)} ADD CONSTRAINT {quote_ident(c.name)} {c.definition}"
        for c in table.constraints
        if c.type == "f" and c.validated
    ]


def index_sql(table: Table, shadow: str, index_names: dict[str, str]) -> list[str]:
    """Build every secondary index on the shadow under its temporary name."""
    statements = []
    target = qualified(table.schema, shadow)
    for index in table.indexes:
        if index.is_primary or index.name not in index_names:
            continue
        temporary = quote_ident(index_names[index.name])
        if index.constraint_type == "u":
            statements.append(
                f"ALTER TABLE {target} ADD CONSTRAINT {temporary} {index.constraint_definition}"
            )
        else:
            unique = "UNIQUE " if index.is_unique else ""
            statements.append(f"CREATE {unique}INDEX {temporary} ON {target} USING {index.definition_tail()}")
        if index.comment is not None:
            statements.append(
                f"COMMENT ON INDEX {qualified(table.schema, index_names[index.name])} "
                f"IS {quote_literal(index.comment)}"
            )
    return statements


def comment_sql(table: Table, shadow: str) -> list[str]:
    target = qualified(table.schema, shadow)
    statements = []
    if table.comment is not None:
        statements.append(f"COMMENT ON TABLE {target} IS {quote_literal(table.comment)}")
    for column in table.columns:
        if column.comment is not None:
            statements.append(
                f"COMMENT ON COLUMN {target}.{quote_ident(column.name)} IS {quote_literal(column.comment)}"
            )
    return statements


def partition_sql(schema: str, parent: str, spec: PartitionSpec | None, name: str, reloptions: tuple[str, ...]) -> str:
    """CREATE TABLE ... PARTITION OF; `spec` None builds the DEFAULT partition."""
    bound = spec.bound_sql() if spec is not None else "DEFAULT"
    options = f" WITH ({', '.join(reloptions)})" if reloptions else ""
    return f"CREATE TABLE {qualified(schema, name)} PARTITION OF {qualified(schema, parent)} {bound}{options}"


def grant_sql(table: Table, target_name: str) -> list[str]:
    target = qualified(table.schema, target_name)
    statements = []
    for grant in table.grants:
        option = " WITH GRANT OPTION" if grant.grantable else ""
        columns = f" ({quote_ident(grant.column)})" if grant.column else ""
        statements.append(f"GRANT {grant.privilege}{columns} ON {target} TO {grant.grantee}{option}")
    return statements


def rename_table_sql(schema: str, name: str, new_name: str) -> str:
    return f"ALTER TABLE {qualified(schema, name)} RENAME TO {quote_ident(new_name)}"


def rename_index_sql(schema: str, name: str, new_name: str) -> str:
    return f"ALTER INDEX {qualified(schema, name)} RENAME TO {quote_ident(new_name)}"


def rename_sequence_sql(schema_qualified: str, new_name: str) -> str:
    return f"ALTER SEQUENCE {schema_qualified} RENAME TO {quote_ident(new_name)}"
