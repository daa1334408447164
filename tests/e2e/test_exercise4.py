"""Exercise 4 over real HTTP: the write-behind cache behind /save, /get, /delete, plus /flush and /stats.

The flush interval is a minute, so nothing reaches sqlite unless a test flushes (or writes durably): each
test can look at the sqlite file through its own connection and see exactly what was committed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from tornado.ioloop import IOLoop
from tornado.web import Application

from kvtornado.client import AsyncKVClient, Signer
from kvtornado.config import Config
from kvtornado.store import MAX_BUSY_TIMEOUT_MS
from tests.e2e.cache_helpers import (
    CacheApp,
    apoll,
    assert_error,
    assert_ok,
    assert_overloaded,
    db_rows,
    header,
    stored,
    write_lock,
)
from tests.e2e.helpers import FRAMING_ERRORS, VERSION, pipelined_behind_framing_error, raw_head
from tests.unit.fakes import ManualClock

LONG_INTERVAL_MS = 60_000  # only explicit flushes and durable writes reach sqlite during a test
gen_test = pytest.mark.gen_test(timeout=30)


@pytest.fixture
def cache_settings() -> dict[str, Any]:
    """Extra ``cache:`` settings; a test overrides this with ``parametrize``."""
    return {}


@pytest.fixture
def cfg(make_config: Callable[..., Config], cache_settings: dict[str, Any]) -> Config:
    return make_config(cache={"flush_interval_ms": LONG_INTERVAL_MS, **cache_settings})


@pytest.fixture
def busy_timeout_ms() -> int:
    """The store's sqlite busy timeout; a test that holds the write lock makes flushes fail fast with less."""
    return MAX_BUSY_TIMEOUT_MS


@pytest.fixture
def clock() -> ManualClock | None:
    """The cache's clock: the event loop's, unless a test moves time itself with a ``ManualClock``."""
    return None


@pytest.fixture
def cache_app(io_loop: IOLoop, cfg: Config, busy_timeout_ms: int, clock: ManualClock | None) -> Iterator[CacheApp]:
    ca = CacheApp(io_loop, cfg, busy_timeout_ms=busy_timeout_ms, clock=clock)
    yield ca
    ca.close()


@pytest.fixture
def app(io_loop: IOLoop, cache_app: CacheApp) -> Application:
    return cache_app.app


@pytest.fixture
def kv(http_client: Any, base_url: str, signer: Signer) -> AsyncKVClient:
    return AsyncKVClient(base_url, signer, timeout_s=10)


async def save(kv: AsyncKVClient, key: str, value: Any, *, durable: bool = False) -> Any:
    body = json.dumps({"key": key, "value": value}, ensure_ascii=False).encode("utf-8")
    return await kv.request("POST", "/save", params={"durable": 1} if durable else None, body=body)


async def get(kv: AsyncKVClient, key: str) -> Any:
    return await kv.request("GET", "/get", params={"key": key})


async def delete(kv: AsyncKVClient, key: str, *, durable: bool = False) -> Any:
    return await kv.request("DELETE", "/delete", params={"key": key, **({"durable": 1} if durable else {})})


async def flush(kv: AsyncKVClient) -> int:
    doc = assert_ok(await kv.request("POST", "/flush"))
    assert set(doc) == {"flushed"} and isinstance(doc["flushed"], int), doc
    n: int = doc["flushed"]
    return n


async def stats(kv: AsyncKVClient) -> dict[str, Any]:
    doc: dict[str, Any] = assert_ok(await kv.request("GET", "/stats"))
    return doc


@gen_test
async def test_read_your_writes_before_the_flush_and_sqlite_only_after_it(
    kv: AsyncKVClient, cache_app: CacheApp
) -> None:
    value = {"n": 1, "list": [1, 2.5, None, True], "s": "x"}
    assert assert_ok(await save(kv, "k", value)) == {"key": "k", "saved": True, "version": VERSION}
    assert assert_ok(await get(kv, "k")) == {"key": "k", "value": value, "version": VERSION, "expires_at": None}
    assert "k" not in db_rows(cache_app.db), "a non-durable save must not be committed before a flush"
    assert (await stats(kv))["cache"]["dirty"] == 1

    assert await flush(kv) == 1
    assert db_rows(cache_app.db) == {"k": stored(value)}
    assert assert_ok(await get(kv, "k"))["value"] == value

    # A delete is a tombstone: invisible at once, still in sqlite until the next flush.
    assert assert_ok(await delete(kv, "k")) == {"key": "k", "deleted": True, "version": VERSION}
    assert_error(await get(kv, "k"), 404, "not_found")
    assert_error(await delete(kv, "k"), 404, "not_found")
    assert db_rows(cache_app.db) == {"k": stored(value)}
    assert await flush(kv) == 1
    assert db_rows(cache_app.db) == {}
    assert_error(await get(kv, "k"), 404, "not_found")


@gen_test
async def test_flush_answers_how_many_keys_it_committed(kv: AsyncKVClient, cache_app: CacheApp) -> None:
    assert await flush(kv) == 0  # nothing dirty
    for key, value in [("a", 1), ("b", 2), ("c", 3), ("a", 4)]:
        assert_ok(await save(kv, key, value))
    assert await flush(kv) == 3  # "a" twice is one key
    assert db_rows(cache_app.db) == {"a": "4", "b": "2", "c": "3"}
    assert await flush(kv) == 0


STATS_SHAPE = {
    "cache": {"entries", "hits", "misses", "evictions", "dirty"},
    "flush": {"count", "rows", "errors", "last_ms", "pending_retry"},
    "rejected": {"overloaded"},
}


@gen_test
async def test_stats_shape_and_counters(kv: AsyncKVClient, cache_app: CacheApp) -> None:
    before = await stats(kv)
    for section, fields in STATS_SHAPE.items():
        assert isinstance(before.get(section), dict), before
        assert fields <= set(before[section]), (section, before[section])
        for name in fields:
            v = before[section][name]
            assert isinstance(v, int | float) and not isinstance(v, bool) and v >= 0, (section, name, v)
    assert before["cache"]["dirty"] == 0 and before["flush"]["errors"] == 0
    assert before["flush"]["pending_retry"] == 0 and before["rejected"]["overloaded"] == 0

    for i in range(100):
        assert_ok(await save(kv, "hot", i))
    mid = await stats(kv)
    assert mid["cache"]["dirty"] == 1
    assert mid["cache"]["entries"] == before["cache"]["entries"] + 1

    assert await flush(kv) == 1
    after = await stats(kv)
    assert after["flush"]["rows"] == before["flush"]["rows"] + 1, "100 writes of one key coalesce into one row"
    assert after["flush"]["count"] == before["flush"]["count"] + 1
    assert after["flush"]["last_ms"] > 0
    assert after["cache"]["dirty"] == 0 and after["flush"]["pending_retry"] == 0
    assert after["cache"]["entries"] == before["cache"]["entries"] + 1  # now clean, still cached
    assert db_rows(cache_app.db) == {"hot": "99"}

    assert assert_ok(await get(kv, "hot"))["value"] == 99
    assert_error(await get(kv, "never-saved"), 404, "not_found")
    last = await stats(kv)
    assert last["cache"]["hits"] == after["cache"]["hits"] + 1
    assert last["cache"]["misses"] == after["cache"]["misses"] + 1
    assert last["rejected"]["overloaded"] == 0


@gen_test
async def test_durable_writes_are_in_sqlite_when_answered(kv: AsyncKVClient, cache_app: CacheApp) -> None:
    assert_ok(await save(kv, "plain", "p"))
    assert assert_ok(await save(kv, "d", ["durable"], durable=True)) == {"key": "d", "saved": True, "version": VERSION}
    # The durable write's flush commits everything dirty at its start, the earlier write included.
    assert db_rows(cache_app.db) == {"d": stored(["durable"]), "plain": stored("p")}
    s = await stats(kv)
    assert s["cache"]["dirty"] == 0 and s["flush"]["count"] == 1

    assert_ok(await delete(kv, "d", durable=True))
    assert db_rows(cache_app.db) == {"plain": stored("p")}
    assert_error(await get(kv, "d"), 404, "not_found")


@pytest.mark.parametrize("busy_timeout_ms", [50], ids=["busy_timeout=50ms"])
@pytest.mark.parametrize("cache_settings", [{"max_dirty": 3, "writes_while_failing": "accept"}],
                         ids=["max_dirty=3-accept"])
@gen_test
async def test_max_dirty_refuses_new_keys_but_accepts_overwrites(kv: AsyncKVClient, cache_app: CacheApp) -> None:
    # Reaching max_dirty starts a flush at once; with sqlite locked it cannot make room.
    with write_lock(cache_app.db):
        for key in ("a", "b", "c"):
            assert_ok(await save(kv, key, key))
        assert_overloaded(await save(kv, "d", "d"))

        async def failed() -> bool | None:
            return (await stats(kv))["flush"]["errors"] >= 1 or None

        await apoll(failed, timeout_s=10, what="the max_dirty flush to fail")
        assert_error(await get(kv, "d"), 404, "not_found")  # the refused write left nothing behind

        assert_ok(await save(kv, "b", "b2"))  # an overwrite of a dirty key adds no dirty key
        assert assert_ok(await get(kv, "b"))["value"] == "b2"
        assert assert_ok(await get(kv, "a"))["value"] == "a"  # reads keep working
        s = await stats(kv)
        assert s["cache"]["dirty"] == 3
        assert s["rejected"]["overloaded"] == 1

    assert await flush(kv) == 3
    assert db_rows(cache_app.db) == {"a": '"a"', "b": '"b2"', "c": '"c"'}
    assert_ok(await save(kv, "d", "d"))  # room again once committed
    assert (await stats(kv))["rejected"]["overloaded"] == 1


@pytest.mark.parametrize("busy_timeout_ms", [50], ids=["busy_timeout=50ms"])
@pytest.mark.parametrize("cache_settings", [{"durable_timeout_ms": 300}], ids=["durable_timeout=300ms"])
@gen_test
async def test_g9_while_sqlite_fails_writes_are_refused_and_reads_go_on(kv: AsyncKVClient, cache_app: CacheApp) -> None:
    assert_ok(await save(kv, "a", 1))
    with write_lock(cache_app.db):
        assert_overloaded(await kv.request("POST", "/flush"))  # the failed attempt starts the refusal
        refused = await save(kv, "b", 2)
        assert assert_overloaded(refused) >= 1
        assert "retry" in json.loads(refused.body)["message"]
        assert_overloaded(await delete(kv, "a"))
        assert_overloaded(await save(kv, "a", "overwrite"))
        assert assert_ok(await get(kv, "a"))["value"] == 1
        assert_error(await get(kv, "b"), 404, "not_found")
        # A durable write is not acknowledged from memory: it waits for a commit and times out here.
        assert_error(await save(kv, "d", 3, durable=True), 504, "durable_timeout")
        s = await stats(kv)
        assert s["flush"]["refusing_writes"] is True and s["rejected"]["overloaded"] >= 3, s

    async def recovered() -> bool | None:
        return (await kv.request("POST", "/flush")).status == 200 or None

    await apoll(recovered, timeout_s=10, what="a successful flush after the lock is released")
    assert db_rows(cache_app.db) == {"a": "1", "d": "3"}
    assert assert_ok(await save(kv, "b", 2)) == {"key": "b", "saved": True, "version": VERSION}
    assert (await stats(kv))["flush"]["refusing_writes"] is False


@pytest.mark.parametrize("cache_settings", [{"max_dirty_bytes": 4096}], ids=["max_dirty_bytes=4096"])
@gen_test
async def test_max_dirty_bytes_refuses_what_would_pass_it(kv: AsyncKVClient, cache_app: CacheApp) -> None:
    big = "x" * 1500
    assert_ok(await save(kv, "a", big))
    assert_ok(await save(kv, "b", big))
    assert assert_overloaded(await save(kv, "c", big)) >= 1  # 3 x 1.5 KB > 4 KiB
    assert_error(await get(kv, "c"), 404, "not_found")
    assert (await stats(kv))["cache"]["dirty_bytes"] <= 4096
    await flush(kv)  # the refusal has started a flush already; this one waits for everything to be in
    assert set(db_rows(cache_app.db)) == {"a", "b"}
    assert_ok(await save(kv, "c", big))


@pytest.mark.parametrize(("method", "path"), [("POST", "/flush"), ("GET", "/stats")], ids=["flush", "stats"])
@gen_test
async def test_admin_routes_need_auth(kv: AsyncKVClient, cache_app: CacheApp, method: str, path: str) -> None:
    assert_ok(await save(kv, "k", 1))
    resp = await kv.request(method, path, sign=False)
    assert_error(resp, 401, "missing_auth")
    assert header(resp, "WWW-Authenticate") == 'KV-HMAC-SHA256 error="missing_auth"', resp.headers
    bad = AsyncKVClient(kv.base_url, Signer("k1", b"b" * 64), timeout_s=10)
    assert_error(await bad.request(method, path), 401, "bad_signature")
    assert db_rows(cache_app.db) == {}, "an unauthenticated /flush must not flush"
    assert (await stats(kv))["cache"]["dirty"] == 1


@pytest.mark.parametrize("busy_timeout_ms", [50], ids=["busy_timeout=50ms"])
@pytest.mark.parametrize("clock", [ManualClock()], ids=["manual_clock"])
@gen_test
async def test_a_failed_flush_is_retried_after_the_backoff_not_the_next_interval(
    kv: AsyncKVClient, cache_app: CacheApp, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    # G4: the backoff starts at flush_interval_ms and is capped at 5 s, so with a one-minute interval the
    # retry is due 5 s after a failure, without waiting for the next periodic flush.
    caplog.set_level(logging.INFO, logger="kvtornado.cache")
    assert_ok(await save(kv, "k", "v"))
    with write_lock(cache_app.db):
        assert_overloaded(await kv.request("POST", "/flush"))  # POST /flush hears that its attempt failed
    s = await stats(kv)
    assert s["flush"]["errors"] == 1 and s["flush"]["pending_retry"] == 1 and s["flush"]["count"] == 0, s
    assert db_rows(cache_app.db) == {}
    assert assert_ok(await get(kv, "k"))["value"] == "v"

    async def committed() -> bool:
        return db_rows(cache_app.db) == {"k": stored("v")}

    clock.advance(5.0)  # the 5 s backoff runs out; the next periodic flush is 55 s away (unit tests: to the ms)
    await apoll(committed, timeout_s=5, what="the retry (due 5 s after the failure)")
    s = await stats(kv)
    assert s["flush"]["errors"] == 1 and s["flush"]["count"] == 1 and s["flush"]["pending_retry"] == 0, s
    messages = [r.getMessage() for r in caplog.records if r.name == "kvtornado.cache"]
    assert any(m.startswith("flush failed") for m in messages), messages
    assert any(m.startswith("flush recovered after 1 failed attempts") for m in messages), messages


@pytest.mark.parametrize("framing", list(FRAMING_ERRORS.values()), ids=list(FRAMING_ERRORS))
@gen_test
async def test_a_delete_smuggled_behind_a_framing_error_is_never_applied(
    http_server: Any, http_port: int, kv: AsyncKVClient, signer: Signer, framing: str
) -> None:
    assert_ok(await save(kv, "victim", 1))
    host = f"127.0.0.1:{http_port}"
    hidden = raw_head("DELETE", "/delete?key=victim", {
        "Host": host, "Authorization": signer.authorization("DELETE", host, "/delete", "key=victim", b""),
    })
    replies = await pipelined_behind_framing_error(http_port, framing, hidden)
    assert [r.status for r in replies] == [400], replies
    assert assert_ok(await get(kv, "victim"))["value"] == 1
    assert (await stats(kv))["cache"]["dirty"] == 1  # only the save: no tombstone was written
