"""Helpers shared by the migration tests: CLI runs, catalog snapshots, small tables."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from typing import Any

import asyncpg

from livepart.orchestrator import RunResult, run_migration
from livepart.settings import Settings

EVENTS_DDL = """
CREATE TABLE events (
    id text PRIMARY KEY,
    ts timestamp NOT NULL,
    amount numeric,
    meta jsonb
)
"""


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m livepart ARGS` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "livepart", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def start_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "livepart", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def events_settings(dsn: str, **overrides: Any) -> Settings:
    base = Settings(dsn=dsn, table="events", partition_key="ts", interval="day", batch_size=2,
                    lock_timeout=1.0)
    return replace(base, **overrides)


async def migrate(settings: Settings) -> RunResult:
    return await run_migration(settings)


async def catalog_snapshot(conn: asyncpg.Connection) -> dict[str, list]:
    """Everything a migration could create or change, for "changed nothing" checks."""
    relations = await conn.fetch(
        """
        SELECT n.nspname, c.relname, c.relkind::text, c.relacl::text
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
        ORDER BY 1, 2
        """
    )
    triggers = await conn.fetch("SELECT tgrelid::regclass::text, tgname, tgenabled::text FROM pg_trigger "
                                "WHERE NOT tgisinternal ORDER BY 1, 2")
    functions = await conn.fetch(
        "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1"
    )
    schemas = await conn.fetch("SELECT nspname FROM pg_namespace ORDER BY 1")
    return {
        "relations": [tuple(r) for r in relations],
        "triggers": [tuple(r) for r in triggers],
        "functions": [r[0] for r in functions],
        "schemas": [r[0] for r in schemas],
    }


async def index_names(conn: asyncpg.Connection, table: str, schema: str = "public") -> set[str]:
    rows = await conn.fetch(
        "SELECT indexrelid::regclass::text AS name FROM pg_index WHERE indrelid = $1::regclass",
        f'"{schema}"."{table}"',
    )
    return {r["name"].split(".")[-1].strip('"') for r in rows}


async def partition_bounds(conn: asyncpg.Connection, table: str) -> dict[str, str]:
    rows = await conn.fetch(
        """
        SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = $1::regclass
        """,
        f'"{table}"',
    )
    return {r["relname"]: r["bound"] for r in rows}


async def views_reading(conn: asyncpg.Connection, table: str) -> set[str]:
    rows = await conn.fetch(
        """
        SELECT DISTINCT v.relname FROM pg_depend d
        JOIN pg_rewrite r ON r.oid = d.objid JOIN pg_class v ON v.oid = r.ev_class
        WHERE d.refobjid = $1::regclass AND v.relkind = 'v'
        """,
        f'"{table}"',
    )
    return {r["relname"] for r in rows}
