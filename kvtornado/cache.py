"""The write-behind cache (exercise 4): reads from memory, writes acknowledged at once, committed in batches.

Three maps hold the state; a read looks in them in this order:
- ``_dirty``: acknowledged since the last flush started (a value, or ``None`` for a delete's tombstone);
- ``_flight``: taken by the flush in progress, or kept by a failed one for its retry. A flush starts by
  swapping ``_dirty`` into ``_flight`` (O(1), however many keys), and a key leaves ``_flight`` when its
  transaction commits. A key written during the flush is in both: the newer write in ``_dirty`` wins;
- ``_clean``: committed values, least recently used first; only these are evicted.
Pending writes and tombstones ("dirty": ``_dirty`` and ``_flight``) are never evicted. A key in none of
the maps is read from sqlite on a miss (concurrent misses share one read). Any write to a key detaches
a read in flight for it, so a read that returns after a newer write never overwrites it.

*When* a flush runs is the ``FlushScheduler``'s (scheduler.py): one at a time, every ``flush_interval_ms``,
at once when ``flush_batch_size`` new keys are dirty, for ``flush()`` or a durable write. A flush takes what
is dirty at its start and commits it in transactions of at most ``flush_batch_size`` rows on the store's
writer thread. A failed flush keeps everything and retries with exponential backoff (G4); until a flush
succeeds again, non-durable writes are refused (G9, ``writes_while_failing: refuse``). Memory is bounded
by count and by key+value bytes, pending (``max_dirty``, ``max_dirty_bytes``) and clean (``max_entries``,
``max_bytes``) alike (G5).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, cast

from kvtornado.config import CacheConfig
from kvtornado.errors import DurableTimeout, Overloaded, StorageError
from kvtornado.scheduler import Clock, FlushScheduler, LoopClock, Timer
from kvtornado.store import Row, SqliteStore

log = logging.getLogger("kvtornado.cache")

_ABSENT = object()  # "no pending write" (None is a pending delete)


def nbytes(text: str | None) -> int:
    """UTF-8 size of a key or a value's JSON text (0 for a tombstone); ASCII, the common case, is not encoded."""
    if text is None:
        return 0
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))

@dataclass
class _Load:
    """One sqlite read for a missing key, shared by every miss that arrives while it runs."""

    future: asyncio.Future[str | None]
    stale: bool = False  # set when the key is written meanwhile: the result must not be cached


@dataclass
class _Waiter:
    """Someone waiting for every write made before flush number ``flush_no`` started to be committed."""

    flush_no: int
    future: asyncio.Future[None]
    fail_fast: bool  # POST /flush hears about a failed attempt; a durable write waits for a later success
    timer: Timer | None = None


class CommitWaiters:
    """Durable writes and ``POST /flush`` waiting for a commit: the one place they are answered.

    A waiter registered while flush N is the latest started waits for flush N+1 (so for every write made
    before it registered). When a flush ends, ``settle`` answers each waiter it covers: a success resolves
    them; a failure fails the fail-fast ones (``POST /flush``) and moves the others on to the next flush. A
    waiter past its timeout gets its timeout error from the clock; ``close`` answers all that are left.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._waiters: list[_Waiter] = []

    def __bool__(self) -> bool:
        return any(not w.future.done() for w in self._waiters)

    def wait(self, flush_no: int, *, fail_fast: bool, timeout_s: float, timeout: Exception) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(flush_no, future, fail_fast)
        waiter.timer = self.clock.call_at(self.clock.now() + timeout_s, lambda: self._answer(waiter, timeout))
        self._waiters.append(waiter)
        return future

    def waiting_after(self, flush_no: int) -> bool:
        """Someone waits for a flush later than ``flush_no``."""
        return any(w.flush_no > flush_no and not w.future.done() for w in self._waiters)

    def settle(self, flush_no: int, failure: Exception | None) -> None:
        keep: list[_Waiter] = []
        for w in self._waiters:
            if w.future.done():
                continue
            if w.flush_no > flush_no:
                keep.append(w)
            elif failure is None:
                self._answer(w, None)
            elif w.fail_fast:
                self._answer(w, failure)
            else:
                w.flush_no = flush_no + 1  # a durable write waits for the next successful flush
                keep.append(w)
        self._waiters = keep

    def close(self, error: Exception) -> None:
        for w in self._waiters:
            self._answer(w, error)
        self._waiters.clear()

    @staticmethod
    def _answer(w: _Waiter, error: Exception | None) -> None:
        if w.timer is not None:
            w.timer.cancel()
            w.timer = None
        if w.future.done():
            return
        if error is None:
            w.future.set_result(None)
        else:
            w.future.set_exception(error)
            w.future.exception()  # retrieved: a waiter nobody awaits any more raises no "never retrieved"


@dataclass
class FlushStats:
    count: int = 0
    rows: int = 0
    errors: int = 0
    last_ms: float = 0.0


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    flush: FlushStats = field(default_factory=FlushStats)


class WriteBehindCache:
    """In-memory read path and write-behind batching over a ``SqliteStore`` (SPEC §7, G1-G9).

    The maps and the read path are here; *when* to flush is the ``FlushScheduler``'s (scheduler.py), and
    who waits for a commit is ``CommitWaiters``'. One injected ``Clock`` drives all three.
    """

    def __init__(self, store: SqliteStore, config: CacheConfig, *, clock: Clock | None = None) -> None:
        self.store = store
        self.config = config
        self.clock: Clock = clock if clock is not None else LoopClock()
        self._dirty: dict[str, str | None] = {}
        self._flight: dict[str, str | None] = {}
        self._overlap = 0  # keys in both _dirty and _flight: counted once as dirty
        self._clean: OrderedDict[str, str] = OrderedDict()
        # Key+value bytes held (G5): every entry of _dirty and of _flight (a key in both is held twice), and _clean.
        self._dirty_bytes = 0
        self._clean_bytes = 0
        self._loading: dict[str, _Load] = {}
        self._new_dirty = 0  # keys that became dirty since the last flush started
        self._flushes_started = 0
        self._tasks: set[asyncio.Task[None]] = set()  # strong references to the miss reads
        self._waiters = CommitWaiters(self.clock)
        self.scheduler = FlushScheduler(
            self.clock, config.flush_interval_ms,
            begin=self._begin_flush,
            has_work=lambda: bool(self.dirty_count or self._waiters),
            wants_next=lambda: (self._new_dirty >= config.flush_batch_size
                                or self._waiters.waiting_after(self._flushes_started)),
        )
        self.stats_ = CacheStats()

    # -- life cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the periodic flush (must run on the event loop that serves requests)."""
        self.scheduler.start()

    async def stop(self, timeout_s: float) -> int:
        """Flush everything (retrying until ``timeout_s``), stop the timer; returns writes left unflushed.
        Every commit waiter is answered: the flush committed its write, or the server is shutting down."""
        total = self.dirty_count
        await self.scheduler.finish(timeout_s)
        left = self.dirty_count
        if left:
            log.error("shutdown: %d of %d acknowledged writes could not be flushed", left, total)
        else:
            log.info("shutdown: flushed %d writes", total)
        self._waiters.close(Overloaded("The server is shutting down."))
        return left

    # -- the key/value interface ----------------------------------------------------------------

    @property
    def dirty_count(self) -> int:
        """Acknowledged writes not yet committed, the batch in flight included (distinct keys)."""
        return len(self._dirty) + len(self._flight) - self._overlap

    def pending(self) -> dict[str, str | None]:
        """A copy of every pending write (``None`` for a delete): what sqlite does not have yet."""
        return {**self._flight, **self._dirty}

    def cached(self) -> dict[str, str]:
        """A copy of the committed values held in memory (what a read answers without sqlite), oldest first."""
        return dict(self._clean)

    async def get(self, key: str) -> str | None:
        pending = self._dirty.get(key, _ABSENT)
        if pending is _ABSENT:
            pending = self._flight.get(key, _ABSENT)
        if pending is not _ABSENT:
            self.stats_.hits += 1
            return pending  # type: ignore[return-value]
        value = self._clean.get(key)
        if value is not None:
            self._clean.move_to_end(key)
            self.stats_.hits += 1
            return value
        self.stats_.misses += 1
        return await self._load(key)

    async def put(self, key: str, value: str, *, durable: bool = False) -> None:
        self._write(key, value, durable=durable)
        if durable:
            await self._await_commit(durable=True)

    async def delete(self, key: str, *, durable: bool = False) -> bool:
        """Tombstone ``key``; False (and nothing written) when it does not exist."""
        if not await self._exists(key):
            return False
        self._write(key, None, durable=durable)
        if durable:
            await self._await_commit(durable=True)
        return True

    async def flush(self) -> int:
        """Commit everything dirty now (retrying at once, whatever the backoff); returns how many keys."""
        n = self.dirty_count
        if n == 0:
            return 0
        await self._await_commit(durable=False)
        return n

    def stats(self) -> dict[str, Any]:
        s, f = self.stats_, self.stats_.flush
        return {
            "cache": {
                "entries": len(self._clean) + self.dirty_count,
                "clean": len(self._clean),
                "hits": s.hits,
                "misses": s.misses,
                "evictions": s.evictions,
                "dirty": self.dirty_count,
                "dirty_bytes": self._dirty_bytes,
                "clean_bytes": self._clean_bytes,
                "max_entries": self.config.max_entries,
                "max_bytes": self.config.max_bytes,
                "max_dirty": self.config.max_dirty,
                "max_dirty_bytes": self.config.max_dirty_bytes,
            },
            "flush": {
                "count": f.count,
                "rows": f.rows,
                "errors": f.errors,
                "last_ms": round(f.last_ms, 3),
                # acknowledged writes waiting for a retry after a failed flush (0 when healthy)
                "pending_retry": self.dirty_count if self.scheduler.streak else 0,
                "failing": self.scheduler.streak > 0,
                "refusing_writes": self._refusing_writes,
                "interval_ms": self.config.flush_interval_ms,
            },
        }

    # -- reads ----------------------------------------------------------------------------------

    def _pending_value(self, key: str) -> object:
        """The pending write for ``key`` (a value or None), or ``_ABSENT`` when there is none."""
        pending = self._dirty.get(key, _ABSENT)
        return self._flight.get(key, _ABSENT) if pending is _ABSENT else pending

    async def _exists(self, key: str) -> bool:
        pending = self._pending_value(key)
        if pending is not _ABSENT:
            return pending is not None
        if key in self._clean:
            return True
        value = await self._load(key)
        pending = self._pending_value(key)  # a write that landed while we read is newer than the read
        return pending is not None if pending is not _ABSENT else value is not None

    async def _load(self, key: str) -> str | None:
        load = self._loading.get(key)
        if load is None:
            load = _Load(asyncio.get_running_loop().create_future())
            self._loading[key] = load
            self._spawn(self._read_into(key, load))
        # shield: one waiter giving up (closed connection) must not cancel the shared read
        return await asyncio.shield(load.future)

    async def _read_into(self, key: str, load: _Load) -> None:
        try:
            value = await self.store.read(key)
        except Exception as exc:  # every waiter must hear of it, whatever it is
            if self._loading.get(key) is load:
                del self._loading[key]
            load.future.set_exception(exc if isinstance(exc, StorageError) else StorageError(f"read failed: {exc!r}"))
            load.future.exception()  # retrieved: no "never retrieved" warning when nobody waits
            return
        if self._loading.get(key) is load:
            del self._loading[key]
        # Not stale: no write to the key since the read began (a miss reads only keys with no pending write).
        if not load.stale and value is not None:
            self._remember(key, value)
        # A stale read still answers the reads that started before the write: for them it is current.
        load.future.set_result(value)

    def _remember(self, key: str, value: str) -> None:
        self._forget(key)
        self._clean[key] = value
        self._clean_bytes += nbytes(key) + nbytes(value)
        self._evict()

    def _forget(self, key: str) -> None:
        value = self._clean.pop(key, None)
        if value is not None:
            self._clean_bytes -= nbytes(key) + nbytes(value)

    def _evict(self) -> None:
        clean, max_entries, max_bytes = self._clean, self.config.max_entries, self.config.max_bytes
        while clean and (len(clean) > max_entries or self._clean_bytes > max_bytes):
            key, value = clean.popitem(last=False)
            self._clean_bytes -= nbytes(key) + nbytes(value)
            self.stats_.evictions += 1

    # -- writes ---------------------------------------------------------------------------------

    @property
    def _refusing_writes(self) -> bool:
        """G9: from a failed flush attempt until the next successful one, non-durable writes are refused."""
        return self.scheduler.streak > 0 and self.config.writes_while_failing == "refuse"

    def _write(self, key: str, value: str | None, *, durable: bool = False) -> None:
        if self._refusing_writes and not durable:
            raise Overloaded("sqlite is failing: writes are refused until a flush succeeds; retry shortly.",
                             retry_after_s=self.scheduler.retry_after_s())
        old = self._dirty.get(key, _ABSENT)
        # What this write adds to the pending bytes: an overwrite in _dirty replaces that entry; anything else is a
        # new entry (a key in the batch in flight is then held twice until that batch commits).
        grows = nbytes(key) + nbytes(value) if old is _ABSENT else nbytes(value) - nbytes(cast("str | None", old))
        if grows > 0 and self._dirty_bytes + grows > self.config.max_dirty_bytes:
            self.scheduler.trigger()
            raise Overloaded(f"{self._dirty_bytes} bytes of writes are waiting for sqlite; retry shortly.",
                             retry_after_s=self.scheduler.retry_after_s())
        if old is _ABSENT:
            in_flight = key in self._flight
            if not in_flight:  # a new dirty key (an overwrite of a pending one is always accepted)
                if self.dirty_count >= self.config.max_dirty:
                    self.scheduler.trigger()  # make room as soon as sqlite allows (max_dirty may be < batch size)
                    raise Overloaded(f"{self.dirty_count} writes are waiting for sqlite; retry shortly.",
                                     retry_after_s=self.scheduler.retry_after_s())
            else:
                self._overlap += 1
            self._new_dirty += 1
        self._dirty[key] = value
        self._dirty_bytes += grows
        self._forget(key)
        load = self._loading.pop(key, None)
        if load is not None:
            load.stale = True
        if (self._new_dirty >= self.config.flush_batch_size or self.dirty_count >= self.config.max_dirty
                or self._dirty_bytes >= self.config.max_dirty_bytes):
            self.scheduler.trigger()

    async def _await_commit(self, *, durable: bool) -> None:
        """Wait until a flush that starts after now has committed (so every write made so far is in)."""
        what = "The write was" if durable else "The flush was"
        timeout = DurableTimeout(f"{what} not committed within {self.config.durable_timeout_ms} ms; "
                                 "pending writes stay pending and will be written.")
        committed = self._waiters.wait(self._flushes_started + 1, fail_fast=not durable,
                                       timeout_s=self.config.durable_timeout_ms / 1000, timeout=timeout)
        # A durable write respects a failure backoff; POST /flush retries at once (G4).
        self.scheduler.trigger(force=not durable)
        await committed

    # -- flushing -------------------------------------------------------------------------------

    def _begin_flush(self) -> Awaitable[None]:
        """Take what is dirty now as the batch of flush number N+1 (synchronously: a write made after this
        returns waits for the next flush) and return the coroutine that commits it."""
        self._flushes_started += 1
        self._new_dirty = 0
        if self._flight:  # what a failed flush kept: its retry takes it, overlaid by newer writes
            flight = self._flight
            if self._overlap:
                for key in self._dirty.keys() & flight.keys():
                    self._dirty_bytes -= nbytes(key) + nbytes(flight[key])  # the older copy is dropped
            flight.update(self._dirty)
            self._dirty = {}
        else:
            self._flight, self._dirty = self._dirty, {}
        self._overlap = 0
        return self._flush(self._flushes_started)

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _flush(self, flush_no: int) -> None:
        f = self.stats_.flush
        started = time.perf_counter()
        committed = 0
        error: StorageError | None = None
        try:
            # _flight does not change until a batch commits, so the writer thread may read it meanwhile.
            for rows in await self.store.ordered_batches(self._flight, self.config.flush_batch_size):
                await self.store.write_rows(rows)
                self._committed(rows)
                committed += len(rows)
        except StorageError as exc:
            error = exc
        except Exception as exc:  # a bug, not sqlite: still a failed attempt that keeps its batch
            log.exception("flush failed unexpectedly")
            error = StorageError(f"unexpected flush error: {exc!r}")
        f.last_ms = (time.perf_counter() - started) * 1000
        f.rows += committed
        if error is None:
            f.count += 1
            if self.scheduler.streak:
                log.info("flush recovered after %d failed attempts: %d rows committed",
                         self.scheduler.streak, committed)
            self.scheduler.succeeded()
            self._waiters.settle(flush_no, None)
            return
        f.errors += 1
        self.scheduler.failed()
        if self.scheduler.streak == 1:
            log.warning("flush failed (%s); %d writes kept, retrying with backoff from %d ms",
                        error, self.dirty_count, self.scheduler.backoff_ms)
        self._waiters.settle(flush_no, Overloaded(
            f"The flush failed; {self.dirty_count} writes stay pending and will be retried.",
            retry_after_s=self.scheduler.retry_after_s()))

    def _committed(self, rows: list[Row]) -> None:
        dirty, flight, clean = self._dirty, self._flight, self._clean
        for key, value in rows:
            del flight[key]
            size = nbytes(key) + nbytes(value)
            self._dirty_bytes -= size
            if key in dirty:
                self._overlap -= 1  # written again during the flush: that write stays pending
            elif value is not None:
                clean[key] = value  # a new key in clean, so already the most recently used
                self._clean_bytes += size
        self._evict()
