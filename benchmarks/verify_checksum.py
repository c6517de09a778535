"""Speed of verification's checksum: the row's text form against hash_record_extended.

Verification sums a 64-bit hash of every row of every range on both tables, so
the hash decides how long `livepart verify` takes. This script loads LiteLLM
rows and times `checksum_sql` over the whole table in both forms, interleaved
and repeated, on one connection with a warm cache.

    .venv/bin/python benchmarks/verify_checksum.py [--rows 20000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from livepart.catalog import load_table  # noqa: E402
from livepart.verify import checksum_sql, supports_record_hash  # noqa: E402
from livepart.workload.litellm import TABLE  # noqa: E402

FORMS = {"text": False, "record": True}


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000, help="LiteLLM rows to load (default 20000)")
    parser.add_argument("--repeats", type=int, default=7, help="timed scans of each form (default 7)")
    parser.add_argument("--seed", type=int, default=4, help="seed of the loaded rows (default 4)")
    options = parser.parse_args()

    with common.local_server() as server:
        info = common.machine_info(server)
        common.print_machine(info)
        dsn = server.create_database("verify_checksum")
        await common.load_litellm(dsn, options.rows, options.seed, large_row_fraction=0.001, control=False)
        conn = await asyncpg.connect(dsn, server_settings={"search_path": ""})
        try:
            table = await load_table(conn, "public", TABLE)
            if not await supports_record_hash(conn, table):
                print("this server has no hash_record_extended for these columns; nothing to compare")
                return 1
            queries = {
                form: f'{checksum_sql(table, "t", record_hash=record)} FROM public."{TABLE}" AS t'
                for form, record in FORMS.items()
            }
            for query in queries.values():  # warm the cache once per form
                await conn.fetchrow(query)
            seconds: dict[str, list[float]] = {form: [] for form in FORMS}
            for _ in range(options.repeats):
                for form, query in queries.items():
                    started = time.perf_counter()
                    await conn.fetchrow(query)
                    seconds[form].append(time.perf_counter() - started)
        finally:
            await conn.close()

    summaries = {form: common.spread(values) for form, values in seconds.items()}
    ratio = summaries["text"]["median"] / summaries["record"]["median"]
    common.print_table(
        ["checksum", "seconds, median [p25 .. p75]", "rows/s (median)"],
        [[form, common.format_spread(summary, " s", 3), f"{options.rows / summary['median']:,.0f}"]
         for form, summary in summaries.items()],
    )
    print(f"hash_record_extended was {ratio:.1f} times as fast as hashing the text form")
    path = common.write_results("verify_checksum", {
        "machine": info, "rows": options.rows, "repeats": options.repeats,
        "seconds": summaries, "text_over_record": ratio,
    })
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    common.run(main)
