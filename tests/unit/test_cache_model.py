"""The write-behind cache's data model (SPEC §5, G1 for /keys and batches, G5 and G9 for batches, G10):
versions reserved ahead of use, expiry on an injected wall clock, listings merged with the pending writes,
batches applied in one step. ``FakeStore`` (tests/unit/fakes.py) stands in for sqlite."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvtornado import cache as cache_module
from kvtornado.cache import WriteBehindCache
from kvtornado.config import CacheConfig
from kvtornado.errors import NotAnInteger, Overloaded, StorageError, VersionMismatch
from kvtornado.ops import Op, Record
from kvtornado.store import Row
from tests.unit.fakes import FakeStore, ManualClock, run_ready, wait_until

QUIET = {"flush_interval_ms": 100, "flush_batch_size": 10_000, "max_dirty": 10_000, "max_entries": 10_000}


class Wall:
    """The injected wall clock expiry reads (unix seconds); moves only when the test says so."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


MakeCache = Callable[..., WriteBehindCache]


@pytest.fixture
def wall() -> Wall:
    return Wall()


@pytest.fixture
def make_cache(io_loop: Any, wall: Wall) -> Iterator[MakeCache]:
    made: list[WriteBehindCache] = []

    def make(store: Any, **cfg: Any) -> WriteBehindCache:
        cache = WriteBehindCache(store, CacheConfig(**{**QUIET, **cfg}), clock=ManualClock(), wall=wall)
        made.append(cache)
        return cache

    yield make

    async def finish() -> None:
        for cache in made:
            cache.scheduler.close()
            if isinstance(cache.store, FakeStore):
                cache.store.heal()
                for gate in (cache.store.read_gate, cache.store.write_gate, cache.store.range_gate):
                    gate.open()
        pending = asyncio.all_tasks() - {asyncio.current_task()}
        if pending:
            await asyncio.wait(pending, timeout=5)

    io_loop.run_sync(finish)


async def keys(cache: WriteBehindCache, prefix: str = "", after: str | None = None, limit: int = 100) -> list[str]:
    return [key for key, _ in await cache.list_keys(prefix, after, limit)]


# ================================================================================================
# Versions (G10)
# ================================================================================================


@pytest.mark.gen_test
async def test_versions_come_from_a_block_reserved_before_the_first_write(make_cache: MakeCache) -> None:
    store = FakeStore({"old": '"o"'})  # version 1 is taken
    cache = make_cache(store)
    await cache.start()
    assert store.reservations == [(2, 1 + cache_module.VERSION_BLOCK)]
    assert [await cache.put(k, "1") for k in ("a", "b", "a")] == [2, 3, 4]
    assert (await cache.get_record("a")) == Record("1", 4)
    await cache.flush()
    assert store.records["a"] == Record("1", 4)  # committed with the version it was acknowledged with


@pytest.mark.gen_test
async def test_a_crash_that_loses_pending_writes_never_lets_their_versions_come_back(make_cache: MakeCache) -> None:
    store = FakeStore()
    first = make_cache(store)
    handed_out = [await first.put(f"k{i}", "1") for i in range(5)]
    # kill -9: nothing flushed, the memory is gone; a new process opens the same store
    second = make_cache(store)
    again = await second.put("k0", "2")
    assert again > max(handed_out)
    assert store.committed == {}


@pytest.mark.gen_test
async def test_the_next_block_is_reserved_at_half_and_a_write_waits_when_none_is_left(
    make_cache: MakeCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache_module, "VERSION_BLOCK", 4)
    store = FakeStore()
    cache = make_cache(store)
    assert await cache.put("a", "1") == 1  # reserved 1..4 first
    assert await cache.put("a", "1") == 2
    await run_ready()
    assert store.reservations == [(1, 4)]
    assert await cache.put("a", "1") == 3  # two left after this one: less than half, so the next block starts
    await wait_until(lambda: len(store.reservations) == 2, "the reservation ahead of need")
    assert [await cache.put("a", "1") for _ in range(6)] == [4, 5, 6, 7, 8, 9]


@pytest.mark.gen_test
async def test_a_write_with_no_version_left_fails_503_while_the_store_cannot_reserve(
    make_cache: MakeCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache_module, "VERSION_BLOCK", 2)
    store = FakeStore()
    cache = make_cache(store)
    await cache.put("a", "1")
    await cache.put("a", "1")  # the reservation ahead of this one is refused: the store fails from now on
    store.fail_reserve = True
    await run_ready()
    with pytest.raises(StorageError):
        await cache.put("b", "1")
    with pytest.raises(StorageError):
        await cache.apply([Op("save", "c", value="1")], batch=True)
    assert cache.pending() == {"a": "1"}  # nothing of the refused writes
    store.heal()
    assert await cache.put("b", "1") > 2


# ================================================================================================
# Conditions, increments, batches
# ================================================================================================


@pytest.mark.gen_test
async def test_conditions_see_pending_committed_and_loaded_records(make_cache: MakeCache) -> None:
    store = FakeStore({"stored": "1"})
    cache = make_cache(store)
    with pytest.raises(VersionMismatch) as err:
        await cache.put("stored", "2", if_version=0)  # a miss: the condition reads sqlite first
    assert err.value.extra == {"current_version": 1}
    v = await cache.put("stored", "2", if_version=1)
    with pytest.raises(VersionMismatch):
        await cache.put("stored", "3", if_version=1)  # the pending write is the current one now
    assert await cache.put("stored", "3", if_version=v) > v
    assert await cache.delete("absent", if_version=0) is False
    assert store.reads == ["stored", "absent"]


@pytest.mark.gen_test
async def test_a_batch_is_all_or_nothing_and_nothing_of_a_refused_one_is_seen(make_cache: MakeCache) -> None:
    store = FakeStore({"n": '"text"'})
    cache = make_cache(store)
    with pytest.raises(NotAnInteger) as err:
        await cache.apply([Op("save", "a", value="1"), Op("delete", "b"), Op("incr", "n")], batch=True)
    assert err.value.extra == {"index": 2}
    assert cache.pending() == {}
    assert await cache.get("a") is None
    outcomes = await cache.apply([Op("save", "a", value="1"), Op("incr", "a", by=4), Op("get", "a")], batch=True)
    assert [o.record.value for o in outcomes] == ["1", "5", "5"]  # type: ignore[union-attr]
    assert cache.pending() == {"a": "5"}


@pytest.mark.gen_test
async def test_a_batch_over_max_dirty_is_refused_whole(make_cache: MakeCache) -> None:
    cache = make_cache(FakeStore(), max_dirty=3)
    await cache.put("a", "1")
    with pytest.raises(Overloaded):
        await cache.apply([Op("save", k, value="1") for k in ("b", "c", "d")], batch=True)
    assert cache.pending() == {"a": "1"}
    await cache.apply([Op("save", k, value="2") for k in ("a", "b", "c")], batch=True)  # two new keys fit
    assert cache.pending() == {"a": "2", "b": "2", "c": "2"}


@pytest.mark.gen_test
async def test_a_batch_over_max_dirty_bytes_is_refused_whole(make_cache: MakeCache) -> None:
    cache = make_cache(FakeStore(), max_dirty_bytes=10)
    with pytest.raises(Overloaded):
        await cache.apply([Op("save", "a", value="1234"), Op("save", "b", value="12345")], batch=True)  # 5 + 6
    assert cache.pending() == {}


@pytest.mark.gen_test
async def test_g9_refuses_a_non_durable_batch_while_the_store_fails(make_cache: MakeCache) -> None:
    store = FakeStore()
    cache = make_cache(store)
    await cache.put("a", "1")
    store.fail_writes = True
    with pytest.raises(Overloaded):
        await cache.flush()
    with pytest.raises(Overloaded, match="writes are refused"):
        await cache.apply([Op("incr", "a")], batch=True)
    outcomes = await cache.apply([Op("get", "a")], batch=True)  # reads go on
    assert outcomes[0].record.value == "1"  # type: ignore[union-attr]


@pytest.mark.gen_test
async def test_a_write_that_lands_while_a_batch_loads_its_misses_is_what_the_batch_sees(
    make_cache: MakeCache
) -> None:
    store = FakeStore({"n": "1"})
    cache = make_cache(store)
    store.read_gate.close()
    batch = asyncio.ensure_future(cache.apply([Op("incr", "n")], batch=True))
    await wait_until(lambda: store.read_gate.waiting == 1, "the batch's read of n")
    await cache.put("n", "10")  # newer than what sqlite is about to answer
    store.read_gate.open()
    (outcome,) = await batch
    assert outcome.record.value == "11"  # type: ignore[union-attr]
    assert await cache.get("n") == "11"


@pytest.mark.gen_test
async def test_a_durable_batch_answers_once_committed(make_cache: MakeCache) -> None:
    store = FakeStore()
    cache = make_cache(store)
    await cache.apply([Op("save", "a", value="1"), Op("save", "b", value="2")], durable=True, batch=True)
    assert store.committed == {"a": "1", "b": "2"}


# ================================================================================================
# Expiry
# ================================================================================================


@pytest.mark.gen_test
async def test_an_expired_key_is_absent_everywhere_pending_or_committed(make_cache: MakeCache, wall: Wall) -> None:
    store = FakeStore()
    cache = make_cache(store)
    await cache.put("p", "5", ttl=10)  # stays pending
    await cache.put("c", "5", ttl=10)
    await cache.flush()
    await cache.put("p", "5", ttl=10)
    assert await keys(cache) == ["c", "p"]
    wall.now += 10
    for key in ("p", "c"):
        assert await cache.get_record(key) is None
        assert await cache.delete(key) is False
    assert await keys(cache) == []
    (outcome,) = await cache.apply([Op("incr", "p")], batch=True)
    assert outcome.record == Record("1", outcome.record.version, None)  # type: ignore[union-attr]
    assert await cache.put("c", "1", if_version=0) > 0


@pytest.mark.gen_test
async def test_incr_keeps_the_expiry_and_a_save_without_ttl_clears_it(make_cache: MakeCache, wall: Wall) -> None:
    cache = make_cache(FakeStore())
    await cache.put("n", "1", ttl=60)
    await cache.apply([Op("incr", "n")], batch=True)
    assert (await cache.get_record("n")).expires_at == wall.now + 60  # type: ignore[union-attr]
    await cache.put("n", "1")
    assert (await cache.get_record("n")).expires_at is None  # type: ignore[union-attr]


@pytest.mark.gen_test
async def test_expired_records_leave_memory_at_commit_on_access_and_by_the_sweep(
    make_cache: MakeCache, wall: Wall
) -> None:
    store = FakeStore()
    cache = make_cache(store)
    await cache.put("gone-at-commit", "1", ttl=5)
    await cache.put("gone-on-access", "1", ttl=20)
    await cache.put("gone-by-sweep", "1", ttl=20)
    await cache.put("kept", "1", ttl=100)
    wall.now += 5
    await cache.flush()
    assert set(cache.cached()) == {"gone-on-access", "gone-by-sweep", "kept"}  # an expired commit is not cached
    wall.now += 15
    assert await cache.get("gone-on-access") is None
    assert set(cache.cached()) == {"gone-by-sweep", "kept"}
    assert await cache.sweep() == 1
    assert set(cache.cached()) == {"kept"}
    assert cache.stats()["cache"]["expired"] == 2
    # the store's rows went by its own sweep, which the cache's sweep runs
    assert sorted(store.swept) == ["gone-at-commit", "gone-by-sweep", "gone-on-access"]
    assert store.committed == {"kept": "1"}


@pytest.mark.gen_test
async def test_the_sweep_runs_every_sweep_interval_on_the_injected_clock(
    make_cache: MakeCache, wall: Wall
) -> None:
    store = FakeStore()
    cache = make_cache(store)
    await cache.start()
    clock: ManualClock = cache.clock  # type: ignore[assignment]
    await cache.put("k", "1", ttl=1)
    await cache.flush()
    wall.now += 1
    clock.advance(cache_module.SWEEP_INTERVAL_S - 0.001)
    await run_ready()
    assert store.swept == []
    clock.advance(0.001)
    await wait_until(lambda: store.swept == ["k"], "the periodic sweep")
    await cache.stop(1)


@pytest.mark.gen_test
async def test_a_sweep_of_a_failing_store_is_only_logged(make_cache: MakeCache, wall: Wall) -> None:
    store = FakeStore()
    cache = make_cache(store)
    await cache.put("k", "1", ttl=1)
    await cache.flush()
    wall.now += 2

    async def failing(now: float, limit: int = 1000) -> int:
        raise StorageError("sqlite sweep failed: disk I/O error (fake)")

    store.sweep_expired = failing  # type: ignore[method-assign]
    assert await cache.sweep() == 1  # memory is reclaimed whatever sqlite does


# ================================================================================================
# Listing (G1 for /keys)
# ================================================================================================


@pytest.mark.gen_test
async def test_a_listing_merges_pending_writes_and_tombstones_with_committed_rows(make_cache: MakeCache) -> None:
    store = FakeStore({"a": "1", "b": "1", "c": "1", "x/1": "1"})
    cache = make_cache(store)
    await cache.delete("b")
    await cache.put("bb", "2")
    await cache.put("c", "2")
    assert await keys(cache) == ["a", "bb", "c", "x/1"]
    rows = dict(await cache.list_keys("", None, 10))
    assert rows["c"].value == "2" and rows["a"].value == "1"
    assert await keys(cache, "b") == ["bb"]
    assert await keys(cache, "x/") == ["x/1"]
    assert await keys(cache, "", "bb", 1) == ["c"]
    assert await keys(cache, "", "a", 2) == ["bb", "c"]


@pytest.mark.gen_test
async def test_a_listing_reads_on_past_a_run_of_tombstones(make_cache: MakeCache) -> None:
    store = FakeStore({f"k{i:02}": "1" for i in range(20)})
    cache = make_cache(store)
    for i in range(15):
        await cache.delete(f"k{i:02}")
    assert await keys(cache, limit=3) == ["k15", "k16", "k17"]
    assert len(store.ranges) > 1  # the first range held only deleted keys


@pytest.mark.gen_test
async def test_a_range_read_while_a_flush_commits_is_read_again(make_cache: MakeCache) -> None:
    store = FakeStore({"a": "1", "gone": "1"})
    cache = make_cache(store)
    await cache.delete("gone")
    store.range_gate.close()
    listing = asyncio.ensure_future(keys(cache))
    await wait_until(lambda: store.range_gate.waiting == 1, "the first range read")
    await cache.flush()  # the tombstone is committed and leaves the pending maps while the read is out
    store.range_gate.open()
    assert await listing == ["a"]
    assert len(store.ranges) == 2


class CommitsDuringEveryRange(FakeStore):
    """A store under which a flush commits during every range read on the reader thread."""

    cache: WriteBehindCache | None = None

    async def range(self, prefix: str, after: str | None, limit: int, now: float, *,
                    serial: bool = False) -> list[Row]:
        rows = await super().range(prefix, after, limit, now, serial=serial)
        if not serial and self.cache is not None:
            self.cache._commit_gen += 1
        return rows


@pytest.mark.gen_test
async def test_a_listing_that_keeps_racing_commits_reads_on_the_writer_thread(make_cache: MakeCache) -> None:
    store = CommitsDuringEveryRange({"a": "1"})
    cache = make_cache(store)
    store.cache = cache
    assert await keys(cache) == ["a"]
    assert [serial for *_, serial in store.ranges] == [False] * cache_module.LIST_RETRIES + [True]
