"""kvtornado/store.py: the sqlite file and schema, row writes, locking, and no sqlite on the event loop."""

from __future__ import annotations

import random
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvtornado import store as store_module
from kvtornado.errors import NotAnInteger, StorageError, VersionMismatch
from kvtornado.ops import Op, Record
from kvtornado.store import MAX_BUSY_TIMEOUT_MS, SCHEMA_VERSION, SqliteStore, ordered_batches

# Captured at import: tests that patch ``sqlite3.connect`` still open their own connections untraced.
_connect = sqlite3.connect
CLOCK = 1234.5


def rows(pairs: list[tuple[str, str | None]]) -> list[tuple[str, Record]]:
    """(key, value JSON text or None for a delete) as the store's rows, versions 1, 2, ... in order."""
    return [(key, Record(value, n)) for n, (key, value) in enumerate(pairs, start=1)]


def direct(path: Path) -> sqlite3.Connection:
    """A second, independent connection to the store's file (autocommit)."""
    return _connect(str(path), isolation_level=None, timeout=0)


def query(path: Path, sql: str) -> list[Any]:
    conn = direct(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "nested" / "kv.sqlite3"


@pytest.fixture
def store(io_loop: Any, db_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(db_path, synchronous="NORMAL", busy_timeout_ms=50, clock=lambda: CLOCK)
    io_loop.run_sync(s.open)
    yield s
    io_loop.run_sync(s.close)


async def on_writer(s: SqliteStore, sql: str) -> Any:
    """Run one statement on the store's own writer connection, on its own thread."""

    def run() -> Any:
        assert s._wconn is not None
        return s._wconn.execute(sql).fetchone()[0]

    return await s._run(s._writer, run)


async def on_reader(s: SqliteStore, sql: str) -> Any:
    def run() -> Any:
        assert s._rconn is not None
        return s._rconn.execute(sql).fetchone()[0]

    return await s._run(s._reader, run)


# --- the file and its schema ---------------------------------------------------------------------


def test_open_creates_the_folder_and_the_file(store: SqliteStore, db_path: Path) -> None:
    assert db_path.parent.is_dir()
    assert db_path.is_file()


def test_journal_mode_is_wal_and_schema_version_is_set(store: SqliteStore, db_path: Path) -> None:
    assert query(db_path, "PRAGMA journal_mode") == [("wal",)]
    assert query(db_path, "PRAGMA user_version") == [(2,)]
    assert SCHEMA_VERSION == 2


def test_table_layout(store: SqliteStore, db_path: Path) -> None:
    assert query(db_path, "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name") == [("kv",), ("meta",)]
    (sql,), = query(db_path, "SELECT sql FROM sqlite_master WHERE name = 'kv'")
    assert sql.rstrip().upper().endswith("WITHOUT ROWID")
    columns = [(name, kind, notnull, pk) for _, name, kind, notnull, _, pk in query(db_path, "PRAGMA table_info(kv)")]
    # a WITHOUT ROWID primary key is NOT NULL by itself
    assert columns == [("key", "TEXT", 1, 1), ("value", "TEXT", 1, 0), ("version", "INTEGER", 1, 0),
                       ("expires_at", "REAL", 0, 0), ("updated_at", "REAL", 1, 0)]
    with pytest.raises(sqlite3.OperationalError, match="rowid"):
        query(db_path, "SELECT rowid FROM kv")
    # the expiry sweep finds expired rows through an index on expires_at
    assert query(db_path, "SELECT name FROM pragma_index_list('kv') WHERE origin = 'c'") == [("kv_expires_at",)]
    assert query(db_path, "SELECT name FROM pragma_index_info('kv_expires_at')") == [("expires_at",)]
    assert query(db_path, "SELECT name, value FROM meta") == [("version_hwm", 0)]


@pytest.mark.parametrize(("mode", "level"), [("OFF", 0), ("NORMAL", 1), ("FULL", 2)])
@pytest.mark.gen_test
async def test_synchronous_and_busy_timeout_on_both_connections(
    io_loop: Any, tmp_path: Path, mode: str, level: int
) -> None:
    s = SqliteStore(tmp_path / "kv.sqlite3", synchronous=mode, busy_timeout_ms=50)
    await s.open()
    try:
        assert await on_writer(s, "PRAGMA synchronous") == level
        assert await on_reader(s, "PRAGMA synchronous") == level
        assert await on_writer(s, "PRAGMA busy_timeout") == 50
        assert await on_reader(s, "PRAGMA journal_mode") == "wal"
    finally:
        await s.close()


def test_busy_timeout_is_capped_at_five_seconds(tmp_path: Path) -> None:
    assert SqliteStore(tmp_path / "kv.sqlite3", busy_timeout_ms=60_000).busy_timeout_ms == MAX_BUSY_TIMEOUT_MS == 5000


@pytest.mark.gen_test
async def test_newer_schema_version_is_refused(io_loop: Any, tmp_path: Path) -> None:
    path = tmp_path / "kv.sqlite3"
    conn = direct(path)
    conn.execute("PRAGMA user_version = 3")
    conn.close()

    s = SqliteStore(path)
    try:
        with pytest.raises(StorageError, match="schema version 3 is newer than this program's \\(2\\)"):
            await s.open()
    finally:
        await s.close()
    # the file was left as it was
    assert query(path, "PRAGMA user_version") == [(3,)]
    assert query(path, "SELECT name FROM sqlite_master") == []


@pytest.mark.gen_test
async def test_an_uncreatable_folder_is_a_storage_error(io_loop: Any, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    s = SqliteStore(blocker / "kv.sqlite3")
    try:
        with pytest.raises(StorageError, match="cannot create the data folder"):
            await s.open()
    finally:
        await s.close()


@pytest.mark.gen_test
async def test_a_file_that_is_not_a_database_is_a_storage_error(io_loop: Any, tmp_path: Path) -> None:
    path = tmp_path / "kv.sqlite3"
    path.write_bytes(b"not a database " * 100)
    s = SqliteStore(path)
    try:
        with pytest.raises(StorageError, match="cannot open the sqlite database"):
            await s.open()
    finally:
        await s.close()
    assert path.read_bytes() == b"not a database " * 100


# --- reads and writes ----------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_put_get_delete_round_trip(store: SqliteStore, db_path: Path) -> None:
    assert await store.get("k") is None

    await store.put("k", '{"a":[1,"é"]}')
    assert await store.get("k") == '{"a":[1,"é"]}'
    # committed, so another connection sees it, with the injected clock as updated_at
    assert query(db_path, "SELECT key, value, updated_at FROM kv") == [("k", '{"a":[1,"é"]}', CLOCK)]

    await store.put("k", '"second"')
    assert await store.get("k") == '"second"'

    assert await store.delete("k") is True
    assert await store.get("k") is None
    assert query(db_path, "SELECT count(*) FROM kv") == [(0,)]


@pytest.mark.gen_test
async def test_delete_of_an_absent_key_returns_false(store: SqliteStore) -> None:
    assert await store.delete("never-saved") is False
    await store.put("k", "1")
    assert await store.delete("k") is True
    assert await store.delete("k") is False


@pytest.mark.gen_test
async def test_keys_are_exact(store: SqliteStore) -> None:
    await store.put("K", "1")
    await store.put("k ", "2")
    await store.put("ключ😀", "3")
    await store.put("a\x00b", "4")  # an embedded NUL is part of the key, not its end
    assert [await store.get(k) for k in ("K", "k", "k ", "ключ😀", "a\x00b", "a")] == ["1", None, "2", "3", "4", None]


@pytest.mark.gen_test
async def test_write_rows_puts_and_deletes_in_one_transaction(
    io_loop: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trace: list[str] = []

    def traced_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = _connect(*args, **kwargs)
        conn.set_trace_callback(trace.append)
        return conn

    monkeypatch.setattr(store_module.sqlite3, "connect", traced_connect)
    s = SqliteStore(tmp_path / "kv.sqlite3", busy_timeout_ms=50)
    await s.open()
    try:
        await s.write_rows(rows([("gone", "0"), ("kept", "0")]))
        trace.clear()
        commits = s.commits

        await s.write_rows(rows([("b", '"x"'), ("gone", None), ("a", "1"), ("absent", None)]))

        assert trace[0] == "BEGIN IMMEDIATE" and trace[-1] == "COMMIT"
        assert sum(1 for sql in trace if sql.startswith(("BEGIN", "COMMIT", "ROLLBACK"))) == 2
        assert sum(1 for sql in trace if sql.startswith("INSERT")) == 2
        assert sum(1 for sql in trace if sql.startswith("DELETE")) == 2
        assert s.commits == commits + 1
        assert [await s.get(k) for k in ("a", "b", "gone", "kept", "absent")] == ["1", '"x"', None, "0", None]
    finally:
        await s.close()


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        pytest.param([("k", '"a"'), ("k", '"b"')], '"b"', id="put-put"),
        pytest.param([("k", '"a"'), ("k", None)], None, id="put-delete"),
        pytest.param([("k", None), ("k", '"b"')], '"b"', id="delete-put"),
        pytest.param([("k", '"a"'), ("k", None), ("k", '"c"')], '"c"', id="put-delete-put"),
    ],
)
@pytest.mark.gen_test
async def test_write_rows_last_write_of_a_key_wins(
    store: SqliteStore, rows: list[tuple[str, str | None]], expected: str | None
) -> None:
    await store.put("k", '"before"')
    await store.write_rows([(key, Record(value, n)) for n, (key, value) in enumerate(rows, start=2)])
    assert await store.get("k") == expected


@pytest.mark.gen_test
async def test_failing_write_rows_is_rolled_back_whole(store: SqliteStore, db_path: Path) -> None:
    await store.write_rows(rows([("gone", "0")]))
    conn = direct(db_path)
    conn.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON kv WHEN NEW.key = 'boom' BEGIN SELECT RAISE(ABORT, 'refused'); END"
    )
    conn.close()
    commits, row_writes = store.commits, store.row_writes

    with pytest.raises(StorageError, match="refused"):
        # sorted, "a" is written before "boom" fails: the rollback must undo it
        await store.write_rows(rows([("a", "1"), ("boom", "2"), ("c", "3"), ("gone", None)]))

    assert [await store.get(k) for k in ("a", "boom", "c", "gone")] == [None, None, None, "0"]
    assert (store.commits, store.row_writes) == (commits, row_writes)
    # the connection is not left inside a transaction: the next batch commits
    await store.write_rows(rows([("a", "1"), ("gone", None)]))
    assert [await store.get(k) for k in ("a", "gone")] == ["1", None]


@pytest.mark.gen_test
async def test_empty_write_rows_is_a_no_op(store: SqliteStore) -> None:
    await store.write_rows(rows([]))
    assert store.commits == 0
    assert await store.flush() == 0


@pytest.mark.gen_test
async def test_stats_count_reads_row_writes_and_commits(store: SqliteStore) -> None:
    await store.write_rows(rows([("a", "1"), ("b", "2")]))
    await store.get("a")
    await store.delete("a")
    await store.delete("a")
    assert store.stats() == {"storage": {"reads": 1, "row_writes": 3, "commits": 3, "expired_rows_swept": 0}}


@pytest.mark.gen_test
async def test_data_survives_close_and_reopen(io_loop: Any, db_path: Path) -> None:
    first = SqliteStore(db_path)
    await first.open()
    await first.write_rows(rows([("a", '"x"'), ("b", "[1,2]")]))
    await first.delete("b")
    await first.close()

    second = SqliteStore(db_path)
    await second.open()
    try:
        assert await second.get("a") == '"x"'
        assert await second.get("b") is None
    finally:
        await second.close()
    assert query(db_path, "PRAGMA user_version") == [(2,)]
    assert query(db_path, "PRAGMA integrity_check") == [("ok",)]


@pytest.mark.gen_test
async def test_a_closed_store_answers_storage_error(io_loop: Any, db_path: Path) -> None:
    s = SqliteStore(db_path)
    await s.open()
    await s.close()
    with pytest.raises(StorageError, match="closed"):
        await s.get("a")
    with pytest.raises(StorageError, match="closed"):
        await s.write_rows(rows([("a", "1")]))
    await s.close()  # closing twice is harmless


# --- locking -------------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_locked_database_fails_writes_but_not_reads(store: SqliteStore, db_path: Path) -> None:
    await store.put("k", '"old"')
    commits = store.commits
    other = direct(db_path)
    try:
        other.execute("BEGIN IMMEDIATE")  # holds the write lock longer than busy_timeout_ms (50)

        with pytest.raises(StorageError, match="locked"):
            await store.write_rows(rows([("k", '"new"'), ("n", "1")]))
        with pytest.raises(StorageError, match="locked"):
            await store.delete("k")
        assert await store.get("k") == '"old"'  # reads use their own connection and WAL
        assert store.commits == commits
    finally:
        other.execute("ROLLBACK")
        other.close()

    await store.write_rows(rows([("k", '"new"'), ("n", "1")]))
    assert await store.get("k") == '"new"'
    assert await store.get("n") == "1"
    assert store.commits == commits + 1


# --- threads -------------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_no_sqlite_work_on_the_event_loop_thread(
    io_loop: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trace: list[tuple[str, str]] = []

    def traced_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        trace.append((threading.current_thread().name, "CONNECT"))
        conn = _connect(*args, **kwargs)
        conn.set_trace_callback(lambda sql: trace.append((threading.current_thread().name, sql)))
        return conn

    monkeypatch.setattr(store_module.sqlite3, "connect", traced_connect)
    loop_thread = threading.current_thread().name
    s = SqliteStore(tmp_path / "kv.sqlite3", busy_timeout_ms=50)

    await s.open()
    await s.put("a", "1")
    await s.write_rows(rows([("b", "2"), ("a", None)]))
    assert await s.get("b") == "2"
    await s.delete("b")
    await s.close()

    assert threading.current_thread().name == loop_thread  # the test itself ran on the loop
    assert len(trace) > 10
    assert all(thread != loop_thread for thread, _ in trace)
    writes = {t for t, sql in trace if sql.startswith(("INSERT", "DELETE", "BEGIN", "COMMIT", "CREATE"))}
    # /get reads on the reader thread; a delete reads the row it checks inside its write transaction
    reads = {t.rsplit("_", 1)[0] for t, sql in trace if sql.startswith("SELECT value")}
    assert len(writes) == 1 and next(iter(writes)).startswith("kv-sqlite-writer")
    assert reads == {"kv-sqlite-reader", "kv-sqlite-writer"}
    assert sum(1 for _, sql in trace if sql == "CONNECT") == 2  # one connection each


# --- batch planning ------------------------------------------------------------------------------


@pytest.mark.parametrize(("count", "batch_rows"), [(0, 5), (1, 5), (5, 5), (6, 5), (10_007, 5000), (23, 4)])
def test_ordered_batches_are_globally_sorted_and_bounded(count: int, batch_rows: int) -> None:
    rnd = random.Random(count)
    items = [(f"k{rnd.random()}", i) for i in range(count)]
    batches = ordered_batches(dict(items), batch_rows)
    assert [item for batch in batches for item in batch] == sorted(items, key=lambda item: item[0])
    assert all(len(batch) == batch_rows for batch in batches[:-1])
    assert all(0 < len(batch) <= batch_rows for batch in batches)


@pytest.mark.gen_test
async def test_ordered_batches_run_on_the_writer_thread(store: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    real = store_module.ordered_batches

    def spy(rows: dict[str, int], batch_rows: int) -> list[list[tuple[str, int]]]:
        seen.append(threading.current_thread().name)
        return real(rows, batch_rows)

    monkeypatch.setattr(store_module, "ordered_batches", spy)
    assert await store.ordered_batches({"b": 1, "a": 2}, 1) == [[("a", 2)], [("b", 1)]]
    assert seen and seen[0].startswith("kv-sqlite-writer")


@pytest.mark.gen_test
async def test_one_store_a_file_the_lock_is_released_on_close(tmp_path: Path) -> None:
    path = tmp_path / "data" / "kv.sqlite3"
    first = SqliteStore(path)
    await first.open()
    second = SqliteStore(path)
    with pytest.raises(StorageError, match="another server is using this database") as refused:
        await second.open()
    assert str(path) in str(refused.value)
    other = SqliteStore(tmp_path / "data" / "other.sqlite3")  # another file in the same folder is fine
    await other.open()
    await other.close()
    await first.close()
    await second.open()  # free once the first is closed
    await second.close()


@pytest.mark.gen_test
async def test_a_new_database_is_private(tmp_path: Path) -> None:
    path = tmp_path / "fresh" / "kv.sqlite3"
    s = SqliteStore(path)
    await s.open()
    try:
        await s.write_rows(rows([("k", '"v"')]))
        assert oct(path.parent.stat().st_mode & 0o777) == "0o700"
        for p in (path, path.with_name("kv.sqlite3-wal"), path.with_name("kv.sqlite3.lock")):
            assert oct(p.stat().st_mode & 0o777) == "0o600", p
    finally:
        await s.close()


@pytest.mark.gen_test
async def test_a_store_never_opened_answers_storage_error_not_a_crash(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "kv.sqlite3")
    for call in (s.read("k"), s.write_rows(rows([("k", "1")])), s.delete("k")):
        with pytest.raises(StorageError, match=r"^the store is closed$"):
            await call
    await s.close()


@pytest.mark.gen_test
async def test_a_lock_file_that_cannot_be_opened_is_a_storage_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "kv.sqlite3"
    (tmp_path / "kv.sqlite3.lock").mkdir()  # the lock's name is taken by a folder
    s = SqliteStore(path)
    with pytest.raises(StorageError, match=r"kv\.sqlite3\.lock: cannot open the lock file"):
        await s.open()
    await s.close()


@pytest.mark.gen_test
async def test_sqlite_errors_on_read_and_delete_are_storage_errors(tmp_path: Path) -> None:
    path = tmp_path / "kv.sqlite3"
    s = SqliteStore(path, busy_timeout_ms=50)
    await s.open()
    try:
        conn = direct(path)
        conn.execute("DROP TABLE kv")  # the schema is gone under the store's feet
        conn.close()
        with pytest.raises(StorageError, match="sqlite read failed: no such table"):
            await s.read("k")
        with pytest.raises(StorageError, match="sqlite write failed: no such table"):
            await s.delete("k")
        with pytest.raises(StorageError, match="sqlite write failed: no such table"):
            await s.write_rows(rows([("k", "1")]))
    finally:
        await s.close()


@pytest.mark.gen_test
async def test_close_closes_both_connections_so_the_wal_is_checkpointed_away(tmp_path: Path) -> None:
    path = tmp_path / "kv.sqlite3"
    s = SqliteStore(path)
    await s.open()
    await s.write_rows(rows([("k", "1")]))
    assert await s.read("k") == Record("1", 1)
    wal = path.with_name(path.name + "-wal")
    assert wal.exists()
    await s.close()
    assert not wal.exists(), "a connection was left open: sqlite removes the WAL when the last one closes"
    assert query(path, "SELECT key, value FROM kv") == [("k", "1")]


@pytest.mark.gen_test
async def test_the_counters_add_up_over_several_calls(store: SqliteStore) -> None:
    await store.write_rows(rows([("a", "1"), ("b", "2")]))
    await store.write_rows(rows([("c", "3")]))
    await store.read("a")
    await store.read("nope")
    assert await store.delete("a") is True
    assert await store.delete("a") is False
    assert store.stats() == {"storage": {"reads": 2, "row_writes": 4, "commits": 4, "expired_rows_swept": 0}}


@pytest.mark.gen_test
async def test_a_closed_store_says_so_in_its_own_words_and_the_default_is_full_sync(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "kv.sqlite3")
    assert s.synchronous == "FULL"  # SPEC §3's default: every commit is on disk
    await s.open()
    await s.close()
    with pytest.raises(StorageError, match=r"^the store is closed$"):
        await s.read("k")


# --- schema 2: migration, versions, ranges, expiry -----------------------------------------------

V1_FILE = Path(__file__).resolve().parent.parent / "data" / "v1.sqlite3"


@pytest.mark.gen_test
async def test_a_v1_database_made_by_the_schema_1_code_is_migrated_in_place(io_loop: Any, tmp_path: Path) -> None:
    path = tmp_path / "kv.sqlite3"
    path.write_bytes(V1_FILE.read_bytes())
    assert query(path, "PRAGMA user_version") == [(1,)]
    s = SqliteStore(path, clock=lambda: CLOCK)
    await s.open()
    try:
        # every row kept, numbered in key order, no expiry, its updated_at untouched
        assert query(path, "SELECT key, value, version, expires_at, updated_at FROM kv ORDER BY key") == [
            ("a", '{"n":[1,2]}', 1, None, 1700000000.5), ("b", '"bee"', 2, None, 1700000000.5),
            ("z", "42", 3, None, 1700000000.5), ("ключ", '"ü"', 4, None, 1700000000.5)]
        assert query(path, "PRAGMA user_version") == [(2,)]
        assert query(path, "SELECT value FROM meta WHERE name = 'version_hwm'") == [(4,)]
        assert await s.get_record("b") == Record('"bee"', 2)
        assert await s.put("new", "1") == 5  # above every migrated version
    finally:
        await s.close()
    assert query(path, "PRAGMA integrity_check") == [("ok",)]


@pytest.mark.gen_test
async def test_a_failed_migration_leaves_the_v1_file_as_it_was(
    io_loop: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "kv.sqlite3"
    path.write_bytes(V1_FILE.read_bytes())
    monkeypatch.setattr(store_module, "_MIGRATE_V1", (*store_module._MIGRATE_V1, "SELECT * FROM no_such_table"))
    s = SqliteStore(path)
    with pytest.raises(StorageError, match="no such table: no_such_table"):
        await s.open()
    await s.close()
    assert query(path, "PRAGMA user_version") == [(1,)]
    assert [name for _, name, *_ in query(path, "PRAGMA table_info(kv)")] == ["key", "value", "updated_at"]
    assert len(query(path, "SELECT * FROM kv")) == 4


@pytest.mark.gen_test
async def test_versions_rise_across_reopen_and_reservations_are_never_handed_out_again(
    io_loop: Any, db_path: Path
) -> None:
    s = SqliteStore(db_path)
    await s.open()
    assert await s.put("a", "1") == 1
    assert await s.reserve_versions(100) == (2, 101)  # reserved and committed, maybe never used
    await s.close()
    s = SqliteStore(db_path)
    await s.open()
    try:
        assert await s.put("a", "2") == 102
        assert await s.reserve_versions(3) == (103, 105)
        assert await s.put("b", "1") == 106
    finally:
        await s.close()
    assert query(db_path, "SELECT value FROM meta") == [(106,)]


@pytest.mark.gen_test
async def test_the_high_water_mark_is_never_below_a_stored_version(io_loop: Any, db_path: Path) -> None:
    s = SqliteStore(db_path)
    await s.open()
    await s.close()
    conn = direct(db_path)
    conn.execute("INSERT INTO kv VALUES ('restored', '1', 500, NULL, 0)")  # e.g. rows from an older backup
    conn.close()
    s = SqliteStore(db_path)
    await s.open()
    try:
        assert await s.put("x", "1") == 501
    finally:
        await s.close()


@pytest.mark.gen_test
async def test_write_through_apply_checks_conditions_in_its_transaction_and_writes_nothing_on_refusal(
    store: SqliteStore, db_path: Path
) -> None:
    assert await store.put("k", '"a"', if_version=0) == 1
    with pytest.raises(VersionMismatch) as err:
        await store.put("k", '"b"', if_version=0)
    assert err.value.extra == {"current_version": 1}
    ops = [Op("save", "x", value="1"), Op("incr", "k")]  # k is a string: the batch fails at op 1
    with pytest.raises(NotAnInteger) as failed:
        await store.apply(ops, batch=True)
    assert failed.value.extra == {"index": 1}
    assert query(db_path, "SELECT key, value, version FROM kv") == [("k", '"a"', 1)]  # x was rolled back
    outcomes = await store.apply([Op("incr", "n", by=5), Op("get", "n"), Op("delete", "k", if_version=1)],
                                 batch=True)
    assert [(o.done, o.record) for o in outcomes] == [
        (True, Record("5", 3)), (True, Record("5", 3)), (True, Record(None, 4))]  # 2 went to the refused save
    assert query(db_path, "SELECT key, value, version FROM kv") == [("n", "5", 3)]


@pytest.mark.gen_test
async def test_a_batch_of_gets_reads_one_snapshot_on_the_reader_thread(store: SqliteStore) -> None:
    await store.put("a", "1")
    outcomes = await store.apply([Op("get", "a"), Op("get", "b")], batch=True)
    assert [(o.done, o.record) for o in outcomes] == [(True, Record("1", 1)), (False, None)]
    assert store.stats()["storage"]["commits"] == 1  # only the put


@pytest.mark.gen_test
async def test_expired_rows_are_absent_and_the_sweep_deletes_them(io_loop: Any, db_path: Path) -> None:
    now = [1000.0]
    s = SqliteStore(db_path, clock=lambda: now[0])
    await s.open()
    try:
        await s.put("short", "1", ttl=5)
        await s.put("long", "2", ttl=50)
        await s.put("forever", "3")
        assert (await s.get_record("short")) == Record("1", 1, 1005.0)
        now[0] = 1005.0
        assert await s.get_record("short") is None
        assert [k for k, _ in await s.list_keys("", None, 10)] == ["forever", "long"]
        assert await s.delete("short") is False
        assert await s.put("short", "9", if_version=0) == 4  # an expired key is absent for conditions too
        now[0] = 1100.0
        assert await s.sweep() == 1  # long; short was overwritten without a ttl
        assert query(db_path, "SELECT key FROM kv ORDER BY key") == [("forever",), ("short",)]
        assert s.stats()["storage"]["expired_rows_swept"] == 1
    finally:
        await s.close()


@pytest.mark.gen_test
async def test_the_sweep_is_bounded_per_transaction(io_loop: Any, db_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "SWEEP_ROWS", 3)
    s = SqliteStore(db_path, clock=lambda: 2000.0)
    await s.open()
    try:
        await s.write_rows([(f"k{i}", Record("1", i + 1, 1000.0 + i)) for i in range(10)])
        assert await s.sweep(rounds=2) == 6  # two transactions of three, the oldest expiry first
        assert [k for (k,) in query(db_path, "SELECT key FROM kv ORDER BY key")] == ["k6", "k7", "k8", "k9"]
        assert await s.sweep() == 4
    finally:
        await s.close()


@pytest.mark.parametrize(("prefix", "end"), [
    ("", None), ("a", "b"), ("app/", "app0"), ("z\U0010ffff", "{"), ("\U0010ffff", None), ("a\ud7ff", "a\ue000"),
])
def test_prefix_end_is_the_least_string_above_the_prefix_range(prefix: str, end: str | None) -> None:
    assert store_module.prefix_end(prefix) == end


@pytest.mark.gen_test
async def test_range_lists_live_rows_of_a_prefix_in_code_point_order(store: SqliteStore) -> None:
    keys = ["a", "a/", "a/b", "a/é", "a/😀", "a0", "ab", "b", "a/\U0010ffff", "A"]
    await store.write_rows([(k, Record("1", n)) for n, k in enumerate(keys, start=1)]
                           + [("a/x", Record("1", 99, CLOCK))])  # expired at the store's clock
    every = [k for k, _ in await store.range("", None, 100, CLOCK)]
    assert every == sorted(keys) == sorted(keys, key=lambda k: k.encode("utf-8"))
    assert [k for k, _ in await store.range("a/", None, 100, CLOCK)] == ["a/", "a/b", "a/é", "a/😀", "a/\U0010ffff"]
    assert [k for k, _ in await store.range("a/", "a/b", 2, CLOCK)] == ["a/é", "a/😀"]
    assert [k for k, _ in await store.range("a/", "0", 1, CLOCK)] == ["a/"]  # a position before the prefix
    assert [k for k, _ in await store.range("a/", None, 100, CLOCK, serial=True)][:2] == ["a/", "a/b"]
    rows = await store.range("b", None, 5, CLOCK)
    assert rows == [("b", Record("1", 8))]
