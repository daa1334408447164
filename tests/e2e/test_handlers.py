"""The handlers' one error path and the stop gate, over real sockets, with a key/value double behind them.

``ScriptedKV`` answers like a store but can raise sqlite trouble or a bug, or hold a write until released, so
each of the handler's outcomes can be reached on purpose: a domain error, a ``StorageError`` (503), an
unexpected exception (500 that says nothing), Tornado's own 405, and the admission gate of a graceful stop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import pytest

from kvtornado.app import make_app
from kvtornado.auth import Authenticator
from kvtornado.client import AsyncKVClient, Signer
from kvtornado.config import Config
from kvtornado.errors import NotFound, StorageError
from kvtornado.handlers import Admission
from kvtornado.ops import Op, Outcome, Record
from tests.conftest import TEST_KEY_ID, TEST_SECRET
from tests.e2e.cache_helpers import assert_error, header
from tests.e2e.helpers import VERSION, RawConnection, host_of, raw_head, serving
from tests.e2e.helpers import assert_error as assert_raw_error
from tests.unit.fakes import wait_until

SECRET_DETAIL = "disk /dev/sda3 at 97 %"  # what a failure said; no answer may repeat it


class ScriptedKV:
    """The ``KeyValue`` calls over a dict; ``fail`` makes every call raise it, ``hold`` stalls ``put``."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.fail: BaseException | None = None
        self.hold: asyncio.Event | None = None
        self.puts = 0
        self.flushes = 0
        self.durable: list[bool] = []  # the durable flag of every put and delete

    def _maybe_fail(self) -> None:
        if self.fail is not None:
            raise self.fail

    async def get_record(self, key: str) -> Record | None:
        self._maybe_fail()
        value = self.data.get(key)
        return None if value is None else Record(value, 1)

    async def put(self, key: str, value: str, *, durable: bool = False, ttl: int | None = None,
                  if_version: int | None = None) -> int:
        self._maybe_fail()
        self.puts += 1
        self.durable.append(durable)
        if self.hold is not None:
            await self.hold.wait()
        self.data[key] = value
        return self.puts

    async def apply(self, ops: Sequence[Op], *, durable: bool = False, batch: bool = False) -> list[Outcome]:
        """Deletes only: what the handlers send here besides /incr and /batch, which these tests do not use."""
        self._maybe_fail()
        self.durable.append(durable)
        (op,) = ops
        assert op.kind == "delete"
        if self.data.pop(op.key, None) is None:
            raise NotFound()
        return [Outcome(op, Record(None, 2), True)]

    async def list_keys(self, prefix: str, after: str | None, limit: int) -> list[tuple[str, Record]]:
        self._maybe_fail()
        return []

    async def sweep(self) -> int:
        return 0

    async def flush(self) -> int:
        self._maybe_fail()
        self.flushes += 1
        return 0

    def stats(self) -> dict[str, Any]:
        return {}


@pytest.fixture
def kv_double() -> ScriptedKV:
    return ScriptedKV()


@pytest.mark.gen_test
async def test_sqlite_trouble_is_a_503_that_names_no_detail(
    config: Config, authenticator: Authenticator, signer: Signer, kv_double: ScriptedKV,
    caplog: pytest.LogCaptureFixture,
) -> None:
    kv_double.data["k"] = "1"
    kv_double.fail = StorageError(f"sqlite read failed: {SECRET_DETAIL}")
    async with serving(make_app(config, authenticator=authenticator, kv=kv_double, admin=True)) as url:
        client = AsyncKVClient(url, signer)
        resp = await client.request("GET", "/get", params={"key": "k"})
        doc = assert_error(resp, 503, "overloaded")
        assert SECRET_DETAIL not in resp.body.decode()
        assert int(header(resp, "Retry-After") or 0) >= 1
        kv_double.fail = None
        stats = await client.request("GET", "/stats")
        assert stats.json()["rejected"] == {"overloaded": 1}  # refusals are counted
    assert doc["message"] == "The storage is not available right now; retry shortly."
    warnings = [r for r in caplog.records if r.name == "kvtornado.handlers" and r.levelno == logging.WARNING]
    assert len(warnings) == 1  # the operator sees the request and the cause
    assert warnings[0].getMessage() == f"storage error on GET /get: sqlite read failed: {SECRET_DETAIL}"


@pytest.mark.gen_test
async def test_an_unexpected_exception_is_a_500_that_says_nothing_about_it(
    config: Config, authenticator: Authenticator, signer: Signer, kv_double: ScriptedKV,
    caplog: pytest.LogCaptureFixture,
) -> None:
    kv_double.fail = RuntimeError(f"bug near {SECRET_DETAIL}")
    async with serving(make_app(config, authenticator=authenticator, kv=kv_double)) as url:
        resp = await AsyncKVClient(url, signer).request("GET", "/get", params={"key": "private-key-name"})
    doc = assert_error(resp, 500, "internal_error")
    assert SECRET_DETAIL not in resp.body.decode() and "Traceback" not in resp.body.decode()
    assert doc["message"] == "The server could not complete the request."
    logged = [r for r in caplog.records if r.exc_info]  # the bug, logged with its traceback, server side
    assert len(logged) == 1 and logged[0].levelno == logging.ERROR, caplog.text
    typ, value, tb = logged[0].exc_info  # type: ignore[misc]
    assert typ is RuntimeError and value is kv_double.fail and tb is not None
    assert logged[0].getMessage() == "uncaught exception on GET /get"  # the path, never the query (keys)
    assert "private-key-name" not in caplog.text


@pytest.mark.gen_test
async def test_a_method_tornado_does_not_know_is_a_json_405_with_allow(
    config: Config, authenticator: Authenticator, kv_double: ScriptedKV
) -> None:
    async with serving(make_app(config, authenticator=authenticator, kv=kv_double)) as url:
        port = int(host_of(url).rsplit(":", 1)[1])
        async with RawConnection(port) as conn:
            await conn.send(raw_head("PROPFIND", "/get?key=k", {"Host": host_of(url), "Connection": "close"}))
            resp = await conn.read_reply()
    doc = assert_raw_error(resp, 405, "method_not_allowed")
    assert resp.header("Allow") == "GET"
    assert doc["message"] == "PROPFIND is not allowed on /get."


@pytest.mark.gen_test
async def test_a_body_refused_from_its_content_length_closes_the_connection(
    config: Config, authenticator: Authenticator, kv_double: ScriptedKV, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(make_app(config, authenticator=authenticator, kv=kv_double)) as url:
        port = int(host_of(url).rsplit(":", 1)[1])
        too_big = config.server.max_body_bytes + 1
        async with RawConnection(port) as conn:
            await conn.send(raw_head("POST", "/save", {"Host": host_of(url), "Content-Type": "application/json",
                                                       "Content-Length": str(too_big)}))
            resp = await conn.read_reply()
            doc = assert_raw_error(resp, 413, "too_large")
            assert resp.header("Connection") == "close"
            assert await conn.closed_by_server()
    assert kv_double.puts == 0
    assert doc["message"] == f"The body is {too_big} bytes; the limit is {config.server.max_body_bytes}."
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text  # Tornado was told too


@pytest.mark.gen_test
async def test_once_stopping_every_new_request_is_refused_and_idle_waits_for_those_being_served(
    config: Config, authenticator: Authenticator, signer: Signer, kv_double: ScriptedKV,
    caplog: pytest.LogCaptureFixture,
) -> None:
    admission = Admission()
    app = make_app(config, authenticator=authenticator, kv=kv_double, admission=admission)
    async with serving(app) as url:
        client = AsyncKVClient(url, signer)
        await admission.idle()  # nothing being served: at once
        assert (await client.request("GET", "/ping")).status == 200
        assert admission.in_flight == 0
        kv_double.hold = asyncio.Event()
        held = asyncio.ensure_future(client.request("POST", "/save", body=b'{"key":"early","value":1}',
                                                    content_type="application/json"))
        await wait_until(lambda: kv_double.puts == 1, "the held save to reach the store")
        assert admission.in_flight == 1

        admission.stop()
        for method, path, params, body in (("POST", "/save", None, b'{"key":"late","value":2}'),
                                           ("GET", "/get", {"key": "early"}, b""),
                                           ("GET", "/ping", None, b"")):
            resp = await client.request(method, path, params=params, body=body,
                                        content_type="application/json" if body else None)
            assert assert_error(resp, 503, "overloaded")["message"] == "The server is shutting down."
            assert header(resp, "Retry-After") == "1"
        assert kv_double.puts == 1, "a request refused while stopping reached the store"

        idle = asyncio.ensure_future(admission.idle())
        await asyncio.sleep(0)
        assert not idle.done(), "idle() returned while a request was being served"
        kv_double.hold.set()
        # the one being served completes
        assert (await held).json() == {"key": "early", "saved": True, "version": VERSION}
        await asyncio.wait_for(idle, timeout=5)
    assert kv_double.data == {"early": "1"}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text  # nothing broke in a hook


class FullDiskJournal:
    """A nonce journal whose disk is full: every ``record`` fails as a real write would."""

    async def record(self, key_id: str, nonce: str, ts: int) -> None:
        raise OSError(28, "No space left on device")


@pytest.mark.gen_test
async def test_a_request_whose_nonce_cannot_be_journaled_is_refused_with_503_and_not_served(
    config: Config, kv_double: ScriptedKV, caplog: pytest.LogCaptureFixture
) -> None:
    now = 1_700_000_000
    auth = Authenticator({TEST_KEY_ID: TEST_SECRET}, clock=lambda: now + 0.5,
                         journal=FullDiskJournal())  # type: ignore[arg-type]
    async with serving(make_app(config, authenticator=auth, kv=kv_double)) as url:
        ahead = AsyncKVClient(url, Signer(TEST_KEY_ID, TEST_SECRET, clock=lambda: now + 10))  # dated ahead
        resp = await ahead.request("POST", "/save", body=b'{"key":"k","value":1}', content_type="application/json")
        assert assert_error(resp, 503, "overloaded")["message"] == (
            "The server cannot record this request's nonce right now; retry shortly.")
        assert kv_double.puts == 0
        on_time = AsyncKVClient(url, Signer(TEST_KEY_ID, TEST_SECRET, clock=lambda: now))  # not journaled
        resp = await on_time.request("POST", "/save", body=b'{"key":"k","value":1}', content_type="application/json")
        assert resp.status == 200 and kv_double.puts == 1
    assert [r.getMessage() for r in caplog.records if r.name == "kvtornado.handlers"] == [
        "cannot record a nonce in the journal: No space left on device"]


@pytest.mark.parametrize(("method", "path", "params"), [
    ("POST", "/flush", None), ("GET", "/stats", None), ("GET", "/get", {"key": "k"}), ("GET", "/ping", None),
    ("DELETE", "/delete", {"key": "k"}),  # DELETE names its key in the query; a body would be a second reading
])
@pytest.mark.gen_test
async def test_a_body_on_a_request_that_takes_none_is_refused_and_nothing_is_done(
    config: Config, authenticator: Authenticator, signer: Signer, kv_double: ScriptedKV,
    method: str, path: str, params: dict[str, str] | None,
) -> None:
    kv_double.data["k"] = "1"
    async with serving(make_app(config, authenticator=authenticator, kv=kv_double, admin=True)) as url:
        resp = await AsyncKVClient(url, signer).request(method, path, params=params, body=b'{"key":"other"}',
                                                       content_type="application/json")
    doc = assert_error(resp, 400, "bad_request")
    assert doc["message"] == f"{method} {path} takes no body."
    assert kv_double.data == {"k": "1"} and kv_double.flushes == 0


@pytest.mark.gen_test
async def test_a_body_on_post_authorize_is_signed_and_accepted(
    config: Config, authenticator: Authenticator, signer: Signer
) -> None:
    async with serving(make_app(config, authenticator=authenticator)) as url:
        resp = await AsyncKVClient(url, signer).request("POST", "/authorize", body=b"any bytes, signed")
    assert resp.status == 200 and resp.json()["authorized"] is True


@pytest.mark.parametrize("method", ["PROPFIND", "GET", "BREW"])
@pytest.mark.gen_test
async def test_an_unknown_path_is_404_whatever_the_method(config: Config, method: str) -> None:
    async with serving(make_app(config)) as url:
        port = int(host_of(url).rsplit(":", 1)[1])
        async with RawConnection(port) as conn:
            await conn.send(raw_head(method, "/nope", {"Host": host_of(url), "Connection": "close"}))
            resp = await conn.read_reply()
    doc = assert_raw_error(resp, 404, "not_found")
    assert resp.header("Allow") is None
    assert doc["message"] == "There is no endpoint at /nope."


@pytest.mark.parametrize(("flag", "durable"), [("1", True), ("true", True), ("0", False), ("false", False),
                                               (None, False)])
@pytest.mark.gen_test
async def test_durable_takes_1_true_0_false_on_save_and_both_deletes(
    config: Config, authenticator: Authenticator, signer: Signer, kv_double: ScriptedKV,
    flag: str | None, durable: bool,
) -> None:
    query = {} if flag is None else {"durable": flag}
    async with serving(make_app(config, authenticator=authenticator, kv=kv_double)) as url:
        client = AsyncKVClient(url, signer)
        saved = await client.request("POST", "/save", params=query, body=b'{"key":"k","value":1}',
                                     content_type="application/json")
        deleted = await client.request("DELETE", "/delete", params={"key": "k", **query})
        await client.request("POST", "/save", body=b'{"key":"k","value":1}', content_type="application/json")
        posted = await client.request("POST", "/delete", params=query, body=b'{"key":"k"}',
                                      content_type="application/json")
    assert [saved.status, deleted.status, posted.status] == [200, 200, 200]
    assert kv_double.durable == [durable, durable, False, durable]


@pytest.mark.parametrize(("query", "body", "status", "code", "message"), [
    (None, b"", 400, "missing_key", 'Send the key as {"key": ...} in the body or as ?key=...'),
    ({"key": "k"}, b'{"key":"k"}', 400, "bad_request", "Name the key once: in the body or in the query, not both."),
    ({"key": "absent"}, b"", 404, "not_found", "No such key."),
    ({"durable": "yes", "key": "k"}, b"", 400, "bad_request", "durable must be 1, 0, true or false."),
])
@pytest.mark.gen_test
async def test_post_delete_refusals_say_what_to_send(
    config: Config, authenticator: Authenticator, signer: Signer, kv_double: ScriptedKV,
    query: dict[str, str] | None, body: bytes, status: int, code: str, message: str,
) -> None:
    kv_double.data["k"] = "1"
    async with serving(make_app(config, authenticator=authenticator, kv=kv_double)) as url:
        resp = await AsyncKVClient(url, signer).request("POST", "/delete", params=query, body=body,
                                                       content_type="application/json")
    assert resp.status == status and resp.json() == {"error": code, "message": message}
    assert kv_double.data == {"k": "1"}


@pytest.mark.parametrize("header", ["If-Match", "If-None-Match"])
@pytest.mark.gen_test
async def test_a_condition_header_is_refused_with_where_to_put_it(
    config: Config, authenticator: Authenticator, signer: Signer, kv_double: ScriptedKV, header: str
) -> None:
    async with serving(make_app(config, authenticator=authenticator, kv=kv_double)) as url:
        resp = await AsyncKVClient(url, signer).request("GET", "/get", params={"key": "k"},
                                                       headers={header: '"1"'})
    assert resp.status == 400 and resp.json() == {
        "error": "bad_request",
        "message": f"{header} is not supported: the signature does not cover headers; "
                   "put the condition in the query as ?if_version=N.",
    }


@pytest.mark.gen_test
async def test_framing_and_chunked_size_refusals_say_what_is_wrong(
    config: Config, authenticator: Authenticator, kv_double: ScriptedKV
) -> None:
    limit = config.server.max_body_bytes
    async with serving(make_app(config, authenticator=authenticator, kv=kv_double)) as url:
        port, host = int(host_of(url).rsplit(":", 1)[1]), host_of(url)
        async with RawConnection(port) as conn:
            await conn.send(raw_head("POST", "/save", {"Host": host, "Content-Length": "abc"}))
            framing = await conn.read_reply()
        async with RawConnection(port) as conn:
            await conn.send(raw_head("POST", "/save", {"Host": host, "Transfer-Encoding": "chunked",
                                                       "Content-Type": "application/json"}),
                            b"%x\r\n" % (limit + 1) + b"x" * (limit + 1) + b"\r\n")
            chunked_reply = await conn.read_reply()
    framing_message = assert_raw_error(framing, 400, "bad_request")["message"]
    assert framing_message == "Content-Length must be one non-negative integer."
    chunked_message = assert_raw_error(chunked_reply, 413, "too_large")["message"]
    assert chunked_message == f"The body is over the limit of {limit} bytes."
    assert chunked_reply.header("Connection") == "close" and kv_double.puts == 0


@pytest.mark.gen_test
async def test_a_request_without_host_is_signed_over_an_empty_host(
    config: Config, authenticator: Authenticator, signer: Signer
) -> None:
    async with serving(make_app(config, authenticator=authenticator)) as url:
        port = int(host_of(url).rsplit(":", 1)[1])
        auth = signer.authorization("GET", "", "/authorize", "", b"")
        async with RawConnection(port) as conn:
            await conn.send(b"GET /authorize HTTP/1.0\r\nAuthorization: " + auth.encode() + b"\r\n\r\n")
            resp = await conn.read_reply()
    assert resp.status == 200, resp.body


@pytest.mark.gen_test
async def test_requests_tornado_refuses_before_prepare_leave_nothing_counted_in_flight(config: Config) -> None:
    admission = Admission()
    async with serving(make_app(config, admission=admission)) as url:
        port = int(host_of(url).rsplit(":", 1)[1])
        for _ in range(2):
            async with RawConnection(port) as conn:
                await conn.send(raw_head("PROPFIND", "/ping", {"Host": host_of(url), "Connection": "close"}))
                assert (await conn.read_reply()).status == 405
        async with RawConnection(port) as conn:
            await conn.send(raw_head("GET", "/ping", {"Host": host_of(url), "Connection": "close"}))
            assert (await conn.read_reply()).status == 200
        assert admission.in_flight == 0
        await asyncio.wait_for(admission.idle(), timeout=5)
