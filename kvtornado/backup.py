"""``kvtornado backup`` and ``kvtornado restore`` (SPEC §11): sqlite's online backup API, both ways.

- **Backup** opens the database read-only and copies it in one step of ``sqlite3.Connection.backup``: one read
  transaction, so the copy is one consistent state of the file even while a server writes it (WAL: the reader
  never blocks the writer, nor the writer the reader). It never takes the server's lock (SPEC §6: tools may
  read the file). The copy is written beside ``OUT`` under a temporary name, checked and then renamed, so
  ``OUT`` is always either the previous backup or a whole new one, and is a single file (rollback journal,
  no ``-wal``) of mode 0600: it holds every value.
- **Restore** takes the one-server lock (``kvtornado.locks``) for its whole run, so no server can start on
  the database meanwhile and none may be running; checks that the input is a sound kvtornado database; copies
  it over the database with the same API; and keeps SPEC §5's version rule — a version names one value for
  good — by raising the restored file's version high-water mark to at least the old file's, so no version
  the old database handed out is handed out again for another value.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvtornado.codec import parse_json
from kvtornado.errors import ConfigError, KVError, StorageError
from kvtornado.locks import LockHeld, lock_path, take_lock
from kvtornado.ops import MAX_SAFE
from kvtornado.store import MAX_BUSY_TIMEOUT_MS, SCHEMA_VERSION, SqliteStore

# What sqlite and the store keep beside the database (``<database><end>``): the journals and the one-server lock.
# A backup never replaces one of them (the caller names the server's other files: ``protect``).
SERVER_FILES = ("-wal", "-shm", "-journal", ".lock")

# store.py's meta table holds the mark; raised here, never lowered.
_RAISE_HWM = "UPDATE meta SET value = max(value, ?) WHERE name = 'version_hwm'"
_READ_HWM = "SELECT value FROM meta WHERE name = 'version_hwm'"


class Refused(ConfigError):
    """The command will not run as asked (one line; exit status 2)."""


@dataclass(frozen=True)
class Copied:
    """What a backup or a restore copied: the rows of ``kv`` and, for a restore, the new version mark."""

    rows: int
    version_hwm: int = 0


def _read_only(path: Path) -> sqlite3.Connection:
    # mode=ro: this connection can never write the file, whatever it is.
    conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {MAX_BUSY_TIMEOUT_MS}")
    return conn


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {str(row[0]) for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {str(row[1]) for row in conn.execute(f"PRAGMA table_info({table})")}


def _check_kvtornado(conn: sqlite3.Connection, path: Path) -> int:
    """Refuse unless ``path`` is a sound kvtornado database this program can open; returns its rows."""
    try:
        verdict = [str(row[0]) for row in conn.execute("PRAGMA integrity_check")]
        if verdict != ["ok"]:
            raise Refused(f"{path}: the database is damaged (integrity_check: {verdict[0]})")
        if "kv" not in _tables(conn) or not {"key", "value"} <= _columns(conn, "kv"):
            raise Refused(f"{path}: not a kvtornado database (it has no kv table)")
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise Refused(f"{path}: database schema version {version} is newer than this program's "
                          f"({SCHEMA_VERSION})")
        return _check_rows(conn, path)
    except sqlite3.DatabaseError as exc:  # e.g. "file is not a database"
        raise Refused(f"{path}: not a readable sqlite database ({exc})") from None


def _check_rows(conn: sqlite3.Connection, path: Path) -> int:
    """Refuse a row the server could not serve as it is: a key that is not text, a value that is not one
    JSON text as the server accepts it (SPEC §5), a version outside 1..2^53-1 or an expiry that is not a
    number. Returns the rows (every value is parsed, as the server parses a request: about 8 s a million
    100-byte rows here)."""
    has_versions = "version" in _columns(conn, "kv")
    extra = ", version, expires_at" if has_versions else ""
    rows = 0
    for key, value, *rest in conn.execute(f"SELECT key, value{extra} FROM kv"):
        rows += 1
        where = f"{path}: the row of key {str(key)[:60]!r}"
        if not isinstance(key, str) or not key:
            raise Refused(f"{path}: a row whose key is not text ({str(key)[:60]!r})")
        if not isinstance(value, str):
            raise Refused(f"{where}: its value is not text")
        try:
            parse_json(value.encode("utf-8", "surrogatepass"))
        except KVError:
            raise Refused(f"{where}: its value is not a JSON text") from None
        if has_versions:
            version, expires_at = rest
            if not isinstance(version, int) or not 1 <= version <= MAX_SAFE:
                raise Refused(f"{where}: its version {version!r} is not in 1..{MAX_SAFE}")
            if expires_at is not None and not isinstance(expires_at, int | float):
                raise Refused(f"{where}: its expiry {expires_at!r} is not a number")
    return rows


def _version_mark(conn: sqlite3.Connection) -> int:
    """The highest version a database may have handed out: its mark, or its highest row (schema 1: none)."""
    tables = _tables(conn)
    mark = 0
    if "meta" in tables:
        row = conn.execute(_READ_HWM).fetchone()
        mark = int(row[0]) if row is not None else 0
    if "kv" in tables and "version" in _columns(conn, "kv"):
        mark = max(mark, int(conn.execute("SELECT coalesce(max(version), 0) FROM kv").fetchone()[0]))
    return mark


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def check_target(database: Path, out: Path, *, protect: Sequence[Path] = ()) -> None:
    """Refuse an ``out`` that is no file name, whose folder is missing, or that is the database or a file a
    server keeps beside it (replacing its ``-wal`` would lose every row a crash left there) or in ``protect``."""
    if not out.name or out.is_dir():
        raise Refused(f"{out}: that is a folder; name the backup file")
    if _same_file(database, out):
        raise Refused(f"{out}: that is the database itself; name another file")
    for own in (*(database.with_name(database.name + end) for end in SERVER_FILES), *protect):
        if _same_file(own, out):
            raise Refused(f"{out}: that is one of the server's own files ({own.name}); name another file")
    if not out.parent.is_dir():
        raise Refused(f"{out.parent}: no such folder")


def backup(database: Path, out: Path, *, protect: Sequence[Path] = ()) -> Copied:
    """Copy the sqlite ``database`` to ``out`` (replaced whole if it exists) while a server may be using it;
    ``check_target``'s refusals first."""
    check_target(database, out, protect=protect)
    if not database.is_file():
        raise Refused(f"{database}: no database there (storage.path of the config)")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        src = _read_only(database)
    except sqlite3.Error as exc:
        raise StorageError(f"{database}: cannot open the database ({exc})") from None
    try:
        with contextlib.closing(src):
            _check_source(src, database)
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # every value is in it
            dst = sqlite3.connect(tmp, isolation_level=None)
            with contextlib.closing(dst):
                src.backup(dst)  # pages=-1: the whole file in one step, one read transaction: one state
                # The copy takes the source's WAL flag; a backup is one self-contained file instead.
                dst.execute("PRAGMA journal_mode = DELETE")
                verdict = str(dst.execute("PRAGMA integrity_check").fetchone()[0])
                if verdict != "ok":
                    raise StorageError(f"{out}: the copy fails its integrity check ({verdict})")
                rows = int(dst.execute("SELECT count(*) FROM kv").fetchone()[0])
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    except sqlite3.Error as exc:
        raise StorageError(f"backup of {database} to {out} failed ({exc})") from None
    except OSError as exc:
        raise StorageError(f"backup of {database} to {out} failed ({exc.strerror or exc})") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return Copied(rows)


def _check_source(conn: sqlite3.Connection, path: Path) -> None:
    """A backup's source: a kvtornado database (the integrity check is done on the copy, which is smaller
    work for the server's file than a second full read of it)."""
    try:
        if "kv" not in _tables(conn):
            raise Refused(f"{path}: not a kvtornado database (it has no kv table)")
    except sqlite3.DatabaseError as exc:
        raise Refused(f"{path}: not a readable sqlite database ({exc})") from None


@contextlib.contextmanager
def _server_lock(database: Path) -> Iterator[None]:
    """The one-server lock on ``database`` for the ``with`` block: refused while a server holds it."""
    try:
        database.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = take_lock(database)
    except LockHeld:
        raise Refused(f"{database}: a server is using this database (it holds {lock_path(database).name}); "
                      "stop it first") from None
    except OSError as exc:
        raise StorageError(f"{lock_path(database)}: cannot take the lock ({exc.strerror or exc})") from None
    try:
        yield
    finally:
        os.close(fd)  # releases the flock


def restore(source: Path, database: Path, *, synchronous: str = "FULL") -> Copied:
    """Copy the backup ``source`` over ``database`` while no server uses it; versions never go back."""
    if _same_file(source, database):
        raise Refused(f"{source}: that is the database itself; name a backup")
    if not source.is_file():
        raise Refused(f"{source}: no such file")
    with _server_lock(database):
        try:
            src = _read_only(source)
        except sqlite3.Error as exc:
            raise Refused(f"{source}: cannot open it as a sqlite database ({exc})") from None
        with contextlib.closing(src):
            rows = _check_kvtornado(src, source)
            old_mark = _copy_over(src, database)
        hwm = asyncio.run(_settle(database, synchronous, old_mark))
    return Copied(rows, hwm)


def _copy_over(src: sqlite3.Connection, database: Path) -> int:
    """Back ``src`` up into ``database`` (created 0600 when missing); returns the old file's version mark."""
    try:
        os.close(os.open(database, os.O_WRONLY | os.O_CREAT, 0o600))
        dst = sqlite3.connect(database, isolation_level=None)
    except (OSError, sqlite3.Error) as exc:
        raise StorageError(f"{database}: cannot open the database ({exc})") from None
    with contextlib.closing(dst):
        try:
            dst.execute(f"PRAGMA busy_timeout = {MAX_BUSY_TIMEOUT_MS}")
            # Read before anything is overwritten; opening it also replays what a killed server left in -wal.
            old_mark = _version_mark(dst)
        except sqlite3.DatabaseError as exc:
            raise Refused(f"{database}: the database there cannot be read ({exc}), so its versions cannot be "
                          "kept; move it aside first") from None
        try:
            # Out of WAL first: a WAL destination must already have the source's page size; a rollback one
            # takes it. (The store turns WAL on again when it opens the file.)
            dst.execute("PRAGMA journal_mode = DELETE")
            src.backup(dst)
        except sqlite3.Error as exc:
            raise StorageError(f"restore into {database} failed ({exc})") from None
    return old_mark


async def _settle(database: Path, synchronous: str, old_mark: int) -> int:
    """Open the restored file as a server would (WAL, an older schema migrated), then raise its mark."""
    store = SqliteStore(database, synchronous=synchronous, lock=False)  # restore() holds the lock
    await store.open()
    await store.close()
    conn = sqlite3.connect(database, isolation_level=None)
    with contextlib.closing(conn):
        try:
            conn.execute(f"PRAGMA busy_timeout = {MAX_BUSY_TIMEOUT_MS}")
            conn.execute(_RAISE_HWM, (old_mark,))
            return _version_mark(conn)
        except sqlite3.Error as exc:
            raise StorageError(f"{database}: cannot raise the version mark ({exc})") from None
