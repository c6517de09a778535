"""The commands that act on an existing migration: verify, rollback, finalize, maintain."""

from __future__ import annotations

import asyncio

import asyncpg

from .errors import InvalidInput
from .ident import qualified
from .maintain import MaintainReport, load_target, run_maintain
from .orchestrator import adopt_settings, check_state_access, open_worker, plan_for_state
from .plan import Names
from .settings import Settings
from .state import MigrationState, Phase, count_trigger_errors, load_state, update_state
from .swap import run_finalize, run_rollback
from .verify import VerifyReport, pair_for, verify_all
from .worker import Worker


async def _existing_state(worker: Worker, explicit: set[str]) -> MigrationState:
    """Load the migration's state and take its partition key and interval into the settings."""
    settings = worker.settings
    await check_state_access(worker.db.conn)
    state = await load_state(worker.db.conn, settings.schema, settings.table)
    if state is None:
        raise InvalidInput(
            f"no migration of {qualified(settings.schema, settings.table)} found; start one with livepart run"
        )
    worker.settings = adopt_settings(state, settings, explicit)
    return state


async def verify_command(
    settings: Settings, stop: asyncio.Event, *, repair: bool, explicit: set[str] = frozenset()
) -> VerifyReport:
    async with open_worker(settings, stop) as worker:
        state = await _existing_state(worker, explicit)
        settings = worker.settings
        phase = state.phase_enum
        if phase in (Phase.PREPARE, Phase.BACKFILL):
            raise InvalidInput(
                f"the backfill of {settings.migration_id} has not finished (phase {phase.value}); "
                "verification compares complete copies: finish it with livepart run"
            )
        plan = await plan_for_state(worker, state)
        conn = worker.db.conn
        errors_at_start = await count_trigger_errors(conn, settings.schema, settings.table)
        report = await verify_all(worker, plan, pair_for(plan, phase), repair=repair)
        if report.clean and phase in (Phase.VERIFY, Phase.SWAP):
            # A clean pass covers every trigger error recorded before it began.
            async def work(connection: asyncpg.Connection) -> None:
                await update_state(connection, settings.schema, settings.table,
                                   trigger_errors_seen=errors_at_start)

            await worker.db.run("verify.errors_seen", work)
        worker.log.info("verify.done", **report.to_json())
        return report


async def rollback_command(settings: Settings, stop: asyncio.Event, *, explicit: set[str] = frozenset()) -> float:
    async with open_worker(settings, stop) as worker:
        state = await _existing_state(worker, explicit)
        if state.phase_enum == Phase.ROLLED_BACK:
            return 0.0
        if state.phase_enum != Phase.SWAPPED:
            raise InvalidInput(
                f"{settings.migration_id} cannot be rolled back in phase {state.phase}: only a swapped, "
                "not yet finalized migration can"
            )
        plan = await plan_for_state(worker, state)
        return await run_rollback(worker, plan)


async def finalize_command(
    settings: Settings, stop: asyncio.Event, *, drop_old: bool, explicit: set[str] = frozenset()
) -> None:
    async with open_worker(settings, stop) as worker:
        state = await _existing_state(worker, explicit)
        if state.phase_enum not in (Phase.SWAPPED, Phase.FINALIZED):
            raise InvalidInput(
                f"{settings.migration_id} cannot be finalized in phase {state.phase}: swap it first "
                "with livepart run"
            )
        names = Names.from_json(state.names_map)
        plan = await plan_for_state(worker, state) if state.phase_enum == Phase.SWAPPED else None
        if plan is None:
            if drop_old:
                async def drop(conn: asyncpg.Connection) -> None:
                    await conn.execute(f"DROP TABLE IF EXISTS {qualified(settings.schema, names.old)}")

                await worker.db.run("finalize.drop_old", drop)
            return
        await run_finalize(worker, plan, drop_old=drop_old)


async def maintain_command(
    settings: Settings, stop: asyncio.Event, *, explicit: set[str] = frozenset()
) -> MaintainReport:
    """Maintain the migration's partitioned table, or any range-partitioned --table."""
    async with open_worker(settings, stop) as worker:
        await check_state_access(worker.db.conn)
        state = await load_state(worker.db.conn, settings.schema, settings.table)
        parent = settings.table
        if state is None and "interval" not in explicit:
            raise InvalidInput(
                f"{qualified(settings.schema, settings.table)} was not migrated by livepart, so its partition "
                "width is unknown: pass --interval (day, week, month, or a whole number)"
            )
        if state is not None:
            settings = worker.settings = adopt_settings(state, settings, explicit)
            names = Names.from_json(state.names_map)
            if state.phase_enum not in (Phase.SWAPPED, Phase.FINALIZED):
                parent = names.shadow
        if state is not None and state.phase_enum == Phase.PREPARE:
            raise InvalidInput(f"{settings.migration_id} is still being prepared; run livepart run first")
        target = await load_target(worker.db.conn, settings.schema, parent, settings.table)
        return await run_maintain(worker, target, settings.interval, settings.future_partitions)
