"""The write-behind cache's guarantees (SPEC §7, G1-G7) against a store double and an injected clock.

``FakeStore`` (tests/unit/fakes.py) commits to a dict, and can fail or stall on demand so a test can act
during a flush or during a miss's read. A few tests run over the real ``SqliteStore`` under ``tmp_path``.
The last part is a Hypothesis state machine that checks the cache against a plain dict.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvtornado.cache import WriteBehindCache, nbytes
from kvtornado.config import CacheConfig
from kvtornado.errors import DurableTimeout, Overloaded, StorageError
from kvtornado.ops import Record
from kvtornado.scheduler import MAX_BACKOFF_MS
from kvtornado.store import SqliteStore
from tests.unit.fakes import FakeStore, ManualClock, run_ready, wait_until

# Large by default so that only the trigger a test is about can start a flush.
QUIET = {"flush_interval_ms": 100, "flush_batch_size": 10_000, "max_dirty": 10_000, "max_entries": 10_000}

MakeCache = Callable[..., WriteBehindCache]


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def make_cache(io_loop: Any) -> Iterator[MakeCache]:
    """``make_cache(store, clock=..., **cache_config)``; at teardown every stall is released and every
    background task of every cache made is finished, so nothing is left pending on the closed loop."""
    made: list[WriteBehindCache] = []

    def make(store: Any, *, clock: ManualClock | None = None, **cfg: Any) -> WriteBehindCache:
        config = CacheConfig(**{**QUIET, **cfg})
        cache = WriteBehindCache(store, config) if clock is None else WriteBehindCache(store, config, clock=clock)
        made.append(cache)
        return cache

    yield make

    async def finish() -> None:
        for cache in made:
            cache.scheduler.close()
            if isinstance(cache.store, FakeStore):
                cache.store.heal()
                cache.store.read_gate.open()
                cache.store.write_gate.open()
        pending = asyncio.all_tasks() - {asyncio.current_task()}
        if pending:
            await asyncio.wait(pending, timeout=5)

    io_loop.run_sync(finish)


async def on_manual_clock(make_cache: MakeCache, store: Any, **cfg: Any) -> tuple[WriteBehindCache, ManualClock]:
    """A started cache whose every timer (tick, retry, durable timeout) waits for the test's ``clock.advance``."""
    clock = ManualClock()
    cache = make_cache(store, clock=clock, **cfg)
    await cache.start()
    return cache, clock


def flush_stats(cache: WriteBehindCache) -> dict[str, Any]:
    return cache.stats()["flush"]


def cache_stats(cache: WriteBehindCache) -> dict[str, Any]:
    return cache.stats()["cache"]


# ================================================================================================
# G1 read-your-writes
# ================================================================================================


@pytest.mark.gen_test
async def test_g1_write_is_read_back_before_any_flush(store: FakeStore, make_cache: MakeCache) -> None:
    cache = make_cache(store)
    await cache.put("k", '"v"')
    assert await cache.get("k") == '"v"'
    assert store.reads == []  # answered from memory
    assert store.committed == {}  # and not yet written


@pytest.mark.gen_test
async def test_g1_writes_are_read_back_during_a_flush(store: FakeStore, make_cache: MakeCache) -> None:
    cache = make_cache(store)
    await cache.put("k", '"v1"')
    store.write_gate.close()
    flushing = asyncio.ensure_future(cache.flush())
    await wait_until(lambda: store.write_gate.waiting == 1, "the flush to reach the store")

    assert await cache.get("k") == '"v1"'  # the batch in flight is still readable
    await cache.put("k", '"v2"')
    assert await cache.get("k") == '"v2"'  # and a newer write wins over it
    store.write_gate.open()
    assert await flushing == 1

    assert store.committed == {"k": '"v1"'}
    assert await cache.get("k") == '"v2"'  # the commit of v1 did not overwrite the newer v2
    assert store.reads == []


@pytest.mark.gen_test
async def test_g1_writes_are_read_back_after_a_failed_flush(store: FakeStore, make_cache: MakeCache) -> None:
    cache = make_cache(store)
    await cache.put("k", '"v"')
    store.fail_writes = True
    with pytest.raises(Overloaded):
        await cache.flush()
    assert await cache.get("k") == '"v"'
    assert store.reads == []
    assert cache_stats(cache)["dirty"] == 1


@pytest.mark.gen_test
async def test_g1_delete_is_a_tombstone_read_as_absent_before_commit(make_cache: MakeCache) -> None:
    store = FakeStore({"k": '"old"'})
    cache = make_cache(store)
    assert await cache.get("k") == '"old"'
    assert await cache.delete("k") is True
    assert await cache.get("k") is None
    assert await cache.delete("k") is False  # already gone as far as any client can tell
    assert store.committed == {"k": '"old"'}  # not committed yet...
    assert store.reads == ["k"]  # ...and the tombstone answered without asking the store
    assert await cache.flush() == 1
    assert store.committed == {}
    assert await cache.get("k") is None


@pytest.mark.gen_test
async def test_g1_deleted_key_is_not_resurrected_by_eviction_pressure(make_cache: MakeCache) -> None:
    store = FakeStore({f"k{i}": f'"v{i}"' for i in range(6)})
    cache = make_cache(store, max_entries=1)
    assert await cache.get("k0") == '"v0"'
    assert await cache.delete("k0") is True
    for i in range(1, 6):  # every read evicts the previous clean entry
        assert await cache.get(f"k{i}") == f'"v{i}"'
    assert cache_stats(cache)["evictions"] >= 4
    assert await cache.get("k0") is None
    assert store.reads.count("k0") == 1  # the tombstone was never evicted, so no re-read of the old value

    assert await cache.flush() == 1
    for i in range(1, 6):
        await cache.get(f"k{i}")
    assert await cache.get("k0") is None  # once committed, the store itself says absent
    assert "k0" not in store.committed


@pytest.mark.gen_test
async def test_g1_dirty_entries_and_tombstones_are_never_evicted(make_cache: MakeCache) -> None:
    store = FakeStore({f"c{i}": f'"c{i}"' for i in range(10)} | {"gone": '"old"'})
    cache = make_cache(store, max_entries=2)
    for i in range(5):
        await cache.put(f"d{i}", f'"d{i}"')
    assert await cache.delete("gone") is True
    for i in range(10):
        await cache.get(f"c{i}")
    assert cache_stats(cache)["evictions"] == 8
    assert cache_stats(cache)["clean"] == 2
    assert cache_stats(cache)["dirty"] == 6

    store.fail_reads = True  # any store read from here on would fail the test
    for i in range(5):
        assert await cache.get(f"d{i}") == f'"d{i}"'
    assert await cache.get("gone") is None


@pytest.mark.gen_test
async def test_g1_miss_never_reads_the_store_for_a_key_with_a_pending_write(make_cache: MakeCache) -> None:
    store = FakeStore({"k": '"committed"', "t": '"committed"'})
    cache = make_cache(store)
    await cache.put("k", '"pending"')
    assert await cache.delete("t") is True  # reads "t" once to know it exists, then tombstones it
    reads_before = list(store.reads)
    store.fail_reads = True
    assert await cache.get("k") == '"pending"'
    assert await cache.get("t") is None
    assert await cache.delete("t") is False
    assert store.reads == reads_before == ["t"]


@pytest.mark.gen_test
async def test_g1_miss_read_racing_a_save_is_not_cached_and_later_gets_see_the_save(make_cache: MakeCache) -> None:
    store = FakeStore({"k": '"old"'})
    cache = make_cache(store)
    store.read_gate.close()
    early_get = asyncio.ensure_future(cache.get("k"))
    await wait_until(lambda: store.read_gate.waiting == 1, "the miss's read to reach the store")

    await cache.put("k", '"new"')
    assert await cache.get("k") == '"new"'
    store.read_gate.open()
    assert await early_get == '"old"'  # it started before the save: the old value was current for it

    assert await cache.get("k") == '"new"'
    assert cache_stats(cache)["clean"] == 0  # the stale read was not remembered
    assert await cache.flush() == 1
    assert await cache.get("k") == '"new"'
    assert store.reads == ["k"]


@pytest.mark.gen_test
async def test_g1_miss_read_racing_a_flushed_delete_does_not_resurrect(make_cache: MakeCache) -> None:
    store = FakeStore({"k": '"old"'})
    cache = make_cache(store)
    store.read_gate.close()
    early_get = asyncio.ensure_future(cache.get("k"))
    await wait_until(lambda: store.read_gate.waiting == 1, "the miss's read to reach the store")

    await cache.put("k", '"mid"')
    assert await cache.delete("k", durable=True) is True  # committed while the old read is still out
    assert "k" not in store.committed
    store.read_gate.open()
    assert await early_get == '"old"'

    assert await cache.get("k") is None  # the old read's value was not cached over the tombstone's commit
    assert await cache.get("k") is None
    assert "k" not in store.committed


@pytest.mark.gen_test
async def test_g1_concurrent_misses_for_one_key_share_one_store_read(make_cache: MakeCache) -> None:
    store = FakeStore({"k": '"v"'})
    cache = make_cache(store)
    store.read_gate.close()
    gets = [asyncio.ensure_future(cache.get("k")) for _ in range(5)]
    await wait_until(lambda: store.read_gate.waiting == 1, "the shared read to reach the store")
    await run_ready()
    assert store.reads == ["k"]
    store.read_gate.open()
    assert await asyncio.gather(*gets) == ['"v"'] * 5
    assert await cache.get("k") == '"v"'  # now cached
    assert store.reads == ["k"]
    assert cache_stats(cache)["misses"] == 5


@pytest.mark.gen_test
async def test_g1_failed_miss_read_raises_to_every_waiter_and_is_retried_next_time(make_cache: MakeCache) -> None:
    store = FakeStore({"k": '"v"'})
    cache = make_cache(store)
    store.fail_reads = True
    store.read_gate.close()
    gets = [asyncio.ensure_future(cache.get("k")) for _ in range(3)]
    await wait_until(lambda: store.read_gate.waiting == 1, "the shared read")
    store.read_gate.open()
    results = await asyncio.gather(*gets, return_exceptions=True)
    assert all(isinstance(r, StorageError) for r in results)
    store.fail_reads = False
    assert await cache.get("k") == '"v"'
    assert store.reads == ["k", "k"]


# ================================================================================================
# G2 last write wins, coalesced
# ================================================================================================


@pytest.mark.gen_test
async def test_g2_hundred_writes_to_one_key_become_one_row_with_the_last_value(
    store: FakeStore, make_cache: MakeCache
) -> None:
    cache = make_cache(store)
    for i in range(100):
        await cache.put("k", f'"v{i}"')
    assert await cache.flush() == 1
    assert store.write_calls == [[("k", '"v99"')]]
    assert flush_stats(cache)["rows"] == 1
    assert flush_stats(cache)["count"] == 1
    assert store.committed == {"k": '"v99"'}


@pytest.mark.parametrize(
    ("ops", "committed"),
    [
        pytest.param([("put", "a"), ("put", "b")], '"b"', id="put-put"),
        pytest.param([("put", "a"), ("delete", None)], None, id="put-delete"),
        pytest.param([("delete", None), ("put", "c")], '"c"', id="delete-put"),
        pytest.param([("put", "a"), ("delete", None), ("put", "d"), ("delete", None)], None, id="put-delete-x2"),
    ],
)
@pytest.mark.gen_test
async def test_g2_committed_state_is_the_last_acknowledged_operation(
    make_cache: MakeCache, ops: list[tuple[str, str | None]], committed: str | None
) -> None:
    store = FakeStore({"k": '"old"'})
    cache = make_cache(store)
    for op, value in ops:
        if op == "put":
            await cache.put("k", f'"{value}"')
        else:
            assert await cache.delete("k") is True
    assert await cache.flush() == 1
    assert store.committed.get("k") == committed
    assert flush_stats(cache)["rows"] == 1


# ================================================================================================
# G3 triggers, one flush at a time, snapshots and transaction sizes
# ================================================================================================


@pytest.mark.gen_test
async def test_g3_flush_takes_what_is_dirty_at_its_start_and_later_writes_wait_for_the_next(
    store: FakeStore, make_cache: MakeCache
) -> None:
    cache = make_cache(store)
    await cache.put("a", '"a1"')
    await cache.put("b", '"b1"')
    store.write_gate.close()
    first = asyncio.ensure_future(cache.flush())
    await wait_until(lambda: store.write_gate.waiting == 1, "the first flush to reach the store")
    await cache.put("c", '"c1"')
    await cache.put("a", '"a2"')
    store.write_gate.open()
    assert await first == 2

    assert sorted(store.write_calls[0]) == [("a", '"a1"'), ("b", '"b1"')]
    assert store.committed == {"a": '"a1"', "b": '"b1"'}
    assert cache_stats(cache)["dirty"] == 2  # a2 and c1 wait for the next flush

    assert await cache.flush() == 2
    assert sorted(store.write_calls[1]) == [("a", '"a2"'), ("c", '"c1"')]
    assert store.committed == {"a": '"a2"', "b": '"b1"', "c": '"c1"'}
    assert cache_stats(cache)["dirty"] == 0


@pytest.mark.gen_test
async def test_g3_a_flush_commits_in_transactions_of_at_most_flush_batch_size_rows(
    store: FakeStore, make_cache: MakeCache
) -> None:
    cache = make_cache(store, flush_batch_size=3)
    store.fail_writes = True  # the size trigger's flushes fail, and the backoff holds the next ones back
    for i in range(10):
        await cache.put(f"k{i:02}", f'"{i}"')
    await wait_until(lambda: flush_stats(cache)["errors"] == 1, "the size-triggered flush to fail")
    await run_ready()
    assert len(store.write_calls) == 1
    store.heal()

    assert await cache.flush() == 10
    assert [len(rows) for rows in store.commits] == [3, 3, 3, 1]
    assert store.committed == {f"k{i:02}": f'"{i}"' for i in range(10)}
    assert flush_stats(cache)["rows"] == 10


@pytest.mark.gen_test
async def test_g3_flush_batch_size_new_dirty_keys_start_a_flush_without_the_timer(
    store: FakeStore, make_cache: MakeCache
) -> None:
    cache = make_cache(store, flush_batch_size=5)  # start() is never called: there is no timer
    for i in range(4):
        await cache.put(f"k{i}", '"v"')
        await cache.put(f"k{i}", '"w"')  # overwrites are not new dirty keys
    await run_ready()
    assert store.write_calls == []
    await cache.put("k4", '"v"')
    await wait_until(lambda: len(store.committed) == 5, "the size-triggered flush to commit")
    assert flush_stats(cache)["count"] == 1
    assert len(store.write_calls) == 1


@pytest.mark.gen_test
async def test_g3_periodic_timer_flushes(store: FakeStore, make_cache: MakeCache) -> None:
    cache = make_cache(store, flush_interval_ms=10)
    await cache.start()
    await cache.put("k", '"v"')
    await wait_until(lambda: flush_stats(cache)["count"] >= 1, "a periodic flush")
    assert store.committed == {"k": '"v"'}
    assert cache_stats(cache)["dirty"] == 0
    assert await cache.stop(1.0) == 0


@pytest.mark.gen_test
async def test_g3_only_one_flush_runs_at_a_time(store: FakeStore, make_cache: MakeCache) -> None:
    cache, clock = await on_manual_clock(make_cache, store, flush_batch_size=2)
    store.write_gate.close()
    await cache.put("a", '"1"')
    first = asyncio.ensure_future(cache.flush())
    await wait_until(lambda: store.write_gate.waiting == 1, "the first flush to reach the store")
    # Every trigger there is, while the first flush is stalled:
    await cache.put("b", '"1"')
    await cache.put("c", '"1"')  # two new dirty keys: the size trigger
    clock.advance(0.1)  # the periodic trigger
    durable = asyncio.ensure_future(cache.put("d", '"1"', durable=True))
    await run_ready()
    second = asyncio.ensure_future(cache.flush())  # POST /flush
    await run_ready()
    assert len(store.write_calls) == 1
    store.write_gate.open()
    assert await first == 1
    assert await second == 4
    await durable
    assert store.max_in_flight == 1
    assert store.committed == {"a": '"1"', "b": '"1"', "c": '"1"', "d": '"1"'}
    assert flush_stats(cache)["count"] == 2  # all that arrived during the first flush went into one more


# ================================================================================================
# G4 nothing acknowledged is dropped: failures, backoff, retry, logs
# ================================================================================================


@pytest.mark.gen_test
async def test_on_flush_hears_every_flush_attempt_failed_ones_too(store: FakeStore, make_cache: MakeCache) -> None:
    cache = make_cache(store)
    durations: list[float] = []
    cache.on_flush = durations.append  # what the metrics' flush duration histogram observes
    await cache.put("a", '"a"')
    store.fail_writes = True
    with pytest.raises(Overloaded):
        await cache.flush()
    store.heal()
    assert await cache.flush() == 1
    assert len(durations) == 2 and all(d >= 0 for d in durations)
    stats = flush_stats(cache)
    assert (stats["count"], stats["errors"]) == (1, 1)
    assert store.committed == {"a": '"a"'}  # the hook changes nothing of what a flush does


@pytest.mark.gen_test
async def test_g4_failing_flush_keeps_its_batch_and_counts_the_error(make_cache: MakeCache) -> None:
    store = FakeStore({"gone": '"old"'})
    cache = make_cache(store)
    await cache.put("a", '"a"')
    assert await cache.delete("gone") is True
    store.fail_writes = True
    with pytest.raises(Overloaded) as failed:
        await cache.flush()
    assert int(failed.value.headers["Retry-After"]) >= 1
    stats = flush_stats(cache)
    assert (stats["errors"], stats["count"], stats["rows"], stats["pending_retry"]) == (1, 0, 0, 2)
    assert cache_stats(cache)["dirty"] == 2
    assert store.committed == {"gone": '"old"'}

    store.heal()
    assert await cache.flush() == 2
    assert store.committed == {"a": '"a"'}
    assert flush_stats(cache)["pending_retry"] == 0


@pytest.mark.gen_test
async def test_g4_partly_committed_flush_keeps_only_the_failed_transactions(
    store: FakeStore, make_cache: MakeCache
) -> None:
    cache = make_cache(store, flush_batch_size=2)
    store.fail_writes = True
    for i in range(5):
        await cache.put(f"k{i}", f'"{i}"')
    await wait_until(lambda: flush_stats(cache)["errors"] == 1, "the size-triggered flush to fail")
    store.heal()
    store.writes_before_failure = 1  # first transaction commits, the second fails
    with pytest.raises(Overloaded):
        await cache.flush()
    assert len(store.committed) == 2
    assert cache_stats(cache)["dirty"] == 3
    assert flush_stats(cache)["rows"] == 2
    for i in range(5):
        assert await cache.get(f"k{i}") == f'"{i}"'
    store.heal()
    assert await cache.flush() == 3
    assert store.committed == {f"k{i}": f'"{i}"' for i in range(5)}


@pytest.mark.gen_test
async def test_g4_backoff_doubles_from_flush_interval_up_to_5_s(store: FakeStore, make_cache: MakeCache) -> None:
    cache, clock = await on_manual_clock(make_cache, store, flush_interval_ms=100)
    store.fail_writes = True
    await cache.put("k", '"v"')
    expected_ms = [100, 200, 400, 800, 1600, 3200, MAX_BACKOFF_MS, MAX_BACKOFF_MS]
    assert MAX_BACKOFF_MS == 5000

    clock.advance(0.1)  # the first periodic flush fails and starts the streak
    await wait_until(lambda: flush_stats(cache)["errors"] == 1, "the first failure")
    for attempt, backoff_ms in enumerate(expected_ms, start=1):
        retry_at = clock.now() + backoff_ms / 1000
        clock.advance_to(retry_at - 0.001)  # every tick up to 1 ms before the retry time leaves the store alone
        await run_ready()
        assert len(store.write_calls) == attempt, f"retried before {backoff_ms} ms"
        clock.advance_to(retry_at)  # the retry is due when the backoff runs out, not at the next tick
        await wait_until(lambda n=attempt: flush_stats(cache)["errors"] == n + 1, f"retry after {backoff_ms} ms")
        assert len(store.write_calls) == attempt + 1
    assert flush_stats(cache)["failing"] is True
    assert await cache.get("k") == '"v"'


@pytest.mark.gen_test
async def test_g4_post_flush_retries_at_once_whatever_the_backoff(store: FakeStore, make_cache: MakeCache) -> None:
    cache, clock = await on_manual_clock(make_cache, store, flush_interval_ms=2000)
    store.fail_writes = True
    await cache.put("k", '"v"')
    clock.advance(2.0)  # the periodic flush
    await wait_until(lambda: flush_stats(cache)["errors"] == 1, "the first failure")

    with pytest.raises(Overloaded) as failed:  # an immediate attempt, which fails too
        await cache.flush()
    assert len(store.write_calls) == 2
    assert failed.value.status == 503
    assert int(failed.value.headers["Retry-After"]) >= 1

    store.heal()
    clock.advance(2.0)  # a tick, still inside the (now 4 s) backoff: the timer waits
    await run_ready()
    assert len(store.write_calls) == 2
    assert await cache.flush() == 1  # POST /flush does not
    assert store.committed == {"k": '"v"'}
    assert flush_stats(cache)["failing"] is False


@pytest.mark.gen_test
async def test_g4_post_flush_during_a_failing_flush_retries_as_soon_as_it_fails(
    store: FakeStore, make_cache: MakeCache
) -> None:
    cache, clock = await on_manual_clock(make_cache, store, flush_interval_ms=2000, durable_timeout_ms=2000)
    store.fail_writes = True
    await cache.put("k", '"v"')
    store.write_gate.close()
    clock.advance(2.0)  # the periodic flush
    await wait_until(lambda: store.write_gate.waiting == 1, "the periodic flush to reach the store")
    posted = asyncio.ensure_future(cache.flush())
    await run_ready()
    store.write_gate.open()  # the periodic flush fails and sets a 2 s backoff...
    with pytest.raises(Overloaded):  # ...which POST /flush does not wait out: it tries once more at once
        await posted
    assert len(store.write_calls) == 2
    assert flush_stats(cache)["errors"] == 2


@pytest.mark.gen_test
async def test_g4_one_warning_per_failure_streak_and_one_info_on_recovery(
    store: FakeStore, make_cache: MakeCache, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kvtornado.cache")
    cache = make_cache(store, writes_while_failing="accept")  # writes go on during the streak

    def records(level: int) -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "kvtornado.cache" and r.levelno == level]

    for streak in (1, 2):
        store.fail_writes = True
        for i in range(3):
            await cache.put(f"s{streak}k{i}", '"v"')
            with pytest.raises(Overloaded):
                await cache.flush()
        assert len(records(logging.WARNING)) == streak
        assert len(records(logging.INFO)) == streak - 1
        store.heal()
        assert await cache.flush() == 3
        assert len(records(logging.WARNING)) == streak
        assert len(records(logging.INFO)) == streak
        assert "recovered" in records(logging.INFO)[-1].getMessage()
    assert flush_stats(cache)["errors"] == 6
    assert len(store.committed) == 6
    assert not records(logging.ERROR)


# ================================================================================================
# G9 no acknowledgement the store cannot back
# ================================================================================================


@pytest.mark.gen_test
async def test_g9_from_a_failed_attempt_until_a_success_non_durable_writes_are_refused(make_cache: MakeCache) -> None:
    store = FakeStore({"old": '"committed"'})
    cache, clock = await on_manual_clock(make_cache, store)
    await cache.put("k", '"v1"')
    store.fail_writes = True
    with pytest.raises(Overloaded):
        await cache.flush()

    with pytest.raises(Overloaded) as refused:
        await cache.put("k2", '"v"')
    assert refused.value.headers["Retry-After"] == "1"  # the backoff is 100 ms: retry in a second
    with pytest.raises(Overloaded):
        await cache.put("k", '"overwrite"')  # an overwrite of a pending key too
    with pytest.raises(Overloaded):
        await cache.delete("old")
    assert await cache.get("k") == '"v1"'  # reads go on, from memory and from the store
    assert await cache.get("old") == '"committed"'
    assert cache.stats()["flush"]["refusing_writes"] is True
    assert cache.pending() == {"k": '"v1"'}  # nothing refused was kept

    # A durable write is not acknowledged from memory: it is taken, and answered once it commits.
    durable = asyncio.ensure_future(cache.put("d", '"durable"', durable=True))
    await run_ready()
    assert not durable.done()
    store.heal()
    clock.advance(1)  # past the backoff: the durable write's flush is retried
    await asyncio.wait_for(durable, timeout=5)
    assert store.committed["d"] == '"durable"' and store.committed["k"] == '"v1"'

    await cache.put("k2", '"v"')  # the success ended the refusal
    assert cache.stats()["flush"]["refusing_writes"] is False


@pytest.mark.gen_test
async def test_g7_stop_answers_a_waiter_whose_request_already_timed_out_without_an_unretrieved_error(
    store: FakeStore, make_cache: MakeCache, caplog: pytest.LogCaptureFixture
) -> None:
    cache = make_cache(store, durable_timeout_ms=50)
    store.write_gate.close()  # the durable write's flush never commits
    with pytest.raises(DurableTimeout):
        await cache.put("k", '"v"', durable=True)
    store.write_gate.open()
    store.fail_writes = True
    assert await cache.stop(0.05) == 1  # cannot flush: the waiter is told the server is shutting down
    gc.collect()  # an exception never retrieved is reported when its future is collected
    await run_ready()
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text


@pytest.mark.gen_test
async def test_g9_retry_after_follows_the_backoff(make_cache: MakeCache) -> None:
    store = FakeStore()
    cache = make_cache(store, clock=ManualClock(), flush_interval_ms=1000)
    await cache.put("k", '"v"')
    store.fail_writes = True
    for expected in ("1", "2", "4", "5", "5"):  # the backoff doubles from flush_interval_ms up to 5 s
        with pytest.raises(Overloaded) as failed:
            await cache.flush()
        assert failed.value.headers["Retry-After"] == expected
        with pytest.raises(Overloaded) as refused:
            await cache.put("other", '"v"')
        assert refused.value.headers["Retry-After"] == expected


@pytest.mark.gen_test
async def test_g9_accept_keeps_acknowledging_writes_while_the_store_fails(make_cache: MakeCache) -> None:
    store = FakeStore()
    cache = make_cache(store, writes_while_failing="accept", max_dirty=3)
    await cache.put("a", '"1"')
    store.fail_writes = True
    with pytest.raises(Overloaded):
        await cache.flush()
    await cache.put("b", '"2"')
    await cache.delete("a")
    assert cache.stats()["flush"]["refusing_writes"] is False
    assert cache.pending() == {"a": None, "b": '"2"'}
    store.heal()
    assert await cache.flush() == 2
    assert store.committed == {"b": '"2"'}


# ================================================================================================
# G5 bounded memory
# ================================================================================================


@pytest.mark.gen_test
async def test_g5_max_dirty_bytes_refuses_a_write_that_grows_the_pending_bytes_past_it(
    store: FakeStore, make_cache: MakeCache
) -> None:
    cache = make_cache(store, max_dirty_bytes=100)
    await cache.put("a", '"' + "x" * 40 + '"')  # 1 + 42 bytes
    await cache.put("b", '"' + "y" * 40 + '"')  # 86 in all
    assert cache.stats()["cache"]["dirty_bytes"] == 86
    await cache.put("a", '"' + "w" * 40 + '"')  # an overwrite that does not grow them is accepted
    assert cache.stats()["cache"]["dirty_bytes"] == 86
    with pytest.raises(Overloaded):
        await cache.put("a", '"' + "x" * 60 + '"')  # one that grows them past the limit is not
    store.write_gate.close()  # the refusal started a flush: hold it, so nothing is committed meanwhile
    await cache.put("c", '"' + "z" * 5 + '"')  # 8 more: 94
    with pytest.raises(Overloaded) as refused:
        await cache.put("d", '"' + "z" * 20 + '"')  # 23 more: 117 > 100
    assert refused.value.headers["Retry-After"] == "1"
    assert cache.pending() == {"a": '"' + "w" * 40 + '"', "b": '"' + "y" * 40 + '"', "c": '"zzzzz"'}
    store.write_gate.open()
    await wait_until(lambda: cache.dirty_count == 0, "the flushes to commit everything")
    assert cache.stats()["cache"]["dirty_bytes"] == 0
    await cache.put("d", '"' + "z" * 20 + '"')  # room again


@pytest.mark.gen_test
async def test_g5_dirty_bytes_count_a_key_held_both_in_flight_and_rewritten(
    store: FakeStore, make_cache: MakeCache
) -> None:
    cache = make_cache(store, max_dirty_bytes=60)
    value = '"' + "x" * 20 + '"'  # 22 bytes; with the key "k", 23
    await cache.put("k", value)
    store.write_gate.close()
    flushing = asyncio.ensure_future(cache.flush())
    await wait_until(lambda: store.write_gate.waiting == 1, "the flush to reach the store")
    await cache.put("k", value)  # the batch in flight still holds the first copy
    assert cache.stats()["cache"]["dirty_bytes"] == 46
    with pytest.raises(Overloaded):
        await cache.put("j", value)  # 69 > 60
    store.write_gate.open()
    assert await flushing == 1
    await wait_until(lambda: cache.dirty_count == 0, "the rewrite to be committed too")
    assert cache.stats()["cache"]["dirty_bytes"] == 0  # both copies are released
    await cache.put("j", value)


@pytest.mark.gen_test
async def test_g5_a_failed_retry_releases_the_older_copy_of_a_rewritten_key(
    store: FakeStore, make_cache: MakeCache
) -> None:
    cache = make_cache(store, writes_while_failing="accept")
    await cache.put("k", '"first"')
    store.fail_writes = True
    with pytest.raises(Overloaded):
        await cache.flush()
    await cache.put("k", '"second!"')  # kept in flight for the retry, and newer in dirty
    assert cache.stats()["cache"]["dirty_bytes"] == (1 + 7) + (1 + 9)
    with pytest.raises(Overloaded):
        await cache.flush()  # the retry merges them: one copy left
    assert cache.stats()["cache"]["dirty_bytes"] == 1 + 9
    store.heal()
    assert await cache.flush() == 1
    assert cache.stats()["cache"]["dirty_bytes"] == 0
    assert store.committed == {"k": '"second!"'}


@pytest.mark.gen_test
async def test_g5_clean_entries_stay_within_max_bytes_least_recently_used_first(make_cache: MakeCache) -> None:
    store = FakeStore({f"k{i}": '"' + "v" * 18 + '"' for i in range(5)})  # 2 + 20 bytes each
    cache = make_cache(store, max_bytes=70)
    for i in range(3):
        assert await cache.get(f"k{i}") is not None
    assert cache.stats()["cache"]["clean_bytes"] == 66
    await cache.get("k0")  # k0 is now the most recently used: k1 goes first
    await cache.get("k3")
    assert cache.stats()["cache"]["clean_bytes"] == 66
    assert cache.stats()["cache"]["evictions"] == 1
    reads = len(store.reads)
    await cache.get("k0")
    await cache.get("k2")
    await cache.get("k3")
    assert len(store.reads) == reads  # all three still cached
    await cache.get("k1")
    assert len(store.reads) == reads + 1  # k1 was the one evicted
    # A committed write enters the clean entries under the same bound.
    await cache.put("big", '"' + "b" * 60 + '"')
    assert await cache.flush() == 1
    assert cache.stats()["cache"]["clean_bytes"] <= 70


@pytest.mark.gen_test
async def test_g5_pending_bytes_are_measured_in_utf8(store: FakeStore, make_cache: MakeCache) -> None:
    cache = make_cache(store)
    await cache.put("é", '"€"')  # 2 + 5 bytes
    assert cache.stats()["cache"]["dirty_bytes"] == 7


@pytest.mark.gen_test
async def test_g5_at_max_dirty_new_keys_are_refused_and_overwrites_and_reads_go_on(make_cache: MakeCache) -> None:
    store = FakeStore({"x": '"x"', "y": '"y"'})
    cache = make_cache(store, max_dirty=3)
    store.write_gate.close()  # reaching max_dirty starts a flush at once: hold it in the store
    for key in "abc":
        await cache.put(key, '"1"')
    with pytest.raises(Overloaded) as refused:
        await cache.put("d", '"1"')
    assert refused.value.status == 503
    assert int(refused.value.headers["Retry-After"]) >= 1
    with pytest.raises(Overloaded):
        await cache.delete("x")  # a tombstone for a key that is not dirty is a new dirty key too
    assert await cache.delete("nope") is False  # nothing to write, nothing refused

    await cache.put("a", '"2"')
    assert await cache.delete("b") is True
    assert await cache.get("a") == '"2"'
    assert await cache.get("b") is None
    assert await cache.get("d") is None  # the refused write was not applied
    assert await cache.get("x") == '"x"'
    assert await cache.get("y") == '"y"'  # a miss still reads the store
    assert store.reads[-1] == "y"
    assert cache_stats(cache)["dirty"] == 3

    store.write_gate.open()
    assert await cache.flush() == 3
    await cache.put("d", '"1"')
    assert await cache.get("d") == '"1"'


@pytest.mark.gen_test
async def test_g5_the_batch_in_flight_counts_as_dirty(store: FakeStore, make_cache: MakeCache) -> None:
    cache = make_cache(store, max_dirty=2)
    await cache.put("a", '"1"')
    await cache.put("b", '"1"')
    store.write_gate.close()
    flushing = asyncio.ensure_future(cache.flush())
    await wait_until(lambda: store.write_gate.waiting == 1, "the flush to reach the store")
    assert cache_stats(cache)["dirty"] == 2
    with pytest.raises(Overloaded):
        await cache.put("c", '"1"')
    await cache.put("a", '"2"')  # an overwrite of a key in flight is accepted
    store.write_gate.open()
    assert await flushing == 2
    assert await cache.get("a") == '"2"'  # the overwrite made during the flush was not lost
    await cache.put("c", '"1"')  # the committed batch freed room
    await cache.flush()
    assert cache_stats(cache)["dirty"] == 0
    assert store.committed == {"a": '"2"', "b": '"1"', "c": '"1"'}


@pytest.mark.gen_test
async def test_g5_reaching_max_dirty_starts_a_flush_without_the_timer(store: FakeStore, make_cache: MakeCache) -> None:
    # max_dirty below flush_batch_size: the size trigger alone would never fire, and new keys would wait
    # for the periodic tick (no timer runs in these tests).
    cache = make_cache(store, max_dirty=2, flush_batch_size=100)
    await cache.put("a", '"1"')
    assert store.write_calls == []
    await cache.put("b", '"1"')
    await wait_until(lambda: store.committed == {"a": '"1"', "b": '"1"'}, "the max_dirty flush")
    await cache.put("c", '"1"')  # room again


@pytest.mark.gen_test
async def test_g5_clean_entries_stay_within_max_entries_least_recently_used_first(make_cache: MakeCache) -> None:
    store = FakeStore({f"k{i}": f'"{i}"' for i in range(4)})
    cache = make_cache(store, max_entries=3)
    for i in range(3):
        await cache.get(f"k{i}")
    await cache.get("k0")  # k0 is now the most recently used; k1 the least
    await cache.get("k3")
    assert cache_stats(cache)["clean"] == 3
    assert cache_stats(cache)["evictions"] == 1
    reads = len(store.reads)
    assert await cache.get("k0") == '"0"'
    assert len(store.reads) == reads  # k0 survived
    assert await cache.get("k1") == '"1"'
    assert store.reads[-1] == "k1"  # k1 was the one evicted

    for i in range(10):  # committed writes become clean entries, bounded too
        await cache.put(f"n{i}", '"v"')
    await cache.flush()
    assert cache_stats(cache)["clean"] == 3
    assert cache_stats(cache)["dirty"] == 0


# ================================================================================================
# G6 durable on request
# ================================================================================================


@pytest.mark.gen_test
async def test_g6_durable_put_returns_only_after_the_store_committed_it(
    store: FakeStore, make_cache: MakeCache
) -> None:
    cache = make_cache(store)
    store.write_gate.close()
    put = asyncio.ensure_future(cache.put("k", '"v"', durable=True))
    seen_at_return: list[str | None] = []
    put.add_done_callback(lambda _: seen_at_return.append(store.committed.get("k")))
    await wait_until(lambda: store.write_gate.waiting == 1, "the durable write's flush to reach the store")
    await run_ready()
    assert not put.done()
    store.write_gate.open()
    await put
    assert seen_at_return == ['"v"']


@pytest.mark.gen_test
async def test_g6_durable_delete_returns_only_after_the_store_committed_it(make_cache: MakeCache) -> None:
    store = FakeStore({"k": '"v"'})
    cache = make_cache(store)
    store.write_gate.close()
    delete = asyncio.ensure_future(cache.delete("k", durable=True))
    await wait_until(lambda: store.write_gate.waiting == 1, "the durable delete's flush to reach the store")
    assert not delete.done()
    assert "k" in store.committed
    store.write_gate.open()
    assert await delete is True
    assert "k" not in store.committed


@pytest.mark.gen_test
async def test_g6_durable_past_its_timeout_raises_and_the_write_is_still_committed(
    store: FakeStore, make_cache: MakeCache
) -> None:
    cache = make_cache(store, durable_timeout_ms=50)
    store.write_gate.close()
    with pytest.raises(DurableTimeout) as timed_out:
        await cache.put("k", '"v"', durable=True)
    assert timed_out.value.status == 504
    assert await cache.get("k") == '"v"'  # acknowledged all the same
    assert store.committed == {}
    store.write_gate.open()
    await wait_until(lambda: store.committed.get("k") == '"v"', "the stalled flush to commit")
    assert cache_stats(cache)["dirty"] == 0


@pytest.mark.gen_test
async def test_g6_durable_write_waits_through_a_failed_attempt_for_the_retry(
    store: FakeStore, make_cache: MakeCache
) -> None:
    cache, clock = await on_manual_clock(make_cache, store, durable_timeout_ms=5000)
    store.fail_writes = True
    put = asyncio.ensure_future(cache.put("k", '"v"', durable=True))
    await wait_until(lambda: flush_stats(cache)["errors"] == 1, "the durable write's flush to fail")
    await run_ready()
    assert not put.done()  # a failed attempt is not an answer for a durable write
    store.heal()
    clock.advance(0.1)  # the retry after the backoff
    await put
    assert store.committed == {"k": '"v"'}
    assert flush_stats(cache)["count"] == 1  # that one retry answered it: no further flush was needed


# ================================================================================================
# G7 graceful stop (unit level)
# ================================================================================================


@pytest.mark.gen_test
async def test_g7_stop_flushes_everything_and_returns_zero(
    store: FakeStore, make_cache: MakeCache, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kvtornado.cache")
    cache = make_cache(store, flush_interval_ms=50, flush_batch_size=4)
    await cache.start()
    for i in range(10):
        await cache.put(f"k{i}", f'"{i}"')
    assert await cache.stop(5.0) == 0
    assert store.committed == {f"k{i}": f'"{i}"' for i in range(10)}
    assert cache_stats(cache)["dirty"] == 0
    assert any("flushed" in r.getMessage() for r in caplog.records if r.name == "kvtornado.cache")


@pytest.mark.gen_test
async def test_g7_stop_with_a_failing_store_returns_the_writes_left(
    store: FakeStore, make_cache: MakeCache, caplog: pytest.LogCaptureFixture
) -> None:
    cache, clock = await on_manual_clock(make_cache, store, flush_interval_ms=50)
    for i in range(3):
        await cache.put(f"k{i}", '"v"')
    store.fail_writes = True
    stopping = asyncio.ensure_future(cache.stop(0.3))
    await wait_until(lambda: flush_stats(cache)["errors"] == 1, "stop's first attempt, at once")
    for attempt, backoff_s in enumerate((0.05, 0.1), start=2):  # then one after each backoff...
        clock.advance(backoff_s)
        await wait_until(lambda n=attempt: flush_stats(cache)["errors"] == n, f"attempt {attempt}")
    clock.advance(0.2)  # ...until the timeout (0.3 s), which comes before the next retry (0.35 s)
    assert await stopping == 3
    assert flush_stats(cache)["errors"] == 3
    assert store.committed == {}
    errors = [r.getMessage() for r in caplog.records if r.name == "kvtornado.cache" and r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "3 of 3" in errors[0]


@pytest.mark.gen_test
async def test_g7_stop_tries_at_once_even_inside_a_failure_backoff(store: FakeStore, make_cache: MakeCache) -> None:
    cache = make_cache(store, flush_interval_ms=5000)  # one failure backs off for 5 s, longer than the stop
    store.fail_writes = True
    await cache.put("k", '"v"')
    with pytest.raises(Overloaded):
        await cache.flush()
    store.heal()  # sqlite is fine again by the time the service is stopped
    assert await cache.stop(1.0) == 0
    assert store.committed == {"k": '"v"'}


# ================================================================================================
# Over the real SqliteStore
# ================================================================================================


async def open_sqlite(path: Path) -> SqliteStore:
    store = SqliteStore(path, synchronous="NORMAL")
    await store.open()
    return store


@pytest.mark.gen_test(timeout=10)
async def test_sqlite_write_behind_survives_a_graceful_restart(tmp_path: Path, make_cache: MakeCache) -> None:
    path = tmp_path / "kv.sqlite3"
    store = await open_sqlite(path)
    cache = make_cache(store, flush_batch_size=3)
    for i in range(10):
        await cache.put(f"k{i}", f'"{i}"')
    assert await cache.delete("k0") is True
    await cache.put("k1", '"one"')
    assert await cache.stop(5.0) == 0
    assert store.reads == 0  # every write went straight to memory, no read needed
    await store.close()

    store = await open_sqlite(path)
    try:
        cache = make_cache(store)
        assert await cache.get("k0") is None
        assert await cache.get("k1") == '"one"'
        for i in range(2, 10):
            assert await cache.get(f"k{i}") == f'"{i}"'
    finally:
        await store.close()


@pytest.mark.gen_test(timeout=10)
async def test_sqlite_crash_loses_only_what_was_not_committed(tmp_path: Path, make_cache: MakeCache) -> None:
    path = tmp_path / "kv.sqlite3"
    store = await open_sqlite(path)
    cache = make_cache(store)
    await cache.put("durable", '"d"', durable=True)
    await cache.put("flushed", '"f"')
    assert await cache.flush() == 1
    await cache.put("pending", '"p"')
    assert await cache.get("pending") == '"p"'
    # The crash: the cache is dropped without a flush.
    await store.close()

    store = await open_sqlite(path)
    try:
        cache = make_cache(store)
        assert await cache.get("durable") == '"d"'
        assert await cache.get("flushed") == '"f"'
        assert await cache.get("pending") is None
    finally:
        await store.close()


@pytest.mark.gen_test(timeout=10)
async def test_sqlite_miss_reads_and_durable_writes(tmp_path: Path, make_cache: MakeCache) -> None:
    store = await open_sqlite(tmp_path / "kv.sqlite3")
    try:
        await store.write_rows([("old", Record('"o"', 1))])
        cache = make_cache(store)
        assert await cache.get("old") == '"o"'
        assert await cache.get("old") == '"o"'
        assert store.reads == 1  # the second get was a hit
        assert await cache.get("absent") is None
        await cache.put("new", '{"n":[1,2]}', durable=True)
        new = await store.read("new")
        assert new is not None and new.value == '{"n":[1,2]}'
        assert await cache.delete("old", durable=True) is True
        assert await store.read("old") is None
    finally:
        await store.close()


# ================================================================================================
# The cache against a plain dict (Hypothesis stateful)
# ================================================================================================

KEYS = st.sampled_from(["a", "b", "c", "d"])
MACHINE_CONFIG = CacheConfig(
    max_entries=2, max_bytes=64, flush_interval_ms=100, flush_batch_size=1, max_dirty=2, durable_timeout_ms=5000
)


class CacheAgainstDict(RuleBasedStateMachine):
    """Saves, deletes, gets (some racing a write), flushes, store failures, graceful restarts and crashes,
    against a plain dict. The store's committed rows plus the cache's pending writes must always be the dict."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.store = FakeStore()
        self.clock = ManualClock()
        self.cache = self._new_cache()
        self.model: dict[str, str] = {}
        self.acknowledged: dict[str, set[str]] = defaultdict(set)  # every value ever acknowledged, per key
        self.serial = 0

    def _new_cache(self) -> WriteBehindCache:
        cache = WriteBehindCache(self.store, MACHINE_CONFIG, clock=self.clock)
        self.run(cache.start())
        return cache

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout=10))

    def _pending(self) -> dict[str, str | None]:
        return self.cache.pending()

    def _healthy(self) -> bool:
        return not self.store.fail_writes and self.store.writes_before_failure is None

    def _would_overload(self, key: str, *, durable: bool = False) -> bool:
        if not durable and self.cache.stats()["flush"]["failing"]:
            return True  # G9: writes_while_failing is refuse, the default
        return key not in self.cache.pending() and self.cache.dirty_count >= MACHINE_CONFIG.max_dirty

    def _drain(self) -> None:
        """Let every task left on the machine's loop (flushes, miss reads) run to its end."""
        pending = asyncio.all_tasks(self.loop)  # the loop is not running: these are all background tasks
        if pending:
            _, stuck = self.loop.run_until_complete(asyncio.wait(pending, timeout=10))
            assert not stuck, f"tasks that never ended: {stuck}"

    # -- operations with their expected outcome -----------------------------------------------------

    async def _save(self, key: str, *, durable: bool = False) -> None:
        self.serial += 1
        value = f'"v{self.serial}"'
        if self._would_overload(key, durable=durable):
            with pytest.raises(Overloaded):
                await self.cache.put(key, value, durable=durable)
            event("save refused: overloaded")
            return
        await self.cache.put(key, value, durable=durable)
        self.model[key] = value
        self.acknowledged[key].add(value)
        if durable:
            assert self.store.committed.get(key) == value, "a durable save answered before its commit"

    async def _delete(self, key: str) -> None:
        if key not in self.model:
            assert await self.cache.delete(key) is False
            return
        if self._would_overload(key):
            with pytest.raises(Overloaded):
                await self.cache.delete(key)
            event("delete refused: overloaded")
            return
        assert await self.cache.delete(key) is True
        del self.model[key]

    async def _flush(self) -> None:
        dirty = self.cache.dirty_count
        if not self._healthy() and dirty:
            commits = len(self.store.commits)
            try:
                assert await self.cache.flush() == dirty
            except Overloaded:
                event("flush failed" if len(self.store.commits) == commits else "flush failed after a commit")
                return
            assert not self.store.fail_writes, "a flush succeeded on a store that fails every write"
        else:
            assert await self.cache.flush() == dirty
        assert self.cache.pending() == {}
        assert self.store.committed == self.model

    # -- rules ----------------------------------------------------------------------------------------

    @rule(key=KEYS)
    def save(self, key: str) -> None:
        self.run(self._save(key))

    @precondition(lambda self: self._healthy() and not self.cache.stats()["flush"]["failing"])
    @rule(key=KEYS)
    def save_durable(self, key: str) -> None:
        self.run(self._save(key, durable=True))

    @rule(key=KEYS)
    def delete(self, key: str) -> None:
        self.run(self._delete(key))

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        assert self.run(self.cache.get(key)) == self.model.get(key)

    @rule(key=KEYS, then_delete=st.booleans(), then_flush=st.booleans())
    def get_racing_writes(self, key: str, then_delete: bool, then_flush: bool) -> None:
        """A miss's store read is held while the key is saved (maybe deleted, maybe flushed); the held
        read may answer the old or the new value, and must not leave the old one cached."""
        before = self.model.get(key)

        async def scenario() -> str | None:
            self.store.read_gate.close()
            try:
                reader = asyncio.ensure_future(self.cache.get(key))
                await run_ready()
                if self.store.read_gate.waiting:
                    event("a get raced writes")
                await self._save(key)
                # A delete of a key that is neither dirty nor cached would wait on the held read.
                if then_delete and (key in self.cache.pending() or key in self.cache.cached()):
                    await self._delete(key)
                if then_flush:
                    await self._flush()
            finally:
                self.store.read_gate.open()
            return await reader

        assert self.run(scenario()) in (before, self.model.get(key))

    @rule()
    def flush(self) -> None:
        self.run(self._flush())

    @rule()
    def toggle_store_failure(self) -> None:
        self.store.fail_writes = not self.store.fail_writes

    @rule(commits=st.integers(min_value=0, max_value=2))
    def fail_after_some_commits(self, commits: int) -> None:
        self.store.fail_writes = False
        self.store.writes_before_failure = commits

    @rule(ms=st.sampled_from([50, 100, 400, 6000]))
    def timer_tick(self, ms: int) -> None:

        async def tick() -> None:  # on the machine's loop: a flush it starts is a task of that loop
            self.clock.advance(ms / 1000)

        self.run(tick())
        self._drain()

    @rule()
    def restart(self) -> None:
        """Graceful: stop() with a healthy store, then a new cache over the same committed rows."""
        self.store.heal()
        if self.cache.stats()["flush"]["failing"]:
            event("restart inside a failure backoff")
        # The clock stands still: a stop inside a failure backoff must still try at once.
        assert self.run(self.cache.stop(5.0)) == 0
        assert self.store.committed == self.model
        self.cache = self._new_cache()

    @rule()
    def crash(self) -> None:
        """kill -9: the cache vanishes unflushed; what the store committed is all that is left."""
        self.cache.scheduler.close()  # nothing of the old process runs again: no timer...
        for task in asyncio.all_tasks(self.loop):  # ...and no flush or read
            task.cancel()
        self._drain()
        for key, value in self.store.committed.items():
            assert value in self.acknowledged[key], f"{key}={value} was never acknowledged"
        lost = {k for k in set(self.model) | set(self.store.committed)
                if self.model.get(k) != self.store.committed.get(k)}
        assert lost <= set(self._pending()), "only acknowledged, not yet committed writes may be lost"
        if lost:
            event("a crash lost pending writes")
        self.model = dict(self.store.committed)
        self.cache = self._new_cache()

    # -- invariants -----------------------------------------------------------------------------------

    @invariant()
    def committed_plus_pending_is_the_model(self) -> None:
        view = dict(self.store.committed)
        for key, value in self._pending().items():
            if value is None:
                view.pop(key, None)
            else:
                view[key] = value
        assert view == self.model

    @invariant()
    def clean_entries_are_current(self) -> None:
        pending = self.cache.pending()
        for key, value in self.cache.cached().items():
            assert key not in pending
            assert self.model.get(key) == value, f"stale clean entry {key}={value}"

    @invariant()
    def memory_and_transactions_stay_bounded(self) -> None:
        stats = self.cache.stats()["cache"]
        assert stats["dirty"] <= MACHINE_CONFIG.max_dirty
        assert stats["clean"] <= MACHINE_CONFIG.max_entries
        assert stats["clean_bytes"] <= MACHINE_CONFIG.max_bytes
        assert stats["clean_bytes"] == sum(nbytes(k) + nbytes(v) for k, v in self.cache.cached().items())
        # Pending bytes hold every pending write once, and a key in flight and rewritten twice.
        pending_once = sum(nbytes(k) + nbytes(v) for k, v in self.cache.pending().items())
        assert pending_once <= stats["dirty_bytes"] <= MACHINE_CONFIG.max_dirty_bytes
        if not self.cache.pending():
            assert stats["dirty_bytes"] == 0
        assert all(len(rows) <= MACHINE_CONFIG.flush_batch_size for rows in self.store.write_calls)
        assert self.store.max_in_flight <= 1

    def teardown(self) -> None:
        self.store.heal()
        self.store.read_gate.open()
        self.store.write_gate.open()
        self.cache.scheduler.close()
        for task in asyncio.all_tasks(self.loop):
            task.cancel()
        self._drain()
        self.loop.close()


# Examples, seed and database come from the profile tests/conftest.py loads (a fixed seed in `make test`).
# Half the profile's examples (150 under `ci`, 50 under `mutate`): test_model.py runs the same cache against a
# model with versions, expiry and batches on top, so this one keeps the suite under its 3 minutes.
CacheAgainstDict.TestCase.settings = settings(stateful_step_count=40,
                                              max_examples=max(settings.default.max_examples // 2, 10))
TestCacheAgainstDict = CacheAgainstDict.TestCase


# ================================================================================================
# Scheduling and commit waiters, through the public interface (each test names the slip it catches)
# ================================================================================================


@pytest.mark.gen_test
async def test_g6_a_durable_write_made_during_a_flush_waits_for_the_next_flush_to_commit(
    store: FakeStore, make_cache: MakeCache
) -> None:
    # Answering it when the flush already running commits would acknowledge a write that flush never took.
    cache, clock = await on_manual_clock(make_cache, store)
    await cache.put("a", '"1"')
    store.write_gate.close()
    flushing = asyncio.ensure_future(cache.flush())
    await wait_until(lambda: store.write_gate.waiting == 1, "the first flush to reach the store")
    durable = asyncio.ensure_future(cache.put("d", '"durable"', durable=True))
    await run_ready()
    store.writes_before_failure = 1  # the running flush commits; the one after it (taking "d") fails
    store.write_gate.open()
    assert await flushing == 1
    await wait_until(lambda: flush_stats(cache)["errors"] == 1, "the flush that took the durable write")
    await run_ready()
    assert not durable.done(), "the durable write was answered before anything committed it"
    assert "d" not in store.committed
    store.heal()
    clock.advance(0.1)  # the retry after the backoff
    await asyncio.wait_for(durable, timeout=5)
    assert store.committed["d"] == '"durable"'


@pytest.mark.gen_test
async def test_g7_stop_answers_a_durable_write_it_could_not_commit(store: FakeStore, make_cache: MakeCache) -> None:
    cache, clock = await on_manual_clock(make_cache, store, durable_timeout_ms=60_000)
    store.fail_writes = True
    durable = asyncio.ensure_future(cache.put("d", '"v"', durable=True))
    await wait_until(lambda: flush_stats(cache)["errors"] == 1, "the durable write's flush to fail")
    stopping = asyncio.ensure_future(cache.stop(1.0))
    await wait_until(lambda: flush_stats(cache)["errors"] == 2, "stop's attempt, at once")
    clock.advance(1.0)  # the stop's timeout; the durable write's own is a minute away
    assert await stopping == 1
    with pytest.raises(Overloaded, match=r"^The server is shutting down\.$"):
        await asyncio.wait_for(durable, timeout=5)


@pytest.mark.gen_test
async def test_pending_retry_is_zero_while_healthy_even_with_writes_waiting(make_cache: MakeCache) -> None:
    cache = make_cache(FakeStore())
    await cache.put("a", '"1"')
    assert (flush_stats(cache)["pending_retry"], cache_stats(cache)["dirty"]) == (0, 1)


@pytest.mark.gen_test
async def test_g1_a_delete_whose_existence_read_races_a_save_deletes_the_saved_key(make_cache: MakeCache) -> None:
    store = FakeStore()  # "k" is not in sqlite: the read that delete makes answers "absent"
    cache = make_cache(store)
    store.read_gate.close()
    deleting = asyncio.ensure_future(cache.delete("k"))
    await wait_until(lambda: store.read_gate.waiting == 1, "delete's read of the store")
    await cache.put("k", '"saved meanwhile"')
    store.read_gate.open()
    assert await deleting is True  # the save landed before the delete: the delete applies to it
    assert await cache.get("k") is None
    assert cache.pending() == {"k": None}


@pytest.mark.parametrize("limit", [{"max_dirty": 1}, {"max_dirty_bytes": 20}], ids=["max_dirty", "max_dirty_bytes"])
@pytest.mark.gen_test
async def test_g5_a_refusal_at_the_memory_limit_says_when_the_backoff_runs_out(
    make_cache: MakeCache, limit: dict[str, int]
) -> None:
    store = FakeStore()
    cache = make_cache(store, clock=ManualClock(), flush_interval_ms=1000, writes_while_failing="accept", **limit)
    store.fail_writes = True
    await cache.put("k", '"v"')  # at max_dirty this starts a flush of its own, which fails too
    await run_ready()
    for _ in range(3):
        with pytest.raises(Overloaded):
            await cache.flush()
        streak = flush_stats(cache)["errors"]  # every attempt so far failed
        with pytest.raises(Overloaded) as refused:
            await cache.put("other-key", '"a value long enough to pass the bytes"')
        assert refused.value.headers["Retry-After"] == str(min(5, 2 ** (streak - 1)))  # 1 s doubling, at most 5


@pytest.mark.gen_test
async def test_g4_the_backoff_starts_again_from_the_interval_after_a_recovery(make_cache: MakeCache) -> None:
    store = FakeStore()
    cache = make_cache(store, clock=ManualClock(), flush_interval_ms=1000)
    store.fail_writes = True
    await cache.put("k", '"v"')
    for expected in ("1", "2", "4"):
        with pytest.raises(Overloaded) as failed:
            await cache.flush()
        assert failed.value.headers["Retry-After"] == expected
    store.heal()
    assert await cache.flush() == 1
    await cache.put("k", '"v2"')
    store.fail_writes = True
    with pytest.raises(Overloaded) as failed:
        await cache.flush()
    assert failed.value.headers["Retry-After"] == "1"  # a new streak, not the old one's 8 s


@pytest.mark.parametrize("order", ["flush_then_unforced", "unforced_then_flush"])
@pytest.mark.gen_test
async def test_g4_post_flush_during_a_flush_retries_at_once_whatever_else_asked_meanwhile(
    store: FakeStore, make_cache: MakeCache, order: str
) -> None:
    # POST /flush during a flush asks for a forced one right after it; an unforced trigger (here the size
    # trigger of new keys) arriving before or after must not turn that into one that waits out the backoff.
    cache, clock = await on_manual_clock(make_cache, store, flush_interval_ms=2000, flush_batch_size=2)
    store.fail_writes = True
    await cache.put("k", '"v"')
    store.write_gate.close()
    clock.advance(2.0)  # the periodic flush
    await wait_until(lambda: store.write_gate.waiting == 1, "the periodic flush to reach the store")

    async def unforced() -> None:
        await cache.put("x", '"1"')
        await cache.put("y", '"1"')  # two new dirty keys: flush_batch_size

    if order == "unforced_then_flush":
        await unforced()
    posted = asyncio.ensure_future(cache.flush())
    await run_ready()
    if order == "flush_then_unforced":
        await unforced()
    store.write_gate.open()  # the periodic flush fails: a 2 s backoff, which POST /flush does not wait out
    with pytest.raises(Overloaded):
        await asyncio.wait_for(posted, timeout=5)
    assert flush_stats(cache)["errors"] == 2


@pytest.mark.gen_test
async def test_g6_a_durable_write_ignored_by_a_backoff_is_flushed_right_after_the_flush_running(
    store: FakeStore, make_cache: MakeCache
) -> None:
    # During a failure backoff a durable write's trigger starts nothing; if a forced flush (POST /flush)
    # is running, the durable write is flushed as soon as that one ends, without waiting for a timer.
    cache, _clock = await on_manual_clock(make_cache, store, flush_interval_ms=5000)
    store.fail_writes = True
    await cache.put("k", '"v"')
    with pytest.raises(Overloaded):
        await cache.flush()  # a failure: 5 s of backoff from now
    store.heal()
    store.write_gate.close()
    posted = asyncio.ensure_future(cache.flush())  # forced: runs at once, and stalls in the store
    await wait_until(lambda: store.write_gate.waiting == 1, "POST /flush to reach the store")
    durable = asyncio.ensure_future(cache.put("d", '"durable"', durable=True))
    await run_ready()
    store.write_gate.open()
    assert await posted == 1
    await asyncio.wait_for(durable, timeout=5)  # the clock has not moved: no tick or retry timer did this
    assert store.committed == {"k": '"v"', "d": '"durable"'}


class BuggyStore(FakeStore):
    """A store whose write raises something that is not a StorageError: a bug, not sqlite."""

    async def write_rows(self, rows: Any) -> None:
        raise RuntimeError("a bug in the writer")


@pytest.mark.gen_test
async def test_g4_an_unexpected_error_in_a_flush_is_a_failed_attempt_that_keeps_its_batch(
    make_cache: MakeCache, caplog: pytest.LogCaptureFixture
) -> None:
    store = BuggyStore()
    cache = make_cache(store)
    await cache.put("k", '"v"')
    with pytest.raises(Overloaded):
        await cache.flush()
    assert cache.pending() == {"k": '"v"'}
    assert (flush_stats(cache)["errors"], flush_stats(cache)["failing"]) == (1, True)
    logged = [r for r in caplog.records if r.name == "kvtornado.cache" and r.exc_info]
    assert logged and logged[0].getMessage() == "flush failed unexpectedly"
    warned = [r.getMessage() for r in caplog.records if r.name == "kvtornado.cache" and r.levelno == logging.WARNING]
    assert warned == ["flush failed (unexpected flush error: RuntimeError('a bug in the writer')); 1 writes kept, "
                      "retrying with backoff from 100 ms"]



@pytest.mark.gen_test
async def test_g6_a_durable_delete_is_taken_while_refusing_and_waits_through_a_failed_attempt(
    make_cache: MakeCache,
) -> None:
    store = FakeStore({"k": '"old"'})
    cache, clock = await on_manual_clock(make_cache, store)
    await cache.put("x", '"1"')
    store.fail_writes = True
    with pytest.raises(Overloaded):
        await cache.flush()  # failing: non-durable writes are refused from now on (G9)
    with pytest.raises(Overloaded):
        await cache.delete("k")
    deleting = asyncio.ensure_future(cache.delete("k", durable=True))  # a durable one is taken
    await wait_until(lambda: "k" in cache.pending(), "the durable delete's tombstone")
    clock.advance(0.1)  # the retry after the first backoff, which fails too
    await wait_until(lambda: flush_stats(cache)["errors"] == 2, "the retry that took the durable delete")
    await run_ready()
    assert not deleting.done(), "a failed attempt answered the durable delete"
    store.heal()
    clock.advance(0.2)  # the retry after the backoff
    assert await asyncio.wait_for(deleting, timeout=5) is True
    assert "k" not in store.committed


class ExplodingReads(FakeStore):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    async def read(self, key: str) -> str | None:
        raise self.error


@pytest.mark.gen_test
async def test_g1_a_failed_miss_read_is_a_storage_error_and_keeps_sqlites_own_words(make_cache: MakeCache) -> None:
    own = StorageError("sqlite read failed: disk I/O error")
    with pytest.raises(StorageError) as failed:
        await make_cache(ExplodingReads(own)).get("k")
    assert failed.value is own
    with pytest.raises(StorageError, match=r"^read failed: RuntimeError\('a bug'\)$"):
        await make_cache(ExplodingReads(RuntimeError("a bug"))).get("k")


@pytest.mark.gen_test
async def test_stats_report_every_counter_and_limit(store: FakeStore, make_cache: MakeCache) -> None:
    cache = make_cache(store, max_entries=7, max_bytes=7000, max_dirty=70, max_dirty_bytes=70_000,
                       flush_interval_ms=123)
    await cache.put("a", '"1"')
    await cache.put("b", '"22"')
    assert await cache.flush() == 2
    await cache.put("c", '"333"')
    for key in ("a", "c", "c", "a"):  # hits on a clean entry and on a pending write, in both orders
        assert await cache.get(key) is not None
    assert await cache.get("zz") is None  # a miss
    stats = cache.stats()
    assert stats["cache"] == {
        "entries": 3, "clean": 2, "hits": 4, "misses": 1, "evictions": 0, "expired": 0, "dirty": 1,
        "dirty_bytes": 1 + 5, "clean_bytes": (1 + 3) + (1 + 4),
        "max_entries": 7, "max_bytes": 7000, "max_dirty": 70, "max_dirty_bytes": 70_000,
    }
    flush = dict(stats["flush"])
    assert isinstance(flush.pop("last_ms"), float)
    assert flush == {"count": 1, "rows": 2, "errors": 0, "pending_retry": 0, "failing": False,
                     "refusing_writes": False, "interval_ms": 123}


@pytest.mark.gen_test
async def test_stop_logs_what_it_flushed_or_could_not(
    store: FakeStore, make_cache: MakeCache, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kvtornado.cache")
    cache = make_cache(store)
    await cache.put("a", '"1"')
    await cache.put("b", '"2"')
    assert await cache.stop(1.0) == 0
    assert [r.getMessage() for r in caplog.records if r.name == "kvtornado.cache"] == ["shutdown: flushed 2 writes"]


@pytest.mark.gen_test
async def test_g6_a_timed_out_waiter_does_not_keep_a_later_one_from_its_answer(
    store: FakeStore, make_cache: MakeCache
) -> None:
    clock = ManualClock()
    cache = make_cache(store, clock=clock, durable_timeout_ms=1000)
    store.write_gate.close()
    first = asyncio.ensure_future(cache.put("a", '"1"', durable=True))
    await wait_until(lambda: store.write_gate.waiting == 1, "the first durable write's flush")
    clock.advance(1.0)  # its timeout: answered 504, the write stays pending
    with pytest.raises(DurableTimeout):
        await first
    second = asyncio.ensure_future(cache.put("b", '"2"', durable=True))  # waits for the next flush
    await run_ready()
    store.write_gate.open()
    await asyncio.wait_for(second, timeout=5)
    assert store.committed == {"a": '"1"', "b": '"2"'}


def test_nbytes_is_utf8_bytes_and_nothing_for_a_tombstone() -> None:
    assert (nbytes(None), nbytes(""), nbytes("abc"), nbytes("é"), nbytes("☃x")) == (0, 0, 3, 2, 4)


@pytest.mark.gen_test
async def test_every_refusal_and_timeout_says_why_in_its_own_words(store: FakeStore, make_cache: MakeCache) -> None:
    clock = ManualClock()
    cache = make_cache(store, clock=clock, max_dirty=2, max_dirty_bytes=20, durable_timeout_ms=1000)
    await cache.put("a", '"1"')  # 1 + 3 bytes
    with pytest.raises(Overloaded) as too_many_bytes:
        await cache.put("b", '"' + "x" * 20 + '"')
    assert too_many_bytes.value.message == "4 bytes of writes are waiting for the store; retry shortly."
    await cache.put("b", '"2"')
    with pytest.raises(Overloaded) as too_many_keys:
        await cache.put("c", '"3"')
    assert too_many_keys.value.message == "2 writes are waiting for the store; retry shortly."
    store.write_gate.close()
    for durable, what in ((True, "The write was"), (False, "The flush was")):
        call = cache.put("a", '"4"', durable=True) if durable else cache.flush()
        waiting = asyncio.ensure_future(call)
        await run_ready()
        clock.advance(1.0)
        with pytest.raises(DurableTimeout) as timed_out:
            await waiting
        assert timed_out.value.message == (f"{what} not committed within 1000 ms; "
                                           "pending writes stay pending and will be written.")
    store.write_gate.open()
    store.fail_writes = True
    await wait_until(lambda: flush_stats(cache)["errors"] >= 1, "the stalled flush to fail")
    with pytest.raises(Overloaded) as refused:
        await cache.put("a", '"5"')
    assert refused.value.message == "The store is failing: writes are refused until a flush succeeds; retry shortly."


@pytest.mark.gen_test
async def test_the_byte_bounds_hold_exactly_at_their_limit(store: FakeStore, make_cache: MakeCache) -> None:
    cache = make_cache(store, max_dirty_bytes=8, max_bytes=8)
    await cache.put("a", '"12"')  # 1 + 4 = 5 bytes
    await cache.put("b", '""')  # 1 + 2: exactly 8, accepted (and a flush is due)
    assert cache_stats(cache)["dirty_bytes"] == 8
    with pytest.raises(Overloaded):
        await cache.put("a", '"123"')  # one byte more than the limit
    await cache.flush()  # (the flush that reaching the limit started may have taken them already)
    assert store.committed == {"a": '"12"', "b": '""'}
    assert cache.cached() == {"a": '"12"', "b": '""'}  # 5 + 3 = 8 bytes: exactly max_bytes, nothing evicted
    assert cache_stats(cache)["evictions"] == 0


@pytest.mark.gen_test
async def test_flush_stats_add_up_and_time_each_flush(store: FakeStore, make_cache: MakeCache) -> None:
    cache = make_cache(store)
    await cache.put("a", '"1"')
    await cache.put("b", '"2"')
    assert await cache.flush() == 2
    await cache.put("c", '"3"')
    assert await cache.flush() == 1
    stats = flush_stats(cache)
    assert (stats["count"], stats["rows"]) == (2, 3)
    assert 0 <= stats["last_ms"] < 60_000
