"""Connections and retries.

Only errors that are known to be transient are retried: a lost connection, a
server shutting down or starting up, a serialization failure, a deadlock and a
lock wait that ran into lock_timeout. Every other error stops the run at once.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception
from tenacity import stop_after_attempt, wait_random_exponential

from .errors import Interrupted, InvalidInput

log = structlog.get_logger()

T = TypeVar("T")

TRANSIENT_SQLSTATES = {
    "08000",  # connection_exception
    "08001",  # sqlclient_unable_to_establish_sqlconnection
    "08003",  # connection_does_not_exist
    "08006",  # connection_failure
    "57P01",  # admin_shutdown
    "57P02",  # crash_shutdown
    "57P03",  # cannot_connect_now
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
    "55P03",  # lock_not_available
}


def is_transient(error: BaseException) -> bool:
    if isinstance(error, asyncpg.PostgresError):
        return getattr(error, "sqlstate", None) in TRANSIENT_SQLSTATES
    if isinstance(error, asyncpg.InterfaceError):
        return "connection" in str(error).lower()
    return isinstance(error, (ConnectionError, TimeoutError, OSError))


def is_connection_error(error: BaseException) -> bool:
    sqlstate = getattr(error, "sqlstate", "") or ""
    if sqlstate.startswith("08") or sqlstate in ("57P01", "57P02", "57P03"):
        return True
    if isinstance(error, asyncpg.InterfaceError):
        return "connection" in str(error).lower()
    return isinstance(error, (ConnectionError, TimeoutError, OSError))


def describe_error(error: BaseException) -> str:
    """Return one line with the error class, SQLSTATE and message, leaving out DETAIL, which may contain row values."""
    sqlstate = getattr(error, "sqlstate", None)
    text = str(error).splitlines()[0] if str(error) else ""
    name = type(error).__name__
    return f"{name} [{sqlstate}]: {text}" if sqlstate else f"{name}: {text}"


def mask_dsn(dsn: str) -> str:
    """Return the DSN without its password, for messages and logs."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "<invalid DSN>"
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def application_name() -> str:
    return f"livepart {socket.gethostname()[:30]} pid {os.getpid()}"


async def connect(dsn: str, *, lock_timeout_ms: int) -> asyncpg.Connection:
    """Open a worker connection with a fixed, predictable session.

    search_path is empty so catalog functions print fully qualified names, and
    TimeZone is UTC so no bound or value depends on the caller's environment.
    """
    return await asyncpg.connect(
        dsn,
        timeout=10,
        statement_cache_size=0,
        server_settings={
            "application_name": application_name(),
            "search_path": "",
            "TimeZone": "UTC",
            "DateStyle": "ISO, YMD",
            "IntervalStyle": "postgres",
            "lock_timeout": str(lock_timeout_ms),
            "idle_in_transaction_session_timeout": "600000",
        },
    )


async def connect_or_explain(dsn: str, *, lock_timeout_ms: int) -> asyncpg.Connection:
    """Connect, turning a failure into one clear InvalidInput line."""
    try:
        return await connect(dsn, lock_timeout_ms=lock_timeout_ms)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        raise InvalidInput(
            f"cannot connect to {mask_dsn(dsn)}: {describe_error(error)}; "
            "check --dsn (or DATABASE_URL) and that the server is running"
        ) from None
    except ValueError as error:
        raise InvalidInput(f"invalid DSN {mask_dsn(dsn)}: {error}; check --dsn") from None


class Database:
    """One worker connection, reopened and re-initialised after a transient failure."""

    def __init__(
        self,
        dsn: str,
        *,
        lock_timeout_ms: int,
        retries: int,
        stop: asyncio.Event | None = None,
        on_connect: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
    ) -> None:
        self.dsn = dsn
        self.lock_timeout_ms = lock_timeout_ms
        self.retries = retries
        self.stop = stop or asyncio.Event()
        self.on_connect = on_connect
        self._conn: asyncpg.Connection | None = None

    @property
    def conn(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            raise asyncpg.InterfaceError("connection is closed")
        return self._conn

    @property
    def is_open(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def open(self) -> asyncpg.Connection:
        """Open the first connection; failure here is bad input, not a retry."""
        self._conn = await connect_or_explain(self.dsn, lock_timeout_ms=self.lock_timeout_ms)
        if self.on_connect is not None:
            await self.on_connect(self._conn)
        return self._conn

    async def _reconnect(self) -> None:
        await self.close()
        self._conn = await connect(self.dsn, lock_timeout_ms=self.lock_timeout_ms)
        log.info("db.reconnected")
        if self.on_connect is not None:
            await self.on_connect(self._conn)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), timeout=5)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                conn.terminate()

    async def _sleep(self, seconds: float) -> None:
        """Sleep between retries, but wake up and stop when a signal arrives."""
        try:
            await asyncio.wait_for(self.stop.wait(), timeout=seconds)
        except TimeoutError:
            return
        raise Interrupted("interrupted while waiting to retry")

    async def run(
        self,
        operation: str,
        work: Callable[[asyncpg.Connection], Awaitable[T]],
        *,
        attempts: int | None = None,
    ) -> T:
        """Run `work(conn)`, retrying transient errors with capped, jittered backoff."""

        def before_sleep(retry_state: RetryCallState) -> None:
            error = retry_state.outcome.exception() if retry_state.outcome else None
            log.warning(
                "retry",
                operation=operation,
                attempt=retry_state.attempt_number,
                wait_s=round(retry_state.upcoming_sleep, 2),
                error=describe_error(error) if error else None,
            )

        retrying = AsyncRetrying(
            retry=retry_if_exception(is_transient),
            wait=wait_random_exponential(multiplier=0.2, max=10),
            stop=stop_after_attempt(attempts or self.retries),
            sleep=self._sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                if self._conn is None or self._conn.is_closed():
                    await self._reconnect()
                try:
                    return await work(self.conn)
                except BaseException as error:
                    if is_connection_error(error):
                        await self.close()
                    raise
        raise AssertionError("unreachable: tenacity reraises the last error")
