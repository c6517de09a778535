"""`python -m livepart.workload seed|write`: the demo's workload against any database.

docker-compose.yml uses it to fill a LiteLLM-shaped table and to keep a
proxy-like writer running while livepart migrates the table.
"""

from __future__ import annotations

import asyncio
import signal
from datetime import datetime, timedelta, timezone

import asyncpg
import typer

from ..log import configure_logging
from .litellm import TABLE, RowGenerator, create_legacy_schema, load_rows
from .writer import CONTROL_TABLE, Writer, create_control_table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
DsnOption = typer.Option(..., "--dsn", envvar="DATABASE_URL", show_default=False,
                         help="PostgreSQL connection URL.")


@app.command()
def seed(
    dsn: str = DsnOption,
    rows: int = typer.Option(20000, help="Rows to load."),
    days: int = typer.Option(90, help='Days of history that "startTime" spreads over.'),
    seed_value: int = typer.Option(7, "--seed", help="Seed of the row generator."),
) -> None:
    """Create the legacy LiteLLM_SpendLogs table with its views, plus a control table, and fill both."""

    async def work() -> int:
        conn = await asyncpg.connect(dsn)
        try:
            if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f'public."{TABLE}"'):
                typer.echo(f"{TABLE} already exists; nothing loaded")
                return 0
            await create_legacy_schema(conn)
            await create_control_table(conn, TABLE, "public", CONTROL_TABLE, copy_rows=False)
            now = datetime.now(timezone.utc).replace(tzinfo=None)
            generator = RowGenerator(seed_value, now - timedelta(days=days), now - timedelta(minutes=5))
            return await load_rows(conn, generator.iter_rows(rows), control=CONTROL_TABLE)
        finally:
            await conn.close()

    typer.echo(f"loaded {asyncio.run(work())} rows")


@app.command()
def write(
    dsn: str = DsnOption,
    seconds: float = typer.Option(0, help="Stop after this many seconds; 0 writes until stopped."),
    seed_value: int = typer.Option(8, "--seed", help="Seed of the writer."),
) -> None:
    """Write like the LiteLLM proxy (inserts, retention deletes, updates), mirroring into the control table."""
    configure_logging()

    async def work() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for number in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(number, stop.set)
        if seconds > 0:
            loop.call_later(seconds, stop.set)
        await Writer(dsn, seed=seed_value, pause=0.05).run(stop)

    asyncio.run(work())


if __name__ == "__main__":
    app(prog_name="python -m livepart.workload")
