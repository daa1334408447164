"""PostgreSQL as the store of record (SPEC §10): ``PostgresStore``, the ``store.Store`` the write-behind cache
flushes into and exercise 3 writes through, on psycopg 3's asyncio API with a ``psycopg_pool`` pool.

Table ``kv`` has §6's columns (``key text COLLATE "C"``: byte order, which for UTF-8 is code-point order, so
``/keys`` pages exactly as on sqlite); ``kv_meta`` holds the schema version and the version high-water mark.

- **Row writes** (``write_rows``, the cache's flush) are idempotent and in version order: an upsert only
  replaces an older version (``ON CONFLICT ... WHERE kv.version < excluded.version``), and a delete only
  removes a row older than itself. With the in-process cache one flusher writes the newest record of each key,
  so no older write of a key can ever arrive after its delete: the delete removes the row in the same
  transaction, and no tombstone row is left (a ``value`` of NULL is read as a tombstone all the same, for
  the Redis flushers to come, which need them).
- **Write-through** (``apply``, exercise 3): one transaction that first takes its versions from ``kv_meta``
  (``UPDATE ... RETURNING``), which row-locks the high-water mark until the commit, then reads its keys and
  writes. So write transactions run one at a time, as on sqlite's single writer thread, and a condition cannot
  race a concurrent write: ``SELECT ... FOR UPDATE`` alone cannot lock a key that does not exist yet (two
  ``if_version=0`` creates would both pass), and serializable isolation would need a retry loop for the same
  effect.
- **Versions** are reserved in blocks committed before use (``reserve_versions``), as on sqlite.
- **One server a database**: ``pg_try_advisory_lock`` on a connection of its own, held for the store's life
  (the server dies, its session ends, the lock is free: never stale). It is checked again at most every
  ``LOCK_CHECK_S`` (by a watcher task, and before a write) and taken again after an outage. A session can end
  under a running server, and another server may take the lock in that window: each server writes its own
  fencing token (``owner`` in ``kv_meta``) at start-up, and every write transaction checks it under a share
  lock, so the first one finds itself replaced, refuses everything from then on and stops (``on_fenced``).
- **Bounded waits**: libpq's ``connect_timeout`` (the URL's, else ``CONNECT_TIMEOUT_S``) bounds a connection
  attempt and the wait for a pooled connection, ``statement_timeout`` a statement, and a deadline of both
  every operation on the client side. PostgreSQL down is a ``StorageError`` (503) within them; the pool
  reconnects by itself.
- Keys may hold U+0000, which a PostgreSQL ``text`` cannot: ``_encode`` escapes it, order-preserving.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from operator import itemgetter
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from kvtornado.config import redact_url
from kvtornado.errors import KVError, StorageError
from kvtornado.ops import GET, MAX_SAFE, Op, Outcome, Record, apply_ops, writes_in
from kvtornado.store import SWEEP_ROWS, Row, WriteThrough, ordered_batches, prefix_end

log = logging.getLogger("kvtornado.pgstore")
T = TypeVar("T")

SCHEMA_VERSION = 2
CONNECT_TIMEOUT_S = 5
STATEMENT_TIMEOUT_MS = 5000  # like sqlite's busy_timeout: a flush that cannot write by then has failed
POOL_MAX = 4  # the cache needs a flush, a reservation and a few miss reads at once
LOCK_CHECK_S = 1.0
# pg_try_advisory_lock's key: "kvtornad" as a bigint. Advisory locks are per database.
LOCK_KEY = int.from_bytes(b"kvtornad", "big")

# Schema steps: _MIGRATIONS[v] brings schema v to v + 1, in the transaction that also records the new version.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    0: (
        'CREATE TABLE IF NOT EXISTS kv(key text COLLATE "C" PRIMARY KEY, value text, version bigint NOT NULL, '
        "expires_at double precision, updated_at double precision NOT NULL)",
        "CREATE INDEX IF NOT EXISTS kv_expires_at ON kv(expires_at) WHERE expires_at IS NOT NULL",
        "INSERT INTO kv_meta(name, value) VALUES ('version_hwm', 0) ON CONFLICT (name) DO NOTHING",
    ),
    # Tombstones (value NULL, left by the Redis flushers' deletes) are reclaimed by version.
    1: ("CREATE INDEX IF NOT EXISTS kv_tombstones ON kv(version) WHERE value IS NULL",),
}
_META = ("CREATE TABLE IF NOT EXISTS kv_meta(name text PRIMARY KEY, value bigint NOT NULL);"
         "INSERT INTO kv_meta(name, value) VALUES ('schema_version', 0) ON CONFLICT (name) DO NOTHING")
_SCHEMA_OF = "SELECT value FROM kv_meta WHERE name = 'schema_version' FOR UPDATE"
_SET_SCHEMA = "UPDATE kv_meta SET value = %s WHERE name = 'schema_version'"
# Versions in rows (a restore, another tool) are never handed out again either.
_RAISE_HWM = ("UPDATE kv_meta SET value = greatest(value, (SELECT coalesce(max(version), 0) FROM kv)) "
              "WHERE name = 'version_hwm'")
_TAKE = ("UPDATE kv_meta SET value = value + %(n)s WHERE name = 'version_hwm' AND value + %(n)s <= %(max)s "
         "RETURNING value")
_UPSERT = (
    "INSERT INTO kv(key, value, version, expires_at, updated_at) "
    "SELECT r.key, r.value, r.version, r.expires_at, %s "
    "FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::float8[]) AS r(key, value, version, expires_at) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value, version = excluded.version, "
    "expires_at = excluded.expires_at, updated_at = excluded.updated_at WHERE kv.version < excluded.version"
)
_DELETE = ("DELETE FROM kv USING unnest(%s::text[], %s::bigint[]) AS d(key, version) "
           "WHERE kv.key = d.key AND kv.version < d.version")
_RECLAIM = "DELETE FROM kv WHERE value IS NULL AND version < %s"
_SELECT = "SELECT value, version, expires_at FROM kv WHERE key = %s"
_SELECT_MANY = "SELECT key, value, version, expires_at FROM kv WHERE key = ANY(%s)"
_LOCK_MANY = _SELECT_MANY + " ORDER BY key FOR UPDATE"
_SWEEP = ("DELETE FROM kv WHERE key IN "
          "(SELECT key FROM kv WHERE expires_at <= %s ORDER BY expires_at LIMIT %s)")
_LIVE = "value IS NOT NULL AND (expires_at IS NULL OR expires_at > %s)"
_TRY_LOCK = "SELECT pg_try_advisory_lock(%s)"
_UNLOCK = "SELECT pg_advisory_unlock(%s)"
# The fencing token: each server writes its own at start-up, and every write transaction checks it. A server
# whose lock was lost (its session died) while another started cannot write again, even once it has the lock.
_CLAIM = ("INSERT INTO kv_meta(name, value) VALUES ('owner', %s) "
          "ON CONFLICT (name) DO UPDATE SET value = excluded.value")
_FENCE = "SELECT 1 FROM kv_meta WHERE name = 'owner' AND value = %s FOR SHARE"
_PING = "SELECT 1"


def _range_sql(inclusive: bool, bounded: bool) -> str:
    low = "key >= %s" if inclusive else "key > %s"
    high = " AND key < %s" if bounded else ""
    return f"SELECT key, value, version, expires_at FROM kv WHERE {low}{high} AND {_LIVE} ORDER BY key LIMIT %s"


_RANGE = {(inclusive, bounded): _range_sql(inclusive, bounded)
          for inclusive in (False, True) for bounded in (False, True)}


def _encode(key: str) -> str:
    """A key as stored: U+0000 (which ``text`` cannot hold) becomes U+0001 U+0001 and U+0001 becomes
    U+0001 U+0002. A prefix code whose words keep the characters' order, so order, prefixes and ranges
    hold on the stored text as on the keys."""
    if "\x00" in key or "\x01" in key:
        return key.replace("\x01", "\x01\x02").replace("\x00", "\x01\x01")
    return key


def _decode(stored: str) -> str:
    if "\x01" in stored:
        return stored.replace("\x01\x01", "\x00").replace("\x01\x02", "\x01")
    return stored


def _record(value: Any, version: Any, expires_at: Any) -> Record:
    return Record(None if value is None else str(value), int(version),
                  None if expires_at is None else float(expires_at))


def _one_line(exc: BaseException) -> str:
    """libpq's messages span lines (``connection to server ... failed: ...\\n\\tIs the server running...``)."""
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return text or type(exc).__name__


class Taken(StorageError):
    """Another server holds the database's advisory lock."""


class PostgresStore(WriteThrough):
    """The store of record on PostgreSQL: a pool of autocommit connections and one connection holding the lock."""

    def __init__(self, url: str, *, clock: Callable[[], float] = time.time, pool_max: int = POOL_MAX,
                 shared: bool = False) -> None:
        self.clock = clock
        # shared (SPEC §10, cache.backend: redis): every server writes, so no lock and no fencing token; a
        # delete leaves a tombstone row, so an older write of the key arriving later is refused.
        self.shared = shared
        try:
            params = conninfo_to_dict(url)
        except psycopg.Error as exc:
            # libpq's message quotes the whole string, password and all
            detail = _one_line(exc).replace(url, redact_url(url))
            raise StorageError(f"storage.url is not a valid libpq URL ({redact_url(detail)})") from None
        params.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
        options = str(params.get("options") or "")
        if "statement_timeout" not in options:
            options = f"{options} -c statement_timeout={STATEMENT_TIMEOUT_MS}".strip()
        params["options"] = options
        params.setdefault("application_name", "kvtornado")
        params["client_encoding"] = "UTF8"
        try:
            self.timeout_s = max(1.0, float(str(params["connect_timeout"])))
        except ValueError:
            raise StorageError("storage.url: connect_timeout must be a number of seconds") from None
        self._conninfo = make_conninfo("", **params)
        self._where = "postgresql://{}@{}:{}/{}".format(
            params.get("user", ""), params.get("host", "localhost"), params.get("port", 5432),
            params.get("dbname", ""))
        # Every operation ends within a connection wait, a statement and a margin, whatever the network does.
        self.deadline_s = self.timeout_s + STATEMENT_TIMEOUT_MS / 1000 + 1.0
        self.pool_max = pool_max
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None
        self._lock_conn: psycopg.AsyncConnection[Any] | None = None
        self._lock_checked = 0.0  # time.monotonic() of the last proof that the lock is still held
        self._lock_guard = asyncio.Lock()
        self._owner = secrets.randbits(62)  # this server's fencing token (see _CLAIM)
        self.fenced = False
        # Called once when another server has taken the database over: the server stops (it must not serve
        # what may now be stale, nor write over the other's rows).
        self.on_fenced: Callable[[], None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._serial = asyncio.Lock()  # held through each commit of write_rows and each serial range
        self._closed = False
        self.reads = 0
        self.row_writes = 0
        self.commits = 0
        self.swept = 0

    @property
    def where(self) -> str:
        return self._where

    # -- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        """Take the lock (one server a database), create or migrate the schema, open the pool."""
        self._lock_conn = await (self._connect() if self.shared else self._take_lock())
        try:
            await self._migrate(self._lock_conn)
            if self.shared:  # the connection only served the migration
                await self._lock_conn.close()
                self._lock_conn = None
            else:
                await self._lock_conn.execute(_CLAIM, (self._owner,))
            pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
                self._conninfo, min_size=1, max_size=self.pool_max, kwargs={"autocommit": True},
                timeout=self.timeout_s, open=False, name="kvtornado",
                # A connection PostgreSQL closed (a restart) is replaced before use, not failed on.
                check=AsyncConnectionPool.check_connection,
            )
            try:
                await pool.open(wait=True, timeout=self.timeout_s)
            except (PoolTimeout, psycopg.Error) as exc:
                await pool.close()
                raise StorageError(f"{self._where}: cannot open the connection pool ({_one_line(exc)})") from None
            self._pool = pool
            if not self.shared:
                self._watch = asyncio.ensure_future(self._watch_lock())
        except BaseException:
            if self._lock_conn is not None:
                await self._lock_conn.close()
                self._lock_conn = None
            raise

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        try:
            return await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
        except psycopg.Error as exc:
            raise StorageError(f"{self._where}: cannot connect to PostgreSQL ({_one_line(exc)})") from None

    async def _take_lock(self) -> psycopg.AsyncConnection[Any]:
        conn = await self._connect()
        try:
            async with asyncio.timeout(self.deadline_s):
                row = await (await conn.execute(_TRY_LOCK, (LOCK_KEY,))).fetchone()
        except (psycopg.Error, TimeoutError) as exc:
            await conn.close()
            raise StorageError(f"{self._where}: cannot take the server lock ({_one_line(exc)})") from None
        if row is None or not row[0]:
            await conn.close()
            raise Taken(f"{self._where}: another server is using this database (it holds the advisory "
                               f"lock {LOCK_KEY}); stop it first")
        self._lock_checked = time.monotonic()
        return conn

    async def _migrate(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Bring the schema to ``SCHEMA_VERSION`` in one transaction (all or nothing); a newer one is refused."""
        try:
            async with asyncio.timeout(self.deadline_s), conn.transaction():
                await conn.execute(_META)
                row = await (await conn.execute(_SCHEMA_OF)).fetchone()
                version = int(row[0]) if row is not None else 0
                if version > SCHEMA_VERSION:
                    raise StorageError(f"{self._where}: database schema version {version} is newer than this "
                                       f"program's ({SCHEMA_VERSION})")
                for step in range(version, SCHEMA_VERSION):
                    for statement in _MIGRATIONS[step]:
                        await conn.execute(statement)
                if version < SCHEMA_VERSION:
                    await conn.execute(_SET_SCHEMA, (SCHEMA_VERSION,))
                    log.info("%s: schema %d created/migrated to %d", self._where, version, SCHEMA_VERSION)
                await conn.execute(_RAISE_HWM)
        except (psycopg.Error, TimeoutError) as exc:
            raise StorageError(f"{self._where}: cannot create the schema ({_one_line(exc)})") from None

    async def close(self) -> None:
        """Close the pool, then the lock's connection (which frees the database for another server)."""
        if self._closed:
            return
        self._closed = True
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        if self._lock_conn is not None:
            # Unlocked before the close: a closed session's backend ends a moment later, and until then its lock
            # would refuse a server started right after this one stopped (a restart).
            try:
                async with asyncio.timeout(self.timeout_s):
                    await self._lock_conn.execute(_UNLOCK, (LOCK_KEY,))
            except (psycopg.Error, TimeoutError):
                pass  # the session is gone already, and its lock with it
            await self._lock_conn.close()
            self._lock_conn = None

    async def _check_lock(self) -> None:
        """Before a write: the lock is still ours (proved at most ``LOCK_CHECK_S`` ago), or taken again."""
        if self.shared or time.monotonic() - self._lock_checked < LOCK_CHECK_S:
            return
        async with self._lock_guard:
            if time.monotonic() - self._lock_checked < LOCK_CHECK_S:
                return
            conn = self._lock_conn
            if conn is not None and not conn.closed:
                try:
                    async with asyncio.timeout(self.timeout_s):
                        await conn.execute(_PING)
                    self._lock_checked = time.monotonic()
                    return
                except (psycopg.Error, TimeoutError):
                    await conn.close()
            self._lock_conn = None
            if self._closed:
                raise StorageError("the store is closed")
            try:
                self._lock_conn = await self._take_lock()
            except Taken:
                self._fence("another server took the lock while this one's connection to PostgreSQL was lost")
            log.warning("%s: the connection holding the server lock was lost; the lock is held again", self._where)

    async def _watch_lock(self) -> None:
        """Prove the lock every ``LOCK_CHECK_S``, writes or not, so a lost one is taken again (or found taken by
        another server) within about a second of PostgreSQL answering again."""
        while not self._closed and not self.fenced:
            await asyncio.sleep(LOCK_CHECK_S)
            try:
                await self._check_lock()
            except StorageError:
                pass  # PostgreSQL down: the next round tries again; a takeover has fenced the store

    def _fence(self, why: str) -> None:
        """Another server owns the database now: refuse every operation from here on, and stop the server."""
        if not self.fenced:
            self.fenced = True
            log.error("%s: %s; this server stops and writes nothing more", self._where, why)
            if self.on_fenced is not None:
                self.on_fenced()
        raise StorageError(f"{self._where}: another server took over this database")

    async def _check_owner(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Inside a write transaction: this server's token is still the database's (held until the commit)."""
        if self.shared:
            return
        row = await (await conn.execute(_FENCE, (self._owner,))).fetchone()
        if row is None:
            self._fence("another server started on this database and replaced this one's fencing token")

    @asynccontextmanager
    async def _conn(self, what: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection for one operation, every failure of it a one-line ``StorageError``."""
        pool = self._pool
        if pool is None:
            raise StorageError("the store is closed")
        if self.fenced:
            raise StorageError(f"{self._where}: another server took over this database")
        try:
            async with asyncio.timeout(self.deadline_s), pool.connection(timeout=self.timeout_s) as conn:
                yield conn
        except KVError:
            raise
        except PoolTimeout:
            raise StorageError(f"PostgreSQL {what} failed: no connection to {self._where} within "
                               f"{self.timeout_s:g} s") from None
        except TimeoutError:
            raise StorageError(f"PostgreSQL {what} failed: no answer within {self.deadline_s:g} s") from None
        except psycopg.Error as exc:
            raise StorageError(f"PostgreSQL {what} failed: {_one_line(exc)}") from None

    # -- backend operations (what the write-behind cache uses) ---------------------------------

    async def _put_rows(self, conn: psycopg.AsyncConnection[Any], rows: Sequence[Row], now: float) -> None:
        # Shared: a delete is an upsert of a tombstone (value NULL), version-ordered like a save.
        saves = [(_encode(k), r) for k, r in rows if r.value is not None or self.shared]
        deletes = [] if self.shared else [(_encode(k), r.version) for k, r in rows if r.value is None]
        if saves:
            await conn.execute(_UPSERT, (now, [k for k, _ in saves], [r.value for _, r in saves],
                                         [r.version for _, r in saves], [r.expires_at for _, r in saves]))
        if deletes:
            await conn.execute(_DELETE, ([k for k, _ in deletes], [v for _, v in deletes]))

    async def ordered_batches(self, rows: Mapping[str, T], batch_rows: int) -> list[list[tuple[str, T]]]:
        """``store.ordered_batches`` off the event loop; ``rows`` must not change until it returns."""
        return await asyncio.to_thread(ordered_batches, rows, batch_rows)

    async def write_rows(self, rows: Sequence[Row]) -> None:
        """Commit these row writes in one transaction; ``StorageError`` on failure."""
        if not rows:
            return
        await self._check_lock()
        ordered = sorted(dict(rows).items(), key=itemgetter(0))  # the last write of a key wins; key order
        async with self._serial, self._conn("write") as conn, conn.transaction():
            await self._check_owner(conn)
            await self._put_rows(conn, ordered, self.clock())
        self.row_writes += len(ordered)
        self.commits += 1

    async def reserve_versions(self, n: int) -> tuple[int, int]:
        """Reserve the next ``n`` versions: ``(first, last)``, committed before any of them is handed out (G10)."""
        await self._check_lock()
        async with self._conn("write") as conn, conn.transaction():
            await self._check_owner(conn)
            row = await (await conn.execute(_TAKE, {"n": n, "max": MAX_SAFE})).fetchone()
        if row is None:
            raise StorageError("the versions are used up (2^53 - 1)")
        self.commits += 1
        last = int(row[0])
        return last - n + 1, last

    async def read(self, key: str) -> Record | None:
        """The committed record of ``key`` (expired or not; a tombstone row has value None), or None."""
        async with self._conn("read") as conn:
            row = await (await conn.execute(_SELECT, (_encode(key),))).fetchone()
        self.reads += 1
        return None if row is None else _record(*row)

    async def range(self, prefix: str, after: str | None, limit: int, now: float, *,
                    serial: bool = False) -> list[Row]:
        """At most ``limit`` live committed rows whose key starts with ``prefix`` and comes after ``after``
        (from ``prefix`` on when None), in key order. ``serial``: no commit of ``write_rows`` runs meanwhile."""
        low_key, inclusive = (prefix, True) if after is None or after < prefix else (after, False)
        end = prefix_end(_encode(prefix))
        low = _encode(low_key)
        args: tuple[Any, ...] = (low, end, now, limit) if end is not None else (low, now, limit)
        sql = _RANGE[inclusive, end is not None]
        if serial:
            async with self._serial, self._conn("read") as conn:
                rows = await (await conn.execute(sql, args)).fetchall()
        else:
            async with self._conn("read") as conn:
                rows = await (await conn.execute(sql, args)).fetchall()
            self.reads += 1
        return [(_decode(row[0]), _record(*row[1:])) for row in rows]

    async def ping(self) -> None:
        async with self._conn("ping") as conn:
            await conn.execute(_PING)

    async def reclaim_tombstones(self, below: int) -> int:
        """Delete the tombstone rows older than ``below`` (no pending write of a lower version remains)."""
        async with self._conn("sweep") as conn:
            return int((await conn.execute(_RECLAIM, (below,))).rowcount)

    async def sweep_expired(self, now: float, limit: int = SWEEP_ROWS) -> int:
        """Delete at most ``limit`` rows expired at ``now`` (one statement); how many were deleted."""
        async with self._conn("sweep") as conn:
            n = (await conn.execute(_SWEEP, (now, limit))).rowcount
        self.swept += n
        return n

    # -- exercise 3: write-through -----------------------------------------------------------------

    async def apply(self, ops: Sequence[Op], *, durable: bool = False, batch: bool = False) -> list[Outcome]:
        """Apply and commit ``ops`` in one transaction (write-through: always durable); see ``apply_ops``."""
        keys = sorted({_encode(op.key) for op in ops})
        now = self.clock()
        if all(op.kind == GET for op in ops):
            async with self._conn("read") as conn:  # one statement: one snapshot for every get of the batch
                found = await (await conn.execute(_SELECT_MANY, (keys,))).fetchall()
            self.reads += 1
            current = {_decode(k): _record(v, ver, exp) for k, v, ver, exp in found}
            outcomes, _ = apply_ops(ops, current.get, now, self._no_version, batch=True)
            return outcomes
        await self._check_lock()
        n = writes_in(ops)
        async with self._conn("write") as conn, conn.transaction():
            await self._check_owner(conn)
            # First the versions: the row lock on the high-water mark makes write transactions one at a time.
            taken = await (await conn.execute(_TAKE, {"n": n, "max": MAX_SAFE})).fetchone()
            if taken is None:
                raise StorageError("the versions are used up (2^53 - 1)")
            next_version = int(taken[0]) - n + 1

            def draw() -> int:
                nonlocal next_version
                next_version += 1
                return next_version - 1

            found = await (await conn.execute(_LOCK_MANY, (keys,))).fetchall()
            current = {_decode(k): _record(v, ver, exp) for k, v, ver, exp in found}
            # A refused op raises here: the transaction rolls back, its versions with it.
            outcomes, writes = apply_ops(ops, current.get, now, draw, batch=batch)
            rows = sorted(writes.items(), key=itemgetter(0))
            await self._put_rows(conn, rows, now)
        self.commits += 1
        self.row_writes += len(rows)
        return outcomes

    @staticmethod
    def _no_version() -> int:
        raise AssertionError("a batch of gets writes nothing")

    def stats(self) -> dict[str, Any]:
        return {"storage": {"reads": self.reads, "row_writes": self.row_writes, "commits": self.commits,
                            "expired_rows_swept": self.swept}}
