"""``FlushScheduler`` on its own: a manual clock, and a flush that is a future the test resolves.

The cache's tests (test_cache.py) show the guarantees end to end; these pin the scheduler's rules one by one:
the derived backoff, the tick, one flush at a time, forced and unforced triggers, closing, and a stop's
``finish``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import pytest

from kvtornado.scheduler import MAX_BACKOFF_MS, FlushScheduler, LoopClock, backoff_ms, wait_until
from tests.unit.fakes import ManualClock, run_ready
from tests.unit.fakes import wait_until as wait_for_condition


class Flushes:
    """The cache's side: each flush is a future the test resolves with success (True) or failure (False)."""

    def __init__(self, clock: ManualClock, interval_ms: int = 100) -> None:
        self.work = True  # has_work()
        self.next = False  # wants_next()
        self.started: list[asyncio.Future[bool]] = []
        self.scheduler = FlushScheduler(clock, interval_ms, begin=self.begin, has_work=lambda: self.work,
                                        wants_next=lambda: self.next)

    def begin(self) -> Awaitable[None]:
        outcome: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.started.append(outcome)

        async def flush() -> None:
            if await outcome:
                self.scheduler.succeeded()
            else:
                self.scheduler.failed()

        return flush()

    async def end(self, ok: bool) -> None:
        """End the running flush, and let whatever it starts next start."""
        self.started[-1].set_result(ok)
        await run_ready()


@pytest.mark.parametrize(("streak", "interval_ms", "expected"), [
    (0, 100, 0), (-1, 100, 0), (1, 100, 100), (2, 100, 200), (3, 100, 400), (6, 100, 3200), (7, 100, 5000),
    (1000, 100, 5000), (1, 8000, 5000), (1, 1, 1), (13, 1, 4096), (14, 1, 5000),
])
def test_the_backoff_doubles_from_the_interval_up_to_5_s(streak: int, interval_ms: int, expected: int) -> None:
    assert backoff_ms(streak, interval_ms) == expected
    assert MAX_BACKOFF_MS == 5000


@pytest.mark.gen_test
async def test_the_tick_starts_a_flush_every_interval_when_there_is_work() -> None:
    clock = ManualClock()
    f = Flushes(clock, interval_ms=100)
    f.scheduler.start()
    clock.advance(0.099)
    assert f.started == []
    clock.advance(0.001)
    assert len(f.started) == 1
    await f.end(True)
    f.work = False
    clock.advance(0.1)
    assert len(f.started) == 1  # nothing to do: no flush
    f.work = True
    clock.advance(0.1)
    assert len(f.started) == 2


@pytest.mark.gen_test
async def test_one_flush_at_a_time_and_one_more_for_every_trigger_that_came_meanwhile() -> None:
    clock = ManualClock()
    f = Flushes(clock)
    f.scheduler.trigger()
    f.scheduler.trigger()
    f.scheduler.trigger(force=True)
    assert len(f.started) == 1
    await f.end(True)
    assert len(f.started) == 2  # the three triggers asked for one more, right after
    await f.end(True)
    assert len(f.started) == 2  # and only one


@pytest.mark.gen_test
async def test_after_a_flush_the_cache_may_ask_for_the_next_one() -> None:
    f = Flushes(ManualClock())
    f.scheduler.trigger()
    f.next = True
    await f.end(True)
    assert len(f.started) == 2
    f.next = False
    await f.end(True)
    assert len(f.started) == 2


@pytest.mark.gen_test
async def test_a_failure_backs_off_unforced_triggers_and_retries_when_the_backoff_runs_out() -> None:
    clock = ManualClock()
    f = Flushes(clock, interval_ms=1000)
    f.scheduler.start()
    f.scheduler.trigger()
    await f.end(False)
    assert (f.scheduler.streak, f.scheduler.retry_at, f.scheduler.retry_after_s()) == (1, clock.now() + 1.0, 1)
    f.scheduler.trigger()  # inside the backoff: nothing
    assert len(f.started) == 1
    clock.advance(0.999)
    assert len(f.started) == 1
    clock.advance(0.001)  # the retry, due exactly when the backoff runs out
    assert len(f.started) == 2
    await f.end(False)
    assert (f.scheduler.streak, f.scheduler.retry_after_s()) == (2, 2)
    clock.advance(0.5)
    assert f.scheduler.retry_after_s() == 2  # 1.5 s left: rounded up
    f.scheduler.trigger(force=True)  # POST /flush: at once, whatever the backoff
    assert len(f.started) == 3
    await f.end(True)
    assert (f.scheduler.streak, f.scheduler.retry_at, f.scheduler.retry_after_s()) == (0, 0.0, 1)
    clock.advance(10)  # the cancelled retry timer does not fire; the ticks run (work is always there)
    assert len(f.started) == 4


@pytest.mark.gen_test
async def test_a_forced_ask_during_a_flush_is_kept_whatever_asks_after_it() -> None:
    clock = ManualClock()
    f = Flushes(clock, interval_ms=1000)
    f.scheduler.trigger(force=True)
    f.scheduler.trigger(force=True)  # POST /flush meanwhile ...
    f.scheduler.trigger()  # ... then an unforced trigger
    await f.end(False)  # a failure: a backoff starts
    assert len(f.started) == 2, "the forced ask was lost to the unforced one"


@pytest.mark.gen_test
async def test_an_unforced_ask_during_a_flush_waits_out_the_backoff_if_that_flush_fails() -> None:
    clock = ManualClock()
    f = Flushes(clock, interval_ms=1000)
    f.scheduler.trigger()
    f.scheduler.trigger()
    await f.end(False)
    assert len(f.started) == 1


@pytest.mark.gen_test
async def test_closed_it_ignores_ticks_retries_and_unforced_triggers_but_not_forced_ones() -> None:
    clock = ManualClock()
    f = Flushes(clock, interval_ms=100)
    f.scheduler.start()
    f.scheduler.trigger()
    await f.end(False)
    f.scheduler.close()
    assert clock.timers == []
    clock.advance(10)
    f.scheduler.trigger()
    assert len(f.started) == 1
    f.scheduler.trigger(force=True)
    assert len(f.started) == 2


@pytest.mark.gen_test
async def test_a_retry_is_only_scheduled_once_started() -> None:
    clock = ManualClock()
    f = Flushes(clock, interval_ms=100)
    f.scheduler.trigger()
    await f.end(False)
    assert clock.timers == []  # not started: the owner drives every flush itself


@pytest.mark.gen_test
async def test_finish_tries_at_once_then_after_each_backoff_until_its_deadline() -> None:
    clock = ManualClock()
    f = Flushes(clock, interval_ms=100)
    f.scheduler.start()
    f.scheduler.trigger()
    await f.end(False)  # in a 100 ms backoff when the stop begins
    finishing = asyncio.ensure_future(f.scheduler.finish(0.25))
    await run_ready()
    assert len(f.started) == 2  # at once, inside the backoff
    await f.end(False)  # backoff 200 ms
    retry_at = f.scheduler.retry_at
    assert retry_at == pytest.approx(clock.now() + 0.2)
    clock.advance_to(retry_at - 0.001)
    await run_ready()
    assert len(f.started) == 2
    clock.advance_to(retry_at)
    await run_ready()
    assert len(f.started) == 3
    await f.end(False)  # backoff 400 ms, past the deadline (0.25 s)
    clock.advance(0.05)
    await asyncio.wait_for(finishing, timeout=5)
    assert len(f.started) == 3


@pytest.mark.gen_test
async def test_finish_waits_for_the_running_flush_and_returns_when_nothing_is_left() -> None:
    clock = ManualClock()
    f = Flushes(clock)
    f.scheduler.trigger()
    finishing = asyncio.ensure_future(f.scheduler.finish(5))
    await run_ready()
    assert not finishing.done() and len(f.started) == 1
    f.work = False
    await f.end(True)
    await asyncio.wait_for(finishing, timeout=5)
    assert len(f.started) == 1


@pytest.mark.gen_test
async def test_finish_gives_up_on_a_flush_still_running_at_its_deadline() -> None:
    clock = ManualClock()
    f = Flushes(clock)
    f.scheduler.trigger()
    finishing = asyncio.ensure_future(f.scheduler.finish(1))
    await run_ready()
    clock.advance(1)
    await asyncio.wait_for(finishing, timeout=5)
    assert not f.started[0].done()


@pytest.mark.gen_test
async def test_wait_until_returns_at_the_time_or_when_the_task_ends_whichever_is_first() -> None:
    clock = ManualClock()
    waiting = asyncio.ensure_future(wait_until(clock, clock.now() + 1))
    await run_ready()
    assert not waiting.done()
    clock.advance(1)
    await asyncio.wait_for(waiting, timeout=5)
    assert clock.timers == []

    task: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiting = asyncio.ensure_future(wait_until(clock, clock.now() + 1, task))
    await run_ready()
    task.set_result(None)
    await asyncio.wait_for(waiting, timeout=5)
    assert clock.timers == []  # its timer was cancelled


@pytest.mark.gen_test
async def test_the_loop_clock_is_monotonic_time_and_calls_back_on_the_loop() -> None:
    clock = LoopClock()
    fired = asyncio.Event()
    start = clock.now()
    clock.call_at(start + 0.01, fired.set)
    cancelled = clock.call_at(start, lambda: pytest.fail("a cancelled timer fired"))
    cancelled.cancel()
    await wait_for_condition(fired.is_set, "the loop clock's timer")
    assert clock.now() >= start + 0.01
