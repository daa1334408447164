"""Both stores in shared mode (SPEC §10: several Redis flushers write them): row writes are idempotent and
version-ordered, a delete leaves a tombstone that refuses an older save arriving later, tombstones are
reclaimed below a version, and several servers share the store (no one-server lock on PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvtornado.ops import Record
from kvtornado.store import SqliteStore


@pytest.fixture(params=["sqlite", "postgresql"])
def open_shared(request: pytest.FixtureRequest, tmp_path: Path, io_loop: Any) -> Iterator[Any]:
    """A function opening one more shared store on the same database; every one opened is closed."""
    opened: list[Any] = []
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None

    async def open_one() -> Any:
        if url is not None:
            from kvtornado.pgstore import PostgresStore

            store: Any = PostgresStore(url, shared=True)
        else:
            store = SqliteStore(tmp_path / "kv.sqlite3", shared=True, lock=not opened)
        await store.open()
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        io_loop.run_sync(store.close)


@pytest.mark.gen_test
async def test_row_writes_are_version_ordered_and_deletes_leave_tombstones(open_shared: Any) -> None:
    store = await open_shared()
    await store.write_rows([("k", Record('"v7"', 7))])
    await store.write_rows([("k", Record('"v5"', 5))])  # an older write arriving late: ignored
    assert await store.read("k") == Record('"v7"', 7)
    await store.write_rows([("k", Record(None, 9))])  # a delete
    assert (await store.read("k") or Record(None, 0)).value is None
    await store.write_rows([("k", Record('"v8"', 8))])  # older than the delete: the tombstone refuses it
    assert (await store.read("k") or Record(None, 0)).value is None
    assert await store.range("", None, 10, 0.0) == []
    await store.write_rows([("k", Record('"v10"', 10))])  # newer than the delete: it is back
    assert await store.read("k") == Record('"v10"', 10)
    await store.write_rows([("k", Record(None, 6))])  # a delete older than the row: ignored
    assert await store.read("k") == Record('"v10"', 10)


@pytest.mark.gen_test
async def test_tombstones_below_a_version_are_reclaimed(open_shared: Any) -> None:
    store = await open_shared()
    await store.write_rows([("a", Record(None, 3)), ("b", Record(None, 8))])
    await store.reclaim_tombstones(5)  # no pending write below 5 remains: a's tombstone can go
    await store.write_rows([("a", Record('"late"', 2)), ("b", Record('"late"', 7))])
    assert await store.read("a") == Record('"late"', 2)  # (only a write older than 5 could be refused wrongly)
    assert (await store.read("b") or Record(None, 0)).value is None


@pytest.mark.gen_test
async def test_several_servers_share_one_store_and_reserve_disjoint_versions(open_shared: Any) -> None:
    first, second = await open_shared(), await open_shared()
    blocks = [await first.reserve_versions(100), await second.reserve_versions(100),
              await first.reserve_versions(100)]
    ranges = [set(range(lo, hi + 1)) for lo, hi in blocks]
    assert sum(len(r) for r in ranges) == len(set().union(*ranges)) == 300
    await second.write_rows([("k", Record("1", blocks[1][0]))])
    assert await first.read("k") == Record("1", blocks[1][0])
