"""The write-behind cache (exercise 4): reads from memory, writes acknowledged at once, committed in batches.

Three maps of ``Record``s (value, version, expiry; ops.py) hold the state; a read looks in them in this order:
- ``_dirty``: acknowledged since the last flush started (a value, or a tombstone for a delete);
- ``_flight``: taken by the flush in progress, or kept by a failed one for its retry. A flush starts by
  swapping ``_dirty`` into ``_flight`` (O(1), however many keys), and a key leaves ``_flight`` when its
  transaction commits. A key written during the flush is in both: the newer write in ``_dirty`` wins;
- ``_clean``: committed values, least recently used first; only these are evicted.
Pending writes and tombstones ("dirty": ``_dirty`` and ``_flight``) are never evicted. A key in none of
the maps is read from sqlite on a miss (concurrent misses share one read). Any write to a key detaches
a read in flight for it, so a read that returns after a newer write never overwrites it. The pending keys
are also kept in order (``_pending_keys``, a ``sortedcontainers.SortedList``) so ``/keys`` can merge them
with a range of committed rows.

Every write goes through ``ops.apply_ops`` (conditions, increments, batches, versions) on the event loop,
in one synchronous step once the records it needs are loaded: no other request can see part of it.
Versions come from blocks reserved in sqlite ahead of use (``store.reserve_versions``), so a write lost in a
crash never lets its version be handed out again (G10). Expired records are absent at once and reclaimed
lazily on access, at commit and by ``sweep`` (every ``SWEEP_INTERVAL_S``, in bounded slices).

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
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sortedcontainers import SortedList

from kvtornado.config import CacheConfig
from kvtornado.errors import DurableTimeout, Overloaded, StorageError
from kvtornado.ops import SAVE, Op, Outcome, Record, apply_ops, writes_in
from kvtornado.scheduler import Clock, FlushScheduler, LoopClock, Timer
from kvtornado.store import VERSION_BLOCK, Row, Store, unanswered

log = logging.getLogger("kvtornado.cache")

# The clean map is swept for expired records every this many seconds, this many entries a loop turn.
SWEEP_INTERVAL_S = 10.0
SWEEP_SLICE = 5000
# A listing round whose committed range was read while a flush committed is read again, at most this many
# times, then once on the writer thread, in order with the commits.
LIST_RETRIES = 3


# Committed rows moved out of the pending maps between two turns of the event loop (see _committed).
COMMIT_SLICE = 500


def nbytes(text: str | None) -> int:
    """UTF-8 size of a key or a value's JSON text (0 for a tombstone); ASCII, the common case, is not encoded."""
    if text is None:
        return 0
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))

@dataclass
class _Load:
    """One sqlite read for a missing key, shared by every miss that arrives while it runs."""

    future: asyncio.Future[Record | None]
    stale: bool = False  # set when the key is written meanwhile: the result must not be cached
    holders: int = 0  # writes waiting to apply with this result: it stays in _loading (valid) until they do


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
    """In-memory read path and write-behind batching over a ``store.Store`` (sqlite or PostgreSQL; SPEC §7, G1-G10).

    The maps and the read path are here; *when* to flush is the ``FlushScheduler``'s (scheduler.py), and
    who waits for a commit is ``CommitWaiters``'. One injected ``Clock`` drives all three; expiry reads the
    wall clock ``wall`` (the store's clock unless given).
    """

    def __init__(self, store: Store, config: CacheConfig, *, clock: Clock | None = None,
                 wall: Callable[[], float] | None = None) -> None:
        self.store = store
        self.config = config
        self.clock: Clock = clock if clock is not None else LoopClock()
        self.wall: Callable[[], float] = wall if wall is not None else getattr(store, "clock", time.time)
        self._dirty: dict[str, Record] = {}
        self._flight: dict[str, Record] = {}
        self._overlap = 0  # keys in both _dirty and _flight: counted once as dirty
        self._clean: OrderedDict[str, Record] = OrderedDict()
        self._pending_keys: SortedList = SortedList()  # every key of _dirty and _flight, in order
        self._commit_gen = 0  # moves whenever committed rows leave the pending maps (see list_keys)
        # Key+value bytes held (G5): every entry of _dirty and of _flight (a key in both is held twice), and _clean.
        self._dirty_bytes = 0
        self._clean_bytes = 0
        self._loading: dict[str, _Load] = {}
        self._new_dirty = 0  # keys that became dirty since the last flush started
        self._flushes_started = 0
        self._tasks: set[asyncio.Task[None]] = set()  # strong references to the miss reads
        self._waiters = CommitWaiters(self.clock)
        # Versions [_next_version, _last_version] are reserved in sqlite and not handed out yet.
        self._next_version = 1
        self._last_version = 0
        self._reserving: asyncio.Future[None] | None = None
        self._reserve_retry_at = 0.0  # clock time before which no reservation ahead of need starts
        self._expiring = False  # some record with an expiry was seen: the clean map needs sweeping
        self._sweep_timer: Timer | None = None
        self._sweeping: asyncio.Task[None] | None = None
        self.scheduler = FlushScheduler(
            self.clock, config.flush_interval_ms,
            begin=self._begin_flush,
            has_work=lambda: bool(self.dirty_count or self._waiters),
            wants_next=lambda: (self._new_dirty >= config.flush_batch_size
                                or self._waiters.waiting_after(self._flushes_started)),
        )
        self.stats_ = CacheStats()
        self.expired_dropped = 0
        # Called with each flush attempt's duration in seconds, failed ones too (the metrics' histogram).
        self.on_flush: Callable[[float], None] | None = None

    # -- life cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Reserve the first block of versions, start the periodic flush and the expiry sweep (on the event
        loop that serves requests). A store that cannot reserve versions fails the start."""
        await self._reserve_versions()
        self.scheduler.start()
        self._schedule_sweep()

    async def stop(self, timeout_s: float) -> int:
        """Flush everything (retrying until ``timeout_s``), stop the timers; returns writes left unflushed.
        Every commit waiter is answered: the flush committed its write, or the server is shutting down."""
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None
        total = self.dirty_count
        await self.scheduler.finish(timeout_s)
        left = self.dirty_count
        if left:
            log.error("shutdown: %d of %d acknowledged writes could not be flushed", left, total)
        else:
            log.info("shutdown: flushed %d writes", total)
        self._waiters.close(Overloaded("The server is shutting down."))
        if self._sweeping is not None:
            await asyncio.gather(self._sweeping, return_exceptions=True)
        return left

    # -- the key/value interface ----------------------------------------------------------------

    @property
    def dirty_count(self) -> int:
        """Acknowledged writes not yet committed, the batch in flight included (distinct keys)."""
        return len(self._dirty) + len(self._flight) - self._overlap

    def pending_records(self) -> dict[str, Record]:
        """A copy of every pending write (a tombstone for a delete): what sqlite does not have yet."""
        return {**self._flight, **self._dirty}

    def pending(self) -> dict[str, str | None]:
        """``pending_records``' values (``None`` for a delete)."""
        return {key: record.value for key, record in self.pending_records().items()}

    def cached(self) -> dict[str, str]:
        """The committed values held in memory (what a read answers without sqlite), oldest first."""
        return {key: record.value for key, record in self._clean.items()}  # type: ignore[misc]  # never tombstones

    async def get_record(self, key: str) -> Record | None:
        """The key's live record, or None when it is absent, deleted or expired."""
        record = self._dirty.get(key)
        if record is None:
            record = self._flight.get(key)
        if record is None:
            record = self._clean.get(key)
            if record is None:
                self.stats_.misses += 1
                record = await self._load(key)
                return record if record is not None and record.live(self.wall()) else None
            if record.expires_at is not None and record.expires_at <= self.wall():
                self._drop_expired(key)
                self.stats_.hits += 1
                return None
            self._clean.move_to_end(key)
        self.stats_.hits += 1
        return record if record.live(self.wall()) else None

    async def get(self, key: str) -> str | None:
        """The key's value as JSON text, or None (a shorthand of ``get_record``)."""
        record = await self.get_record(key)
        return None if record is None else record.value

    async def put(self, key: str, value: str, *, durable: bool = False, ttl: int | None = None,
                  if_version: int | None = None) -> int:
        """Save ``value`` (JSON text); the new version. The common unconditional save skips the op machinery."""
        if if_version is not None:
            outcomes = await self.apply([Op(SAVE, key, value=value, ttl=ttl, if_version=if_version)],
                                        durable=durable)
            return outcomes[0].record.version  # type: ignore[union-attr]  # a save always has its record
        if self._next_version > self._last_version:
            await self._reserve_versions()
        expires_at = None
        if ttl is not None:
            expires_at = self.wall() + ttl
            self._expiring = True
        record = Record(value, self._draw(), expires_at)
        writes = {key: record}
        self._admit(writes, durable)
        self._install(writes)
        if durable:
            await self._await_commit(durable=True)
        return record.version

    async def delete(self, key: str, *, durable: bool = False, if_version: int | None = None) -> bool:
        """Tombstone ``key``; False (and nothing written) when it does not exist."""
        outcomes = await self.apply([Op("delete", key, if_version=if_version)], durable=durable, batch=True)
        return outcomes[0].done

    async def apply(self, ops: Sequence[Op], *, durable: bool = False, batch: bool = False) -> list[Outcome]:
        """Apply ``ops`` (``ops.apply_ops``) in one step on the loop, once every record they need is in memory
        and enough versions are reserved; all or nothing, G5 and G9 checked for the whole of it. With
        ``durable``, returns once a flush has committed it."""
        need = {op.key for op in ops if op.needs_current}
        versions = writes_in(ops)
        held: dict[str, _Load] = {}
        try:
            while True:
                if versions and self._last_version - self._next_version + 1 < versions:
                    await self._reserve_versions()
                    continue
                missing = [k for k in need if self._peek(k) is None and (k not in held or held[k].stale)]
                if not missing:
                    break
                self.stats_.misses += len(missing)
                for key in missing:
                    if key in held:
                        self._release(key, held.pop(key))
                    held[key] = self._hold(key)
                await asyncio.gather(*(asyncio.shield(held[k].future) for k in missing))
            # From here to the end of _install nothing awaits: no other request sees part of the ops.
            now = self.wall()

            def lookup(key: str) -> Record | None:
                record = self._peek(key)
                if record is not None or key not in need:  # an unconditional save does not look
                    return record
                return held[key].future.result()

            outcomes, writes = apply_ops(ops, lookup, now, self._draw, batch=batch)
        finally:
            for key, load in held.items():
                self._release(key, load)
        if writes:
            self._admit(writes, durable)
            self._install(writes)
            if durable:
                await self._await_commit(durable=True)
        return outcomes

    async def list_keys(self, prefix: str, after: str | None, limit: int) -> list[Row]:
        """At most ``limit`` live keys starting with ``prefix`` after ``after``, in order, with their records:
        the committed rows merged with the pending writes (a pending write wins, a tombstone hides its row)."""
        out: list[Row] = []
        pos = after
        while len(out) < limit:
            rows, bounded = await self._list_round(prefix, pos, limit - len(out), out, limit)
            if not bounded:
                break
            pos = rows[-1][0]
        return out[:limit]

    async def sweep(self) -> int:
        """Drop expired records from the clean map (in slices, the loop free between them) and reclaim
        expired rows in sqlite; returns how many records were dropped from memory."""
        dropped = 0
        if self._expiring:
            keys = list(self._clean)
            for start in range(0, len(keys), SWEEP_SLICE):
                now = self.wall()
                for key in keys[start:start + SWEEP_SLICE]:
                    record = self._clean.get(key)
                    if record is not None and record.expires_at is not None and record.expires_at <= now:
                        self._drop_expired(key)
                        dropped += 1
                await asyncio.sleep(0)
        try:
            await self.store.sweep_expired(self.wall())
        except StorageError as exc:  # the flush reports a failing store; the next sweep tries again
            log.debug("expiry sweep of the store failed: %s", exc)
        return dropped

    async def flush(self) -> int:
        """Commit everything dirty now (retrying at once, whatever the backoff); returns how many keys."""
        n = self.dirty_count
        if n == 0:
            return 0
        await self._await_commit(durable=False)
        return n

    async def readiness(self) -> str | None:
        """SPEC §11 ``/readyz``: None when writes are taken and the store answers, else why not."""
        if self._refusing_writes:
            return "The store is failing: writes are refused until a flush succeeds."
        return await unanswered(self.store)

    def stats(self) -> dict[str, Any]:
        s, f = self.stats_, self.stats_.flush
        return {
            "cache": {
                "entries": len(self._clean) + self.dirty_count,
                "clean": len(self._clean),
                "hits": s.hits,
                "misses": s.misses,
                "evictions": s.evictions,
                "expired": self.expired_dropped,
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

    def _peek(self, key: str) -> Record | None:
        """The record memory holds for ``key`` (pending first, expired or not), or None: then sqlite has it."""
        record = self._dirty.get(key)
        if record is None:
            record = self._flight.get(key)
            if record is None:
                record = self._clean.get(key)
        return record

    async def _load(self, key: str) -> Record | None:
        load = self._hold(key)
        try:
            # shield: one waiter giving up (closed connection) must not cancel the shared read
            return await asyncio.shield(load.future)
        finally:
            self._release(key, load)

    def _hold(self, key: str) -> _Load:
        """The sqlite read of ``key`` in progress (or done and still valid), else a new one; held until
        ``_release``: while held, a write to the key marks it stale instead of it being forgotten unseen."""
        load = self._loading.get(key)
        if load is None:
            load = _Load(asyncio.get_running_loop().create_future())
            self._loading[key] = load
            self._spawn(self._read_into(key, load))
        load.holders += 1
        return load

    def _release(self, key: str, load: _Load) -> None:
        load.holders -= 1
        if load.holders == 0 and load.future.done() and self._loading.get(key) is load:
            del self._loading[key]

    async def _read_into(self, key: str, load: _Load) -> None:
        try:
            record = await self.store.read(key)
        except Exception as exc:  # every waiter must hear of it, whatever it is
            if self._loading.get(key) is load:
                del self._loading[key]
            load.future.set_exception(exc if isinstance(exc, StorageError) else StorageError(f"read failed: {exc!r}"))
            load.future.exception()  # retrieved: no "never retrieved" warning when nobody waits
            return
        if load.holders == 0 and self._loading.get(key) is load:
            del self._loading[key]
        # Not stale: no write to the key since the read began (a miss reads only keys with no pending write).
        if not load.stale and record is not None and record.live(self.wall()):
            self._remember(key, record)
        # A stale read still answers the reads that started before the write: for them it is current.
        load.future.set_result(record)

    def _remember(self, key: str, record: Record) -> None:
        self._forget(key)
        if record.expires_at is not None:
            self._expiring = True
        self._clean[key] = record
        self._clean_bytes += nbytes(key) + nbytes(record.value)
        self._evict()

    def _forget(self, key: str) -> None:
        record = self._clean.pop(key, None)
        if record is not None:
            self._clean_bytes -= nbytes(key) + nbytes(record.value)

    def _drop_expired(self, key: str) -> None:
        self._forget(key)
        self.expired_dropped += 1

    def _evict(self) -> None:
        clean, max_entries, max_bytes = self._clean, self.config.max_entries, self.config.max_bytes
        while clean and (len(clean) > max_entries or self._clean_bytes > max_bytes):
            key, record = clean.popitem(last=False)
            self._clean_bytes -= nbytes(key) + nbytes(record.value)
            self.stats_.evictions += 1

    # -- listing --------------------------------------------------------------------------------

    def _pending_after(self, prefix: str, pos: str | None, hi: str | None) -> Iterator[str]:
        """Pending keys starting with ``prefix``, after ``pos`` (from ``prefix`` when None), up to ``hi``."""
        low, inclusive = (prefix, True) if pos is None or pos < prefix else (pos, False)
        for key in self._pending_keys.irange(low, hi, inclusive=(inclusive, True)):
            if not key.startswith(prefix):
                return
            yield key

    async def _list_round(self, prefix: str, pos: str | None, want: int, out: list[Row],
                          limit: int) -> tuple[list[Row], bool]:
        """Read up to ``want`` committed rows after ``pos`` and merge the pending keys up to the last of
        them into ``out`` (every pending key to the end of the prefix when the rows ran out), until ``out``
        holds ``limit``; returns the rows and whether they filled ``want`` (then more may follow them).

        The merge must see the pending maps as they were when sqlite took its snapshot: a row a flush
        commits meanwhile leaves the pending maps, and the snapshot may predate its commit. So a round is
        read again when ``_commit_gen`` moved during the read, and after ``LIST_RETRIES`` times it is read
        on the writer thread, where no commit can land between the read and its result."""
        for attempt in range(LIST_RETRIES + 1):
            serial = attempt == LIST_RETRIES
            gen = self._commit_gen
            rows = await self.store.range(prefix, pos, want, self.wall(), serial=serial)
            if serial or gen == self._commit_gen:
                break
        bounded = len(rows) >= want
        now = self.wall()
        dirty, flight = self._dirty, self._flight

        def merged() -> Iterator[Row]:
            committed = iter(rows)  # the store left out its expired rows itself
            row = next(committed, None)
            for key in self._pending_after(prefix, pos, rows[-1][0] if bounded else None):
                while row is not None and row[0] < key:
                    yield row
                    row = next(committed, None)
                if row is not None and row[0] == key:
                    row = next(committed, None)  # the pending write is newer
                record = dirty.get(key) or flight[key]
                if record.live(now):
                    yield key, record
            while row is not None:
                yield row
                row = next(committed, None)

        for item in merged():
            out.append(item)
            if len(out) >= limit:
                break
        return rows, bounded

    # -- expiry ---------------------------------------------------------------------------------

    def _schedule_sweep(self) -> None:
        self._sweep_timer = self.clock.call_at(self.clock.now() + SWEEP_INTERVAL_S, self._sweep_due)

    def _sweep_due(self) -> None:
        if self._sweeping is None or self._sweeping.done():
            self._sweeping = self._spawn(self.sweep())
        self._schedule_sweep()

    # -- writes ---------------------------------------------------------------------------------

    @property
    def _refusing_writes(self) -> bool:
        """G9: from a failed flush attempt until the next successful one, non-durable writes are refused."""
        return self.scheduler.streak > 0 and self.config.writes_while_failing == "refuse"

    def _draw(self) -> int:
        """The next reserved version (``apply`` reserved enough first); starts the next reservation at half."""
        version = self._next_version
        if version > self._last_version:
            raise StorageError("no version reserved")  # a bug: apply and put reserve before drawing
        self._next_version = version + 1
        if (self._last_version - version < VERSION_BLOCK // 2 and self._reserving is None
                and self.clock.now() >= self._reserve_retry_at):
            self._reserving = self._spawn(self._reserve())
        return version

    async def _reserve_versions(self) -> None:
        """Wait for the next block of versions (one reservation at a time); StorageError when it fails."""
        if self._reserving is None:
            self._reserving = self._spawn(self._reserve())
        reserving = self._reserving
        await asyncio.shield(reserving)

    async def _reserve(self) -> None:
        try:
            first, last = await self.store.reserve_versions(VERSION_BLOCK)
            if first != self._last_version + 1:  # the block does not follow ours: what is left of ours is dropped
                self._next_version = first
            self._last_version = last
        except StorageError as exc:
            # The next reservation ahead of need waits a second (a write that has none left retries at once).
            self._reserve_retry_at = self.clock.now() + 1.0
            log.warning("cannot reserve versions: %s", exc)
            raise
        finally:
            self._reserving = None

    def _admit(self, writes: dict[str, Record], durable: bool) -> None:
        """G9 and G5 for the whole of ``writes``: refused (nothing written) or all of them fit."""
        if self._refusing_writes and not durable:
            raise Overloaded("The store is failing: writes are refused until a flush succeeds; retry shortly.",
                             retry_after_s=self.scheduler.retry_after_s())
        grows = 0
        new_keys = 0
        dirty, flight = self._dirty, self._flight
        for key, record in writes.items():
            old = dirty.get(key)
            # An overwrite in _dirty replaces that entry; anything else is a new entry (a key in the batch in
            # flight is then held twice until that batch commits).
            if old is None:
                grows += nbytes(key) + nbytes(record.value)
                if key not in flight:
                    new_keys += 1
            else:
                grows += nbytes(record.value) - nbytes(old.value)
        if grows > 0 and self._dirty_bytes + grows > self.config.max_dirty_bytes:
            self.scheduler.trigger()
            raise Overloaded(f"{self._dirty_bytes} bytes of writes are waiting for the store; retry shortly.",
                             retry_after_s=self.scheduler.retry_after_s())
        if new_keys and self.dirty_count + new_keys > self.config.max_dirty:
            self.scheduler.trigger()  # make room as soon as sqlite allows (max_dirty may be < batch size)
            raise Overloaded(f"{self.dirty_count} writes are waiting for the store; retry shortly.",
                             retry_after_s=self.scheduler.retry_after_s())

    def _install(self, writes: dict[str, Record]) -> None:
        dirty, flight = self._dirty, self._flight
        for key, record in writes.items():
            old = dirty.get(key)
            if old is None:
                if key in flight:
                    self._overlap += 1
                else:
                    self._pending_keys.add(key)
                self._new_dirty += 1
                self._dirty_bytes += nbytes(key) + nbytes(record.value)
            else:
                self._dirty_bytes += nbytes(record.value) - nbytes(old.value)
            if record.expires_at is not None:
                self._expiring = True
            dirty[key] = record
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
                    self._dirty_bytes -= nbytes(key) + nbytes(flight[key].value)  # the older copy is dropped
            flight.update(self._dirty)
            self._dirty = {}
        else:
            self._flight, self._dirty = self._dirty, {}
        self._overlap = 0
        return self._flush(self._flushes_started)

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a failed background reservation is logged, not "never retrieved"

    async def _flush(self, flush_no: int) -> None:
        f = self.stats_.flush
        started = time.perf_counter()
        committed = 0
        error: StorageError | None = None
        try:
            # _flight does not change until a batch commits, so the writer thread may read it meanwhile.
            for rows in await self.store.ordered_batches(self._flight, self.config.flush_batch_size):
                await self.store.write_rows(rows)
                await self._committed(rows)
                committed += len(rows)
        except StorageError as exc:
            error = exc
        except Exception as exc:  # a bug, not sqlite: still a failed attempt that keeps its batch
            log.exception("flush failed unexpectedly")
            error = StorageError(f"unexpected flush error: {exc!r}")
        elapsed_s = time.perf_counter() - started
        f.last_ms = elapsed_s * 1000
        f.rows += committed
        if self.on_flush is not None:
            self.on_flush(elapsed_s)
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

    async def _committed(self, rows: list[Row]) -> None:
        """Move committed rows out of the pending maps, ``COMMIT_SLICE`` at a time with the loop free between
        slices: taking 5 000 keys out of the ordered pending set at once stalled the loop for ~15 ms. Each slice
        moves ``_commit_gen``, so a listing whose sqlite read overlapped one reads again; a key not yet moved is
        still pending with the record just committed, which the listing's merge prefers to the row."""
        for start in range(0, len(rows), COMMIT_SLICE):
            if start:
                await asyncio.sleep(0)
            self._committed_slice(rows[start:start + COMMIT_SLICE])

    def _committed_slice(self, rows: list[Row]) -> None:
        dirty, flight, clean = self._dirty, self._flight, self._clean
        now = self.wall()
        for key, record in rows:
            del flight[key]
            size = nbytes(key) + nbytes(record.value)
            self._dirty_bytes -= size
            if key in dirty:
                self._overlap -= 1  # written again during the flush: that write stays pending
                continue
            self._pending_keys.remove(key)
            if record.live(now):
                clean[key] = record  # a new key in clean, so already the most recently used
                self._clean_bytes += size
        self._commit_gen += 1
        self._evict()
