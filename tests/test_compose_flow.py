"""The docker-compose services' commands, run as plain processes against a local server."""

from __future__ import annotations

import subprocess
import sys

import asyncpg

from helpers import cli
from livepart.workload.compare import compare_with_control
from livepart.workload.litellm import TABLE
from livepart.workload.writer import CONTROL_TABLE


def workload(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "livepart.workload", *args], capture_output=True, text=True,
                          timeout=300)


async def test_seed_write_and_migrate(dsn: str) -> None:
    seeded = workload("seed", "--dsn", dsn, "--rows", "300")
    assert seeded.returncode == 0, seeded.stderr
    assert "loaded 300 rows" in seeded.stdout
    again = workload("seed", "--dsn", dsn, "--rows", "300")
    assert "already exists; nothing loaded" in again.stdout

    writer = subprocess.Popen([sys.executable, "-m", "livepart.workload", "write", "--dsn", dsn,
                               "--seconds", "8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    migrated = cli("run", "--dsn", dsn, "--batch-size", "100")
    _, writer_log = writer.communicate(timeout=60)

    assert migrated.returncode == 0, migrated.stderr
    assert writer.returncode == 0, writer_log[-2000:]
    assert '"errors": 0' in writer_log
    conn = await asyncpg.connect(dsn)
    try:
        comparison = await compare_with_control(conn, TABLE, CONTROL_TABLE)
    finally:
        await conn.close()
    assert comparison.ok, comparison.summary()
