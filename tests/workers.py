"""Run `livepart` as a real subprocess and react to its JSON log lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

Event = dict[str, Any]


class WorkerProcess:
    """A `python -m livepart ...` process whose stderr log events are collected as they arrive."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.process = subprocess.Popen(
            [sys.executable, "-m", "livepart", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.events: list[Event] = []
        self.other_lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                with self._lock:
                    self.other_lines.append(line.rstrip())
                continue
            with self._lock:
                self.events.append(event)

    def wait_for(self, predicate: Callable[[Event], bool], timeout: float = 60) -> Event | None:
        """Return the first event matching `predicate`, or None if the process ended first."""
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            with self._lock:
                new = self.events[seen:]
                seen = len(self.events)
            for event in new:
                if predicate(event):
                    return event
            if self.process.poll() is not None and not self._reader.is_alive():
                with self._lock:
                    if seen == len(self.events):
                        return None
                continue
            time.sleep(0.005)
        raise TimeoutError(f"no matching event within {timeout} s; last events: {self.events[-5:]}")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.finish()

    def signal(self, number: int) -> None:
        self.process.send_signal(number)

    def finish(self, timeout: float = 300) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    @property
    def stdout(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.read()

    def named(self, name: str) -> list[Event]:
        with self._lock:
            return [e for e in self.events if e.get("event") == name]
