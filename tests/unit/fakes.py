"""Test doubles for the write-behind cache: a store over a dict that can fail or stall, and a manual clock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from kvtornado.errors import StorageError
from kvtornado.ops import Record
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
    """The calls the cache uses, over a plain dict of committed records.

    ``read`` takes its record when it is called and returns it after the read gate: a stalled read is a read
    that sqlite answered before some later commit. ``write_rows`` applies its rows all at once after the
    write gate, or raises ``StorageError`` when the store is failing. ``committed`` shows the committed values
    (JSON text) by key; ``records`` the whole records. Versions are reserved from a high-water mark, as sqlite does.
    """

    def __init__(self, committed: dict[str, str] | None = None) -> None:
        self.records: dict[str, Record] = {
            key: Record(value, n) for n, (key, value) in enumerate((committed or {}).items(), start=1)
        }
        self.hwm = len(self.records)
        self.clock: Callable[[], float] = time.time
        self.read_gate = Gate()
        self.write_gate = Gate()
        self.range_gate = Gate()
        self.fail_writes = False
        self.fail_reads = False
        self.fail_reserve = False
        self.writes_before_failure: int | None = None  # fail every write_rows call after this many succeed
        self.reads: list[str] = []  # every key read, in order
        self.write_calls: list[list[tuple[str, str | None]]] = []  # every write_rows call (key, value), failed too
        self.commits: list[list[tuple[str, str | None]]] = []  # the write_rows calls that committed
        self.reservations: list[tuple[int, int]] = []
        self.ranges: list[tuple[str, str | None, int, bool]] = []  # (prefix, after, limit, serial) of every range
        self.swept: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0

    @property
    def committed(self) -> dict[str, str]:
        return {key: record.value for key, record in self.records.items()}  # type: ignore[misc]

    def heal(self) -> None:
        self.fail_writes = self.fail_reads = self.fail_reserve = False
        self.writes_before_failure = None

    async def read(self, key: str) -> Record | None:
        self.reads.append(key)
        record = self.records.get(key)
        await self.read_gate.pass_through()
        if self.fail_reads:
            raise StorageError("sqlite read failed: disk I/O error (fake)")
        return record

    async def ordered_batches(self, rows: Mapping[str, T], batch_rows: int) -> list[list[tuple[str, T]]]:
        return ordered_batches(rows, batch_rows)  # the real planner, run inline

    async def write_rows(self, rows: Sequence[Row]) -> None:
        batch = list(rows)
        shown = [(key, record.value) for key, record in batch]
        self.write_calls.append(shown)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self.write_gate.pass_through()
            if self.fail_writes or self.writes_before_failure == 0:
                raise StorageError("sqlite write failed: database is locked (fake)")
            if self.writes_before_failure is not None:
                self.writes_before_failure -= 1
            for key, record in batch:
                assert record.version <= self.hwm, "a version written before it was reserved"
                if record.value is None:
                    self.records.pop(key, None)
                else:
                    self.records[key] = record
            self.commits.append(shown)
        finally:
            self.in_flight -= 1

    async def reserve_versions(self, n: int) -> tuple[int, int]:
        if self.fail_reserve:
            raise StorageError("sqlite write failed: disk I/O error (fake)")
        first, self.hwm = self.hwm + 1, self.hwm + n
        self.reservations.append((first, self.hwm))
        return first, self.hwm

    async def range(self, prefix: str, after: str | None, limit: int, now: float, *,
                    serial: bool = False) -> list[Row]:
        self.ranges.append((prefix, after, limit, serial))
        rows = sorted((key, record) for key, record in self.records.items()
                      if key.startswith(prefix) and (after is None or key > after) and record.live(now))
        await self.range_gate.pass_through()
        if self.fail_reads:
            raise StorageError("sqlite read failed: disk I/O error (fake)")
        return rows[:limit]

    async def sweep_expired(self, now: float, limit: int = 1000) -> int:
        gone = sorted(key for key, record in self.records.items()
                      if record.expires_at is not None and record.expires_at <= now)[:limit]
        for key in gone:
            del self.records[key]
        self.swept += gone
        return len(gone)


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
