"""The per-run context that every phase receives: settings, connection, stop signal."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg
import structlog

from .db import Database
from .throttle import Throttler, interruptible_sleep, throttler_for
from .settings import Settings
from .state import update_state


# Test hooks: coroutines that in-process tests register to run at a named point.
test_hooks: dict[str, Callable[[], Awaitable[None]]] = {}


@dataclass
class Worker:
    settings: Settings
    db: Database
    stop: asyncio.Event
    log: structlog.typing.FilteringBoundLogger
    throttler: Throttler = field(init=False)
    _throttle_reason: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.throttler = throttler_for(self.settings.sleep)

    @property
    def schema(self) -> str:
        return self.settings.schema

    @property
    def table(self) -> str:
        return self.settings.table

    async def pause_point(self, name: str) -> None:
        """Test hook: run a registered coroutine, or sleep when LIVEPART_TEST_PAUSE names the point.

        The variable holds `point=seconds` pairs separated by commas. Tests use it
        to kill the worker at exact moments, for instance inside the swap transaction.
        """
        hook = test_hooks.get(name)
        if hook is not None:
            await hook()
        seconds = test_pauses().get(name)
        if seconds:
            self.log.info("test.pause", point=name, seconds=seconds)
            await asyncio.sleep(seconds)

    async def sleep(self, seconds: float) -> None:
        await interruptible_sleep(self.stop, seconds)

    async def throttle(self) -> None:
        """Wait for the throttler, logging and persisting its state when the reason changes."""
        state = self.throttler.state
        if state.reason != self._throttle_reason:
            self._throttle_reason = state.reason
            self.log.info("throttle.changed", throttled=state.throttled, reason=state.reason)

            async def record(conn: asyncpg.Connection) -> None:
                await update_state(conn, self.schema, self.table, throttle=state.reason)

            await self.db.run("throttle.record", record)
        await self.throttler.wait(self.stop)


def test_pauses() -> dict[str, float]:
    raw = os.environ.get("LIVEPART_TEST_PAUSE", "")
    pauses = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        point, _, seconds = item.partition("=")
        pauses[point] = float(seconds or 0)
    return pauses
