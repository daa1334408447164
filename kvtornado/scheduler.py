"""When the write-behind cache flushes (SPEC §7, G3 and G4): one clock, one flush at a time, a derived backoff.

The cache (cache.py) owns *what* is pending; this module owns *when* it is written:
- every ``flush_interval_ms`` (a timer on the injected clock), and at once when the cache triggers a flush
  (``flush_batch_size`` new keys, a durable write, ``POST /flush``);
- one flush at a time: a trigger during a flush runs one more flush right after it (forced if any trigger
  that arrived meanwhile was forced);
- after the n-th failed attempt in a row, no unforced trigger starts a flush for
  ``backoff_ms(n, flush_interval_ms)``, and a retry is due when that runs out. The backoff is a function of
  the failure streak, never stored. A forced trigger (``POST /flush``) does not wait it out.

Every deadline (the tick, the retry, a graceful stop's timeout) is on one injected ``Clock``, so a test moves
time with a manual clock instead of waiting for it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

MAX_BACKOFF_MS = 5000


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """Monotonic seconds, and callbacks at a time on that clock."""

    def now(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer: ...


class LoopClock:
    """``time.monotonic`` and timers on the running asyncio loop (whose own clock is monotonic too)."""

    def now(self) -> float:
        return time.monotonic()

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_later(max(0.0, when - self.now()), callback)


async def wait_until(clock: Clock, when: float, task: asyncio.Future[None] | None = None) -> None:
    """Return when ``clock`` reaches ``when``, or as soon as ``task`` (if any) is done."""
    reached: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def reach() -> None:
        if not reached.done():
            reached.set_result(None)

    timer = clock.call_at(when, reach)
    try:
        await asyncio.wait({reached} if task is None else {reached, task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        timer.cancel()
        reached.cancel()


def backoff_ms(streak: int, interval_ms: int) -> int:
    """G4: after ``streak`` failed attempts in a row, interval·2^(streak-1), at most 5 s; 0 when healthy."""
    if streak <= 0:
        return 0
    return min(MAX_BACKOFF_MS, interval_ms << min(streak - 1, 16))


class FlushScheduler:
    """Starts the cache's flushes: on the tick, on a trigger, after a failure's backoff; one at a time.

    ``begin()`` is the cache's: called synchronously, it takes what is dirty as the new flush's batch and
    returns the coroutine that commits it (which reports its outcome with ``succeeded()``/``failed()``).
    ``has_work()`` says whether a flush would have anything to do (dirty keys or commit waiters);
    ``wants_next()`` whether the cache wants another flush right after one ends (without a trigger).
    """

    def __init__(
        self,
        clock: Clock,
        interval_ms: int,
        *,
        begin: Callable[[], Awaitable[None]],
        has_work: Callable[[], bool],
        wants_next: Callable[[], bool],
    ) -> None:
        self.clock = clock
        self.interval_ms = interval_ms
        self._begin = begin
        self._has_work = has_work
        self._wants_next = wants_next
        self.streak = 0  # failed attempts in a row
        self._failed_at = 0.0
        self._running: asyncio.Task[None] | None = None
        self._asked: bool | None = None  # a trigger during the running flush: None (none), False, True (forced)
        self._tick: Timer | None = None
        self._retry: Timer | None = None
        self._started = False
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()  # strong references until done

    # -- state ------------------------------------------------------------------------------------

    @property
    def backoff_ms(self) -> int:
        return backoff_ms(self.streak, self.interval_ms)

    @property
    def retry_at(self) -> float:
        """Clock time before which no unforced trigger starts a flush (0 when healthy)."""
        return self._failed_at + self.backoff_ms / 1000 if self.streak else 0.0

    def retry_after_s(self) -> int:
        """Retry-After for a refusal: healthy, a flush is on its way now; failing, when the backoff runs out."""
        if not self.streak:
            return 1
        return max(1, math.ceil(self.retry_at - self.clock.now()))

    # -- life cycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the periodic tick (on the event loop that serves requests)."""
        self._started = True
        self._schedule_tick()

    def close(self) -> None:
        """No more ticks or retries, and unforced triggers are ignored from now on."""
        self._closed = True
        for timer in (self._tick, self._retry):
            if timer is not None:
                timer.cancel()
        self._tick = self._retry = None

    async def finish(self, timeout_s: float) -> None:
        """For a graceful stop: close, then flush at once (whatever the backoff: sqlite may be fine again) and
        after each failure's backoff, until there is nothing to flush or ``timeout_s`` has passed."""
        self.close()
        deadline = self.clock.now() + timeout_s
        at_once = True
        while self._has_work() and self.clock.now() < deadline:
            if self._running is not None:
                await wait_until(self.clock, deadline, self._running)
            elif at_once or self.clock.now() >= self.retry_at:
                self._start()
            else:
                await wait_until(self.clock, min(self.retry_at, deadline))
            at_once = False
        if self._running is not None:
            await wait_until(self.clock, deadline, self._running)

    # -- triggers ---------------------------------------------------------------------------------

    def trigger(self, *, force: bool = False) -> None:
        """Flush now, or right after the running flush; an unforced trigger waits out a failure backoff and
        is ignored once the scheduler is closed."""
        if not force and (self._closed or self.clock.now() < self.retry_at):
            return
        if self._running is not None:
            self._asked = force or bool(self._asked)
            return
        if self._has_work():
            self._start()

    def succeeded(self) -> None:
        self.streak = 0
        self._cancel_retry()

    def failed(self) -> None:
        self.streak += 1
        self._failed_at = self.clock.now()
        if self._started and not self._closed:
            self._cancel_retry()
            self._retry = self.clock.call_at(self.retry_at, self._retry_due)

    # -- internals --------------------------------------------------------------------------------

    def _schedule_tick(self) -> None:
        self._tick = self.clock.call_at(self.clock.now() + self.interval_ms / 1000, self._on_tick)

    def _on_tick(self) -> None:
        self._schedule_tick()
        self.trigger()

    def _retry_due(self) -> None:
        self._retry = None
        self.trigger()

    def _cancel_retry(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    def _start(self) -> None:
        self._asked = None
        self._running = asyncio.ensure_future(self._run(self._begin()))
        self._tasks.add(self._running)
        self._running.add_done_callback(self._tasks.discard)

    async def _run(self, flush: Awaitable[None]) -> None:
        try:
            await flush
        finally:
            self._running = None
        if self._asked is not None:
            self.trigger(force=self._asked)
        elif self._wants_next():
            self.trigger()
