"""The migration as a persisted state machine: plan, prepare, backfill, verify, swap.

`run_migration` reads as the list of phases. Each phase is idempotent and
persists the next phase when it ends, so running the same command again after
any interruption continues where the last run stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import structlog

from . import __version__
from .backfill import run_backfill
from .catalog import load_table, partition_bounds, relation_exists
from .db import Database, describe_error
from .errors import Interrupted, InvalidInput, LivepartError, StateMismatch
from .ident import qualified, quote_ident
from .plan import Names, Plan, build_plan
from .prepare import discard_migration, install_forward_trigger, run_prepare
from .settings import Settings
from .state import (
    TERMINAL_PHASES,
    MigrationState,
    Phase,
    acquire_worker_lock,
    create_state,
    definition_hash,
    ensure_state_schema,
    load_state,
    record_error,
    record_worker,
    release_worker_lock,
    update_state,
)
from .swap import check_forward_trigger, run_swap
from .verify import run_verify_phase
from .worker import Worker


@dataclass
class RunResult:
    phase: Phase
    rows_copied: int
    swap_lock_ms: float | None
    already_done: bool


@contextlib.asynccontextmanager
async def open_worker(settings: Settings, stop: asyncio.Event | None = None) -> AsyncIterator[Worker]:
    """Connect, take the table's worker lock, and always release both."""
    stop = stop or asyncio.Event()
    log = structlog.get_logger().bind(migration=settings.migration_id)

    async def take_lock(conn: asyncpg.Connection) -> None:
        if int(await conn.fetchval("SHOW server_version_num")) >= 140000:
            # A killed worker's backend notices the closed socket within a second even
            # in the middle of a statement, so its row locks and worker lock go away.
            await conn.execute("SET client_connection_check_interval = 1000")
        await acquire_worker_lock(conn, settings.migration_id)

    db = Database(settings.dsn, lock_timeout_ms=settings.lock_timeout_ms, retries=settings.retries,
                  stop=stop, on_connect=take_lock)
    await db.open()
    worker = Worker(settings=settings, db=db, stop=stop, log=log)
    try:
        yield worker
    finally:
        with contextlib.suppress(Exception):
            if db.is_open:
                await release_worker_lock(db.conn, settings.migration_id)
        await db.close()


async def run_migration(settings: Settings, stop: asyncio.Event | None = None) -> RunResult:
    async with open_worker(settings, stop) as worker:
        state, plan = await start_or_resume(worker)
        already_done = state.phase_enum in TERMINAL_PHASES
        try:
            while state.phase_enum not in TERMINAL_PHASES:
                phase = state.phase_enum
                worker.log.info("phase.start", phase=phase.value)
                await worker.pause_point(f"phase.{phase.value}")
                if phase == Phase.PREPARE:
                    await run_prepare(worker, plan)
                elif phase == Phase.BACKFILL:
                    await run_backfill(worker, plan, state)
                elif phase in (Phase.VERIFY, Phase.ROLLED_BACK):
                    await _set_phase(worker, Phase.VERIFY)
                    await run_verify_phase(worker, plan, state)
                elif phase == Phase.SWAP:
                    await run_swap(worker, plan)
                state = await _reload(worker)
            if not already_done:
                await _clear_error(worker)
        except Interrupted:
            raise
        except (LivepartError, asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as error:
            await _save_error(worker, error)
            raise
        return RunResult(state.phase_enum, state.rows_copied, state.swap_lock_ms, already_done)


async def start_or_resume(worker: Worker) -> tuple[MigrationState, Plan | None]:
    """Return the state and plan, creating both for a new migration (after preflight)."""
    settings = worker.settings
    conn = worker.db.conn
    await check_state_access(conn)
    state = await load_state(conn, settings.schema, settings.table)
    if state is not None and settings.restart:
        await _restart(worker, state)
        state = None
    if state is None:
        plan = await build_plan(conn, settings)
        plan.raise_on_failure()
        await ensure_state_schema(conn)
        await create_state(
            conn,
            schema=settings.schema,
            table=settings.table,
            settings=settings.public_dict(),
            settings_hash=settings.identity_hash(),
            definition_hash_value=definition_hash(plan.table),
            names=plan.names.to_json(),
            order_columns=plan.order_columns,
            rows_estimated=plan.table.estimated_rows,
        )
        worker.log.info("migration.created", partitions=len(plan.partitions), order=plan.order_columns,
                        version=__version__)
        return await _reload(worker), plan

    check_settings(state, settings)
    await record_worker(conn, settings.schema, settings.table)
    if state.phase_enum in TERMINAL_PHASES:
        worker.log.info("migration.already_done", phase=state.phase)
        return state, None
    plan = await plan_for_state(worker, state)
    await check_catalog(worker, plan, state)
    worker.log.info("migration.resume", phase=state.phase, rows_copied=state.rows_copied)
    return state, plan


def stored_settings(state: MigrationState) -> dict:
    return json.loads(state.settings) if isinstance(state.settings, str) else state.settings


def check_settings(state: MigrationState, settings: Settings) -> None:
    """Stop `run` when the migration in progress was started with other settings."""
    if state.settings_hash == settings.identity_hash():
        return
    stored = stored_settings(state)
    changed = [
        f"{name} {stored.get(name)!r} -> {value!r}"
        for name, value in settings.identity().items()
        if stored.get(name) != value
    ]
    raise InvalidInput(
        f"the migration of {settings.migration_id} was started with other settings "
        f"({', '.join(changed)}); run it with the same settings, or pass --restart to discard it "
        "and start over"
    )


def adopt_settings(state: MigrationState, settings: Settings, explicit: set[str]) -> Settings:
    """Take partition key and interval from the migration in progress unless given on the command line."""
    stored = stored_settings(state)
    adopted = {}
    for name in ("partition_key", "interval"):
        if name not in explicit:
            adopted[name] = stored[name]
        elif stored[name] != getattr(settings, name):
            option = "--" + name.replace("_", "-")
            raise InvalidInput(
                f"the migration of {settings.migration_id} uses {option} {stored[name]}, not "
                f"{getattr(settings, name)}; leave {option} out or pass {stored[name]}"
            )
    return dataclasses.replace(settings, **adopted)


async def check_state_access(conn: asyncpg.Connection) -> None:
    """Turn a missing privilege on livepart's own schema into one clear line."""
    row = await conn.fetchrow(
        """
        SELECT pg_catalog.pg_get_userbyid(n.nspowner) AS owner,
               pg_catalog.has_schema_privilege(n.oid, 'USAGE')
               AND pg_catalog.has_schema_privilege(n.oid, 'CREATE') AS schema_ok,
               pg_catalog.has_schema_privilege(n.oid, 'USAGE') AND (
                   pg_catalog.to_regclass('livepart.migration') IS NULL
                   OR pg_catalog.has_table_privilege('livepart.migration', 'SELECT, INSERT, UPDATE, DELETE'))
                   AS table_ok
        FROM pg_catalog.pg_namespace n WHERE n.nspname = 'livepart'
        """
    )
    if row is not None and not (row["schema_ok"] and row["table_ok"]):
        raise InvalidInput(
            f"the current user cannot use the livepart schema (owner {quote_ident(row['owner'])}); connect "
            "as the role that started the migration, or grant USAGE and CREATE on schema livepart and "
            "all privileges on its tables"
        )


async def plan_for_state(worker: Worker, state: MigrationState) -> Plan:
    """Rebuild the plan of an existing migration, with the names it persisted."""
    settings = worker.settings
    names = Names.from_json(state.names_map)
    if state.phase_enum in (Phase.SWAPPED, Phase.FINALIZED):
        return await _plan_after_swap(worker, state, names)
    plan = await build_plan(worker.db.conn, settings, resuming=True)
    plan.raise_on_failure()
    if definition_hash(plan.table) != state.definition_hash:
        raise InvalidInput(
            f"the definition of {qualified(settings.schema, settings.table)} changed since the "
            "migration started (columns, types or primary key); pass --restart to start over"
        )
    current_indexes = set(plan.names.indexes)
    if current_indexes != set(names.indexes):
        added = sorted(current_indexes - set(names.indexes))
        removed = sorted(set(names.indexes) - current_indexes)
        raise InvalidInput(
            f"the indexes of {qualified(settings.schema, settings.table)} changed since the migration "
            f"started (added: {added or 'none'}, removed: {removed or 'none'}); undo the change or pass "
            "--restart to start over"
        )
    plan.names = names
    plan.order_columns = list(state.order_columns)
    return plan


async def _plan_after_swap(worker: Worker, state: MigrationState, names: Names) -> Plan:
    """After the swap the old table carries the suffix; plan from it under the canonical name."""
    settings = worker.settings
    conn = worker.db.conn
    old = await load_table(conn, settings.schema, names.old)
    if old is None:
        raise StateMismatch(
            f"{qualified(settings.schema, names.old)} no longer exists (it was dropped after the swap)"
        )
    table = dataclasses.replace(old, name=names.table)
    key = table.column(settings.partition_key)
    return Plan(
        settings=settings, table=table, key=key, names=names, partitions=[], partition_count=0,
        minimum=None, maximum=None, order_columns=list(state.order_columns),
        shadow_primary_key=list(table.primary_key) + ([key.name] if key.name not in table.primary_key else []),
        checks=[], server_version=await conn.fetchval("SHOW server_version"),
    )


async def check_catalog(worker: Worker, plan: Plan, state: MigrationState) -> None:
    """On resume, confirm that the objects the state records exist and are intact."""
    if state.phase_enum == Phase.PREPARE:
        return
    conn = worker.db.conn
    schema, names = plan.table.schema, plan.names
    shadow = qualified(schema, names.shadow)
    key = await conn.fetchval(
        """
        SELECT a.attname::text FROM pg_catalog.pg_partitioned_table p
        JOIN pg_catalog.pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = p.partattrs[0]
        WHERE p.partrelid = pg_catalog.to_regclass($1)
        """,
        shadow,
    )
    if key is None:
        raise StateMismatch(
            f"the state says phase {state.phase} but the partitioned table {shadow} is missing; "
            "run again with --restart to start over"
        )
    if key != plan.key.name:
        raise StateMismatch(f"{shadow} is partitioned by {quote_ident(key)}, not by "
                            f"{quote_ident(plan.key.name)}; run again with --restart")
    partitions = {name for name, _ in await partition_bounds(conn, schema, names.shadow)}
    if names.default_partition not in partitions:
        raise StateMismatch(f"the default partition {qualified(schema, names.default_partition)} is "
                            "missing; create it again or run with --restart")
    problems = await check_forward_trigger(conn, plan.forward_trigger(), schema, names.table)
    if problems and not worker.settings.reinstall_trigger:
        raise StateMismatch(
            f"the dual-write trigger on {qualified(schema, names.table)} was changed while livepart was "
            f"not running ({'; '.join(problems)}): writes made meanwhile may be missing from {shadow}. "
            "Run again with --reinstall-trigger to reinstall it and verify every range before the swap, "
            "or with --restart to start over"
        )
    if problems:
        await _reinstall_trigger(worker, plan, state)


async def _reinstall_trigger(worker: Worker, plan: Plan, state: MigrationState) -> None:
    worker.log.warning("trigger.reinstall", phase=state.phase)
    next_phase = Phase.BACKFILL if state.phase_enum == Phase.BACKFILL else Phase.VERIFY

    async def reset(conn: asyncpg.Connection) -> None:
        await update_state(conn, plan.table.schema, plan.table.name, verify_checkpoint=None)

    await worker.db.run("trigger.reset", reset)
    await install_forward_trigger(worker, plan, replace=True)  # sets the phase to backfill
    if next_phase != Phase.BACKFILL:
        await _set_phase(worker, next_phase)


async def _restart(worker: Worker, state: MigrationState) -> None:
    """Discard an unfinished migration: trigger, shadow table and state."""
    settings = worker.settings
    if state.phase_enum in TERMINAL_PHASES:
        raise InvalidInput(
            f"the migration of {settings.migration_id} already swapped the tables; --restart cannot "
            "discard it: use livepart rollback, or livepart finalize"
        )
    probe = await build_plan(worker.db.conn, dataclasses.replace(settings, restart=False), resuming=True)
    probe.raise_on_failure()
    await discard_migration(worker, Names.from_json(state.names_map), probe.table)
    worker.log.warning("migration.discarded", phase=state.phase)


async def _set_phase(worker: Worker, phase: Phase) -> None:
    async def work(conn: asyncpg.Connection) -> None:
        await update_state(conn, worker.schema, worker.table, phase=phase)

    await worker.db.run("state.phase", work)


async def _reload(worker: Worker) -> MigrationState:
    async def work(conn: asyncpg.Connection) -> MigrationState:
        state = await load_state(conn, worker.schema, worker.table)
        if state is None:
            raise StateMismatch(f"the state row of {worker.settings.migration_id} disappeared")
        return state

    return await worker.db.run("state.load", work)


async def _clear_error(worker: Worker) -> None:
    async def work(conn: asyncpg.Connection) -> None:
        await update_state(conn, worker.schema, worker.table, last_error=None, last_error_at=None)

    await worker.db.run("state.clear_error", work)


async def _save_error(worker: Worker, error: BaseException) -> None:
    """Record the error in the state row; a failure to do so must not hide the error."""
    message = str(error) if isinstance(error, LivepartError) else describe_error(error)
    with contextlib.suppress(Exception):
        async def work(conn: asyncpg.Connection) -> None:
            if await relation_exists(conn, "livepart", "migration"):
                await record_error(conn, worker.schema, worker.table, message)

        await asyncio.wait_for(worker.db.run("state.error", work, attempts=2), timeout=15)
