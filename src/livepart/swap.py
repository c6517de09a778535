"""Phase 5 and 6: swap the names in one short transaction; roll back; finalize.

Everything expensive happened before. Under the lock the swap only asserts
(phase, trigger present and enabled, no unverified trigger errors) and
renames. The old table and its indexes take a suffix and the new table and its
indexes take the canonical names. Views are re-pointed, and grants and
sequence ownership move to the new table. The forward trigger is dropped and
the reverse trigger is installed, which keeps the old table in sync for a
rollback. Lock waits are bounded by lock_timeout and retried with jittered
backoff. A failed attempt rolls back and leaves every name as it was.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import asyncpg

from . import ddl
from .catalog import ENABLED_TRIGGER_FLAGS, Table, load_table, relation_exists, trigger_state
from .errors import LivepartError, StateMismatch
from .ident import derived_name, qualified, quote_ident, quote_literal
from .plan import NEW_SUFFIX, Names, Plan, forward_trigger_spec, reverse_trigger_spec, view_definitions
from .state import STATE_SCHEMA, Phase, count_trigger_errors, load_state, update_state
from .trigger import EVENTS, TriggerSpec, drop_statements, install_statements, trigger_name
from .worker import Worker

@dataclass(frozen=True)
class Renames:
    """Ordered renames for one direction of the exchange."""

    tables: list[tuple[str, str]]
    indexes: list[tuple[str, str]]
    sequences: list[tuple[str, str]]  # (qualified current name, new name)


def forward_renames(names: Names, schema: str, shadow_sequences: dict[str, str]) -> Renames:
    old_index = [(names.primary_key, names.primary_key_old)]
    old_index += [(canonical, old) for canonical, (_, old) in names.indexes.items()]
    new_index = [(names.primary_key_temporary, names.primary_key)]
    new_index += [(temporary, canonical) for canonical, (temporary, _) in names.indexes.items()]
    sequences = [(qualified(schema, canonical), old) for canonical, old in names.identity_sequences.values()]
    sequences += [
        (shadow_sequences[column], canonical)
        for column, (canonical, _) in names.identity_sequences.items()
        if column in shadow_sequences
    ]
    return Renames(
        tables=[(names.table, names.old), (names.shadow, names.table)],
        indexes=old_index + new_index,
        sequences=sequences,
    )


def backward_renames(names: Names, schema: str) -> Renames:
    live_index = [(names.primary_key, names.primary_key_temporary)]
    live_index += [(canonical, temporary) for canonical, (temporary, _) in names.indexes.items()]
    old_index = [(names.primary_key_old, names.primary_key)]
    old_index += [(old, canonical) for canonical, (_, old) in names.indexes.items()]
    sequences = [
        (qualified(schema, canonical), derived_name(canonical, NEW_SUFFIX))
        for canonical, _ in names.identity_sequences.values()
    ]
    sequences += [(qualified(schema, old), canonical) for canonical, old in names.identity_sequences.values()]
    return Renames(
        tables=[(names.table, names.shadow), (names.old, names.table)],
        indexes=live_index + old_index,
        sequences=sequences,
    )


def rename_statements(schema: str, renames: Renames) -> list[str]:
    """Rename tables, indexes and sequences; the first table's objects move out of the way first."""
    statements = [ddl.rename_table_sql(schema, *renames.tables[0])]
    half = len(renames.indexes) // 2
    statements += [ddl.rename_index_sql(schema, a, b) for a, b in renames.indexes[:half]]
    statements += [ddl.rename_sequence_sql(a, b) for a, b in renames.sequences[: len(renames.sequences) // 2]]
    statements.append(ddl.rename_table_sql(schema, *renames.tables[1]))
    statements += [ddl.rename_index_sql(schema, a, b) for a, b in renames.indexes[half:]]
    statements += [ddl.rename_sequence_sql(a, b) for a, b in renames.sequences[len(renames.sequences) // 2:]]
    return statements


def view_statements(views: list[tuple[str, str, tuple[str, ...]]]) -> list[str]:
    """Re-create views from definitions captured before the rename, so they bind to the new table."""
    statements = []
    for name, definition, options in views:
        with_options = f" WITH ({', '.join(options)})" if options else ""
        statements.append(f"CREATE OR REPLACE VIEW {name}{with_options} AS {definition.rstrip().rstrip(';')}")
    return statements


def sequence_owner_statements(table: Table, target: str) -> list[str]:
    """Move serial sequences to the table now carrying the canonical name."""
    return [
        f"ALTER SEQUENCE {sequence.qualified_name} OWNED BY {qualified(table.schema, target)}."
        f"{quote_ident(sequence.column)}"
        for sequence in table.sequences
        if sequence.dependency == "a"
    ]


def swap_statements(plan: Plan) -> list[ddl.Statement]:
    """Build the swap transaction's statements as `livepart plan` prints them."""
    table, names = plan.table, plan.names
    live = qualified(table.schema, names.table)
    lock = f"ACCESS EXCLUSIVE on {live} and the new table, bounded by lock_timeout, retried"
    predicted = {
        column: qualified(table.schema, derived_name(f"{names.shadow}_{column}", "_seq"))
        for column in names.identity_sequences
    }
    sql = [
        f"LOCK TABLE {live} IN ACCESS EXCLUSIVE MODE",
        f"LOCK TABLE {qualified(table.schema, names.shadow)} IN ACCESS EXCLUSIVE MODE",
        "-- assert: phase is swap, forward trigger present and enabled, no unverified trigger errors",
    ]
    sql += drop_statements(plan.forward_trigger())
    sql += rename_statements(table.schema, forward_renames(names, table.schema, predicted))
    sql += [
        f"SELECT pg_catalog.setval({quote_literal(qualified(table.schema, canonical))}::regclass, s.last_value, "
        f"s.is_called) FROM {qualified(table.schema, old)} AS s"
        for canonical, old in names.identity_sequences.values()
    ]
    sql += sequence_owner_statements(table, names.table)
    sql += view_statements(plan.view_definitions)
    sql += ddl.grant_sql(table, names.table)
    sql += install_statements(plan.reverse_trigger(), table.owner)
    sql.append("COMMIT")
    return [ddl.Statement(statement, lock) for statement in sql]


async def check_forward_trigger(conn: asyncpg.Connection, spec: TriggerSpec, schema: str, table: str) -> list[str]:
    """Return the forward triggers that are missing or disabled."""
    problems = []
    for event in EVENTS:
        name = trigger_name(spec, event)
        flag = await trigger_state(conn, schema, table, name)
        if flag is None:
            problems.append(f"{name} is missing")
        elif flag not in ENABLED_TRIGGER_FLAGS:
            problems.append(f"{name} is disabled")
    return problems


async def swap_committed(conn: asyncpg.Connection, plan: Plan) -> bool:
    """Read the catalog and the state to learn whether an earlier swap attempt committed."""
    schema, names = plan.table.schema, plan.names
    kind = await conn.fetchval(
        """
        SELECT c.relkind::text FROM pg_catalog.pg_class c
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = $1 AND c.relname = $2
        """,
        schema,
        names.table,
    )
    renamed = kind == "p" and await relation_exists(conn, schema, names.old)
    state = await load_state(conn, schema, names.table)
    recorded = state is not None and state.phase_enum in (Phase.SWAPPED, Phase.FINALIZED)
    if renamed != recorded:
        raise StateMismatch(
            f"the catalog says the swap of {qualified(schema, names.table)} "
            f"{'committed' if renamed else 'did not commit'} but the state says phase "
            f"{state.phase if state else 'unknown'}; inspect both before running again"
        )
    return renamed


async def lock_holders(conn: asyncpg.Connection, relation: str) -> list[dict]:
    """Return the sessions that hold locks on the table, oldest transaction first, without query text."""
    rows = await conn.fetch(
        """
        SELECT a.pid, a.state, l.mode,
               extract(epoch FROM now() - a.xact_start)::int AS transaction_seconds
        FROM pg_catalog.pg_locks l
        JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
        WHERE l.relation = $1::regclass AND l.granted AND a.pid <> pg_catalog.pg_backend_pid()
        ORDER BY a.xact_start NULLS LAST LIMIT 5
        """,
        relation,
    )
    return [dict(r) for r in rows]


def describe_holders(holders: list[dict]) -> str:
    if not holders:
        return "no session holds a lock on it any more"
    return ", ".join(
        f"pid {h['pid']} ({h['state']}, {h['mode']}, transaction open {h['transaction_seconds']} s)"
        for h in holders
    )


async def run_swap(worker: Worker, plan: Plan) -> float:
    """Exchange the names; return how long the ACCESS EXCLUSIVE lock was held, in ms."""
    table, names = plan.table, plan.names
    schema = table.schema
    live = qualified(schema, names.table)
    shadow = qualified(schema, names.shadow)
    forward = plan.forward_trigger()
    held: dict[str, float] = {}

    async def attempt(conn: asyncpg.Connection) -> None:
        if await swap_committed(conn, plan):
            worker.log.info("swap.already_committed")
            return
        fresh = await load_table(conn, schema, names.table) or table
        try:
            async with conn.transaction():
                await conn.execute(f"LOCK TABLE {live} IN ACCESS EXCLUSIVE MODE")
                locked_at = time.monotonic()
                await conn.execute(f"LOCK TABLE {shadow} IN ACCESS EXCLUSIVE MODE")
                worker.log.info("swap.lock_acquired")
                await _assert_ready(conn, plan, forward)
                views = await view_definitions(conn, fresh)
                shadow_sequences = await _identity_sequences(conn, schema, names.shadow, names)
                await worker.pause_point("swap.locked")
                for sql in drop_statements(forward):
                    await conn.execute(sql)
                for sql in rename_statements(schema, forward_renames(names, schema, shadow_sequences)):
                    await conn.execute(sql)
                await _carry_identity_values(conn, schema, names, from_table=names.old, to_table=names.table)
                for sql in sequence_owner_statements(fresh, names.table):
                    await conn.execute(sql)
                for sql in view_statements(views):
                    await conn.execute(sql)
                for sql in ddl.grant_sql(fresh, names.table):
                    await conn.execute(sql)
                for sql in install_statements(reverse_trigger_spec(fresh, names), fresh.owner):
                    await conn.execute(sql)
                await update_state(conn, schema, names.table, phase=Phase.SWAPPED,
                                   swapped_at=await conn.fetchval("SELECT now()"))
                await worker.pause_point("swap.before_commit")
            held["ms"] = (time.monotonic() - locked_at) * 1000
            await worker.pause_point("swap.after_commit")
        except asyncpg.LockNotAvailableError:
            worker.log.warning("swap.lock_blocked", sessions=await lock_holders(conn, live))
            raise

    try:
        await worker.db.run("swap", attempt, attempts=worker.settings.swap_attempts)
    except asyncpg.LockNotAvailableError:
        holders = await worker.db.run("swap.holders", lambda conn: lock_holders(conn, live))
        raise LivepartError(
            f"the swap could not lock {live} within --lock-timeout {worker.settings.lock_timeout:g} s in "
            f"{worker.settings.swap_attempts} attempts; holding locks: {describe_holders(holders)}. "
            "End those transactions or run again later: the migration is verified and waits for the swap"
        ) from None
    lock_ms = held.get("ms")

    async def record(conn: asyncpg.Connection) -> None:
        await update_state(conn, schema, names.table, swap_lock_ms=lock_ms)

    if lock_ms is not None:
        await worker.db.run("swap.record", record)
    worker.log.info("swap.done", lock_ms=round(lock_ms, 1) if lock_ms is not None else None)
    return lock_ms or 0.0


async def _assert_ready(conn: asyncpg.Connection, plan: Plan, forward: TriggerSpec) -> None:
    schema, names = plan.table.schema, plan.names
    state = await conn.fetchrow(
        f"SELECT phase, trigger_errors_seen FROM {STATE_SCHEMA}.migration "
        "WHERE table_schema = $1 AND table_name = $2 FOR UPDATE",
        schema,
        names.table,
    )
    if state is None or state["phase"] != Phase.SWAP.value:
        raise StateMismatch(
            f"swap of {qualified(schema, names.table)} refused: phase is "
            f"{state['phase'] if state else 'missing'}, expected swap (verified)"
        )
    problems = await check_forward_trigger(conn, forward, schema, names.table)
    if problems:
        raise StateMismatch(
            f"swap refused: the dual-write trigger on {qualified(schema, names.table)} is not intact "
            f"({'; '.join(problems)}), so writes may be missing from the new table: run with --restart"
        )
    errors = await count_trigger_errors(conn, schema, names.table)
    if errors != state["trigger_errors_seen"]:
        raise StateMismatch(
            f"swap refused: {errors - state['trigger_errors_seen']} trigger errors were recorded after "
            "the last verification; run livepart verify --repair, then run again"
        )


async def _identity_sequences(conn: asyncpg.Connection, schema: str, table: str, names: Names) -> dict[str, str]:
    """Map identity columns to the qualified sequence names of `table`."""
    result = {}
    for column in names.identity_sequences:
        sequence = await conn.fetchval(
            "SELECT pg_catalog.pg_get_serial_sequence($1, $2)", qualified(schema, table), column
        )
        if sequence:
            result[column] = sequence
    return result


async def _carry_identity_values(
    conn: asyncpg.Connection, schema: str, names: Names, *, from_table: str, to_table: str
) -> None:
    """Continue each identity sequence where the other table's sequence stopped."""
    source = await _identity_sequences(conn, schema, from_table, names)
    target = await _identity_sequences(conn, schema, to_table, names)
    for column, sequence in source.items():
        if column not in target:
            continue
        await conn.execute(
            f"SELECT pg_catalog.setval($1::regclass, s.last_value, s.is_called) FROM {sequence} AS s",
            target[column],
        )


async def run_rollback(worker: Worker, plan: Plan) -> float:
    """Swap back: the old table takes the canonical names again and the forward trigger returns."""
    table, names = plan.table, plan.names
    schema = table.schema
    live = qualified(schema, names.table)
    old = qualified(schema, names.old)
    held: dict[str, float] = {}

    async def attempt(conn: asyncpg.Connection) -> None:
        state = await load_state(conn, schema, names.table)
        if state is not None and state.phase_enum == Phase.ROLLED_BACK:
            return
        fresh = await load_table(conn, schema, names.old) or table
        current_live = await load_table(conn, schema, names.table)
        async with conn.transaction():
            await conn.execute(f"LOCK TABLE {live} IN ACCESS EXCLUSIVE MODE")
            locked_at = time.monotonic()
            await conn.execute(f"LOCK TABLE {old} IN ACCESS EXCLUSIVE MODE")
            views = await view_definitions(conn, current_live) if current_live else []
            for sql in drop_statements(reverse_trigger_spec(table, names)):
                await conn.execute(sql)
            for sql in rename_statements(schema, backward_renames(names, schema)):
                await conn.execute(sql)
            await _carry_identity_values(conn, schema, names, from_table=names.shadow, to_table=names.table)
            for sql in sequence_owner_statements(current_live or table, names.table):
                await conn.execute(sql)
            for sql in view_statements(views):
                await conn.execute(sql)
            forward = forward_trigger_spec(fresh, names, plan.shadow_primary_key)
            for sql in install_statements(forward, fresh.owner):
                await conn.execute(sql)
            await update_state(conn, schema, names.table, phase=Phase.ROLLED_BACK, swapped_at=None)
        held["ms"] = (time.monotonic() - locked_at) * 1000

    await worker.db.run("rollback", attempt, attempts=worker.settings.swap_attempts)
    worker.log.info("rollback.done", lock_ms=round(held.get("ms", 0.0), 1))
    return held.get("ms", 0.0)


async def run_finalize(worker: Worker, plan: Plan, *, drop_old: bool) -> None:
    """Drop the reverse trigger and, on request, the old table."""
    table, names = plan.table, plan.names
    schema = table.schema

    async def work(conn: asyncpg.Connection) -> None:
        async with conn.transaction():
            for sql in drop_statements(reverse_trigger_spec(table, names)):
                await conn.execute(sql)
            if drop_old and await relation_exists(conn, schema, names.old):
                await conn.execute(f"DROP TABLE {qualified(schema, names.old)}")
            await update_state(conn, schema, names.table, phase=Phase.FINALIZED)

    await worker.db.run("finalize", work, attempts=worker.settings.swap_attempts)
    worker.log.info("finalize.done", dropped_old_table=drop_old)
