"""Measure what the dual-write trigger adds to the LiteLLM proxy's 100-row INSERTs.

Every setup lives in its own schema of one database on one throwaway server,
with the same preloaded rows:

  none             legacy table, no trigger (the baseline)
  row              row-level trigger from livepart.trigger.row_level_function_sql
  row_noexc        the same without its EXCEPTION block
  statement        the statement-level triggers that livepart installs
  statement_nothing  the same, but the INSERT trigger uses ON CONFLICT DO NOTHING
  statement_noexc  the same as statement, but the INSERT function has no EXCEPTION block
  partitioned      the rows inserted straight into the partitioned table (the floor)

The shadow tables, partitions and triggers come from the real prepare and
backfill phases (run_migration stopped by a test hook before verify). Each
round inserts one 100-row batch into every setup, in a shuffled order, with
the same rows and keys that no table has seen yet. Every few rounds the script
runs VACUUM and CHECKPOINT outside the timed part.

trigger overhead = (time with trigger - time of none) / time of partitioned

Run: .venv/bin/python benchmarks/trigger_cost.py [--rounds 200] [--preload-rows 5000]
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg

import common
from livepart.catalog import load_table
from livepart.ident import qualified, quote_ident
from livepart.plan import Names, forward_trigger_spec
from livepart.settings import Settings
from livepart.state import load_state
from livepart.trigger import (
    TriggerSpec,
    create_function_sql,
    drop_statements,
    function_name,
    row_level_function_sql,
)
from livepart.workload.litellm import (
    COLUMN_TYPES,
    KEY_COLUMN,
    MODEL_COLUMNS,
    TABLE,
    RowGenerator,
    create_legacy_schema,
    load_rows,
    to_record,
)

NAME = "trigger_cost"
ROWS_PER_INSERT = 100
BASELINE = "none"
FLOOR = "partitioned"
INSTALLED = "statement"
GOAL = 0.5
ROW_TRIGGER = "livepart_bench_row"


@dataclass
class Setup:
    name: str
    description: str
    schema: str
    needs_migration: bool
    insert_sql: str = ""
    target: str = ""
    shadow: str = ""
    seconds: list[float] = field(default_factory=list)


SETUPS = (
    Setup("none", "legacy table, no trigger (baseline)", "bench_none", False),
    Setup("row", "row-level trigger (row_level_function_sql)", "bench_row", True),
    Setup("row_noexc", "row-level trigger without EXCEPTION block", "bench_row_noexc", True),
    Setup("statement", "statement-level triggers as installed", "bench_statement", True),
    Setup("statement_nothing", "statement-level, INSERT uses ON CONFLICT DO NOTHING", "bench_stmt_nothing", True),
    Setup("statement_noexc", "statement-level, INSERT without EXCEPTION block", "bench_stmt_noexc", True),
    Setup("partitioned", "straight into the partitioned table (floor)", "bench_partitioned", True),
)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200,
                        help="timed rounds; each inserts one 100-row batch into every setup (default 200)")
    parser.add_argument("--warmup-rounds", type=int, default=10,
                        help="untimed rounds before the timed ones (default 10)")
    parser.add_argument("--preload-rows", type=int, default=5000,
                        help="rows loaded into every table before the rounds (default 5000)")
    parser.add_argument("--maintenance-every", type=int, default=20,
                        help="rounds between two runs of VACUUM and CHECKPOINT (default 20)")
    parser.add_argument("--batches", type=int, default=20,
                        help="distinct 100-row batches that the rounds cycle through (default 20)")
    parser.add_argument("--seed", type=int, default=1, help="seed of rows, keys and order (default 1)")
    arguments = parser.parse_args()
    for name in ("rounds", "preload_rows", "maintenance_every", "batches"):
        if getattr(arguments, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if arguments.warmup_rounds < 0:
        parser.error("--warmup-rounds must be 0 or more")
    return arguments


# -- SQL --------------------------------------------------------------------


def multi_row_insert_sql(table: str) -> str:
    """Build the proxy's statement: one VALUES list of 100 rows, ON CONFLICT DO NOTHING, no target."""
    columns = ", ".join(quote_ident(name) for name in MODEL_COLUMNS)
    width = len(MODEL_COLUMNS)
    rows = []
    for row in range(ROWS_PER_INSERT):
        values = ", ".join(f"${row * width + number + 1}::{COLUMN_TYPES[name]}"
                           for number, name in enumerate(MODEL_COLUMNS))
        rows.append(f"({values})")
    return f"INSERT INTO {table} ({columns}) VALUES {', '.join(rows)} ON CONFLICT DO NOTHING"


def replace_once(text: str, pattern: str, replacement: str) -> str:
    """Replace exactly one match of `pattern`, so that a change in trigger.py fails loudly here."""
    result, count = re.subn(pattern, replacement, text, flags=re.DOTALL)
    if count != 1:
        raise RuntimeError(f"expected one match of {pattern!r} in the generated trigger function, found {count}; "
                           "livepart.trigger changed: update this benchmark")
    return result


def without_exception_block(function_sql: str) -> str:
    return replace_once(function_sql, r"EXCEPTION WHEN OTHERS THEN\n.*?RETURN NULL;\n(?=END)", "")


def with_do_nothing(function_sql: str) -> str:
    return replace_once(function_sql, r"DO UPDATE SET [^;]*;", "DO NOTHING;")


def row_trigger_sql(spec: TriggerSpec) -> str:
    return (f"CREATE TRIGGER {ROW_TRIGGER} AFTER INSERT OR UPDATE OR DELETE ON {spec.source} "
            f"FOR EACH ROW EXECUTE FUNCTION {function_name(spec, 'row')}()")


async def trigger_spec(conn: asyncpg.Connection, schema: str) -> tuple[TriggerSpec, Names]:
    """Build the forward TriggerSpec as livepart.plan.forward_trigger_spec does, from the state row."""
    state = await load_state(conn, schema, TABLE)
    names = Names.from_json(state.names_map)
    table = await load_table(conn, schema, TABLE)
    key = "startTime"
    shadow_primary_key = list(table.primary_key) + ([key] if key not in table.primary_key else [])
    return forward_trigger_spec(table, names, shadow_primary_key), names


async def configure(conn: asyncpg.Connection, setup: Setup) -> None:
    """Put the setup's trigger in place and fill in its insert statement."""
    setup.target = qualified(setup.schema, TABLE)
    if not setup.needs_migration:
        setup.insert_sql = multi_row_insert_sql(setup.target)
        return
    spec, names = await trigger_spec(conn, setup.schema)
    setup.shadow = qualified(setup.schema, names.shadow)
    statements: list[str] = []
    if setup.name in ("row", "row_noexc", "partitioned"):
        statements += drop_statements(spec)
    if setup.name == "row":
        statements += [row_level_function_sql(spec), row_trigger_sql(spec)]
    elif setup.name == "row_noexc":
        statements += [without_exception_block(row_level_function_sql(spec)), row_trigger_sql(spec)]
    elif setup.name == "statement_nothing":
        statements.append(with_do_nothing(create_function_sql(spec, "INSERT")))
    elif setup.name == "statement_noexc":
        statements.append(without_exception_block(create_function_sql(spec, "INSERT")))
    async with conn.transaction():
        for statement in statements:
            await conn.execute(statement)
    if setup.name == FLOOR:
        setup.target = setup.shadow
    setup.insert_sql = multi_row_insert_sql(setup.target)


async def describe_triggers(conn: asyncpg.Connection, setup: Setup) -> list[str]:
    records = await conn.fetch(
        "SELECT tgname::text, pg_catalog.pg_get_triggerdef(oid) AS definition FROM pg_catalog.pg_trigger "
        "WHERE tgrelid = $1::regclass AND NOT tgisinternal ORDER BY 1",
        qualified(setup.schema, TABLE),
    )
    kinds = []
    for record in records:
        level = "row" if "FOR EACH ROW" in record["definition"] else "statement"
        kinds.append(f"{record['tgname']} ({level})")
    return kinds


# -- rows -------------------------------------------------------------------


def make_batches(seed: int, count: int) -> list[list[dict[str, Any]]]:
    """Generate `count` 100-row batches stamped within the last hour, without large rows."""
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    generator = RowGenerator(seed, now - timedelta(hours=1), now, large_row_fraction=0)
    return [generator.rows(ROWS_PER_INSERT) for _ in range(count)]


def round_arguments(batch: list[dict[str, Any]], keys: list[str]) -> list[Any]:
    """Flatten one batch into statement parameters, with fresh request_ids."""
    arguments: list[Any] = []
    for row, key in zip(batch, keys):
        arguments.extend(to_record({**row, KEY_COLUMN: key}))
    return arguments


def fresh_keys(rng: random.Random) -> list[str]:
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(ROWS_PER_INSERT)]


# -- measurement ------------------------------------------------------------


async def build_setups(dsn: str, preload_rows: int, seed: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        generator = common.litellm_generator(seed, large_row_fraction=0)
        preload = generator.rows(preload_rows)
        for setup in SETUPS:
            await create_legacy_schema(conn, setup.schema)
            await load_rows(conn, preload, schema=setup.schema)
        with common.quiet_logs():
            for setup in SETUPS:
                if setup.needs_migration:
                    settings = Settings(dsn=dsn, schema=setup.schema, batch_size=1000)
                    await common.prepare_only(settings, backfill=True)
        for setup in SETUPS:
            await configure(conn, setup)
        await conn.execute("VACUUM (ANALYZE)")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


async def maintain(conn: asyncpg.Connection) -> float:
    """Run VACUUM and CHECKPOINT on the whole database; return the seconds they took."""
    watch = common.Stopwatch()
    await conn.execute("VACUUM")
    await conn.execute("CHECKPOINT")
    return watch.seconds()


async def measure(dsn: str, arguments: argparse.Namespace) -> dict[str, Any]:
    batches = make_batches(arguments.seed, arguments.batches)
    rng = random.Random(arguments.seed)
    order = list(SETUPS)
    per_round: list[dict[str, float]] = []
    maintenance_seconds = 0.0
    conn = await asyncpg.connect(dsn)
    try:
        total = arguments.warmup_rounds + arguments.rounds
        for number in range(total):
            parameters = round_arguments(batches[number % len(batches)], fresh_keys(rng))
            rng.shuffle(order)
            times: dict[str, float] = {}
            for setup in order:
                watch = common.Stopwatch()
                status = await conn.execute(setup.insert_sql, *parameters)
                times[setup.name] = watch.seconds()
                if status != f"INSERT 0 {ROWS_PER_INSERT}":
                    raise RuntimeError(f"insert into {setup.target} returned {status!r}, expected "
                                       f"{ROWS_PER_INSERT} new rows")
            timed = number >= arguments.warmup_rounds
            if timed:
                per_round.append(times)
                for setup in SETUPS:
                    setup.seconds.append(times[setup.name])
            if (number + 1) % arguments.maintenance_every == 0:
                maintenance_seconds += await maintain(conn)
            if timed and (number + 1 - arguments.warmup_rounds) % 50 == 0:
                print(f"  {number + 1 - arguments.warmup_rounds} of {arguments.rounds} rounds")
        checks = await sanity_checks(conn)
    finally:
        await conn.close()
    return {"per_round": per_round, "checks": checks, "maintenance_seconds": maintenance_seconds}


async def sanity_checks(conn: asyncpg.Connection) -> dict[str, Any]:
    """Confirm that every trigger copied every row and recorded no error."""
    checks: dict[str, Any] = {}
    for setup in SETUPS:
        legacy = await conn.fetchval(f"SELECT count(*) FROM {qualified(setup.schema, TABLE)}")
        entry: dict[str, Any] = {"rows_in_legacy_table": legacy,
                                 "triggers": await describe_triggers(conn, setup)}
        if setup.shadow:
            entry["rows_in_partitioned_table"] = await conn.fetchval(f"SELECT count(*) FROM {setup.shadow}")
        checks[setup.name] = entry
    checks["trigger_errors"] = await conn.fetchval("SELECT count(*) FROM livepart.trigger_error")
    for setup in SETUPS:
        entry = checks[setup.name]
        if setup.name not in (BASELINE, FLOOR) and entry["rows_in_partitioned_table"] != entry["rows_in_legacy_table"]:
            raise RuntimeError(f"{setup.name}: the partitioned table has {entry['rows_in_partitioned_table']} rows "
                               f"but the legacy table {entry['rows_in_legacy_table']}: the trigger lost writes")
    if checks["trigger_errors"]:
        raise RuntimeError(f"the triggers recorded {checks['trigger_errors']} errors in livepart.trigger_error")
    return checks


def bootstrap_overhead(per_round: list[dict[str, float]], name: str, seed: int,
                       samples: int = 1000) -> tuple[float, float]:
    """Return a 95% bootstrap interval of the overhead of medians, resampling whole rounds."""
    rng = random.Random(seed)
    estimates = []
    for _ in range(samples):
        chosen = [per_round[rng.randrange(len(per_round))] for _ in per_round]
        baseline = statistics.median(times[BASELINE] for times in chosen)
        floor = statistics.median(times[FLOOR] for times in chosen)
        estimates.append((statistics.median(times[name] for times in chosen) - baseline) / floor)
    estimates.sort()
    return estimates[int(0.025 * samples)], estimates[int(0.975 * samples) - 1]


def analyse(per_round: list[dict[str, float]], seed: int) -> dict[str, Any]:
    times_ms = {setup.name: [seconds * 1000 for seconds in setup.seconds] for setup in SETUPS}
    summaries = {name: common.spread(values) for name, values in times_ms.items()}
    baseline = summaries[BASELINE]["median"]
    floor = summaries[FLOOR]["median"]
    result: dict[str, Any] = {}
    for setup in SETUPS:
        ratios = [(times[setup.name] - times[BASELINE]) / times[FLOOR] for times in per_round]
        result[setup.name] = {
            "description": setup.description,
            "insert_ms": summaries[setup.name],
            "added_ms_median": summaries[setup.name]["median"] - baseline,
            "overhead_of_medians": (summaries[setup.name]["median"] - baseline) / floor,
            "overhead_per_round": common.spread(ratios),
            "overhead_of_medians_95ci": bootstrap_overhead(per_round, setup.name, seed),
        }
    return result


def print_summary(results: dict[str, Any]) -> None:
    rows = []
    for setup in SETUPS:
        entry = results[setup.name]
        rows.append([
            setup.name,
            common.format_spread(entry["insert_ms"], digits=2),
            f"{entry['added_ms_median']:+.2f}",
            f"{entry['overhead_of_medians']:.2f}",
            "{:.2f} .. {:.2f}".format(*entry["overhead_of_medians_95ci"]),
            common.format_spread(entry["overhead_per_round"], digits=2),
        ])
    print()
    print("insert of 100 rows, ms: median [p25 .. p75]; overhead = (setup - none) / partitioned")
    common.print_table(["setup", "insert ms", "added ms", "overhead", "95% interval", "overhead per round"], rows)
    installed = results[INSTALLED]["overhead_of_medians"]
    low, high = results[INSTALLED]["overhead_of_medians_95ci"]
    if high <= GOAL:
        verdict = "met"
    elif installed <= GOAL:
        verdict = "met by the median, but the 95% interval reaches above it"
    else:
        verdict = f"NOT met: {installed / GOAL:.2f} times the goal"
    print(f"\ngoal: overhead of the installed statement-level trigger at most {GOAL}: {verdict} "
          f"(overhead {installed:.2f}, 95% interval {low:.2f} .. {high:.2f})")
    row = results["row"]["overhead_of_medians"]
    if row > 0:
        print(f"the statement-level trigger adds {installed / row:.2f} times what the row-level one adds "
              f"(overheads {installed:.2f} and {row:.2f})")


async def main() -> int:
    arguments = parse_arguments()
    with common.local_server() as server:
        info = common.machine_info(server)
        common.print_machine(info)
        dsn = server.create_database("trigger_cost")
        print(f"preloading {arguments.preload_rows} rows into {len(SETUPS)} tables and running "
              "prepare and backfill for the partitioned ones ...")
        watch = common.Stopwatch()
        await build_setups(dsn, arguments.preload_rows, arguments.seed)
        setup_seconds = watch.seconds()
        print(f"  setup took {setup_seconds:.0f} s")
        print(f"timing {arguments.rounds} rounds (+{arguments.warmup_rounds} warm-up) of "
              f"{len(SETUPS)} inserts of {ROWS_PER_INSERT} rows ...")
        measured = await measure(dsn, arguments)
        print(f"  VACUUM and CHECKPOINT between rounds took {measured['maintenance_seconds']:.0f} s in total")
    results = analyse(measured["per_round"], arguments.seed)
    print_summary(results)
    payload = {
        "benchmark": NAME,
        "machine": info,
        "parameters": vars(arguments),
        "goal": GOAL,
        "definitions": {
            "overhead_of_medians": "(median ms of setup - median ms of none) / median ms of partitioned",
            "overhead_per_round": "(setup - none) / partitioned within each round, then median and quartiles",
            "overhead_of_medians_95ci": "2.5th and 97.5th percentiles of overhead_of_medians over 1000 "
                                        "bootstrap resamples of whole rounds",
        },
        "results": results,
        "checks": measured["checks"],
        "setup_seconds": setup_seconds,
        "load_average_at_end": common.load_average(),
        "maintenance_seconds": measured["maintenance_seconds"],
        "per_round_ms": [{name: seconds * 1000 for name, seconds in times.items()}
                         for times in measured["per_round"]],
    }
    path = common.write_results(NAME, payload)
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    common.run(main)
