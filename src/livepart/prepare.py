"""Phase 2, prepare: build the partitioned shadow table and install the dual-write trigger.

Every step is idempotent. The shadow table, its indexes and its default
partition are created in one transaction. The range partitions follow in
small transactions, and each one whose name already exists is skipped. The
trigger install commits together with the move to the backfill phase.
"""

from __future__ import annotations

import asyncpg

from . import ddl
from .catalog import partition_bounds, relation_exists
from .errors import StateMismatch
from .ident import qualified, quote_ident
from .catalog import Table
from .plan import Names, Plan, forward_trigger_spec, shadow_statements
from .state import STATE_SCHEMA, Phase, delete_state, update_state
from .trigger import drop_statements, install_statements
from .worker import Worker

PARTITIONS_PER_TRANSACTION = 50


async def run_prepare(worker: Worker, plan: Plan) -> None:
    await create_shadow(worker, plan)
    await create_partitions(worker, plan)
    await grant_state_access(worker, plan.table.owner)
    await worker.pause_point("prepare.before_trigger")
    await install_forward_trigger(worker, plan)


async def create_shadow(worker: Worker, plan: Plan) -> None:
    statements = shadow_statements(plan)
    table = plan.table

    async def work(conn: asyncpg.Connection) -> None:
        async with conn.transaction():
            if await relation_exists(conn, table.schema, plan.names.shadow):
                await _check_is_partitioned(conn, table.schema, plan.names.shadow)
                return
            for statement in statements:
                await conn.execute(statement.sql)
            await _set_owner(conn, table.schema, plan.names.shadow, table.owner)
            await _set_owner(conn, table.schema, plan.names.default_partition, table.owner)

    await worker.db.run("prepare.shadow", work)
    worker.log.info("prepare.shadow_ready", shadow=plan.names.shadow)


async def create_partitions(worker: Worker, plan: Plan) -> None:
    """Create the missing range partitions of the shadow, a few per transaction."""
    table = plan.table
    pending = list(plan.partitions)
    created = 0
    while pending:
        chunk, pending = pending[:PARTITIONS_PER_TRANSACTION], pending[PARTITIONS_PER_TRANSACTION:]

        async def work(conn: asyncpg.Connection, chunk=chunk) -> int:
            count = 0
            async with conn.transaction():
                existing = {name for name, _ in await partition_bounds(conn, table.schema, plan.names.shadow)}
                for spec in chunk:
                    if spec.name in existing:
                        continue
                    await conn.execute(
                        ddl.partition_sql(table.schema, plan.names.shadow, spec, spec.name, table.reloptions)
                    )
                    await _set_owner(conn, table.schema, spec.name, table.owner)
                    count += 1
            return count

        created += await worker.db.run("prepare.partitions", work)
    worker.log.info("prepare.partitions_ready", created=created, planned=len(plan.partitions))


async def grant_state_access(worker: Worker, owner: str) -> None:
    """Let the trigger functions, which run as the table owner, record their errors."""

    async def work(conn: asyncpg.Connection) -> None:
        if owner == await conn.fetchval("SELECT current_user::text"):
            return
        role = quote_ident(owner)
        async with conn.transaction():
            await conn.execute(f"GRANT USAGE ON SCHEMA {STATE_SCHEMA} TO {role}")
            await conn.execute(f"GRANT INSERT ON {STATE_SCHEMA}.trigger_error TO {role}")
            await conn.execute(f"GRANT USAGE ON SEQUENCE {STATE_SCHEMA}.trigger_error_id_seq TO {role}")

    await worker.db.run("prepare.grants", work)


async def install_forward_trigger(worker: Worker, plan: Plan, *, replace: bool = False) -> None:
    """Install the dual-write trigger and move to the backfill phase, in one transaction.

    CREATE TRIGGER waits for SHARE ROW EXCLUSIVE on the old table, so every
    write already in flight finishes first and every later write fires the
    trigger. The wait is bounded by lock_timeout and retried. With `replace`,
    existing triggers are dropped first. Without it, a retry after a commit whose
    acknowledgement was lost finds the phase already moved on and does nothing.
    """
    spec = plan.forward_trigger()
    statements = (drop_statements(spec) if replace else []) + install_statements(spec, plan.table.owner)

    async def work(conn: asyncpg.Connection) -> None:
        async with conn.transaction():
            phase = await conn.fetchval(
                f"SELECT phase FROM {STATE_SCHEMA}.migration WHERE table_schema = $1 AND table_name = $2 "
                "FOR UPDATE",
                plan.table.schema, plan.table.name,
            )
            if phase != Phase.PREPARE.value and not replace:
                return
            for sql in statements:
                await conn.execute(sql)
            await update_state(conn, plan.table.schema, plan.table.name, phase=Phase.BACKFILL)

    await worker.db.run("prepare.trigger", work)
    worker.log.info("prepare.trigger_installed", table=plan.table.name)


async def _set_owner(conn: asyncpg.Connection, schema: str, name: str, owner: str) -> None:
    current = await conn.fetchval("SELECT current_user::text")
    if current != owner:
        await conn.execute(f"ALTER TABLE {qualified(schema, name)} OWNER TO {quote_ident(owner)}")


async def _check_is_partitioned(conn: asyncpg.Connection, schema: str, name: str) -> None:
    kind = await conn.fetchval(
        """
        SELECT c.relkind::text FROM pg_catalog.pg_class c
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = $1 AND c.relname = $2
        """,
        schema,
        name,
    )
    if kind != "p":
        raise StateMismatch(
            f"{qualified(schema, name)} exists but is not a partitioned table; livepart did not create "
            "it: rename or drop it, then run again with --restart"
        )


async def discard_migration(worker: Worker, names: Names, table: Table) -> None:
    """Drop what prepare created (trigger, functions, shadow table) and the state row."""
    spec = forward_trigger_spec(table, names, [])

    async def work(conn: asyncpg.Connection) -> None:
        async with conn.transaction():
            for sql in drop_statements(spec):
                await conn.execute(sql)
            await conn.execute(f"DROP TABLE IF EXISTS {qualified(table.schema, names.shadow)}")
            await delete_state(conn, table.schema, names.table)

    await worker.db.run("restart.discard", work)
