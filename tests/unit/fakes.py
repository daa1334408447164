"""Test doubles for the write-behind cache: a store over a dict that can fail or stall, and a manual clock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from kvtornado.errors import StorageError
from kvtornado.store import Row, ordered_batches

T = TypeVar("T")


class Gate:
    """A stall point. Open, callers pass straight through (no await at all, so a healthy call is atomic);
    closed, they wait until ``open()``. ``waiting`` says how many are held, so a test can act "during" a call."""

    def __init__(self) -> None:
        self._opened = asyncio.Event()
        self._opened.set()
        self.waiting = 0

    def close(self) -> None:
        self._opened.clear()

    def open(self) -> None:
        self._opened.set()

    async def pass_through(self) -> None:
        if self._opened.is_set():
            return
        self.waiting += 1
        try:
            await self._opened.wait()
        finally:
            self.waiting -= 1


class FakeStore:
    """The two calls the cache uses, over a plain dict of committed rows.

    ``read`` takes its value when it is called and returns it after the read gate: a stalled read is a read
    that sqlite answered before some later commit. ``write_rows`` applies its rows all at once after the
    write gate, or raises ``StorageError`` when the store is failing.
    """

    def __init__(self, committed: dict[str, str] | None = None) -> None:
        self.committed: dict[str, str] = dict(committed or {})
        self.read_gate = Gate()
        self.write_gate = Gate()
        self.fail_writes = False
        self.fail_reads = False
        self.writes_before_failure: int | None = None  # fail every write_rows call after this many succeed
        self.reads: list[str] = []  # every key read, in order
        self.write_calls: list[list[Row]] = []  # every write_rows call, failed ones included
        self.commits: list[list[Row]] = []  # the write_rows calls that committed
        self.in_flight = 0
        self.max_in_flight = 0

    def heal(self) -> None:
        self.fail_writes = self.fail_reads = False
        self.writes_before_failure = None

    async def read(self, key: str) -> str | None:
        self.reads.append(key)
        value = self.committed.get(key)
        await self.read_gate.pass_through()
        if self.fail_reads:
            raise StorageError("sqlite read failed: disk I/O error (fake)")
        return value

    async def ordered_batches(self, rows: Mapping[str, T], batch_rows: int) -> list[list[tuple[str, T]]]:
        return ordered_batches(rows, batch_rows)  # the real planner, run inline

    async def write_rows(self, rows: Sequence[Row]) -> None:
        batch = list(rows)
        self.write_calls.append(batch)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self.write_gate.pass_through()
            if self.fail_writes or self.writes_before_failure == 0:
                raise StorageError("sqlite write failed: database is locked (fake)")
            if self.writes_before_failure is not None:
                self.writes_before_failure -= 1
            for key, value in batch:
                if value is None:
                    self.committed.pop(key, None)
                else:
                    self.committed[key] = value
            self.commits.append(batch)
        finally:
            self.in_flight -= 1


class _ManualTimer:
    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """An injected monotonic clock (``kvtornado.scheduler.Clock``) that moves only when the test says so.
    ``advance`` runs every timer that falls due, in time order (and those they set that fall due too)."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._timers: list[_ManualTimer] = []

    def now(self) -> float:
        return self._now

    def call_at(self, when: float, callback: Callable[[], None]) -> _ManualTimer:
        timer = _ManualTimer(when, callback)
        if when <= self._now:  # already due: on the loop's next round, as the loop's own timers do
            asyncio.get_running_loop().call_soon(lambda: None if timer.cancelled else timer.callback())
        else:
            self._timers.append(timer)
        return timer

    @property
    def timers(self) -> list[float]:
        """When each live timer is due, earliest first."""
        return sorted(t.when for t in self._timers if not t.cancelled)

    def advance(self, seconds: float) -> None:
        self.advance_to(self._now + seconds)

    def advance_to(self, target: float) -> None:
        while True:
            due = [t for t in self._timers if not t.cancelled and t.when <= target]
            if not due:
                break
            timer = min(due, key=lambda t: t.when)
            self._timers.remove(timer)
            self._now = max(self._now, timer.when)
            timer.callback()
        self._timers = [t for t in self._timers if not t.cancelled]
        self._now = target


async def wait_until(condition: Callable[[], object], what: str, timeout_s: float = 5.0) -> None:
    """Poll ``condition`` on the event loop until it holds; fail (not hang) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.001)


async def run_ready(rounds: int = 20) -> None:
    """Let every task that is ready run to its next real wait (the fake store has no threads, so a few loop
    rounds are enough for a triggered flush to reach ``write_rows``). Used only to show something did NOT
    happen; positive conditions are awaited with ``wait_until``."""
    for _ in range(rounds):
        await asyncio.sleep(0)
