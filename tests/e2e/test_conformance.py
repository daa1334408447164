"""One behaviour, every pairing (STYLE 20, SPEC §10): the §5/§7 rules run on real ``exercise4.py`` (the
write-behind cache) and ``exercise3.py`` (write-through) processes over each store of record — sqlite and
PostgreSQL (a throwaway server, tests/services.py; those pairings are skipped without its binaries and fail
under ``KV_REQUIRE_SERVICES=1``), and ``exercise4.py`` with the Redis cache (``cache.backend: redis``, a
throwaway ``redis-server``) over each.

One server per pairing serves the module (each test has its own key prefix); the restart, second-server and
outage tests start their own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvtornado.client import KVClient, KVClientError, Signer
from tests.conftest import TEST_KEY_ID, TEST_SECRET, write_config, write_keys
from tests.e2e.cache_helpers import header, poll
from tests.e2e.helpers import ServerProcess

PAIRINGS = [
    pytest.param((4, "sqlite"), id="memory+sqlite"),
    pytest.param((4, "postgresql"), id="memory+postgresql"),
    pytest.param((3, "sqlite"), id="write-through+sqlite"),
    pytest.param((3, "postgresql"), id="write-through+postgresql"),
    pytest.param((4, "sqlite", "redis"), id="redis+sqlite"),
    pytest.param((4, "postgresql", "redis"), id="redis+postgresql"),
]


class Pairing:
    """An exercise and a store of record; ``sections`` is the config that selects them."""

    def __init__(self, request: pytest.FixtureRequest, exercise: int, backend: str, cache: str = "memory") -> None:
        self.exercise = exercise
        self.backend = backend
        self.cache = cache
        self.postgres: Any = None
        self.redis: Any = None
        if cache == "redis":
            self.redis = request.getfixturevalue("redis_server")
            if not self.redis.running():
                self.redis.start()
        if backend == "postgresql":
            self.postgres = request.getfixturevalue("postgres")
            if not self.postgres.running():
                self.postgres.start()

    def sections(self) -> dict[str, Any]:
        """A fresh store each call: a new database for PostgreSQL (sqlite's lives in the server's folder)."""
        # A long flush interval: the cache's writes stay pending until a flush is asked for (or a stop).
        sections: dict[str, Any] = {"cache": {"flush_interval_ms": 60_000}}
        if self.cache == "redis":
            sections["cache"].update(backend="redis", redis_url=self.redis.url())
        if self.backend == "postgresql":
            sections["storage"] = {"backend": "postgresql", "url": self.postgres.create_db("conf")}
        return sections

    def start(self, folder: Path, sections: dict[str, Any]) -> ServerProcess:
        keys = folder / "keys" / "kv.keys"
        if not keys.exists():
            write_keys(keys, [f"{TEST_KEY_ID} {TEST_SECRET.decode()}"])
        srv = ServerProcess.start(self.exercise, write_config(folder, sections))
        srv.wait_listening()
        return srv

    def commit(self, kv: KVClient) -> None:
        """Everything acknowledged is in the store now (exercise 3 always commits first)."""
        if self.exercise == 4:
            kv.flush()


def client(srv: ServerProcess) -> KVClient:
    return KVClient(srv.base_url, Signer(TEST_KEY_ID, TEST_SECRET), timeout_s=20.0)


@pytest.fixture(scope="module", params=PAIRINGS)
def pairing(request: pytest.FixtureRequest) -> Pairing:
    return Pairing(request, *request.param)


@pytest.fixture(scope="module")
def server(pairing: Pairing, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp(f"ex{pairing.exercise}-{pairing.backend}")
    with pairing.start(folder, pairing.sections()) as srv:
        yield srv
        assert srv.stop() == 0, srv.lines


@pytest.fixture
def kv(server: ServerProcess) -> Iterator[KVClient]:
    with client(server) as c:
        yield c


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    return request.node.originalname + "/"


def refused(call: Any, status: int, code: str) -> KVClientError:
    with pytest.raises(KVClientError) as err:
        call()
    assert (err.value.status, err.value.code) == (status, code), err.value.doc
    return err.value


def test_versions_etag_and_conditions(kv: KVClient, prefix: str, pairing: Pairing) -> None:
    k = prefix + "k"
    v1 = kv.save(k, {"n": 1}, if_version=0)["version"]
    resp = kv.request("GET", "/get", params={"key": k})
    assert resp.status == 200 and header(resp, "ETag") == f'"{v1}"'
    assert refused(lambda: kv.save(k, 2, if_version=0), 412, "version_mismatch").current_version == v1
    pairing.commit(kv)
    v2 = kv.save(k, {"n": 2}, if_version=v1)["version"]
    assert refused(lambda: kv.delete(k, if_version=v1), 412, "version_mismatch").current_version == v2
    v3 = kv.delete(k, if_version=v2)["version"]
    assert v1 < v2 < v3 < 2**53
    refused(lambda: kv.get(k), 404, "not_found")
    pairing.commit(kv)
    refused(lambda: kv.get(k), 404, "not_found")
    assert kv.save(k, "again", if_version=0)["version"] > v3


def test_expiry_makes_a_key_absent_for_everything(kv: KVClient, prefix: str, pairing: Pairing) -> None:
    k = prefix + "k"
    before = time.time()
    saved = kv.save(k, 7, ttl=1)
    pairing.commit(kv)
    record = kv.get_record(k)
    assert record["version"] == saved["version"] and before + 1 <= record["expires_at"] <= time.time() + 1
    poll(lambda: _absent(kv, k), timeout_s=5, what="the key to expire")
    assert kv.keys(prefix=prefix)["keys"] == []
    assert kv.incr(k)["value"] == 1  # counts from 0, with no expiry
    assert kv.get_record(k)["expires_at"] is None


def _absent(kv: KVClient, key: str) -> bool:
    try:
        kv.get(key)
    except KVClientError as exc:
        return exc.status == 404
    return False


def test_keys_pages_in_code_point_order_over_committed_and_pending_writes(
    kv: KVClient, prefix: str, pairing: Pairing
) -> None:
    committed = ["a", "c", "e", "é", "\U0001f600", "\x00z"]
    for name in committed:
        kv.save(prefix + name, name)
    pairing.commit(kv)
    for name in ["b", "d", "\uffff"]:
        kv.save(prefix + name, name)  # pending on exercise 4
    kv.delete(prefix + "c")
    kv.save(prefix + "e", "E")
    seen: list[tuple[str, Any]] = []
    cursor = None
    while True:
        page = kv.keys(prefix=prefix, limit=2, cursor=cursor, values=True)
        seen += [(item["key"][len(prefix):], item["value"]) for item in page["keys"]]
        cursor = page["cursor"]
        if cursor is None:
            break
    names = sorted({*committed, "b", "d", "\uffff"} - {"c"})
    assert seen == [(n, "E" if n == "e" else n) for n in names]


def test_incr_and_a_batch_is_all_or_nothing(kv: KVClient, prefix: str, pairing: Pairing) -> None:
    n = prefix + "n"
    assert kv.incr(n, by=5)["value"] == 5
    pairing.commit(kv)
    assert kv.incr(n, by=-2)["value"] == 3
    kv.save(prefix + "text", "x")
    err = refused(lambda: kv.batch([{"op": "save", "key": prefix + "new", "value": 1},
                                    {"op": "incr", "key": n},
                                    {"op": "incr", "key": prefix + "text"}]), 409, "not_an_integer")
    assert err.index == 2
    assert kv.get(n) == 3
    refused(lambda: kv.get(prefix + "new"), 404, "not_found")
    results = kv.batch([{"op": "save", "key": prefix + "new", "value": 1}, {"op": "incr", "key": prefix + "new"},
                        {"op": "get", "key": prefix + "new"}, {"op": "delete", "key": prefix + "none"}])
    assert results[2]["value"] == 2 and results[1]["version"] > results[0]["version"]
    assert results[3] == {"key": prefix + "none", "deleted": False}


def test_a_replayed_request_is_refused_on_every_route_and_changes_nothing(
    kv: KVClient, prefix: str, pairing: Pairing
) -> None:
    # With the Redis cache the nonce is claimed in the same script as the data, or on its own when the request
    # ends before reaching Redis (an error, a route without data): a replay is 401 either way, never served.
    k, n = prefix + "k", prefix + "n"
    kv.save(k, "v")
    kv.incr(n, 5)

    def body(doc: Any) -> bytes:
        return json.dumps(doc).encode()

    requests: list[tuple[str, str, dict[str, Any] | None, bytes, int]] = [
        ("GET", "/get", {"key": k}, b"", 200),
        ("GET", "/get", {"key": prefix + "absent"}, b"", 404),
        ("GET", "/get", {"key": k, "colour": "red"}, b"", 400),  # an unknown parameter: refused before any data
        ("POST", "/save", None, body({"key": prefix + "s", "value": 1}), 200),
        ("POST", "/save", None, b"{not json", 400),
        ("POST", "/incr", None, body({"key": n, "by": 1}), 200),
        ("POST", "/incr", None, body({"key": k, "by": 1}), 409),  # "v" is no integer
        ("POST", "/save", {"if_version": "1"}, body({"key": n, "value": 0}), 412),
        ("DELETE", "/delete", {"key": prefix + "s"}, b"", 200),
        ("POST", "/batch", None, body({"ops": [{"op": "incr", "key": n}, {"op": "get", "key": k}]}), 200),
        ("GET", "/keys", {"prefix": prefix}, b"", 200),
        ("GET", "/authorize", None, b"", 200),
        ("PUT", "/get", None, b"", 405),  # authenticated first, then refused: its replay is still a replay
    ]
    for method, path, params, sent, status in requests:
        req = kv.build(method, path, params=params, body=sent)
        first = kv._send(req)
        assert first.status == status, (method, path, first.status, first.body)
        again = kv._send(req)
        assert (again.status, again.json()["error"]) == (401, "replayed_nonce"), (method, path, again.body)
    # The replays changed nothing: each write above happened once.
    assert kv.get(n) == 5 + 1 + 1  # the /incr and the batch's incr, not their replays
    assert refused(lambda: kv.get(prefix + "s"), 404, "not_found")


def test_a_restart_keeps_every_value_and_never_reuses_a_version(
    pairing: Pairing, tmp_path: Path
) -> None:
    sections = pairing.sections()
    with pairing.start(tmp_path, sections) as srv, client(srv) as kv:
        last = [kv.save(f"k{i}", i)["version"] for i in range(5)][-1]
        assert srv.stop() == 0, srv.lines  # a graceful stop flushes what is pending
    with pairing.start(tmp_path, sections) as srv, client(srv) as kv:
        assert [kv.get(f"k{i}") for i in range(5)] == list(range(5))
        assert kv.save("k0", "new")["version"] > last
        assert srv.stop() == 0, srv.lines


def test_a_second_server_on_the_same_store_refuses_to_start(
    pairing: Pairing, server: ServerProcess, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    if pairing.cache == "redis" and pairing.backend == "postgresql":
        pytest.skip("shared by design: several servers on one Redis and one database (test_several_servers.py)")
    first = Path(server.proc.args[3]).parent  # type: ignore[index]  # ServerProcess: exerciseN.py --config PATH
    config = (first / "config.yaml").read_text()
    if pairing.backend == "sqlite":
        folder = first  # the same storage.path
    else:  # the same database from another folder: only PostgreSQL's lock can refuse it
        folder = tmp_path
        write_keys(folder / "keys" / "kv.keys", [f"{TEST_KEY_ID} {TEST_SECRET.decode()}"])
    (folder / "second.yaml").write_text(config)
    second = ServerProcess.start(pairing.exercise, folder / "second.yaml")
    with second:
        assert second.proc.wait(timeout=20) == 2
        second.stop()
    lines = [line for line in second.lines if line.strip()]
    assert len(lines) == 1 and "another server is using this database" in lines[0], second.lines


@pytest.mark.parametrize("exercise", [4, 3])
def test_an_outage_is_503_and_service_resumes_by_itself(exercise: int, request: pytest.FixtureRequest,
                                                         tmp_path: Path) -> None:
    pairing = Pairing(request, exercise, "postgresql")
    with pairing.start(tmp_path, pairing.sections()) as srv, client(srv) as kv:
        kv.save("kept", 1, durable=True)
        pairing.postgres.stop()
        try:
            started = time.monotonic()
            refused(lambda: kv.get("never-seen"), 503, "overloaded")  # a miss (exercise 4), a read (exercise 3)
            if exercise == 3:
                refused(lambda: kv.save("w", 1), 503, "overloaded")
            else:
                kv.save("w", 1)  # acknowledged from memory; the flush that fails keeps it
                refused(lambda: kv.flush(), 503, "overloaded")
            assert time.monotonic() - started < 20
        finally:
            pairing.postgres.start()
        poll(lambda: _absent(kv, "never-seen"), timeout_s=15, what="reads to resume")
        assert kv.get("kept") == 1
        assert kv.save("after", 2, durable=True)["version"] > 0
        if exercise == 4:
            kv.flush()
            assert kv.get("w") == 1
        assert srv.stop() == 0, srv.lines


def test_an_unreachable_database_at_start_up_is_one_line_and_a_failure(tmp_path: Path) -> None:
    from tests.services import free_port

    url = f"postgresql://kv:hunter2@127.0.0.1:{free_port()}/kv?connect_timeout=1"
    write_keys(tmp_path / "keys" / "kv.keys", [f"{TEST_KEY_ID} {TEST_SECRET.decode()}"])
    srv = ServerProcess.start(4, write_config(tmp_path, {"storage": {"backend": "postgresql", "url": url}}))
    with srv:
        assert srv.proc.wait(timeout=20) == 2
        srv.stop()
    lines = [line for line in srv.lines if line.strip()]
    assert len(lines) == 1 and "cannot connect to PostgreSQL" in lines[0] and "hunter2" not in lines[0], srv.lines
