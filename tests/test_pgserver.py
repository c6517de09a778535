"""Tests of the local PostgreSQL launcher against real servers."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import asyncpg
import pytest

from livepart.pgserver import (
    LocalPostgres,
    ServerNotFoundError,
    ServerStartError,
    find_server_binaries,
)


def fetch(dsn: str, query: str, **connect_args: object) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        connection = await asyncpg.connect(dsn, **connect_args)
        try:
            return await connection.fetch(query)
        finally:
            await connection.close()

    return asyncio.run(run())


def execute(dsn: str, sql: str) -> None:
    async def run() -> None:
        connection = await asyncpg.connect(dsn)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(run())


def fetchval(dsn: str, query: str, **connect_args: object) -> object:
    return fetch(dsn, query, **connect_args)[0][0]


def processes_using(folder: Path) -> list[int]:
    """Return the ids of processes whose command line mentions `folder`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command_line = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # The process ended while we looked.
        if str(folder).encode() in command_line:
            pids.append(int(entry.name))
    return pids


def wait_until_no_process_uses(folder: Path, timeout_s: float = 10.0) -> list[int]:
    """Poll until no process mentions `folder` and return the ones left at the timeout."""
    deadline = time.monotonic() + timeout_s
    while (pids := processes_using(folder)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return pids


def listening_addresses(port: int) -> set[str]:
    """Return the local addresses of TCP sockets listening on `port`, read from /proc/net."""
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address_hex, port_hex = fields[1].split(":")
            if int(port_hex, 16) != port or fields[3] != "0A":  # 0A is TCP_LISTEN
                continue
            if len(address_hex) == 8:
                addresses.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address_hex)[::-1]))
            else:
                addresses.add(address_hex)
    return addresses


def make_fake_bin_dir(folder: Path, programs: tuple[str, ...] = ("initdb", "pg_ctl", "postgres")) -> Path:
    """Create a folder with executable stand-ins named like the server programs."""
    folder.mkdir(parents=True)
    for name in programs:
        program = folder / name
        program.write_text("#!/bin/sh\nexit 1\n")
        program.chmod(0o755)
    return folder


# --- LocalPostgres ---------------------------------------------------------


def test_start_stop_leaves_nothing_behind() -> None:
    server = LocalPostgres()
    server.start()
    base_dir = server.base_dir
    assert base_dir is not None
    assert base_dir.name.startswith("livepart-pg-")
    assert processes_using(base_dir), "no server process found after start()"
    assert fetchval(server.dsn(), "SELECT 1") == 1

    server.stop()

    assert not base_dir.exists()
    assert wait_until_no_process_uses(base_dir) == []
    with pytest.raises(OSError):
        fetch(server.dsn(), "SELECT 1", timeout=5)
    server.stop()  # A second stop() does nothing.


def test_server_listens_on_loopback_only(pg_server: LocalPostgres) -> None:
    dsn = pg_server.dsn()

    assert fetchval(dsn, "SHOW listen_addresses") == "127.0.0.1"
    assert fetchval(dsn, "SHOW port") == str(pg_server.port)
    assert listening_addresses(pg_server.port) == {"127.0.0.1"}

    socket_dir = Path(str(fetchval(dsn, "SHOW unix_socket_directories")))
    assert socket_dir == pg_server.socket_dir
    assert pg_server.base_dir in socket_dir.parents
    assert fetchval(dsn, "SELECT 1", host=str(socket_dir), port=pg_server.port) == 1


def test_server_runs_as_unprivileged_user(pg_server: LocalPostgres) -> None:
    pid = int((pg_server.data_dir / "postmaster.pid").read_text().splitlines()[0])
    status = Path(f"/proc/{pid}/status").read_text()
    effective_uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[2])

    if os.geteuid() == 0:
        assert effective_uid != 0
        assert pg_server.os_user != "root"
    else:
        assert effective_uid == os.geteuid()


def test_server_settings_applied() -> None:
    with LocalPostgres(settings={"wal_level": "logical", "work_mem": "8MB"}) as server:
        assert fetchval(server.dsn(), "SHOW wal_level") == "logical"
        assert fetchval(server.dsn(), "SHOW work_mem") == "8MB"
        assert fetchval(server.dsn(), "SHOW max_connections") == "200"
        assert fetchval(server.dsn(), "SHOW fsync") == "on"


def test_restart_immediate_keeps_committed_data() -> None:
    with LocalPostgres() as server:
        dsn = server.create_database("crash_test")
        port = server.port
        execute(dsn, "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 1000)")
        started_before = fetchval(dsn, "SELECT pg_postmaster_start_time()")

        server.restart(mode="immediate")

        assert server.port == port
        assert fetchval(dsn, "SELECT pg_postmaster_start_time()") > started_before
        assert fetchval(dsn, "SELECT count(*) FROM t") == 1000
        server_log = server.log_path.read_text()
        assert "database system was interrupted" in server_log or "not properly shut down" in server_log


def test_stop_server_then_start_server() -> None:
    with LocalPostgres() as server:
        dsn = server.create_database("downtime_test")
        execute(dsn, "CREATE TABLE t AS SELECT 42 AS answer")

        server.stop_server(mode="fast")

        assert server.data_dir.is_dir()
        with pytest.raises(OSError):
            fetch(dsn, "SELECT 1", timeout=5)

        server.start_server()

        assert fetchval(dsn, "SELECT answer FROM t") == 42


def test_restart_rejects_unknown_mode(pg_server: LocalPostgres) -> None:
    with pytest.raises(ValueError):
        pg_server.restart(mode="crash")

    assert fetchval(pg_server.dsn(), "SELECT 1") == 1


def test_context_manager_stops_on_exception() -> None:
    with pytest.raises(RuntimeError, match="fails inside the block"):
        with LocalPostgres() as server:
            base_dir = server.base_dir
            raise RuntimeError("the test fails inside the block")

    assert not base_dir.exists()
    assert wait_until_no_process_uses(base_dir) == []


def test_bad_setting_raises_start_error() -> None:
    server = LocalPostgres(settings={"shared_buffers": "lots"})

    with pytest.raises(ServerStartError) as caught:
        server.start()

    message = str(caught.value)
    assert "pg_ctl start failed" in message
    assert 'invalid value for parameter "shared_buffers"' in message
    base_dir = server.data_dir.parent
    assert not base_dir.exists()
    assert wait_until_no_process_uses(base_dir) == []


@pytest.mark.parametrize("name", ["bad name", "x;y", "listen_addresses", "port", "unix_socket_directories"])
def test_invalid_setting_name_rejected(name: str) -> None:
    with pytest.raises(ValueError):
        LocalPostgres(settings={name: "1"})


def test_port_taken_retries_another_port() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken_port = squatter.getsockname()[1]

        class FirstPortTaken(LocalPostgres):
            picked: list[int] = []

            def _pick_port(self) -> int:
                port = taken_port if not self.picked else super()._pick_port()
                self.picked.append(port)
                return port

        with FirstPortTaken() as server:
            assert server.picked[0] == taken_port
            assert server.port != taken_port
            assert fetchval(server.dsn(), "SELECT 1") == 1
            assert "Address already in use" in server.log_path.read_text()


SERVER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from livepart.pgserver import LocalPostgres

    if sys.argv[1] == "atexit":
        server = LocalPostgres()
        server.start()
        print(server.base_dir, flush=True)
        sys.exit(0)
    with LocalPostgres() as server:
        print(server.base_dir, flush=True)
        time.sleep(120)
    """
)


def start_server_script(mode: str) -> tuple[subprocess.Popen[str], Path]:
    child = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, mode],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    first_line = child.stdout.readline().strip()
    assert first_line, f"child printed no folder, stderr: {child.stderr.read()}"
    base_dir = Path(first_line)
    return child, base_dir


def clean_up_after_child(child: subprocess.Popen[str], base_dir: Path) -> None:
    """Kill what a failed test left running: the child, then its server (SIGQUIT is an immediate shutdown)."""
    if child.poll() is None:
        child.kill()
        child.wait()
    pid_file = base_dir / "data" / "postmaster.pid"
    if pid_file.exists():
        os.kill(int(pid_file.read_text().splitlines()[0]), signal.SIGQUIT)
        wait_until_no_process_uses(base_dir)
    shutil.rmtree(base_dir, ignore_errors=True)


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_server(signal_number: int) -> None:
    child, base_dir = start_server_script("with")
    try:
        assert processes_using(base_dir)

        child.send_signal(signal_number)
        child.wait(timeout=60)

        assert child.returncode != 0
        assert not base_dir.exists()
        assert wait_until_no_process_uses(base_dir) == []
    finally:
        clean_up_after_child(child, base_dir)


def test_atexit_stops_server() -> None:
    child, base_dir = start_server_script("atexit")
    try:
        child.wait(timeout=60)

        assert child.returncode == 0, child.stderr.read()
        assert not base_dir.exists()
        assert wait_until_no_process_uses(base_dir) == []
    finally:
        clean_up_after_child(child, base_dir)


def test_server_version_is_numeric(pg_server: LocalPostgres) -> None:
    version = pg_server.server_version()

    assert version.split()[0].replace(".", "").isdigit()
    assert fetchval(pg_server.dsn(), "SHOW server_version").split()[0] == version.split()[0]


# --- fixtures --------------------------------------------------------------


def test_dsn_fixture_gives_empty_database(dsn: str) -> None:
    name = fetchval(dsn, "SELECT current_database()")
    tables = fetchval(dsn, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")

    assert name.startswith("test_dsn_fixture_gives_empty_database")
    assert tables == 0


def test_make_dsn_gives_distinct_databases(make_dsn) -> None:
    first = make_dsn("source")
    second = make_dsn("source")

    assert first != second
    assert fetchval(first, "SELECT current_database()").endswith(tuple("0123456789"))


@pytest.mark.parametrize("label", ["x" * 80, "x" * 80 + "y"])
def test_database_name_fits_identifier_limit(dsn: str, label: str, pg_server: LocalPostgres) -> None:
    name = str(fetchval(dsn, "SELECT current_database()"))

    assert len(name.encode()) <= 63
    assert dsn.endswith("/" + name)
    others = fetch(pg_server.dsn(), "SELECT datname FROM pg_database WHERE datname LIKE 'test_database_name%'")
    assert len({row["datname"] for row in others}) == len(others)


# --- find_server_binaries --------------------------------------------------


def test_find_binaries_honours_pg_bin(tmp_path: Path) -> None:
    fake = make_fake_bin_dir(tmp_path / "bin")

    found = find_server_binaries(environ={"PG_BIN": str(fake)})

    assert found == fake


def test_find_binaries_rejects_bad_pg_bin(tmp_path: Path) -> None:
    with pytest.raises(ServerNotFoundError) as caught:
        find_server_binaries(environ={"PG_BIN": str(tmp_path)})

    assert "PG_BIN" in str(caught.value)
    assert str(tmp_path) in str(caught.value)


def test_find_binaries_reports_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ServerNotFoundError) as caught:
        find_server_binaries(
            environ={}, pg_config=None, debian_root=tmp_path / "missing", embedded_module=None
        )

    message = str(caught.value)
    assert "postgresql-15" in message
    assert "livepart[embedded]" in message
    assert "PG_BIN" in message
    assert "\n" not in message


def test_find_binaries_prefers_highest_debian_version(tmp_path: Path) -> None:
    root = tmp_path / "postgresql"
    make_fake_bin_dir(root / "9.6" / "bin")
    make_fake_bin_dir(root / "15" / "bin")
    make_fake_bin_dir(root / "16" / "bin", programs=("pg_ctl",))  # Client-only, no server.

    found = find_server_binaries(environ={}, pg_config=None, debian_root=root, embedded_module=None)

    assert found == root / "15" / "bin"


def test_find_binaries_skips_client_only_pg_config(tmp_path: Path) -> None:
    client_bin = make_fake_bin_dir(tmp_path / "client", programs=("psql",))
    pg_config = tmp_path / "pg_config"
    pg_config.write_text(f"#!/bin/sh\necho {client_bin}\n")
    pg_config.chmod(0o755)
    root = tmp_path / "postgresql"
    make_fake_bin_dir(root / "15" / "bin")

    found = find_server_binaries(
        environ={}, pg_config=str(pg_config), debian_root=root, embedded_module=None
    )

    assert found == root / "15" / "bin"


def test_find_binaries_uses_pg_config_bindir(tmp_path: Path) -> None:
    server_bin = make_fake_bin_dir(tmp_path / "server")
    pg_config = tmp_path / "pg_config"
    pg_config.write_text(f"#!/bin/sh\necho {server_bin}\n")
    pg_config.chmod(0o755)

    found = find_server_binaries(environ={}, pg_config=str(pg_config), debian_root=None, embedded_module=None)

    assert found == server_bin


def test_find_binaries_falls_back_to_embedded_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "site" / "fake_embedded_postgres"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('the lookup must not import the package')\n")
    make_fake_bin_dir(package / "pginstall" / "bin")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))

    found = find_server_binaries(
        environ={}, pg_config=None, debian_root=None, embedded_module="fake_embedded_postgres"
    )

    assert found == package / "pginstall" / "bin"


def test_local_postgres_rejects_bin_dir_without_server(tmp_path: Path) -> None:
    with pytest.raises(ServerNotFoundError):
        LocalPostgres(bin_dir=tmp_path)
