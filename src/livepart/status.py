"""`livepart status`: a migration's progress and health, read from its state row and the catalog."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import asyncpg

from .catalog import ENABLED_TRIGGER_FLAGS, trigger_state
from .plan import Names
from .state import Phase, count_trigger_errors, load_state
from .trigger import EVENTS

async def collect_status(conn: asyncpg.Connection, schema: str, table: str) -> dict[str, Any]:
    state = await load_state(conn, schema, table)
    if state is None:
        return {"migration": f"{schema}.{table}", "phase": None}
    now = datetime.now(timezone.utc)
    names = Names.from_json(state.names_map)
    phase = state.phase_enum

    rate = None
    if state.backfill_started_at and state.checkpoint_at and state.rows_copied:
        elapsed = (state.checkpoint_at - state.backfill_started_at).total_seconds()
        rate = state.rows_copied / elapsed if elapsed > 0 else None
    remaining = max(state.rows_estimated - state.rows_copied, 0)
    eta = remaining / rate if rate and phase == Phase.BACKFILL else None

    prefix = "livepart_rev" if phase == Phase.SWAPPED else "livepart_fwd"
    trigger = await _trigger_summary(conn, schema, names.table, prefix)
    if phase == Phase.FINALIZED:
        trigger = {"name": None, "present": False, "enabled": False, "expected": False}

    return {
        "migration": f"{schema}.{table}",
        "phase": phase.value,
        "phase_since": _iso(state.phase_started_at),
        "rows_copied": state.rows_copied,
        "rows_estimated": state.rows_estimated,
        "percent": round(100 * state.rows_copied / state.rows_estimated, 1) if state.rows_estimated else None,
        "batches": state.batches,
        "rows_per_second": round(rate, 1) if rate else None,
        "eta_seconds": round(eta) if eta is not None else None,
        "checkpoint_age_seconds": round((now - state.checkpoint_at).total_seconds(), 1)
        if state.checkpoint_at else None,
        "trigger": trigger,
        "trigger_errors": await count_trigger_errors(conn, schema, table),
        "throttle": state.throttle,
        "verify": {
            "ranges": state.verify_ranges,
            "rows": state.verify_rows,
            "differences": state.verify_differences,
            "repaired": state.verify_repaired,
            "verified_at": _iso(state.verified_at),
        },
        "swap_lock_ms": round(state.swap_lock_ms, 1) if state.swap_lock_ms is not None else None,
        "swapped_at": _iso(state.swapped_at),
        "worker": {
            "host": state.worker_host,
            "pid": state.worker_pid,
            "started_at": _iso(state.worker_started_at),
            "running": await _worker_running(conn, f"{schema}.{table}"),
        },
        "last_error": state.last_error,
        "last_error_at": _iso(state.last_error_at),
        "tables": {"live": names.table, "shadow": names.shadow, "old": names.old},
    }


async def _trigger_summary(conn: asyncpg.Connection, schema: str, table: str, prefix: str) -> dict[str, Any]:
    flags = [await trigger_state(conn, schema, table, f"{prefix}_{event.lower()}") for event in EVENTS]
    return {
        "name": f"{prefix}_*",
        "present": all(flag is not None for flag in flags),
        "enabled": all(flag in ENABLED_TRIGGER_FLAGS for flag in flags),
        "expected": True,
    }


async def _worker_running(conn: asyncpg.Connection, migration_id: str) -> bool:
    return await conn.fetchval(
        """
        WITH k AS (SELECT pg_catalog.hashtextextended('livepart:' || $1, 0) AS key)
        SELECT EXISTS (
            SELECT 1 FROM k, pg_catalog.pg_locks l
            WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
              AND l.classid::bigint = (k.key >> 32) & 4294967295
              AND l.objid::bigint = k.key & 4294967295)
        """,
        migration_id,
    )


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None
