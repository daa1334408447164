"""kvtornado/backup.py: a consistent copy while the store writes, a restore that checks its input, holds the
one-server lock and never lets versions go back (SPEC §5, §6, §11)."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvtornado.backup import Refused, backup, restore
from kvtornado.locks import take_lock
from kvtornado.ops import Op
from kvtornado.store import SCHEMA_VERSION, SqliteStore
from tests.conftest import ROOT


def fill(path: Path, items: dict[str, object], *, reserve: int = 0) -> int:
    """Write ``items`` through a SqliteStore (as a server would), reserve ``reserve`` more versions; returns
    the version mark the file then holds."""

    async def run() -> None:
        s = SqliteStore(path, synchronous="NORMAL")
        await s.open()
        try:
            for key, value in items.items():
                await s.put(key, json.dumps(value))
            if reserve:
                await s.reserve_versions(reserve)
        finally:
            await s.close()

    asyncio.run(run())
    return hwm_of(path)


def rows_of(path: Path) -> dict[str, tuple[object, int]]:
    conn = sqlite3.connect(path)
    try:
        return {k: (json.loads(v), n) for k, v, n in conn.execute("SELECT key, value, version FROM kv")}
    finally:
        conn.close()


def one(path: Path, sql: str) -> object:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchone()[0]
    finally:
        conn.close()


def hwm_of(path: Path) -> int:
    return int(one(path, "SELECT value FROM meta WHERE name = 'version_hwm'"))  # type: ignore[call-overload]


def next_version(path: Path) -> int:
    """The version a server opening ``path`` hands out to its next write."""

    async def run() -> int:
        s = SqliteStore(path, synchronous="NORMAL")
        await s.open()
        try:
            return await s.put("probe", '"p"')
        finally:
            await s.close()

    return asyncio.run(run())


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "data" / "kv.sqlite3"
    fill(path, {"a": 1, "b": "bee", "ключ": {"n": [1, 2]}})
    return path


# --- backup -----------------------------------------------------------------------------------------------


def test_backup_is_one_file_with_every_row_mode_0600(db: Path, tmp_path: Path) -> None:
    out = tmp_path / "backup.sqlite3"
    copied = backup(db, out)
    assert copied.rows == 3
    assert rows_of(out) == rows_of(db)
    assert one(out, "PRAGMA integrity_check") == "ok"
    assert one(out, "PRAGMA journal_mode") == "delete"  # self-contained: no -wal to carry along
    assert one(out, "PRAGMA user_version") == SCHEMA_VERSION
    assert hwm_of(out) == hwm_of(db)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backup.sqlite3", "data"]  # no temporary left


def test_backup_replaces_an_older_backup_whole(db: Path, tmp_path: Path) -> None:
    out = tmp_path / "backup.sqlite3"
    out.write_bytes(b"an old backup, or anything")
    backup(db, out)
    assert set(rows_of(out)) == {"a", "b", "ключ"}


def test_backup_while_the_store_is_open_and_writing(db: Path, tmp_path: Path) -> None:
    """The server's own store stays open (and holds its lock) and keeps writing during the copy: the copy never
    waits for or takes that lock, and is one consistent state (each batch wholly in it or wholly not)."""
    out = tmp_path / "live.sqlite3"

    async def run() -> int:
        s = SqliteStore(db, synchronous="NORMAL")
        await s.open()
        stop = asyncio.Event()

        async def writer() -> int:
            n = 0
            while not stop.is_set():
                n += 1
                await s.apply([Op("save", "x", value=str(n)), Op("save", "y", value=str(n))], batch=True)
            return n

        try:
            task = asyncio.ensure_future(writer())
            await asyncio.sleep(0.05)
            await asyncio.to_thread(backup, db, out)
            await asyncio.sleep(0.05)
            stop.set()
            return await task
        finally:
            await s.close()

    written = asyncio.run(run())
    assert one(out, "PRAGMA integrity_check") == "ok"
    copied = rows_of(out)
    assert copied["x"][0] == copied["y"][0]  # the two saves of one batch: both or neither
    assert 1 <= int(copied["x"][0]) < written  # some of the writes, taken while they went on  # type: ignore[call-overload]
    assert rows_of(db)["x"][0] == written


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        pytest.param("missing", "no database there", id="no-database"),
        pytest.param("same", "that is the database itself", id="out-is-the-database"),
        pytest.param("no-folder", "no such folder", id="out-folder-missing"),
        pytest.param("not-kv", "not a kvtornado database", id="not-kvtornado"),
        pytest.param("garbage", "not a readable sqlite database", id="not-sqlite"),
    ],
)
def test_backup_refusals(tmp_path: Path, setup: str, message: str) -> None:
    database = tmp_path / "kv.sqlite3"
    out = tmp_path / "out.sqlite3"
    if setup == "same":
        fill(database, {"a": 1})
        out = database
    elif setup == "no-folder":
        fill(database, {"a": 1})
        out = tmp_path / "nowhere" / "out.sqlite3"
    elif setup == "not-kv":
        sqlite3.connect(database).execute("CREATE TABLE other(x)").connection.close()
    elif setup == "garbage":
        database.write_bytes(b"not a database at all " * 100)
    with pytest.raises(Refused, match=message):
        backup(database, out)
    assert not (tmp_path / "out.sqlite3").exists()


# --- restore ----------------------------------------------------------------------------------------------


def test_restore_puts_the_backup_in_place_and_versions_never_go_back(db: Path, tmp_path: Path) -> None:
    saved = tmp_path / "backup.sqlite3"
    backup(db, saved)
    before = rows_of(db)
    # After the backup the server goes on: new values, and versions reserved far ahead (write-behind blocks).
    old_mark = fill(db, {"a": 2, "later": True}, reserve=5000)
    assert old_mark > hwm_of(saved)

    copied = restore(saved, db)

    assert copied.rows == 3
    assert rows_of(db) == before  # the backup's data, at the backup's versions
    assert copied.version_hwm == old_mark == hwm_of(db)  # raised to the replaced file's mark
    assert one(db, "PRAGMA integrity_check") == "ok"
    assert one(db, "PRAGMA journal_mode") == "wal"
    assert next_version(db) > old_mark  # no version of the old file is handed out again


def test_restore_keeps_a_higher_mark_of_the_backup(db: Path, tmp_path: Path) -> None:
    saved = tmp_path / "backup.sqlite3"
    fill(saved, {"x": 1}, reserve=9000)
    copied = restore(saved, db)
    assert copied.version_hwm == hwm_of(saved) >= 9000


def test_restore_reads_the_mark_a_killed_server_left_in_the_wal(tmp_path: Path) -> None:
    """The replaced file's mark counts even when it is only in its -wal (the server was killed with -9)."""
    live = tmp_path / "live" / "kv.sqlite3"
    fill(live, {"a": 1})
    conn = sqlite3.connect(live, isolation_level=None)
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("UPDATE meta SET value = 777777 WHERE name = 'version_hwm'")
    killed = tmp_path / "killed" / "kv.sqlite3"
    killed.parent.mkdir()
    for suffix in ("", "-wal"):  # the files as a kill would leave them: the update not yet in the main file
        shutil.copyfile(str(live) + suffix, str(killed) + suffix)
    conn.close()
    saved = tmp_path / "backup.sqlite3"
    fill(saved, {"b": 2})

    assert restore(saved, killed).version_hwm == 777777
    assert set(rows_of(killed)) == {"b"}


def test_restore_onto_a_new_machine_creates_the_database(tmp_path: Path, db: Path) -> None:
    saved = tmp_path / "backup.sqlite3"
    backup(db, saved)
    target = tmp_path / "fresh" / "data" / "kv.sqlite3"
    copied = restore(saved, target)
    assert copied.rows == 3 and rows_of(target) == rows_of(db)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o700


def test_restore_of_a_schema_1_database_migrates_it(tmp_path: Path, db: Path) -> None:
    old = tmp_path / "v1.sqlite3"
    shutil.copyfile(ROOT / "tests" / "data" / "v1.sqlite3", old)
    old_mark = hwm_of(db)
    copied = restore(old, db)
    assert copied.rows == 4
    assert one(db, "PRAGMA user_version") == SCHEMA_VERSION
    assert {k: v for k, (v, _) in rows_of(db).items()} == {"z": 42, "a": {"n": [1, 2]}, "ключ": "ü", "b": "bee"}
    assert copied.version_hwm >= max(old_mark, 4)


@pytest.fixture
def held(db: Path) -> Iterator[None]:
    """What a running server holds on ``db`` (an flock: another descriptor, even in this process, is refused)."""
    import os

    fd = take_lock(db)
    try:
        yield
    finally:
        os.close(fd)


def test_restore_is_refused_while_a_server_holds_the_database(db: Path, tmp_path: Path, held: None) -> None:
    saved = tmp_path / "backup.sqlite3"
    backup(db, saved)  # a backup is never refused: it does not take the lock
    before = db.read_bytes()
    with pytest.raises(Refused, match=r"a server is using this database \(it holds kv.sqlite3.lock\); stop it"):
        restore(saved, db)
    assert db.read_bytes() == before


def _newer(path: Path) -> None:
    fill(path, {"a": 1})
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()


def _damaged(path: Path) -> None:
    fill(path, {f"k{i:04d}": "x" * 200 for i in range(400)})
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.close()
    data = bytearray(path.read_bytes())
    page = 4096
    data[page * 3: page * 4] = b"\xff" * page  # one whole page of the table's b-tree
    path.write_bytes(bytes(data))


def _index_out_of_step(path: Path) -> None:
    """A file sqlite reads but whose index no longer matches its table: integrity_check says so."""

    async def run() -> None:
        s = SqliteStore(path, synchronous="NORMAL")
        await s.open()
        for i in range(3):
            await s.put(f"k{i}", "1", ttl=1000)
        await s.close()

    asyncio.run(run())
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA writable_schema = ON")
    conn.execute("UPDATE sqlite_master SET sql = replace(sql, 'ON kv(expires_at)', 'ON kv(updated_at)') "
                 "WHERE name = 'kv_expires_at'")
    conn.close()


def _with_row(sql: str, *args: object) -> Callable[[Path], None]:
    """A sound database with one row more, written past the store by ``sql`` (the rows a server never writes)."""

    def make(path: Path) -> None:
        fill(path, {"a": 1})
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute(sql, args)
        finally:
            conn.close()

    return make


_ROW = "INSERT INTO kv(key, value, version, expires_at, updated_at) VALUES (?, ?, ?, ?, 0)"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(_with_row(_ROW, "zz", "not json", 5, None), "the row of key 'zz': its value is not a JSON text",
                     id="value-not-json"),
        pytest.param(_with_row(_ROW, "zz", "NaN", 5, None), "its value is not a JSON text", id="value-nan"),
        pytest.param(_with_row(_ROW, "zz", "1 2", 5, None), "its value is not a JSON text", id="value-two-texts"),
        pytest.param(_with_row(_ROW, "zz", b"1", 5, None), "its value is not text", id="value-blob"),
        pytest.param(_with_row(_ROW, b"zz", "1", 5, None), "a row whose key is not text", id="key-blob"),
        pytest.param(_with_row(_ROW, "", "1", 5, None), "a row whose key is not text", id="key-empty"),
        pytest.param(_with_row(_ROW, "zz", "1", -5, None), r"its version -5 is not in 1\.\.9007199254740991",
                     id="version-negative"),
        pytest.param(_with_row(_ROW, "zz", "1", 0, None), "its version 0 is not in", id="version-zero"),
        pytest.param(_with_row(_ROW, "zz", "1", 2**53, None), "its version 9007199254740992 is not in",
                     id="version-too-big"),
        pytest.param(_with_row(_ROW, "zz", "1", "seven", None), "its version 'seven' is not in", id="version-text"),
        pytest.param(_with_row(_ROW, "zz", "1", 5, "soon"), "its expiry 'soon' is not a number", id="expiry-text"),
        pytest.param(lambda p: None, "no such file", id="missing"),
        pytest.param(lambda p: p.write_bytes(b"SQLite format 2\0" + b"x" * 5000), "not a readable sqlite database",
                     id="not-sqlite"),
        pytest.param(lambda p: sqlite3.connect(p).execute("CREATE TABLE t(x)").connection.close(),
                     "not a kvtornado database", id="no-kv-table"),
        pytest.param(_newer, "is newer than this program's", id="newer-schema"),
        pytest.param(_damaged, r"not a readable sqlite database \(database disk image is malformed\)",
                     id="malformed-page"),
        pytest.param(_index_out_of_step, r"the database is damaged \(integrity_check: row 1 missing from index",
                     id="fails-integrity-check"),
    ],
)
def test_restore_refuses_what_is_not_a_sound_kvtornado_database(db: Path, tmp_path: Path, make: object,
                                                                  message: str) -> None:
    source = tmp_path / "in.sqlite3"
    make(source)  # type: ignore[operator]
    before = rows_of(db)
    with pytest.raises(Refused, match=message):
        restore(source, db)
    assert rows_of(db) == before  # nothing was touched


def test_restore_refuses_the_database_itself(db: Path) -> None:
    with pytest.raises(Refused, match="that is the database itself"):
        restore(db, db)


def test_restore_refuses_an_unreadable_old_database(db: Path, tmp_path: Path) -> None:
    """Its versions cannot be known, so they cannot be kept: moving it aside is the person's call."""
    saved = tmp_path / "backup.sqlite3"
    backup(db, saved)
    db.write_bytes(b"garbage " * 1000)
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    with pytest.raises(Refused, match=r"cannot be read .* move it aside first"):
        restore(saved, db)
