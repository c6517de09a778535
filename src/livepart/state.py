"""Durable migration state in the target database, in livepart's own schema.

One row per migrated table records the phase, the backfill checkpoint and the
counters. Each backfill batch updates its row in the batch's own transaction,
so a crash can never separate copied rows from the checkpoint that covers them.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import asyncpg

from . import __version__
from .catalog import Table
from .errors import WorkerLockHeld

STATE_SCHEMA = "livepart"


class Phase(StrEnum):
    PREPARE = "prepare"  # state created; shadow table and trigger being built
    BACKFILL = "backfill"  # dual-write trigger live; old rows being copied
    VERIFY = "verify"  # copy done; comparing old and new range by range
    SWAP = "swap"  # verified; waiting for the swap's lock window
    SWAPPED = "swapped"  # names exchanged; the old table is kept in sync for rollback
    ROLLED_BACK = "rolled_back"  # swapped back; the new table is kept in sync again
    FINALIZED = "finalized"  # reverse trigger dropped; nothing left to do


TERMINAL_PHASES = (Phase.SWAPPED, Phase.FINALIZED)

STATE_DDL = f"""
CREATE SCHEMA IF NOT EXISTS {STATE_SCHEMA};
CREATE TABLE IF NOT EXISTS {STATE_SCHEMA}.migration (
    table_schema text NOT NULL,
    table_name text NOT NULL,
    phase text NOT NULL,
    settings jsonb NOT NULL,
    settings_hash text NOT NULL,
    definition_hash text NOT NULL,
    tool_version text NOT NULL,
    names jsonb NOT NULL,
    order_columns text[] NOT NULL,
    upper_bound text[],
    checkpoint text[],
    freeze_cap text,
    pending_rows bigint NOT NULL DEFAULT 0,
    pending_checkpoint bigint NOT NULL DEFAULT 0,
    rows_estimated bigint NOT NULL DEFAULT 0,
    rows_copied bigint NOT NULL DEFAULT 0,
    batches bigint NOT NULL DEFAULT 0,
    backfill_started_at timestamptz,
    checkpoint_at timestamptz,
    verify_checkpoint text[],
    verify_ranges bigint NOT NULL DEFAULT 0,
    verify_rows bigint NOT NULL DEFAULT 0,
    verify_differences bigint NOT NULL DEFAULT 0,
    verify_repaired bigint NOT NULL DEFAULT 0,
    verified_at timestamptz,
    trigger_errors_seen bigint NOT NULL DEFAULT 0,
    swap_attempts integer NOT NULL DEFAULT 0,
    swap_lock_ms double precision,
    swapped_at timestamptz,
    throttle text,
    last_error text,
    last_error_at timestamptz,
    worker_host text,
    worker_pid integer,
    worker_started_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    phase_started_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_schema, table_name)
);
CREATE TABLE IF NOT EXISTS {STATE_SCHEMA}.backfill_pending (
    table_schema text NOT NULL,
    table_name text NOT NULL,
    ordinal bigint NOT NULL,
    key text[] NOT NULL,
    PRIMARY KEY (table_schema, table_name, ordinal)
);
CREATE TABLE IF NOT EXISTS {STATE_SCHEMA}.trigger_error (
    id bigserial PRIMARY KEY,
    table_schema text NOT NULL,
    table_name text NOT NULL,
    occurred_at timestamptz NOT NULL DEFAULT now(),
    operation text NOT NULL,
    sqlstate text NOT NULL,
    message text NOT NULL
);
"""

# Serialises creation of the state schema between workers on different tables.
STATE_DDL_LOCK_KEY = 0x6C697665706172  # "livepar"


@dataclass
class MigrationState:
    """One row of livepart.migration, as read from the database."""

    row: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.row[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def phase_enum(self) -> Phase:
        return Phase(self.row["phase"])

    @property
    def names_map(self) -> dict[str, Any]:
        return json.loads(self.row["names"]) if isinstance(self.row["names"], str) else self.row["names"]


def definition_hash(table: Table) -> str:
    """Hash the parts of a table definition that the shadow table was built from."""
    shape = {
        "columns": [
            [c.name, c.type_sql, c.not_null, c.identity, c.generated] for c in table.columns
        ],
        "primary_key": list(table.primary_key),
    }
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


async def ensure_state_schema(conn: asyncpg.Connection) -> None:
    async with conn.transaction():
        await conn.execute("SELECT pg_catalog.pg_advisory_xact_lock($1)", STATE_DDL_LOCK_KEY)
        await conn.execute(STATE_DDL)


async def state_schema_exists(conn: asyncpg.Connection) -> bool:
    return await conn.fetchval(
        "SELECT pg_catalog.to_regclass($1) IS NOT NULL", f"{STATE_SCHEMA}.migration"
    )


async def load_state(conn: asyncpg.Connection, schema: str, table: str) -> MigrationState | None:
    if not await state_schema_exists(conn):
        return None
    row = await conn.fetchrow(
        f"SELECT * FROM {STATE_SCHEMA}.migration WHERE table_schema = $1 AND table_name = $2",
        schema,
        table,
    )
    return MigrationState(dict(row)) if row else None


async def create_state(
    conn: asyncpg.Connection,
    *,
    schema: str,
    table: str,
    settings: dict[str, Any],
    settings_hash: str,
    definition_hash_value: str,
    names: dict[str, Any],
    order_columns: list[str],
    rows_estimated: int,
) -> None:
    await conn.execute(
        f"""
        INSERT INTO {STATE_SCHEMA}.migration
            (table_schema, table_name, phase, settings, settings_hash, definition_hash,
             tool_version, names, order_columns, rows_estimated,
             worker_host, worker_pid, worker_started_at)
        VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8::jsonb, $9, $10, $11, $12, now())
        """,
        schema,
        table,
        Phase.PREPARE.value,
        json.dumps(settings),
        settings_hash,
        definition_hash_value,
        __version__,
        json.dumps(names),
        order_columns,
        rows_estimated,
        socket.gethostname(),
        os.getpid(),
    )


async def update_state(conn: asyncpg.Connection, schema: str, table: str, **values: Any) -> None:
    """Update columns of the state row; `phase` also resets phase_started_at."""
    assignments = []
    arguments: list[Any] = [schema, table]
    for column, value in values.items():
        arguments.append(value.value if isinstance(value, Phase) else value)
        assignments.append(f"{column} = ${len(arguments)}")
    if "phase" in values:
        assignments.append("phase_started_at = now()")
    assignments.append("updated_at = now()")
    await conn.execute(
        f"UPDATE {STATE_SCHEMA}.migration SET {', '.join(assignments)} "
        "WHERE table_schema = $1 AND table_name = $2",
        *arguments,
    )


async def record_error(conn: asyncpg.Connection, schema: str, table: str, message: str) -> None:
    await update_state(conn, schema, table, last_error=message[:2000], last_error_at=datetime.now().astimezone())


async def delete_state(conn: asyncpg.Connection, schema: str, table: str) -> None:
    await conn.execute(
        f"DELETE FROM {STATE_SCHEMA}.migration WHERE table_schema = $1 AND table_name = $2",
        schema,
        table,
    )
    for side_table in ("trigger_error", "backfill_pending"):
        await conn.execute(
            f"DELETE FROM {STATE_SCHEMA}.{side_table} WHERE table_schema = $1 AND table_name = $2",
            schema,
            table,
        )


async def count_trigger_errors(conn: asyncpg.Connection, schema: str, table: str) -> int:
    if not await state_schema_exists(conn):
        return 0
    return await conn.fetchval(
        f"SELECT count(*) FROM {STATE_SCHEMA}.trigger_error WHERE table_schema = $1 AND table_name = $2",
        schema,
        table,
    )


# --- one worker per table -------------------------------------------------


def _lock_key_sql() -> str:
    return "pg_catalog.hashtextextended('livepart:' || $1, 0)"


async def acquire_worker_lock(conn: asyncpg.Connection, migration_id: str) -> None:
    """Take the table's session-level advisory lock, or raise naming its holder."""
    acquired = await conn.fetchval(
        f"SELECT pg_catalog.pg_try_advisory_lock({_lock_key_sql()})", migration_id
    )
    if acquired:
        return
    holder = await conn.fetchrow(
        f"""
        WITH k AS (SELECT {_lock_key_sql()} AS key)
        SELECT a.pid, a.application_name, host(a.client_addr) AS client,
               a.backend_start
        FROM k, pg_catalog.pg_locks l
        JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
        WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
          AND l.classid::bigint = (k.key >> 32) & 4294967295
          AND l.objid::bigint = k.key & 4294967295
        """,
        migration_id,
    )
    if holder is None:
        who = "another session (it ended while this one was looking it up: try again)"
    else:
        client = holder["client"] or "local socket"
        since = holder["backend_start"].isoformat(timespec="seconds")
        who = (
            f"'{holder['application_name']}' (server pid {holder['pid']}, "
            f"client {client}, since {since})"
        )
    raise WorkerLockHeld(
        f"another livepart worker is already migrating {migration_id}: {who}; "
        "wait for it to finish or stop it, then run this command again"
    )


async def release_worker_lock(conn: asyncpg.Connection, migration_id: str) -> None:
    await conn.execute(f"SELECT pg_catalog.pg_advisory_unlock({_lock_key_sql()})", migration_id)


async def record_worker(conn: asyncpg.Connection, schema: str, table: str) -> None:
    await update_state(
        conn,
        schema,
        table,
        worker_host=socket.gethostname(),
        worker_pid=os.getpid(),
        worker_started_at=datetime.now().astimezone(),
    )
