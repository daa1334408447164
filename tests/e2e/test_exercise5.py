"""Cross-cutting business rules and process-level guarantees of the write-behind service (SPEC §7).

The first part drives exercise 4 in this process over real HTTP (last write wins, deletes stay deleted,
unicode round-trips). The second runs ``python exercise4.py`` as a real process: SIGTERM/SIGINT flush
everything (G7), ``kill -9`` loses nothing durable or older than a flush (G8), restarts keep data, and a
second sqlite connection holding the write lock makes flushes fail without losing a write (G4, G5, G6).
"""

from __future__ import annotations

import http.client
import json
import random
import signal
import socket
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from tornado.ioloop import IOLoop
from tornado.web import Application

from kvtornado.client import AsyncKVClient, KVClient, KVClientError, Signer
from kvtornado.config import Config
from tests.conftest import TEST_KEY_ID, TEST_SECRET, write_config
from tests.e2e.cache_helpers import (
    CacheApp,
    Exercise4,
    assert_error,
    assert_ok,
    assert_overloaded,
    db_rows,
    integrity,
    poll,
    stored,
    write_lock,
)
from tests.e2e.helpers import PROCESS_TIMEOUT_S, VERSION, ServerProcess

gen_test = pytest.mark.gen_test(timeout=30)

UNICODE_CASES = {
    "ключ": "значение",
    "键🔑": {"值": ["🙂", "e\u0301", "\u00e9"]},
    "space and/slash?q=1&x=%41#frag": "plain+plus",
    "tab\tnew\nline": "\u0000nul and \u2028 line separator",
    "\u00e9": "precomposed",  # must stay distinct from the decomposed key below
    "e\u0301": "decomposed",
    '"quoted" \\ back': '"\\',
}


# --- cross-cutting rules over HTTP, exercise 4 in this process -------------------------------------------


@pytest.fixture
def cache_app(io_loop: IOLoop, make_config: Callable[..., Config]) -> Iterator[CacheApp]:
    ca = CacheApp(io_loop, make_config(cache={"flush_interval_ms": 60_000}))
    yield ca
    ca.close()


@pytest.fixture
def app(io_loop: IOLoop, cache_app: CacheApp) -> Application:
    return cache_app.app


@pytest.fixture
def kv(http_client: Any, base_url: str, signer: Signer) -> AsyncKVClient:
    return AsyncKVClient(base_url, signer, timeout_s=10)


async def current(kv: AsyncKVClient, key: str) -> Any:
    """The value ``/get`` answers, or ``MISSING`` for a 404."""
    resp = await kv.request("GET", "/get", params={"key": key})
    if resp.status == 404:
        assert_error(resp, 404, "not_found")
        return MISSING
    doc = assert_ok(resp)
    assert doc["key"] == key, doc
    return doc["value"]


MISSING = object()


async def flush(kv: AsyncKVClient) -> int:
    n: int = assert_ok(await kv.request("POST", "/flush"))["flushed"]
    return n


@gen_test
async def test_last_write_wins_across_saves_and_deletes(kv: AsyncKVClient, cache_app: CacheApp) -> None:
    await kv.save("k", "v1")
    await kv.save("k", "v2")
    await kv.delete("k")
    await kv.save("k", "v3")
    assert await current(kv, "k") == "v3"
    assert await flush(kv) == 1
    assert db_rows(cache_app.db) == {"k": stored("v3")}

    await kv.save("k", "v4")
    await kv.delete("k")
    assert await current(kv, "k") is MISSING
    await flush(kv)
    assert db_rows(cache_app.db) == {}

    # A model: random saves, deletes and flushes on a few keys against a plain dict; after every flush
    # sqlite holds exactly the model, and every read at any time answers from it.
    rng = random.Random(20240501)
    model: dict[str, Any] = {}
    keys = ["a", "b", "c", "d"]
    for step in range(150):
        key = rng.choice(keys)
        roll = rng.random()
        if roll < 0.55:
            value = rng.choice([step, f"s{step}", [step], {"n": step}, None, False])
            assert_ok(await kv.request("POST", "/save", body=json.dumps({"key": key, "value": value}).encode()))
            model[key] = value
        elif roll < 0.85:
            resp = await kv.request("DELETE", "/delete", params={"key": key})
            if key in model:
                assert assert_ok(resp) == {"key": key, "deleted": True, "version": VERSION}
                del model[key]
            else:
                assert_error(resp, 404, "not_found")
        elif roll < 0.95:
            await flush(kv)
            assert db_rows(cache_app.db) == {k: stored(v) for k, v in model.items()}, step
        else:
            assert_ok(await kv.request("POST", "/save", params={"durable": 1},
                                       body=json.dumps({"key": key, "value": step}).encode()))
            model[key] = step
            assert db_rows(cache_app.db) == {k: stored(v) for k, v in model.items()}, step
        assert await current(kv, key) == model.get(key, MISSING), step
    await flush(kv)
    assert db_rows(cache_app.db) == {k: stored(v) for k, v in model.items()}
    for key in keys:
        assert await current(kv, key) == model.get(key, MISSING)


@gen_test
async def test_a_deleted_key_stays_deleted_across_flushes(kv: AsyncKVClient, cache_app: CacheApp) -> None:
    await kv.save("gone", {"was": "here"})
    await kv.save("kept", 1)
    await flush(kv)
    assert set(db_rows(cache_app.db)) == {"gone", "kept"}

    await kv.delete("gone")
    for i in range(3):  # later flushes (with other keys in them) never bring it back
        await kv.save("kept", i)
        await flush(kv)
        assert await current(kv, "gone") is MISSING
        assert db_rows(cache_app.db) == {"kept": stored(i)}
    before = (await kv.stats())["cache"]["misses"]
    assert await current(kv, "gone") is MISSING  # not cached: the miss reads sqlite, which has no row
    assert (await kv.stats())["cache"]["misses"] == before + 1
    with pytest.raises(KVClientError) as err:
        await kv.delete("gone")
    assert err.value.status == 404 and err.value.code == "not_found"


@gen_test
async def test_unicode_keys_and_values_round_trip_through_a_flush(kv: AsyncKVClient, cache_app: CacheApp) -> None:
    for key, value in UNICODE_CASES.items():
        assert await kv.save(key, value) == {"key": key, "saved": True, "version": VERSION}
    for key, value in UNICODE_CASES.items():
        assert await current(kv, key) == value
    assert await flush(kv) == len(UNICODE_CASES)
    assert db_rows(cache_app.db) == {k: stored(v) for k, v in UNICODE_CASES.items()}
    for key, value in UNICODE_CASES.items():
        assert await current(kv, key) == value


# --- a real exercise4.py process -----------------------------------------------------------------------


@pytest.fixture
def start_server(tmp_path: Path, keys_file: Path) -> Iterator[Callable[..., Exercise4]]:
    """``start_server(cache={...})`` -> a listening ``exercise4.py``; every one is killed at teardown."""
    started: list[Exercise4] = []

    def start(**sections: Any) -> Exercise4:
        config = write_config(tmp_path, sections, name="ex4.yaml")
        srv = Exercise4(config)
        started.append(srv)
        return srv.wait_listening()

    yield start
    for srv in started:
        srv.kill()


def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "kv.sqlite3"  # write_config's storage.path, relative to the config's folder


def stop_cleanly(srv: Exercise4, sig: signal.Signals = signal.SIGTERM) -> None:
    srv.send(sig)
    status = srv.wait_exit()
    assert status == 0, (status, srv.log)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_flushes_every_acknowledged_write(
    start_server: Callable[..., Exercise4], tmp_path: Path, sig: signal.Signals
) -> None:
    srv = start_server(cache={"flush_interval_ms": 600_000})
    n = 40
    with srv.client() as c:
        for i in range(n):
            assert c.save(f"k{i}", {"i": i}) == {"key": f"k{i}", "saved": True, "version": VERSION}
        c.save("k0", "last")  # overwrite: the committed state is the last acknowledged one
        s = c.stats()
        assert s["cache"]["dirty"] == n and s["flush"]["count"] == 0, s
    # Really write-behind: acknowledged, and not one row in sqlite yet.
    assert db_rows(db_path(tmp_path)) == {}

    stop_cleanly(srv, sig)
    rows = db_rows(db_path(tmp_path))
    assert rows == {"k0": stored("last"), **{f"k{i}": stored({"i": i}) for i in range(1, n)}}
    assert integrity(db_path(tmp_path)) == "ok"
    assert f"shutdown: flushed {n} writes" in srv.log, srv.log
    assert "Traceback" not in srv.log, srv.log


def test_sigterm_that_cannot_flush_in_time_exits_nonzero_with_the_count(
    start_server: Callable[..., Exercise4], tmp_path: Path
) -> None:
    srv = start_server(cache={"flush_interval_ms": 600_000, "shutdown_timeout_s": 1})
    with srv.client() as c:
        for i in range(3):
            c.save(f"k{i}", i)
    with write_lock(db_path(tmp_path)):  # the shutdown flush waits for sqlite's lock longer than 1 s
        srv.send(signal.SIGTERM)
        srv.wait_line(r"shutdown: 3 of 3 acknowledged writes could not be flushed")
        # Still locked: the writer thread sits in sqlite's 5 s busy wait, and the process must not wait for
        # it (G7: "up to shutdown_timeout_s"); the bound leaves seconds of slack for a slow machine.
        status = srv.wait_exit(timeout_s=3.0)
    assert status > 0, (status, srv.log)  # it exited by itself, with a failure status
    assert "could not flush 3 acknowledged writes within 1 s" in srv.log, srv.log
    assert integrity(db_path(tmp_path)) == "ok"


def test_sigterm_right_after_the_listening_line_exits_cleanly(start_server: Callable[..., Exercise4]) -> None:
    # A supervisor may signal as soon as the service says it listens: the signal must already be handled.
    srv = start_server()
    stop_cleanly(srv)
    assert "shutdown: flushed 0 writes" in srv.log, srv.log


def test_kill_9_loses_nothing_durable_nor_older_than_a_flush(
    start_server: Callable[..., Exercise4], tmp_path: Path
) -> None:
    interval_ms = 200
    srv = start_server(cache={"flush_interval_ms": interval_ms})
    with srv.client() as c:
        first = {f"old{i}": i for i in range(30)}
        for k, v in first.items():
            c.save(k, v)
        count0 = c.stats()["flush"]["count"]
        # Once a flush that started after the last acknowledgement has finished, the batch is committed.
        poll(lambda: (s := c.stats()) and (s["flush"]["count"] >= count0 + 2 or s["cache"]["dirty"] == 0),
             timeout_s=10, what="a periodic flush after the first batch")
        durable = {f"durable{i}": f"d{i}" for i in range(5)}
        for k, v in durable.items():
            assert c.save(k, v, durable=True) == {"key": k, "saved": True, "version": VERSION}
        for i in range(5):  # acknowledged just before the crash: these may or may not survive
            c.save(f"young{i}", i)
    srv.kill()
    assert srv.proc.returncode == -signal.SIGKILL

    db = db_path(tmp_path)
    assert integrity(db) == "ok"
    rows = db_rows(db)
    for k, v in durable.items():
        assert rows.get(k) == stored(v), (k, rows)
    for k, v in first.items():
        assert rows.get(k) == stored(v), (k, rows)
    assert set(rows) <= set(first) | set(durable) | {f"young{i}" for i in range(5)}

    # The service starts again on the crashed file and serves what was committed.
    again = start_server(cache={"flush_interval_ms": interval_ms})
    with again.client() as c:
        for k, v in durable.items():
            assert c.get(k) == v
        assert c.get("old29") == 29
    stop_cleanly(again)
    assert integrity(db) == "ok"


def test_restart_keeps_data(start_server: Callable[..., Exercise4], tmp_path: Path) -> None:
    srv = start_server(cache={"flush_interval_ms": 600_000})
    with srv.client() as c:
        c.save("plain", {"a": [1, 2, 3]})
        for key, value in UNICODE_CASES.items():
            c.save(key, value)
        c.save("deleted", 1)
        c.delete("deleted")
    stop_cleanly(srv)

    again = start_server(cache={"flush_interval_ms": 600_000})
    with again.client() as c:
        assert c.get("plain") == {"a": [1, 2, 3]}
        for key, value in UNICODE_CASES.items():
            assert c.get(key) == value
        with pytest.raises(KVClientError) as err:
            c.get("deleted")
        assert err.value.status == 404
    stop_cleanly(again)
    assert integrity(db_path(tmp_path)) == "ok"


def test_locked_sqlite_fails_flushes_without_losing_writes(
    start_server: Callable[..., Exercise4], tmp_path: Path
) -> None:
    max_dirty = 5
    srv = start_server(cache={"flush_interval_ms": 100, "max_dirty": max_dirty})
    db = db_path(tmp_path)
    with srv.client() as c:
        c.save("committed", "before the lock", durable=True)
        with closing(sqlite3.connect(str(db))) as conn, conn:  # a row the cache has never seen
            conn.execute("INSERT INTO kv(key, value, version, updated_at) VALUES ('outside', '\"from sqlite\"', 1, 0)")
        outside = {"committed": stored("before the lock"), "outside": stored("from sqlite")}
        with write_lock(db):
            acknowledged = {f"new{i}": i for i in range(max_dirty)}
            for k, v in acknowledged.items():
                c.save(k, v)
            resp = c.request("POST", "/save", body=json.dumps({"key": "one-too-many", "value": 0}).encode())
            assert_overloaded(resp)
            c.save("new0", "overwritten")  # an overwrite of a dirty key is still accepted
            acknowledged["new0"] = "overwritten"

            def failed_flush() -> dict[str, Any] | None:
                doc: dict[str, Any] = c.stats()
                return doc if doc["flush"]["errors"] > 0 else None

            # The first attempt waits out sqlite's busy timeout (5 s) before it fails.
            s = poll(failed_flush, timeout_s=15, what="a failed flush in /stats", interval_s=0.1)
            assert s["cache"]["dirty"] == max_dirty and s["flush"]["pending_retry"] == max_dirty, s
            assert s["rejected"]["overloaded"] >= 1, s
            # Reads keep working: dirty keys from memory, committed ones from the cache or sqlite.
            for k, v in acknowledged.items():
                assert c.get(k) == v
            assert c.get("committed") == "before the lock"
            misses = c.stats()["cache"]["misses"]
            assert c.get("outside") == "from sqlite"  # a miss: read from sqlite under the write lock
            assert c.stats()["cache"]["misses"] == misses + 1
            with pytest.raises(KVClientError) as err:
                c.get("one-too-many")
            assert err.value.status == 404
            assert db_rows(db) == outside, "nothing can be committed while the lock is held"

        def flushed() -> bool:
            resp = c.request("POST", "/flush")  # retries at once, whatever the backoff
            return resp.status == 200 and c.stats()["cache"]["dirty"] == 0

        poll(flushed, timeout_s=15, what="a successful POST /flush after the lock is released", interval_s=0.1)
        expected = {**outside, **{k: stored(v) for k, v in acknowledged.items()}}
        assert db_rows(db) == expected
        s = c.stats()
        assert s["flush"]["pending_retry"] == 0 and s["flush"]["errors"] >= 1, s
        c.save("one-too-many", 0)  # room again
    assert "flush failed" in srv.log and "flush recovered" in srv.log, srv.log
    stop_cleanly(srv)
    assert db_rows(db) == {**expected, "one-too-many": "0"}
    assert integrity(db) == "ok"


def test_durable_write_times_out_while_locked_and_is_committed_later(
    start_server: Callable[..., Exercise4], tmp_path: Path
) -> None:
    srv = start_server(cache={"flush_interval_ms": 100, "durable_timeout_ms": 200})
    db = db_path(tmp_path)
    with srv.client() as c:
        with write_lock(db):
            resp = c.request("POST", "/save", params={"durable": 1},
                             body=json.dumps({"key": "slow", "value": ["still", "kept"]}).encode())
            assert_error(resp, 504, "durable_timeout")
            assert c.get("slow") == ["still", "kept"]  # acknowledged as pending: read-your-writes holds
            assert "slow" not in db_rows(db)
        poll(lambda: db_rows(db).get("slow") == stored(["still", "kept"]), timeout_s=15,
             what="the timed-out durable write to be committed after the lock is released", interval_s=0.05)
        assert c.get("slow") == ["still", "kept"]
    stop_cleanly(srv)
    assert db_rows(db) == {"slow": stored(["still", "kept"])}


def test_kill_9_during_an_outage_loses_nothing_acknowledged_after_the_failure(
    start_server: Callable[..., Exercise4], tmp_path: Path
) -> None:
    # G9 (writes_while_failing: refuse, the default): from the first failed attempt on, no write is acknowledged
    # from memory alone, so a crash during the outage loses at most what G8 allows.
    srv = start_server(cache={"flush_interval_ms": 100})
    db = db_path(tmp_path)
    with srv.client() as c:
        c.save("before", "committed", durable=True)
        with write_lock(db):
            c.save("early", "acknowledged before the failure was known")  # within G8's bound: may be lost

            def failed_flush() -> dict[str, Any] | None:
                doc: dict[str, Any] = c.stats()
                return doc if doc["flush"]["errors"] > 0 else None

            poll(failed_flush, timeout_s=15, what="a failed flush in /stats", interval_s=0.1)
            statuses: Counter[int] = Counter()
            for i in range(300):
                resp = c.request("POST", "/save", body=json.dumps({"key": f"during{i}", "value": i}).encode())
                statuses[resp.status] += 1
            assert statuses == {503: 300}, statuses
            srv.kill()
    assert integrity(db) == "ok"
    rows = db_rows(db)
    assert rows.get("before") == stored("committed")
    assert set(rows) <= {"before", "early"}


# --- replays across restarts (SPEC §4) -------------------------------------------------------------------


def _send_raw(port: int, authorization: str, path: str = "/authorize") -> tuple[int, dict[str, Any]]:
    """Exactly these bytes, as a captured request would be replayed (no client re-signs it)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=PROCESS_TIMEOUT_S)
    try:
        conn.request("GET", path, headers={"Host": f"127.0.0.1:{port}", "Authorization": authorization})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@pytest.mark.parametrize("exercise", [2, 4])
@pytest.mark.parametrize("stop", ["SIGTERM", "kill -9"])
def test_a_request_accepted_before_a_restart_is_refused_after_it(
    tmp_path: Path, keys_file: Path, exercise: int, stop: str
) -> None:
    config = write_config(tmp_path, name="replay.yaml")
    signer = Signer(TEST_KEY_ID, TEST_SECRET)
    with ServerProcess.start(exercise, config) as srv:
        port = srv.wait_listening()
        host = f"127.0.0.1:{port}"
        now_s = int(time.time())
        captured = {
            "now": signer.authorization("GET", host, "/authorize", "", b""),
            # a client whose clock runs 120 s ahead: still inside the window after the restart
            "ahead": signer.authorization("GET", host, "/authorize", "", b"", ts=now_s + 120),
        }
        for authorization in captured.values():
            assert _send_raw(port, authorization)[0] == 200
        if stop == "SIGTERM":
            assert srv.stop() == 0, srv.lines
        else:
            srv.proc.kill()
            srv.proc.wait(timeout=PROCESS_TIMEOUT_S)
    with ServerProcess.start(exercise, config, "--port", str(port)) as again:
        assert again.wait_listening() == port
        for name, authorization in captured.items():
            status, doc = _send_raw(port, authorization)
            assert status == 401 and doc["error"] in ("replayed_nonce", "stale_timestamp"), (name, doc)
        # The one a future-dated clock signed is refused by its nonce, whatever kind of stop it was.
        assert _send_raw(port, captured["ahead"])[1]["error"] == "replayed_nonce"
        # A client that signs anew gets in (the project client re-signs a stale_timestamp by itself).
        with KVClient(again.base_url, signer) as c:
            assert c.authorize()["key_id"] == TEST_KEY_ID
        assert again.stop() == 0, again.lines


@pytest.mark.parametrize("stop", ["SIGTERM", "kill -9"])
def test_a_start_that_fails_before_serving_keeps_the_journal_as_it_found_it(
    tmp_path: Path, keys_file: Path, stop: str
) -> None:
    config = write_config(tmp_path, name="replay.yaml")
    signer = Signer(TEST_KEY_ID, TEST_SECRET)
    with ServerProcess.start(4, config) as srv:
        port = srv.wait_listening()
        captured = signer.authorization("GET", f"127.0.0.1:{port}", "/authorize", "", b"")
        assert _send_raw(port, captured)[0] == 200
        if stop == "SIGTERM":
            assert srv.stop() == 0, srv.lines
        else:
            srv.proc.kill()
            srv.proc.wait(timeout=PROCESS_TIMEOUT_S)
    with socket.socket() as taken:  # the next start opens the journal, then cannot listen
        taken.bind(("127.0.0.1", port))
        taken.listen()
        with ServerProcess.start(4, config, "--port", str(port)) as failed:
            assert failed.proc.wait(timeout=PROCESS_TIMEOUT_S) == 2
    with ServerProcess.start(4, config, "--port", str(port)) as again:
        assert again.wait_listening() == port
        status, doc = _send_raw(port, captured)
        unclean = [line for line in again.lines if "no clean stop recorded" in line]
        if stop == "SIGTERM":  # the failed start kept the clean stop's nonces: refused by its nonce
            assert (status, doc["error"], unclean) == (401, "replayed_nonce", []), (doc, again.lines)
        else:  # ... and did not turn a kill -9 into a clean stop: refused by the start-up floor
            assert (status, doc["error"]) == (401, "stale_timestamp") and unclean, (doc, again.lines)
        assert again.stop() == 0, again.lines
