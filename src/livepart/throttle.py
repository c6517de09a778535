"""Throttling between batches.

The copy loop only waits on the throttler and reads its cheap "throttled, why"
state. The state is logged when it changes, not on every batch.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

from .errors import Interrupted


@dataclass(frozen=True)
class ThrottleState:
    throttled: bool
    reason: str


class Throttler(Protocol):
    state: ThrottleState

    async def wait(self, stop: asyncio.Event) -> None: ...


class NoThrottle:
    state = ThrottleState(False, "not throttled")

    async def wait(self, stop: asyncio.Event) -> None:
        if stop.is_set():
            raise Interrupted("stop requested")


class FixedSleep:
    """Sleep a fixed time between batches (--sleep), waking early on a stop signal."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.state = ThrottleState(True, f"fixed sleep of {seconds:g} s between batches")

    async def wait(self, stop: asyncio.Event) -> None:
        await interruptible_sleep(stop, self.seconds)


async def interruptible_sleep(stop: asyncio.Event, seconds: float) -> None:
    """Sleep, but raise Interrupted as soon as a stop is requested."""
    if stop.is_set():
        raise Interrupted("stop requested")
    if seconds <= 0:
        return
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        return
    raise Interrupted("stop requested")


def throttler_for(sleep: float) -> Throttler:
    return FixedSleep(sleep) if sleep > 0 else NoThrottle()
