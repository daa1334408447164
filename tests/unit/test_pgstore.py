"""kvtornado/pgstore.py against a throwaway PostgreSQL (tests/services.py; skipped without the binaries):
the schema, idempotent row writes in version order, code-point order, versions across reopen, write-through
conditions under concurrency, the one-server lock, and an outage as a bounded ``StorageError``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from kvtornado.config import CacheConfig
from kvtornado.errors import NotAnInteger, Overloaded, StorageError, VersionMismatch
from kvtornado.ops import Op, Record
from kvtornado.pgstore import PostgresStore, _decode, _encode

CLOCK = 1234.5


def query(url: str, sql: str) -> list[Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql)
        return cur.fetchall() if cur.description is not None else []


async def opened(url: str) -> PostgresStore:
    store = PostgresStore(url, clock=lambda: CLOCK)
    await store.open()
    return store


@pytest.fixture
def store(io_loop: Any, pg_url: str) -> Iterator[PostgresStore]:
    s = io_loop.run_sync(lambda: opened(pg_url))
    yield s
    io_loop.run_sync(s.close)


def test_encode_keeps_order_and_prefixes() -> None:
    keys = ["", "\x00", "\x00\x00", "\x01", "\x01\x00", "\x02", "a", "a\x00", "a\x00b", "a\x01", "ab", "é"]
    encoded = [_encode(k) for k in keys]
    assert all("\x00" not in e for e in encoded)
    assert [_decode(e) for e in encoded] == keys
    assert sorted(encoded) == [_encode(k) for k in sorted(keys)]
    for p in keys:
        for k in keys:
            assert _encode(k).startswith(_encode(p)) == k.startswith(p), (p, k)


@pytest.mark.gen_test
async def test_schema_columns_collation_index_and_meta(store: PostgresStore, pg_url: str) -> None:
    cols = query(pg_url, "SELECT column_name, data_type, is_nullable, collation_name FROM information_schema.columns "
                         "WHERE table_name = 'kv' ORDER BY ordinal_position")
    assert cols == [("key", "text", "NO", "C"), ("value", "text", "YES", None), ("version", "bigint", "NO", None),
                    ("expires_at", "double precision", "YES", None), ("updated_at", "double precision", "NO", None)]
    assert query(pg_url, "SELECT indexname FROM pg_indexes WHERE tablename = 'kv' ORDER BY 1") == [
        ("kv_expires_at",), ("kv_pkey",), ("kv_tombstones",)]
    meta = dict(query(pg_url, "SELECT name, value FROM kv_meta"))
    assert meta.pop("owner") > 0  # this server's fencing token
    assert meta == {"schema_version": 2, "version_hwm": 0}


@pytest.mark.gen_test
async def test_a_newer_schema_is_refused(pg_url: str) -> None:
    s = await opened(pg_url)  # creates the schema; then a newer program pretends to have run
    await s.close()
    query(pg_url, "UPDATE kv_meta SET value = 9 WHERE name = 'schema_version'")
    with pytest.raises(StorageError, match=r"schema version 9 is newer than this program's \(2\)"):
        await opened(pg_url)


@pytest.mark.gen_test
async def test_row_writes_are_idempotent_and_never_undo_a_newer_version(store: PostgresStore) -> None:
    await store.write_rows([("k", Record('"v5"', 5)), ("d", Record("1", 3))])
    await store.write_rows([("k", Record('"v5"', 5))])  # written twice: the same
    await store.write_rows([("k", Record('"v4"', 4)), ("d", Record(None, 2))])  # out of order: both ignored
    assert await store.read("k") == Record('"v5"', 5)
    assert await store.read("d") == Record("1", 3)
    await store.write_rows([("d", Record(None, 6)), ("k", Record('"v7"', 7, 99.5))])
    assert await store.read("d") is None  # the delete removed the row: no tombstone is left
    assert await store.read("k") == Record('"v7"', 7, 99.5)
    assert store.stats()["storage"]["row_writes"] == 7


@pytest.mark.gen_test
async def test_range_is_in_code_point_order_with_prefix_cursor_limit_and_expiry(store: PostgresStore) -> None:
    keys = ["b", "a", "é", "\uffff", "\U0001f600", "a\x00", "a\x01", "\x00", "ab", "Z", "a/1", "a/2", "a/x"]
    await store.write_rows([(k, Record(f'"{i}"', i + 1)) for i, k in enumerate(keys)]
                           + [("a/gone", Record("0", 99, CLOCK - 1))])
    listed = await store.range("", None, 100, CLOCK)
    assert [k for k, _ in listed] == sorted(keys)
    assert [k for k, _ in await store.range("a/", None, 2, CLOCK)] == ["a/1", "a/2"]
    assert [k for k, _ in await store.range("a/", "a/2", 10, CLOCK)] == ["a/x"]
    assert [k for k, _ in await store.range("a", "a\x00", 2, CLOCK, serial=True)] == ["a\x01", "a/1"]
    assert await store.read("a\x00") == Record('"5"', 6)
    assert await store.sweep_expired(CLOCK) == 1


@pytest.mark.gen_test
async def test_versions_are_never_handed_out_twice_across_reopen(pg_url: str) -> None:
    s = await opened(pg_url)
    first = await s.reserve_versions(100)
    await s.write_rows([("k", Record("1", 500))])  # a row above the mark (another tool): counted too
    await s.close()
    s = await opened(pg_url)
    try:
        assert first == (1, 100)
        assert (await s.reserve_versions(10))[0] == 501
        (outcome,) = await s.apply([Op("save", "k", value="2")])
        assert outcome.record is not None and outcome.record.version == 511
    finally:
        await s.close()


@pytest.mark.gen_test
async def test_write_through_conditions_incr_and_all_or_nothing_batches(store: PostgresStore) -> None:
    v = await store.put("k", "1", if_version=0)
    with pytest.raises(VersionMismatch):
        await store.put("k", "2", if_version=0)
    with pytest.raises(NotAnInteger):
        await store.apply([Op("save", "k", value="5"), Op("save", "s", value='"x"'), Op("incr", "s")], batch=True)
    assert await store.get("k") == "1" and await store.get("s") is None  # nothing of the refused batch
    (incr,) = await store.apply([Op("incr", "k", by=41, if_version=v)])
    assert incr.record == Record("42", v + 1)
    assert await store.delete("k") is True and await store.delete("k") is False
    ttl = await store.put("t", "1", ttl=10)
    assert await store.get_record("t") == Record("1", ttl, CLOCK + 10)
    gets = await store.apply([Op("get", "t"), Op("get", "nope")], batch=True)
    assert [o.done for o in gets] == [True, False]


@pytest.mark.gen_test
async def test_concurrent_creates_have_one_winner_and_increments_are_exact(store: PostgresStore) -> None:
    async def create(n: int) -> bool:
        try:
            await store.put("once", str(n), if_version=0)
            return True
        except VersionMismatch:
            return False

    assert sum(await asyncio.gather(*(create(n) for n in range(12)))) == 1
    await asyncio.gather(*(store.apply([Op("incr", "n")]) for _ in range(30)))
    assert await store.get("n") == "30"


@pytest.mark.gen_test
async def test_a_second_store_on_the_same_database_is_refused_until_the_first_closes(pg_url: str) -> None:
    first = await opened(pg_url)
    with pytest.raises(StorageError, match="another server is using this database"):
        await opened(pg_url)
    await first.close()
    await (await opened(pg_url)).close()


def lose_lock(url: str) -> None:
    """End the session holding the advisory lock, as a PostgreSQL restart or a network cut would."""
    query(url, "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
               "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")


@pytest.mark.gen_test
async def test_a_server_whose_lock_was_lost_while_another_started_is_fenced_and_stops(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvtornado import pgstore

    monkeypatch.setattr(pgstore, "LOCK_CHECK_S", 3600.0)  # the first does not notice the loss by itself
    first = await opened(pg_url)
    stopped: list[bool] = []
    first.on_fenced = lambda: stopped.append(True)
    await first.write_rows([("k", Record('"first"', 5))])
    lose_lock(pg_url)
    second = await opened(pg_url)  # the lock was free: it starts, and its token replaces the first's
    await second.write_rows([("k", Record('"second"', 10**6))])

    with pytest.raises(StorageError, match="another server took over this database"):
        await first.write_rows([("k", Record('"late"', 7))])
    assert first.fenced and stopped == [True]
    for refused in (first.read("k"), first.reserve_versions(1), first.apply([Op("save", "k", value="1")])):
        with pytest.raises(StorageError, match="another server took over"):
            await refused
    assert await second.get("k") == '"second"'
    await first.close()
    await second.close()


@pytest.mark.gen_test
async def test_a_lost_lock_found_held_by_another_server_fences_at_the_next_check(pg_url: str) -> None:
    first = await opened(pg_url)
    lose_lock(pg_url)
    second = await opened(pg_url)
    first._lock_checked = 0.0  # the next write proves the lock first, as the watcher does every second
    with pytest.raises(StorageError, match="another server took over this database"):
        await first.write_rows([("k", Record('"late"', 7))])
    assert first.fenced
    await first.close()
    await second.close()


@pytest.mark.gen_test
async def test_a_lost_lock_nobody_took_is_taken_again_by_the_watcher(pg_url: str, monkeypatch: pytest.MonkeyPatch
                                                                   ) -> None:
    from kvtornado import pgstore

    monkeypatch.setattr(pgstore, "LOCK_CHECK_S", 0.05)
    first = await opened(pg_url)
    lose_lock(pg_url)
    deadline = time.monotonic() + 10
    while not query(pg_url, "SELECT 1 FROM pg_locks WHERE locktype = 'advisory'"):
        assert time.monotonic() < deadline, "the lock was not taken again"
        await asyncio.sleep(0.05)  # polling for the watcher's retake, with the deadline above
    with pytest.raises(StorageError, match="another server is using this database"):
        await opened(pg_url)
    await first.write_rows([("k", Record('"still mine"', 3))])  # the same token: not fenced
    assert not first.fenced and await first.get("k") == '"still mine"'
    await first.close()


def test_a_malformed_url_is_refused_without_its_password() -> None:
    with pytest.raises(StorageError) as err:
        PostgresStore("postgresql://postgres:S3cretPW@[::1:1/db3")
    assert "S3cretPW" not in str(err.value) and "not a valid libpq URL" in str(err.value)


@pytest.mark.parametrize("url", ["host=127.0.0.1 port=1 password=S3cretPW dbname=db3",
                                 "host=h password='S3cretPW x' dbname=db3", "postgresql://u@h/db?password=S3cretPW"])
def test_config_refusals_never_show_a_password(url: str) -> None:
    from kvtornado.config import parse_config
    from kvtornado.errors import ConfigError

    doc = {"storage": {"backend": "postgresql", "url": url}}
    try:
        parse_config(doc)
    except ConfigError as exc:
        assert "S3cretPW" not in str(exc)
    else:
        assert url.startswith("postgresql://")  # a well-formed URL is accepted (its password is used, not shown)


@pytest.mark.gen_test
async def test_an_unreachable_server_is_one_line_without_the_password(postgres: Any) -> None:
    from tests.services import free_port

    s = PostgresStore(f"postgresql://kv:hunter2@127.0.0.1:{free_port()}/kv?connect_timeout=1")
    started = time.monotonic()
    with pytest.raises(StorageError) as err:
        await s.open()
    message = str(err.value)
    assert "cannot connect to PostgreSQL" in message and "\n" not in message and "hunter2" not in message
    assert time.monotonic() - started < 5


@pytest.mark.gen_test(timeout=60)
async def test_an_outage_is_a_bounded_storage_error_and_service_resumes(store: PostgresStore, postgres: Any) -> None:
    from kvtornado.cache import WriteBehindCache

    cache = WriteBehindCache(store, CacheConfig(flush_interval_ms=50), wall=lambda: CLOCK)
    await cache.start()
    try:
        await cache.put("k", '"before"', durable=True)
        await asyncio.to_thread(postgres.stop)
        started = time.monotonic()
        with pytest.raises(StorageError):
            await store.read("other")
        with pytest.raises(StorageError):
            await store.put("w", "1")
        assert time.monotonic() - started < 2 * store.deadline_s
        await cache.put("k", '"during"')  # acknowledged from memory; the flushes fail and keep it
        assert "does not answer" in (await cache.readiness() or "")  # /readyz: 503
        await asyncio.to_thread(postgres.start)
        # POST /flush fails fast on a failed attempt, and the pool's first reconnect may still meet a server
        # that is starting up: service resumes by itself when a flush succeeds within a bounded time.
        deadline = time.monotonic() + 15
        while True:
            try:
                assert await cache.flush() in (0, 1)  # 0: the periodic flush got there first
                break
            except Overloaded:
                assert time.monotonic() < deadline, "no flush succeeded after PostgreSQL came back"
                await asyncio.sleep(0.1)  # polling for the recovery, with the deadline above
        assert await store.read("k") == Record('"during"', (await cache.get_record("k")).version)  # type: ignore[union-attr]
    finally:
        await cache.stop(10)


@pytest.mark.gen_test
async def test_a_schema_1_database_gets_the_tombstone_index_and_keeps_its_rows(pg_url: str) -> None:
    s = await opened(pg_url)
    await s.write_rows([("k", Record('"v"', 3))])
    await s.close()
    query(pg_url, "DROP INDEX kv_tombstones")
    query(pg_url, "UPDATE kv_meta SET value = 1 WHERE name = 'schema_version'")
    s = await opened(pg_url)
    try:
        assert await s.read("k") == Record('"v"', 3)
        assert ("kv_tombstones",) in query(pg_url, "SELECT indexname FROM pg_indexes WHERE tablename = 'kv'")
        assert query(pg_url, "SELECT value FROM kv_meta WHERE name = 'schema_version'") == [(2,)]
    finally:
        await s.close()
