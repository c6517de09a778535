"""Shared fixtures: one local PostgreSQL server per test session, one database per test."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator

import pytest

from livepart.pgserver import LocalPostgres, PsqlError

MAX_IDENTIFIER_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1
_database_numbers = itertools.count(1)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long-running test")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[LocalPostgres]:
    """One throwaway PostgreSQL server for the whole session, stopped at the end."""
    with LocalPostgres() as server:
        yield server


@pytest.fixture
def make_dsn(pg_server: LocalPostgres, request: pytest.FixtureRequest) -> Iterator[Callable[[str], str]]:
    """Factory `make_dsn(suffix) -> dsn` for a new empty database, dropped after the test."""
    created: list[str] = []

    def create(suffix: str = "") -> str:
        name = _database_name(request.node.name, suffix)
        dsn = pg_server.create_database(name)
        created.append(name)
        return dsn

    yield create

    for name in created:
        try:
            pg_server.drop_database(name)
        except PsqlError:
            pass  # The test may have stopped the server or dropped the database itself.


@pytest.fixture
def dsn(make_dsn: Callable[[str], str]) -> str:
    """DSN of a new empty database named after the test, dropped after the test."""
    return make_dsn("")


def _database_name(test_name: str, suffix: str) -> str:
    """Build a database name from the test name that is unique within the session.

    Parametrized tests share a prefix, so a session-wide number keeps names apart.
    The result is lowercase ASCII, so its length in characters equals its length in bytes.
    """
    tail = f"_{_sanitize(suffix)[:20]}" if suffix else ""
    tail += f"_{next(_database_numbers)}"
    head = _sanitize(test_name)[: MAX_IDENTIFIER_BYTES - len(tail)]
    return head + tail


def _sanitize(text: str) -> str:
    return re.sub(r"[^a-z0-9_]+", "_", text.lower()).strip("_") or "db"
