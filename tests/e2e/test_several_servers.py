"""SPEC §10 at the process level: several real ``exercise4.py`` servers on one Redis (the shared cache, log and
nonces) and one PostgreSQL (the store of record), both throwaway servers (tests/services.py). Read-your-writes
across servers, a replay refused by every other server, increments and conditions racing through all of them,
``kill -9`` of a server losing nothing it acknowledged, PostgreSQL and Redis stopped and started, and
``server.processes`` workers on sqlite."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psycopg
import pytest

from kvtornado.client import KVClient, KVClientError, Signer
from tests.conftest import TEST_KEY_ID, TEST_SECRET, write_config, write_keys
from tests.e2e.cache_helpers import poll
from tests.e2e.helpers import ServerProcess

PUBLIC_HOST = "kv.test"  # what every client signs: any server may be the one that answers


class Cluster:
    """``n`` servers on one Redis database and one PostgreSQL database, each started from its own folder."""

    def __init__(self, folder: Path, redis_url: str, pg_url: str, **cache: Any) -> None:
        self.folder = folder
        self.redis_url = redis_url
        self.pg_url = pg_url
        self.cache = {"backend": "redis", "redis_url": redis_url, "flush_interval_ms": 100,
                      "reclaim_idle_ms": 500, **cache}
        self.servers: list[ServerProcess] = []
        self._stack = ExitStack()

    def start(self, **cache: Any) -> ServerProcess:
        folder = self.folder / f"s{len(self.servers)}"
        write_keys(folder / "keys" / "kv.keys", [f"{TEST_KEY_ID} {TEST_SECRET.decode()}"])
        config = write_config(folder, {"auth": {"public_host": PUBLIC_HOST},
                                       "storage": {"backend": "postgresql", "url": self.pg_url},
                                       "cache": {**self.cache, **cache}})
        srv = self._stack.enter_context(ServerProcess.start(4, config))
        srv.wait_listening()
        self.servers.append(srv)
        return srv

    def client(self, srv: ServerProcess) -> KVClient:
        return self._stack.enter_context(proxied(srv))

    def stop(self) -> None:
        try:
            for srv in self.servers:
                if srv.proc.poll() is None:
                    assert srv.stop() == 0, srv.lines
        finally:
            self._stack.close()

    def rows(self) -> dict[str, Any]:
        with psycopg.connect(self.pg_url, autocommit=True) as conn:
            return {k: v for k, v in conn.execute("SELECT key, value FROM kv WHERE value IS NOT NULL")}


def proxied(srv: ServerProcess) -> KVClient:
    """A client of ``srv`` as if through the load balancer: it sends and signs the public host name."""
    kv = KVClient(srv.base_url, Signer(TEST_KEY_ID, TEST_SECRET), timeout_s=20)
    kv.host_header = PUBLIC_HOST
    return kv


@pytest.fixture
def cluster(tmp_path: Path, redis_url: str, postgres: Any) -> Iterator[Cluster]:
    if not postgres.running():
        postgres.start()
    c = Cluster(tmp_path, redis_url, postgres.create_db("cluster"))
    try:
        yield c
    finally:
        c.stop()


def refused(call: Any, status: int, code: str) -> KVClientError:
    with pytest.raises(KVClientError) as err:
        call()
    assert (err.value.status, err.value.code) == (status, code), err.value.doc
    return err.value


def test_every_server_reads_the_others_writes_and_refuses_their_replays(cluster: Cluster) -> None:
    a, b, c = (cluster.client(cluster.start()) for _ in range(3))
    v = a.save("k", {"n": 1})["version"]
    assert b.get_record("k")["version"] == v and c.get("k") == {"n": 1}
    b.delete("k")
    refused(lambda: c.get("k"), 404, "not_found")
    refused(lambda: a.save("k", 2, if_version=v), 412, "version_mismatch")
    c.save("p/1", 1)
    b.save("p/2", 2)
    assert [item["key"] for item in a.keys(prefix="p/")["keys"]] == ["p/1", "p/2"]
    # One signed request, sent to the server it was made for and then to the two others.
    req = a.build("POST", "/save", body=b'{"key": "once", "value": 1}')
    assert a._send(req).status == 200
    for other in (b, c):
        resp = other._send(req)
        assert resp.status == 401 and b"replayed_nonce" in resp.body, resp.body


def test_increments_and_creates_racing_through_three_servers(cluster: Cluster) -> None:
    servers = [cluster.start() for _ in range(3)]

    def count(i: int) -> None:
        with proxied(servers[i % 3]) as kv:
            for _ in range(40):
                kv.incr("n")

    def create(i: int) -> bool:
        with proxied(servers[i % 3]) as kv:
            try:
                kv.save("once", i, if_version=0)
            except KVClientError as exc:
                assert exc.status == 412, exc.doc
                return False
            return True

    with ThreadPoolExecutor(9) as pool:
        list(pool.map(count, range(9)))
        won = list(pool.map(create, range(9)))
    a = cluster.client(servers[0])
    assert a.get("n") == 9 * 40
    assert won.count(True) == 1
    assert a.get("once") == won.index(True)


def test_kill_9_of_a_server_after_300_acknowledged_writes_loses_none(cluster: Cluster) -> None:
    survivor = cluster.client(cluster.start())
    doomed = cluster.start(flush_interval_ms=5)  # its flusher holds entries when it dies
    kv = cluster.client(doomed)
    versions = {f"w{i}": kv.save(f"w{i}", i)["version"] for i in range(300)}
    doomed.proc.kill()
    doomed.proc.wait(timeout=10)
    assert survivor.flush()["flushed"] >= 0  # takes over what the dead flusher held, once idle
    poll(lambda: len(cluster.rows()) == 300, timeout_s=20, what="every write to be committed")
    assert {k: survivor.get_record(k)["version"] for k in versions} == versions
    assert cluster.rows() == {f"w{i}": str(i) for i in range(300)}


def test_postgresql_stopped_and_started_loses_nothing_acknowledged(cluster: Cluster, postgres: Any) -> None:
    a, b = cluster.client(cluster.start()), cluster.client(cluster.start())
    a.save("before", 1, durable=True)
    postgres.stop()
    acknowledged: dict[str, int] = {}
    try:
        started = time.monotonic()
        i = 0
        while True:  # acknowledged until a flush round has failed (a pool connection wait), then G9
            i += 1
            try:
                acknowledged[f"k{i}"] = (a if i % 2 else b).save(f"k{i}", i)["version"]
            except KVClientError as exc:
                assert (exc.status, exc.code) == (503, "overloaded"), exc.doc
                break
            assert time.monotonic() - started < 20, "no write was refused while PostgreSQL was down"
            time.sleep(0.02)  # spread the writes over flush rounds
        for kv in (a, b):  # every server refuses now, from the one failing mark in Redis
            refused(lambda kv=kv: kv.save("refused", 1), 503, "overloaded")
        refused(lambda: a.flush(), 503, "overloaded")
        assert acknowledged
    finally:
        postgres.start()
    poll(lambda: _flushed(a), timeout_s=30, what="a flush to succeed again")
    for key, version in acknowledged.items():
        assert b.get_record(key)["version"] == version
    rows = cluster.rows()
    assert all(rows[key] == key[1:] for key in acknowledged) and rows["before"] == "1"
    b.save("after", 2, durable=True)


def _flushed(kv: KVClient) -> bool:
    try:
        kv.flush()
    except KVClientError as exc:
        assert exc.status in (503, 504), exc.doc
        return False
    return True


def test_redis_stopped_and_started_loses_nothing_acknowledged(tmp_path: Path, postgres: Any) -> None:
    from tests.services import start_redis

    if not postgres.running():
        postgres.start()
    folder = tmp_path / "redis"
    folder.mkdir()
    redis = start_redis(folder, appendfsync="always")  # every acknowledged write is on disk before Redis answers
    c = Cluster(tmp_path, redis.url(0), postgres.create_db("rs"), flush_interval_ms=60_000)
    try:
        a, b = c.client(c.start()), c.client(c.start())
        versions = {f"k{i}": (a if i % 2 else b).save(f"k{i}", i)["version"] for i in range(50)}
        redis.stop()
        started = time.monotonic()
        refused(lambda: a.get("k1"), 503, "overloaded")
        refused(lambda: b.save("during", 1), 503, "overloaded")
        assert time.monotonic() - started < 15
        redis.start()
        poll(lambda: _answers(a), timeout_s=20, what="Redis to be used again")
        assert {k: b.get_record(k)["version"] for k in versions} == versions
        assert a.flush()["flushed"] == 50
        assert len(c.rows()) == 50
        assert b.save("k0", "new")["version"] > max(versions.values())
    finally:
        try:
            c.stop()
        finally:
            redis.stop()


def _answers(kv: KVClient) -> bool:
    try:
        kv.get("k0")
    except KVClientError as exc:
        assert exc.status == 503, exc.doc
        return False
    return True


def test_server_processes_fork_workers_that_share_the_port_and_stop_together(tmp_path: Path,
                                                                           redis_url: str) -> None:
    write_keys(tmp_path / "keys" / "kv.keys", [f"{TEST_KEY_ID} {TEST_SECRET.decode()}"])
    config = write_config(tmp_path, {"server": {"processes": 2},
                                     "cache": {"backend": "redis", "redis_url": redis_url}})
    with ServerProcess.start(4, config) as srv:
        srv.wait_listening()
        srv.wait_for(r"listening on")  # the second worker
        with ThreadPoolExecutor(4) as pool:
            def write(i: int) -> int:
                with KVClient(srv.base_url, Signer(TEST_KEY_ID, TEST_SECRET), timeout_s=20) as kv:
                    return int(kv.save(f"k{i}", i)["version"])
            versions = list(pool.map(write, range(40)))
        assert len(set(versions)) == 40
        assert srv.stop() == 0, srv.lines
    assert sum("listening on" in line for line in srv.lines) == 2, srv.lines
    # Every acknowledged write was flushed into the one sqlite file by the stop.
    import sqlite3
    from contextlib import closing

    # closing(): a connection's own context manager only commits; an unclosed one warns on 3.13.
    with closing(sqlite3.connect(tmp_path / "data" / "kv.sqlite3")) as conn:
        assert conn.execute("SELECT count(*) FROM kv").fetchone()[0] == 40
