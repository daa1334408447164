"""Storage: the ``Store`` interface, and sqlite behind it (one writer thread and one reader thread, each with
its own connection).

``SqliteStore`` is exercise 3's write-through store (every write committed before it returns) and the
backend the write-behind cache flushes into. No sqlite call ever runs on the event loop thread.
``kvtornado.pgstore.PostgresStore`` is the other implementation (SPEC §10); ``open_store`` picks one from the
config. The ``Store`` protocol lives here, beside its first implementation and the helpers both share
(``Row``, ``ordered_batches``, ``prefix_end``), so the sqlite path never imports a PostgreSQL driver.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import os
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from kvtornado.errors import KVError, StorageError
from kvtornado.locks import LockHeld, lock_path, take_lock
from kvtornado.ops import GET, MAX_SAFE, Op, Outcome, Record, apply_ops

if TYPE_CHECKING:
    from kvtornado.config import StorageConfig
    from kvtornado.pgstore import PostgresStore

SCHEMA_VERSION = 2
# SPEC §6: a flush that cannot take the write lock within this has failed.
MAX_BUSY_TIMEOUT_MS = 5000

# Schema 2 (SPEC §6): every row has its version and expiry. ``meta`` keeps the version high-water mark: every
# version up to it may have been handed out (write-behind reserves blocks ahead), so none is handed out twice.
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS kv(key TEXT PRIMARY KEY, value TEXT NOT NULL, version INTEGER NOT NULL, "
    "expires_at REAL, updated_at REAL NOT NULL) WITHOUT ROWID",
    # Partial: only rows that can expire are indexed, so rows without a ttl cost the index nothing.
    "CREATE INDEX IF NOT EXISTS kv_expires_at ON kv(expires_at) WHERE expires_at IS NOT NULL",
    "CREATE TABLE IF NOT EXISTS meta(name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
    "INSERT OR IGNORE INTO meta(name, value) VALUES ('version_hwm', 0)",
)
# Shared mode (SPEC §10, several flushers): a delete leaves its version here, so an older save of the key that
# arrives later is refused; reclaimed once no pending write can be older (``reclaim_tombstones``). Created on
# every open (kv's layout, and so the schema version, are unchanged).
_TOMBSTONES = ("CREATE TABLE IF NOT EXISTS kv_tombstone(key TEXT PRIMARY KEY, version INTEGER NOT NULL) "
               "WITHOUT ROWID")
_GUARDED_UPSERT = (
    "INSERT INTO kv(key, value, version, expires_at, updated_at) SELECT ?, ?, ?, ?, ? "
    "WHERE NOT EXISTS (SELECT 1 FROM kv_tombstone WHERE key = ? AND version >= ?) "
    "ON CONFLICT(key) DO UPDATE SET value = excluded.value, version = excluded.version, "
    "expires_at = excluded.expires_at, updated_at = excluded.updated_at WHERE kv.version < excluded.version"
)
_GUARDED_DELETE = "DELETE FROM kv WHERE key = ? AND version < ?"
_PUT_TOMBSTONE = (
    "INSERT INTO kv_tombstone(key, version) SELECT ?, ? WHERE NOT EXISTS "
    "(SELECT 1 FROM kv WHERE key = ? AND version >= ?) "
    "ON CONFLICT(key) DO UPDATE SET version = excluded.version WHERE kv_tombstone.version < excluded.version"
)
_DROP_TOMBSTONE = "DELETE FROM kv_tombstone WHERE key = ? AND version < ?"
_RECLAIM = "DELETE FROM kv_tombstone WHERE version < ?"
_READ_HWM = "SELECT value FROM meta WHERE name = 'version_hwm'"
# Schema 1 -> 2, in the same transaction as _SCHEMA: every row kept, numbered 1..n in key order.
_MIGRATE_V1 = (
    "CREATE TABLE kv_v2(key TEXT PRIMARY KEY, value TEXT NOT NULL, version INTEGER NOT NULL, "
    "expires_at REAL, updated_at REAL NOT NULL) WITHOUT ROWID",
    "INSERT INTO kv_v2(key, value, version, expires_at, updated_at) "
    "SELECT key, value, row_number() OVER (ORDER BY key), NULL, updated_at FROM kv",
    "DROP TABLE kv",
    "ALTER TABLE kv_v2 RENAME TO kv",
)
_UPSERT = (
    "INSERT INTO kv(key, value, version, expires_at, updated_at) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT(key) DO UPDATE SET value = excluded.value, version = excluded.version, "
    "expires_at = excluded.expires_at, updated_at = excluded.updated_at"
)
_DELETE = "DELETE FROM kv WHERE key = ?"
_SELECT = "SELECT value, version, expires_at FROM kv WHERE key = ?"
_HWM = "SELECT max((SELECT value FROM meta WHERE name = 'version_hwm'), (SELECT coalesce(max(version), 0) FROM kv))"
_SET_HWM = "UPDATE meta SET value = ? WHERE name = 'version_hwm'"
_LIVE = "(expires_at IS NULL OR expires_at > ?)"
# A bounded sweep: the oldest expired rows first, through the expires_at index.
_SWEEP = ("DELETE FROM kv WHERE key IN "
          "(SELECT key FROM kv WHERE expires_at <= ? ORDER BY expires_at LIMIT ?)")
# Statements without parameters, named once (SQL keywords are case-insensitive).
_WAL = "PRAGMA journal_mode = WAL"
_USER_VERSION = "PRAGMA user_version"
_BEGIN = "BEGIN IMMEDIATE"
_BEGIN_READ = "BEGIN"
_COMMIT = "COMMIT"
_ROLLBACK = "ROLLBACK"
_PROBE = "SELECT count(*) FROM kv LIMIT 1"


def _range_sql(inclusive: bool, bounded: bool) -> str:
    low = "key >= ?" if inclusive else "key > ?"
    high = " AND key < ?" if bounded else ""
    return (f"SELECT key, value, version, expires_at FROM kv WHERE {low}{high} AND {_LIVE} "
            "ORDER BY key LIMIT ?")


_RANGE = {(inclusive, bounded): _range_sql(inclusive, bounded)
          for inclusive in (False, True) for bounded in (False, True)}
# Versions the write-behind cache reserves at a time (one small commit per block).
VERSION_BLOCK = 1 << 17
# The expiry sweep deletes this many rows a transaction, at most SWEEP_ROUNDS transactions a call.
SWEEP_ROWS = 1000
SWEEP_ROUNDS = 50

# One row write: (key, record); a record whose value is None is a delete.
Row = tuple[str, Record]
T = TypeVar("T")


def prefix_end(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix`` (None: no bound), in code-point order."""
    stripped = prefix.rstrip("\U0010ffff")
    if not stripped:
        return None
    last = ord(stripped[-1]) + 1
    if 0xD800 <= last <= 0xDFFF:  # keys hold no surrogates: the next code point that can follow is U+E000
        last = 0xE000
    return stripped[:-1] + chr(last)


def _record(row: tuple[Any, ...]) -> Record:
    return Record(str(row[0]), int(row[1]), None if row[2] is None else float(row[2]))


log = logging.getLogger("kvtornado.store")


def _connect(path: Path, synchronous: str, busy_timeout_ms: int) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; writes use explicit BEGIN IMMEDIATE ... COMMIT.
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=True)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        # A file that is not a database fails here, not in connect(): the connection must still be closed.
        mode = conn.execute(_WAL).fetchone()[0]
        if str(mode).lower() != "wal":
            raise StorageError(f"{path}: cannot switch sqlite to WAL journal mode (got {mode})")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
    except BaseException:
        conn.close()
        raise
    return conn


# Rows sorted at a time while planning a flush: each sort holds the GIL for well under a millisecond.
RUN_ROWS = 1000


def ordered_batches(rows: Mapping[str, T], batch_rows: int) -> list[list[tuple[str, T]]]:
    """Split ``{key: ...}`` into lists of ``(key, ...)`` of at most ``batch_rows``, in global key order.

    Writing keys in order turns random B-tree updates into one sequential walk (2-4x faster here for
    100 000 updates). One big sort would hold the GIL, and so stall the event loop, for tens of ms;
    short sorted runs merged in Python let the loop thread take the GIL back between items.
    """
    first = itemgetter(0)
    run = min(batch_rows, RUN_ROWS)
    pairs = iter(rows.items())  # consumed a run at a time: copying 100 000 items at once holds the GIL too
    runs: list[list[tuple[str, T]]] = []
    while chunk := sorted(islice(pairs, run), key=first):
        runs.append(chunk)
    if len(runs) <= 1:
        return runs
    batches: list[list[tuple[str, T]]] = []
    batch: list[tuple[str, T]] = []
    for item in heapq.merge(*runs, key=first):
        batch.append(item)
        if len(batch) == batch_rows:
            batches.append(batch)
            batch = []
    if batch:
        batches.append(batch)
    return batches


class Store(Protocol):
    """What the write-behind cache (and, through ``WriteThrough``, exercise 3's handlers) needs of a store of
    record: ``SqliteStore`` and ``kvtornado.pgstore.PostgresStore`` implement it, and one conformance suite
    (tests/e2e/test_conformance.py) runs the API against each. Every failure is a ``StorageError``."""

    clock: Callable[[], float]

    @property
    def where(self) -> str:
        """The database, for log lines (never a password)."""
        ...

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def read(self, key: str) -> Record | None: ...
    async def range(self, prefix: str, after: str | None, limit: int, now: float, *,
                    serial: bool = False) -> list[Row]: ...
    async def ordered_batches(self, rows: Mapping[str, T], batch_rows: int) -> list[list[tuple[str, T]]]: ...
    async def write_rows(self, rows: Sequence[Row]) -> None: ...
    async def reserve_versions(self, n: int) -> tuple[int, int]: ...
    async def sweep_expired(self, now: float, limit: int = ...) -> int: ...
    async def reclaim_tombstones(self, below: int) -> int: ...
    async def ping(self) -> None: ...
    async def apply(self, ops: Sequence[Op], *, durable: bool = False, batch: bool = False) -> list[Outcome]: ...
    def stats(self) -> dict[str, Any]: ...


async def unanswered(store: Store | WriteThrough) -> str | None:
    """Why ``store`` is not ready (``/readyz``, one sentence), or None when it answers."""
    try:
        await store.ping()
    except StorageError as exc:
        return f"The store does not answer ({exc})."
    return None


def open_store(storage: StorageConfig, *, clock: Callable[[], float] = time.time, shared: bool = False,
               lock: bool = True) -> SqliteStore | PostgresStore:
    """The store ``storage.backend`` names, not opened yet (psycopg is imported only for postgresql).
    ``shared``: written by several flushers (the Redis cache); ``lock``: sqlite takes its one-server lock
    (a forking parent holds it for its workers)."""
    if storage.backend == "postgresql":
        from kvtornado.pgstore import PostgresStore

        assert storage.url is not None  # the config refuses postgresql without a url
        return PostgresStore(storage.url, clock=clock, shared=shared)
    return SqliteStore(storage.path, synchronous=storage.synchronous, clock=clock, shared=shared, lock=lock)


class WriteThrough(ABC):
    """The key/value interface the handlers use (``handlers.KeyValue``), over a store's own ``apply``, ``read``,
    ``range`` and ``sweep_expired``: exercise 3, where every write is committed before it returns."""

    clock: Callable[[], float]

    @abstractmethod
    async def read(self, key: str) -> Record | None:
        """The committed record of ``key`` (expired or not), or None."""

    @abstractmethod
    async def range(self, prefix: str, after: str | None, limit: int, now: float, *,
                    serial: bool = False) -> list[Row]:
        """Up to ``limit`` live committed rows under ``prefix`` after ``after``, in key order."""

    @abstractmethod
    async def sweep_expired(self, now: float, limit: int = SWEEP_ROWS) -> int:
        """Delete up to ``limit`` rows expired at ``now``; how many went."""

    @abstractmethod
    async def apply(self, ops: Sequence[Op], *, durable: bool = False, batch: bool = False) -> list[Outcome]:
        """Apply and commit ``ops`` in one transaction (see ``ops.apply_ops``)."""

    async def get_record(self, key: str) -> Record | None:
        """The key's live record, or None when it is absent or expired."""
        record = await self.read(key)
        return record if record is not None and record.live(self.clock()) else None

    async def list_keys(self, prefix: str, after: str | None, limit: int) -> list[Row]:
        return await self.range(prefix, after, limit, self.clock())

    async def get(self, key: str) -> str | None:
        """The key's value as JSON text, or None (a shorthand of ``get_record``)."""
        record = await self.get_record(key)
        return None if record is None else record.value

    async def put(self, key: str, value: str, *, durable: bool = False, ttl: int | None = None,
                  if_version: int | None = None) -> int:
        """Write-through: returns the new version once the row is committed (``durable`` is always true here)."""
        outcomes = await self.apply([Op("save", key, value=value, ttl=ttl, if_version=if_version)])
        return outcomes[0].record.version  # type: ignore[union-attr]  # a save always has its record

    async def delete(self, key: str, *, durable: bool = False, if_version: int | None = None) -> bool:
        """Delete and commit; False when there was no such key."""
        outcomes = await self.apply([Op("delete", key, if_version=if_version)], batch=True)
        return outcomes[0].done

    async def sweep(self, *, rounds: int = SWEEP_ROUNDS) -> int:
        """Reclaim expired rows (the server calls this periodically): short transactions of
        ``SWEEP_ROWS`` rows, at most ``rounds`` of them, the event loop free between them."""
        total = 0
        for _ in range(rounds):
            n = await self.sweep_expired(self.clock(), SWEEP_ROWS)
            total += n
            if n < SWEEP_ROWS:
                break
        return total

    async def flush(self) -> int:
        return 0  # nothing is ever pending in a write-through store

    @abstractmethod
    async def ping(self) -> None:
        """One trivial statement: ``StorageError`` when the store does not answer."""

    async def readiness(self) -> str | None:
        """SPEC §11 ``/readyz``: None when the store answers, else why not (one sentence)."""
        return await unanswered(self)


class SqliteStore(WriteThrough):
    """Write-through key/value store on one sqlite file (WAL, ``synchronous`` from the config)."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "FULL",
        busy_timeout_ms: int = MAX_BUSY_TIMEOUT_MS,
        clock: Callable[[], float] = time.time,
        shared: bool = False,
        lock: bool = True,
    ) -> None:
        self.path = Path(path)
        # shared: several flushers write (SPEC §10): version-ordered writes with tombstones, versions reserved
        # in the file itself. lock: take the one-server lock (a forking parent holds it for its workers).
        self.shared = shared
        self.lock = lock
        self.synchronous = synchronous
        self.busy_timeout_ms = min(busy_timeout_ms, MAX_BUSY_TIMEOUT_MS)
        self.clock = clock
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-sqlite-writer")
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-sqlite-reader")
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._closed = False
        self._lock_fd: int | None = None  # flock on <path>.lock, held for the store's life (one server a file)
        self._hwm = 0  # the version high-water mark: owned by the writer thread once open
        self.reads = 0
        self.row_writes = 0
        self.commits = 0
        self.swept = 0

    @property
    def where(self) -> str:
        return str(self.path)

    # -- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the folder, the file and the schema; open both connections on their threads."""
        await self._run(self._writer, self._open_writer)
        try:
            await self._run(self._reader, self._open_reader)
        except BaseException:
            await self.close()  # the writer's connection and the lock are not left behind
            raise

    def _open_writer(self) -> None:
        try:
            # The folder and the file hold every value: only the server's user may read them (WAL and SHM files
            # take the database file's mode).
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"{self.path.parent}: cannot create the data folder ({exc.strerror})") from None
        if self.lock:
            self._take_lock()
        try:
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
        except OSError as exc:
            self._release_lock()
            raise StorageError(f"{self.path}: cannot create the database file ({exc.strerror})") from None
        conn: sqlite3.Connection | None = None
        try:
            conn = _connect(self.path, self.synchronous, self.busy_timeout_ms)
            version = conn.execute(_USER_VERSION).fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StorageError(
                    f"{self.path}: database schema version {version} is newer than this program's ({SCHEMA_VERSION})"
                )
            if version < SCHEMA_VERSION:
                self._migrate(conn, version)
            conn.execute(_PROBE).fetchone()
            if self.shared:
                conn.execute(_TOMBSTONES)
            self._hwm = int(conn.execute(_HWM).fetchone()[0])
        except BaseException as exc:
            # Whatever failed after the connection was made, it is closed here: never left to the GC.
            if conn is not None:
                conn.close()
            self._release_lock()
            if isinstance(exc, sqlite3.Error):
                raise StorageError(f"{self.path}: cannot open the sqlite database ({exc})") from None
            raise
        self._wconn = conn

    def _migrate(self, conn: sqlite3.Connection, version: int) -> None:
        """Bring an older (or new, empty) database to ``SCHEMA_VERSION`` in one transaction: all or nothing."""
        conn.execute(_BEGIN)
        try:
            if version == 1:
                rows = conn.execute(_PROBE).fetchone()[0]
                for statement in _MIGRATE_V1:
                    conn.execute(statement)
                log.info("%s: migrated %d rows from schema 1 to %d", self.path, rows, SCHEMA_VERSION)
            for statement in _SCHEMA:
                conn.execute(statement)
            if version == 1:  # the migrated rows hold versions 1..n: hand out none of them again
                conn.execute(_SET_HWM, (conn.execute(_HWM).fetchone()[0],))
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute(_COMMIT)
        except BaseException:
            if conn.in_transaction:
                conn.execute(_ROLLBACK)
            raise

    def _take_lock(self) -> None:
        """One server a database (``kvtornado.locks``)."""
        try:
            self._lock_fd = take_lock(self.path)
        except LockHeld:
            raise StorageError(f"{self.path}: another server is using this database (it holds "
                               f"{lock_path(self.path).name}); stop it first") from None
        except OSError as exc:
            raise StorageError(f"{lock_path(self.path)}: cannot open the lock file ({exc.strerror})") from None

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def _open_reader(self) -> None:
        try:
            self._rconn = _connect(self.path, self.synchronous, self.busy_timeout_ms)
        except sqlite3.Error as exc:
            raise StorageError(f"{self.path}: cannot open the sqlite database ({exc})") from None

    async def close(self) -> None:
        """Close both connections (on their own threads) and stop the threads."""

        def close_conn(attr: str) -> None:
            conn = getattr(self, attr)
            if conn is not None:
                conn.close()
                setattr(self, attr, None)

        if self._closed:
            return
        await self._run(self._reader, close_conn, "_rconn")
        await self._run(self._writer, close_conn, "_wconn")
        self._closed = True
        self._reader.shutdown(wait=True)
        self._writer.shutdown(wait=True)
        self._release_lock()  # last: the file is free for another server only once nothing of ours writes it

    async def _run(self, pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:  # the threads are gone; say so in the store's own terms
            raise StorageError("the store is closed")
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    # -- backend operations (what the write-behind cache uses) ---------------------------------

    def _conn(self, conn: sqlite3.Connection | None) -> sqlite3.Connection:
        if conn is None:
            raise StorageError("the store is closed")
        return conn

    def _rollback(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            try:
                conn.execute(_ROLLBACK)
            except sqlite3.Error:
                pass

    @staticmethod
    def _put_rows(conn: sqlite3.Connection, rows: Sequence[Row], now: float) -> None:
        # Upserts and deletes run as two statements: a key must appear once (the callers' rows are unique).
        conn.executemany(_UPSERT, [(k, r.value, r.version, r.expires_at, now) for k, r in rows if r.value is not None])
        conn.executemany(_DELETE, [(k,) for k, r in rows if r.value is None])

    @staticmethod
    def _put_rows_guarded(conn: sqlite3.Connection, rows: Sequence[Row], now: float) -> None:
        """Shared mode: a row only replaces an older version, and a delete leaves a tombstone, so a batch written
        twice or after a newer one (another flusher's) never undoes a newer write."""
        for k, r in rows:
            if r.value is not None:
                conn.execute(_GUARDED_UPSERT, (k, r.value, r.version, r.expires_at, now, k, r.version))
                conn.execute(_DROP_TOMBSTONE, (k, r.version))
            else:
                conn.execute(_GUARDED_DELETE, (k, r.version))
                conn.execute(_PUT_TOMBSTONE, (k, r.version, k, r.version))

    def _write_rows(self, rows: Sequence[Row]) -> int:
        conn = self._conn(self._wconn)
        now = self.clock()
        # The last write of a key in the batch wins; sorted keys turn random B-tree updates into a sequential
        # walk (about 3x faster here).
        ordered = sorted(dict(rows).items(), key=itemgetter(0))
        try:
            conn.execute(_BEGIN)
            (self._put_rows_guarded if self.shared else self._put_rows)(conn, ordered, now)
            conn.execute(_COMMIT)
            return len(ordered)
        except sqlite3.Error as exc:
            self._rollback(conn)
            raise StorageError(f"sqlite write failed: {exc}") from None

    async def ordered_batches(self, rows: Mapping[str, T], batch_rows: int) -> list[list[tuple[str, T]]]:
        """``ordered_batches`` on the writer thread (it runs there before the writes anyway); ``rows``
        must not change until it returns."""
        return await self._run(self._writer, ordered_batches, rows, batch_rows)

    async def write_rows(self, rows: Sequence[Row]) -> None:
        """Commit these row writes in one transaction on the writer thread; ``StorageError`` on failure."""
        if not rows:
            return
        self.row_writes += await self._run(self._writer, self._write_rows, rows)
        self.commits += 1

    def _reserve(self, n: int) -> tuple[int, int]:
        conn = self._conn(self._wconn)
        if self.shared:  # other processes reserve in this file too: the mark is read in the same transaction
            return self._reserve_shared(conn, n)
        first, last = self._hwm + 1, self._hwm + n
        if last > MAX_SAFE:
            raise StorageError("the versions are used up (2^53 - 1)")
        try:
            conn.execute(_SET_HWM, (last,))  # autocommit: committed (and fsynced) before a version is used
        except sqlite3.Error as exc:
            raise StorageError(f"sqlite write failed: {exc}") from None
        self._hwm = last
        return first, last

    def _reserve_shared(self, conn: sqlite3.Connection, n: int) -> tuple[int, int]:
        try:
            conn.execute(_BEGIN)
            hwm = max(self._hwm, int(conn.execute(_READ_HWM).fetchone()[0]))
            if hwm + n > MAX_SAFE:
                raise StorageError("the versions are used up (2^53 - 1)")
            conn.execute(_SET_HWM, (hwm + n,))
            conn.execute(_COMMIT)
        except sqlite3.Error as exc:
            self._rollback(conn)
            raise StorageError(f"sqlite write failed: {exc}") from None
        except StorageError:
            self._rollback(conn)
            raise
        self._hwm = hwm + n
        return hwm + 1, hwm + n

    def _reclaim(self, below: int) -> int:
        conn = self._conn(self._wconn)
        try:
            return int(conn.execute(_RECLAIM, (below,)).rowcount) if self.shared else 0
        except sqlite3.Error as exc:
            raise StorageError(f"sqlite sweep failed: {exc}") from None

    def _ping(self) -> None:
        try:
            self._conn(self._rconn).execute(_PROBE).fetchone()
        except sqlite3.Error as exc:
            raise StorageError(f"sqlite read failed: {exc}") from None

    async def ping(self) -> None:
        await self._run(self._reader, self._ping)

    async def reclaim_tombstones(self, below: int) -> int:
        """Shared mode: forget the deletes older than ``below`` (no pending write of a lower version remains)."""
        return await self._run(self._writer, self._reclaim, below)

    async def reserve_versions(self, n: int) -> tuple[int, int]:
        """Reserve the next ``n`` versions: ``(first, last)``, committed before any of them is handed out, so a
        crash can lose a write but never let its version be handed out again (G10)."""
        reserved = await self._run(self._writer, self._reserve, n)
        self.commits += 1
        return reserved

    def _read(self, key: str) -> Record | None:
        conn = self._conn(self._rconn)
        try:
            row = conn.execute(_SELECT, (key,)).fetchone()
        except sqlite3.Error as exc:
            raise StorageError(f"sqlite read failed: {exc}") from None
        return None if row is None else _record(row)

    async def read(self, key: str) -> Record | None:
        """The committed record of ``key`` (expired or not), or None; runs on the reader thread."""
        record = await self._run(self._reader, self._read, key)
        self.reads += 1
        return record

    def _range(self, conn: sqlite3.Connection | None, prefix: str, after: str | None, limit: int,
               now: float) -> list[Row]:
        conn = self._conn(conn)
        end = prefix_end(prefix)
        low, inclusive = (prefix, True) if after is None or after < prefix else (after, False)
        args: tuple[Any, ...] = (low, end, now, limit) if end is not None else (low, now, limit)
        try:
            rows = conn.execute(_RANGE[inclusive, end is not None], args).fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"sqlite read failed: {exc}") from None
        return [(str(row[0]), _record(row[1:])) for row in rows]

    async def range(self, prefix: str, after: str | None, limit: int, now: float, *,
                    serial: bool = False) -> list[Row]:
        """At most ``limit`` live committed rows whose key starts with ``prefix`` and comes after ``after``
        (from ``prefix`` on when None), in key order. On the reader thread; ``serial`` runs it on the writer
        thread instead, in order with the commits (no commit can land while it reads)."""
        if serial:
            return await self._run(self._writer, self._range, self._wconn, prefix, after, limit, now)
        rows = await self._run(self._reader, self._range, self._rconn, prefix, after, limit, now)
        self.reads += 1
        return rows

    def _sweep(self, now: float, limit: int) -> int:
        conn = self._conn(self._wconn)
        try:
            return int(conn.execute(_SWEEP, (now, limit)).rowcount)  # autocommit: one statement
        except sqlite3.Error as exc:
            raise StorageError(f"sqlite sweep failed: {exc}") from None

    async def sweep_expired(self, now: float, limit: int = SWEEP_ROWS) -> int:
        """Delete at most ``limit`` rows expired at ``now`` (one short transaction); how many were deleted."""
        n = await self._run(self._writer, self._sweep, now, limit)
        self.swept += n
        return n

    # -- the key/value interface the handlers use (exercise 3: write-through) ------------------

    def _draw(self) -> int:
        if self._hwm >= MAX_SAFE:
            raise StorageError("the versions are used up (2^53 - 1)")
        self._hwm += 1
        return self._hwm

    def _apply(self, ops: Sequence[Op], batch: bool) -> tuple[list[Outcome], int]:
        conn = self._conn(self._wconn)
        now = self.clock()

        lookup = self._lookup(conn)
        try:
            # One transaction: the conditions are checked against what it reads, and nothing else writes
            # between the check and the write (the writer thread is the only writer).
            conn.execute(_BEGIN)
            outcomes, writes = apply_ops(ops, lookup, now, self._draw, batch=batch)
            rows = sorted(writes.items(), key=itemgetter(0))
            self._put_rows(conn, rows, now)
            if rows:
                conn.execute(_SET_HWM, (self._hwm,))
            conn.execute(_COMMIT)
            return outcomes, len(rows)
        except KVError:
            self._rollback(conn)  # a refused op: nothing of it is written (its versions stay unused)
            raise
        except sqlite3.Error as exc:
            self._rollback(conn)
            raise StorageError(f"sqlite write failed: {exc}") from None

    def _apply_reads(self, ops: Sequence[Op]) -> list[Outcome]:
        conn = self._conn(self._rconn)
        now = self.clock()
        try:
            conn.execute(_BEGIN_READ)  # one snapshot for every get of the batch
            try:
                lookup = self._lookup(conn)
                outcomes, _ = apply_ops(ops, lookup, now, self._no_version, batch=True)
            finally:
                conn.execute(_COMMIT)
        except sqlite3.Error as exc:
            self._rollback(conn)
            raise StorageError(f"sqlite read failed: {exc}") from None
        return outcomes

    @staticmethod
    def _lookup(conn: sqlite3.Connection) -> Callable[[str], Record | None]:
        def lookup(key: str) -> Record | None:
            row = conn.execute(_SELECT, (key,)).fetchone()
            return None if row is None else _record(row)
        return lookup

    @staticmethod
    def _no_version() -> int:
        raise AssertionError("a batch of gets writes nothing")

    async def apply(self, ops: Sequence[Op], *, durable: bool = False, batch: bool = False) -> list[Outcome]:
        """Apply and commit ``ops`` in one transaction (write-through: always durable); see ``apply_ops``."""
        if all(op.kind == GET for op in ops):
            outcomes = await self._run(self._reader, self._apply_reads, ops)
            self.reads += 1
            return outcomes
        outcomes, written = await self._run(self._writer, self._apply, ops, batch)
        self.commits += 1
        self.row_writes += written
        return outcomes

    def stats(self) -> dict[str, Any]:
        return {"storage": {"reads": self.reads, "row_writes": self.row_writes, "commits": self.commits,
                            "expired_rows_swept": self.swept}}
