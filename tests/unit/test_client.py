"""kvtornado/client.py: the query text that is sent is the one that is signed; the secret never shows; both
clients (blocking and async) follow the same rules; a request is sent at most once, and a body the server
refuses from its Content-Length is reported as the server's 413, not as a broken pipe."""

from __future__ import annotations

import inspect
import itertools
import json
import re
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest

from kvtornado.auth import Authenticator, parse_authorization
from kvtornado.client import (
    AsyncKVClient,
    KVClient,
    KVClientError,
    KVConnectionError,
    KVProtocolError,
    Signer,
    encode_query,
)
from kvtornado.codec import query_fields
from kvtornado.errors import AuthError
from tests.conftest import TEST_KEY_ID, TEST_SECRET, write_config, write_keys
from tests.e2e.helpers import ServerProcess

NOW = 1_700_000_000
NONCE = "fixed-nonce-0123456789"
HOST = "localhost:8888"


@pytest.fixture
def fixed_signer() -> Signer:
    return Signer(TEST_KEY_ID, TEST_SECRET, clock=lambda: NOW + 0.9, nonce=lambda: NONCE)


@pytest.fixture
def auth() -> Authenticator:
    return Authenticator({TEST_KEY_ID: TEST_SECRET}, clock=lambda: NOW)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        pytest.param({"key": "a b"}, "key=a%20b", id="space-is-%20"),
        pytest.param({"key": "a+b"}, "key=a%2Bb", id="plus-escaped"),
        pytest.param({"key": "a/b?c&d=e#f"}, "key=a%2Fb%3Fc%26d%3De%23f", id="reserved-escaped"),
        pytest.param({"key": "é€"}, "key=%C3%A9%E2%82%AC", id="utf8"),
        pytest.param({"key": "k", "durable": 1}, "key=k&durable=1", id="order-kept-and-int"),
        pytest.param({"key": "a-b_c.d~e"}, "key=a-b_c.d~e", id="unreserved-kept"),
        pytest.param({}, "", id="empty"),
        pytest.param(None, "", id="none"),
    ],
)
def test_encode_query(params: dict[str, Any] | None, expected: str) -> None:
    assert encode_query(params) == expected


@pytest.mark.parametrize("key", ["a b", "a+b", "x/y?z&w=1", "é € 😀", "100%"])
def test_encoded_query_round_trips_through_the_server_parser(key: str) -> None:
    assert query_fields(encode_query({"key": key})) == {"key": key}


def test_signer_header_verifies_for_the_exact_query(fixed_signer: Signer, auth: Authenticator) -> None:
    query = encode_query({"key": "a b+c"})
    value = fixed_signer.authorization("GET", HOST, "/get", query, b"")

    params = parse_authorization(value)
    assert (params.key_id, params.ts, params.nonce) == (TEST_KEY_ID, NOW, NONCE)
    assert auth.verify(authorization=value, method="GET", host=HOST, path="/get", query=query, body=b"") == "k1"


def test_the_same_key_spelled_differently_is_another_query(fixed_signer: Signer, auth: Authenticator) -> None:
    value = fixed_signer.authorization("GET", HOST, "/get", encode_query({"key": "a b"}), b"")
    with pytest.raises(AuthError) as info:
        # "a+b" decodes to the same key but is not the text that was signed
        auth.verify(authorization=value, method="GET", host=HOST, path="/get", query="key=a+b", body=b"")
    assert info.value.code == "bad_signature"


def test_signer_repr_hides_the_secret() -> None:
    secret = b"Zz9-" * 10
    signer = Signer("k1", secret)
    for text in (repr(signer), str(signer), f"{signer!r}"):
        assert secret.decode() not in text
        assert "secret" not in text
        assert "k1" in text


def test_signer_uses_a_fresh_nonce_and_the_clock_by_default() -> None:
    signer = Signer(TEST_KEY_ID, TEST_SECRET)
    a = parse_authorization(signer.authorization("GET", HOST, "/authorize", "", b""))
    b = parse_authorization(signer.authorization("GET", HOST, "/authorize", "", b""))
    assert a.nonce != b.nonce


# --- a local server that records what each client sends -----------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int = 200
    doc: Any = field(default_factory=lambda: {"ok": True})
    drop: bool = False  # read the request, answer nothing, close the connection
    then_close: bool = False  # answer, then close without saying so (a keep-alive the server gave up)
    raw: bytes | None = None  # sent as the body in place of ``doc``'s JSON


@dataclass(frozen=True)
class Seen:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    peer: tuple[str, int]


class Recorder(ThreadingHTTPServer):
    """HTTP/1.1 on 127.0.0.1, an ephemeral port: records every request and answers from ``answers``."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _RecordingHandler)
        self.seen: list[Seen] = []
        self.answers: list[Answer] = []
        self.closed = threading.Semaphore(0)  # released once per connection the server has closed

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def shutdown_request(self, request: Any) -> None:
        super().shutdown_request(request)
        self.closed.release()


class _RecordingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Recorder

    def _any(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.seen.append(Seen(self.command, self.path, dict(self.headers.items()), body,
                                     self.client_address))
        answer = self.server.answers.pop(0) if self.server.answers else Answer()
        if answer.drop:
            self.close_connection = True
            return
        data = json.dumps(answer.doc).encode() if answer.raw is None else answer.raw
        self.send_response(answer.status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = answer.then_close

    do_GET = do_POST = do_DELETE = _any

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the test reads ``seen``
        pass


def running_recorder() -> Iterator[Recorder]:
    """A ``Recorder`` serving on its own thread until the generator is closed (the body of a fixture)."""
    server = Recorder()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    yield from running_recorder()


Call = Callable[..., Any]


@pytest.fixture(params=["KVClient", "AsyncKVClient"])
def call(request: pytest.FixtureRequest, io_loop: Any) -> Call:
    """``call(base_url, signer, "get", "k")``: one client method on a fresh client of either kind, run to its
    end (the async one on the test's loop): every rule below holds for both. A generator (``iter_keys``) is
    run to its end too, into a list."""

    def run(base_url: str, signer: Signer | None, method: str, *args: Any, **kwargs: Any) -> Any:
        if request.param == "KVClient":
            with KVClient(base_url, signer, timeout_s=5) as client:
                result = getattr(client, method)(*args, **kwargs)
                return list(result) if inspect.isgenerator(result) else result

        async def go() -> Any:
            result = getattr(AsyncKVClient(base_url, signer, timeout_s=5), method)(*args, **kwargs)
            if inspect.isasyncgen(result):
                return [entry async for entry in result]
            return await result

        return io_loop.run_sync(go, timeout=10)

    return run


def verify_seen(auth: Authenticator, seen: Seen) -> str:
    parts = urlsplit(seen.target)
    return auth.verify(
        authorization=seen.headers.get("Authorization"), method=seen.method, host=seen.headers["Host"],
        path=parts.path, query=parts.query, body=seen.body,
    )


def test_get_sends_what_it_signed(call: Call, recorder: Recorder, fixed_signer: Signer,
                                  auth: Authenticator) -> None:
    recorder.answers.append(Answer(200, {"key": "a b/é", "value": [1]}))

    assert call(recorder.url, fixed_signer, "get", "a b/é") == [1]

    (seen,) = recorder.seen
    assert (seen.method, seen.target) == ("GET", "/get?key=a%20b%2F%C3%A9")
    assert seen.headers["Host"] == urlsplit(recorder.url).netloc
    assert verify_seen(auth, seen) == TEST_KEY_ID


def test_durable_save_signs_body_and_query(call: Call, recorder: Recorder, fixed_signer: Signer,
                                           auth: Authenticator) -> None:
    recorder.answers.append(Answer(200, {"key": "k", "saved": True}))

    assert call(recorder.url, fixed_signer, "save", "k", {"é": None}, durable=True) == {"key": "k", "saved": True}

    (seen,) = recorder.seen
    assert (seen.method, seen.target) == ("POST", "/save?durable=1")
    assert json.loads(seen.body) == {"key": "k", "value": {"é": None}}
    assert seen.headers["Content-Type"] == "application/json"
    assert verify_seen(auth, seen) == TEST_KEY_ID


def test_delete_sends_key_and_durable_in_the_query(call: Call, recorder: Recorder, fixed_signer: Signer,
                                                   auth: Authenticator) -> None:
    recorder.answers.append(Answer(200, {"key": "k", "deleted": True}))

    assert call(recorder.url, fixed_signer, "delete", "k", durable=True) == {"key": "k", "deleted": True}

    (seen,) = recorder.seen
    assert (seen.method, seen.target, seen.body) == ("DELETE", "/delete?key=k&durable=1", b"")
    assert verify_seen(auth, seen) == TEST_KEY_ID


def test_an_error_answer_raises_the_server_code_and_body(call: Call, recorder: Recorder,
                                                         fixed_signer: Signer) -> None:
    doc = {"error": "version_mismatch", "message": "The key is at version 3.", "current_version": 3}
    recorder.answers.append(Answer(412, doc))

    with pytest.raises(KVClientError) as info:
        call(recorder.url, fixed_signer, "get", "k")
    assert (info.value.status, info.value.code, info.value.message) == (412, "version_mismatch",
                                                                        "The key is at version 3.")
    assert info.value.doc == doc


@pytest.mark.parametrize("answer", [Answer(200, raw=b'{"key": "k", "value": not json}'), Answer(200, {"key": "k"}),
                                    Answer(200, ["value"])], ids=["not-json", "no-value", "not-an-object"])
def test_a_2xx_answer_the_protocol_rules_out_is_a_protocol_error(call: Call, recorder: Recorder,
                                                                 fixed_signer: Signer, answer: Answer) -> None:
    recorder.answers.append(answer)
    with pytest.raises(KVProtocolError):
        call(recorder.url, fixed_signer, "get", "k")


def test_ping_is_unsigned(call: Call, recorder: Recorder, fixed_signer: Signer) -> None:
    recorder.answers.append(Answer(200, {"ping": "pong"}))

    assert call(recorder.url, fixed_signer, "ping") == {"ping": "pong"}
    assert "Authorization" not in recorder.seen[0].headers


@pytest.mark.parametrize("name", ["Authorization", "authorization", "AUTHORIZATION", "Host", "Content-Length",
                                  "Transfer-Encoding"])
@pytest.mark.parametrize("sign", [True, False], ids=["signed", "unsigned"])
def test_a_header_the_client_owns_is_refused_before_anything_is_sent(
    call: Call, recorder: Recorder, fixed_signer: Signer, name: str, sign: bool
) -> None:
    with pytest.raises(ValueError, match=f"sets the {name} header itself"):
        call(recorder.url, fixed_signer, "request", "GET", "/authorize", headers={name: "KV-HMAC-SHA256 x"},
             sign=sign)
    assert recorder.seen == []


def test_other_caller_headers_are_sent_and_may_replace_the_content_type(
    call: Call, recorder: Recorder, fixed_signer: Signer, auth: Authenticator
) -> None:
    resp = call(recorder.url, fixed_signer, "request", "POST", "/save", body=b"key=k&value=v",
                headers={"content-type": "application/x-www-form-urlencoded", "X-Request-Id": "abc-1"})

    assert resp.status == 200
    (seen,) = recorder.seen
    assert seen.headers["X-Request-Id"] == "abc-1"
    assert [v for k, v in seen.headers.items() if k.lower() == "content-type"] == [
        "application/x-www-form-urlencoded"]
    assert verify_seen(auth, seen) == TEST_KEY_ID


@pytest.mark.parametrize("url", ["ftp://example.com", "example.com:8888", "http://", "http://h:1/kv",
                                 "http://h:1?x=1"])
def test_both_clients_refuse_a_url_that_is_not_a_server_root(io_loop: Any, url: str) -> None:
    with pytest.raises(ValueError, match="URL"):
        KVClient(url, None)

    async def make() -> None:
        AsyncKVClient(url, None)

    with pytest.raises(ValueError, match="URL"):
        io_loop.run_sync(make)


def test_a_connection_refused_names_the_url(call: Call) -> None:
    with socket.socket() as taken:  # bound, never listening: a connection to it is refused
        taken.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(KVConnectionError) as info:
            call(url, None, "ping")
    assert str(info.value) == f"cannot connect to {url}: Connection refused"
    assert isinstance(info.value, OSError)


# --- SPEC §5's data model: versions, conditions, expiry, listing, incr, batch ---------------------

RECORD = {"key": "k", "value": "v", "version": 7, "expires_at": None}
PAGE = {"keys": [{"key": "a", "version": 1, "expires_at": None}], "cursor": "c1"}
OPS = [{"op": "save", "key": "a", "value": 1, "ttl": 5, "if_version": 0}, {"op": "incr", "key": "a", "by": 2},
       {"op": "get", "key": "a"}, {"op": "delete", "key": "a", "if_version": 2}]
RESULTS = [{"key": "a", "version": 1}, {"key": "a", "value": 3, "version": 2},
           {"key": "a", "found": True, "value": 3, "version": 2, "expires_at": None},
           {"key": "a", "deleted": True, "version": 3}]
SAVED = {"key": "k", "saved": True, "version": 7}
DELETED = {"key": "k", "deleted": True, "version": 8}
COUNTED = {"key": "n", "value": -4, "version": 2}


@pytest.mark.parametrize(
    ("method", "args", "kwargs", "answer", "returned", "http_method", "target", "body"),
    [
        pytest.param("save", ("k", "v"), {}, SAVED, SAVED, "POST", "/save", {"key": "k", "value": "v"},
                     id="save-returns-the-whole-answer"),
        pytest.param("save", ("k", [1]), {"ttl": 60, "if_version": 0, "durable": True}, SAVED, SAVED, "POST",
                     "/save?ttl=60&if_version=0&durable=1", {"key": "k", "value": [1]}, id="save-ttl-create-durable"),
        pytest.param("save", ("k", "v"), {"if_version": 12}, SAVED, SAVED, "POST", "/save?if_version=12",
                     {"key": "k", "value": "v"}, id="save-if-version"),
        pytest.param("get", ("k",), {}, RECORD, "v", "GET", "/get?key=k", None, id="get-is-still-the-value"),
        pytest.param("get_record", ("a b",), {}, RECORD, RECORD, "GET", "/get?key=a%20b", None,
                     id="get-record-is-the-whole-answer"),
        pytest.param("delete", ("k",), {"if_version": 3}, DELETED, DELETED, "DELETE", "/delete?key=k&if_version=3",
                     None, id="delete-if-version"),
        pytest.param("delete", ("k",), {"if_version": 0, "durable": True}, DELETED, DELETED, "DELETE",
                     "/delete?key=k&if_version=0&durable=1", None, id="delete-if-version-0-durable"),
        pytest.param("incr", ("n",), {}, COUNTED, COUNTED, "POST", "/incr", {"key": "n", "by": 1}, id="incr-by-1"),
        pytest.param("incr", ("n", -5), {"if_version": 2, "durable": True}, COUNTED, COUNTED, "POST",
                     "/incr?if_version=2&durable=1", {"key": "n", "by": -5}, id="incr-by-if-version-durable"),
        pytest.param("keys", (), {}, PAGE, PAGE, "GET", "/keys", None, id="keys-nothing-given-nothing-sent"),
        pytest.param("keys", ("a b/",), {"limit": 10, "cursor": "c+1/=", "values": True}, PAGE, PAGE, "GET",
                     "/keys?prefix=a%20b%2F&limit=10&cursor=c%2B1%2F%3D&values=1", None, id="keys-everything"),
        pytest.param("keys", ("",), {"values": False}, PAGE, PAGE, "GET", "/keys?prefix=", None,
                     id="keys-empty-prefix-is-sent-values-0-is-not"),
        pytest.param("batch", (OPS,), {}, {"results": RESULTS}, RESULTS, "POST", "/batch", {"ops": OPS},
                     id="batch-returns-the-results"),
        pytest.param("batch", (tuple(OPS),), {"durable": True}, {"results": RESULTS}, RESULTS, "POST",
                     "/batch?durable=1", {"ops": OPS}, id="batch-of-a-tuple-durable"),
    ],
)
def test_each_endpoint_sends_its_method_path_query_and_body_signed(
    call: Call, recorder: Recorder, fixed_signer: Signer, auth: Authenticator, method: str, args: tuple[Any, ...],
    kwargs: dict[str, Any], answer: Any, returned: Any, http_method: str, target: str, body: Any,
) -> None:
    recorder.answers.append(Answer(200, answer))

    assert call(recorder.url, fixed_signer, method, *args, **kwargs) == returned

    (seen,) = recorder.seen
    assert (seen.method, seen.target) == (http_method, target)
    if body is None:
        assert seen.body == b""
    else:
        assert json.loads(seen.body) == body
        assert seen.headers["Content-Type"] == "application/json"
    assert verify_seen(auth, seen) == TEST_KEY_ID


@pytest.mark.parametrize(
    ("method", "args", "kwargs", "status", "doc", "current_version", "index"),
    [
        pytest.param("save", ("k", "v"), {"if_version": 2}, 412,
                     {"error": "version_mismatch", "message": "The key is at version 5.", "current_version": 5},
                     5, None, id="save-412-current-version"),
        pytest.param("delete", ("k",), {"if_version": 1}, 412,
                     {"error": "version_mismatch", "message": "The key does not exist.", "current_version": 0},
                     0, None, id="delete-412-absent-is-version-0"),
        pytest.param("incr", ("k",), {}, 409, {"error": "not_an_integer", "message": "The value is not one."},
                     None, None, id="incr-409"),
        pytest.param("batch", (OPS,), {}, 412,
                     {"error": "version_mismatch", "message": "Op 0 failed.", "current_version": 3, "index": 0},
                     3, 0, id="batch-412-at-index-0"),
        pytest.param("batch", (OPS,), {}, 409, {"error": "not_an_integer", "message": "Op 1 failed.", "index": 1},
                     None, 1, id="batch-409-at-index-1"),
        pytest.param("batch", ([],), {}, 400, {"error": "bad_request", "message": "A batch needs ops."},
                     None, None, id="batch-as-a-whole-has-no-index"),
        pytest.param("keys", (), {"cursor": "zz"}, 400, {"error": "bad_request", "message": "Bad cursor."},
                     None, None, id="keys-400"),
    ],
)
def test_an_error_body_maps_to_current_version_and_index(
    call: Call, recorder: Recorder, fixed_signer: Signer, method: str, args: tuple[Any, ...],
    kwargs: dict[str, Any], status: int, doc: dict[str, Any], current_version: int | None, index: int | None,
) -> None:
    recorder.answers.append(Answer(status, doc))

    with pytest.raises(KVClientError) as info:
        call(recorder.url, fixed_signer, method, *args, **kwargs)
    err = info.value
    assert (err.status, err.code, err.message, err.doc) == (status, doc["error"], doc["message"], doc)
    assert (err.current_version, err.index) == (current_version, index)


@pytest.mark.parametrize(
    "doc",
    [
        pytest.param(None, id="no-body"),
        pytest.param({"error": "x", "message": "m", "current_version": True, "index": False}, id="bools"),
        pytest.param({"error": "x", "message": "m", "current_version": "3", "index": 1.0}, id="not-integers"),
    ],
)
def test_current_version_and_index_are_none_unless_integers(doc: dict[str, Any] | None) -> None:
    err = KVClientError(500, "x", "m", doc=doc)
    assert (err.current_version, err.index) == (None, None)


@pytest.mark.parametrize(
    ("method", "args", "kwargs", "message"),
    [
        pytest.param("save", ("k", "v"), {"if_version": True}, "if_version must be an integer, not True",
                     id="save-bool-if-version"),
        pytest.param("save", ("k", "v"), {"ttl": "60"}, "ttl must be an integer, not '60'", id="save-str-ttl"),
        pytest.param("save", ("k", "v"), {"ttl": 1.5}, "ttl must be an integer, not 1.5", id="save-float-ttl"),
        pytest.param("delete", ("k",), {"if_version": "3"}, "if_version must be an integer",
                     id="delete-str-if-version"),
        pytest.param("incr", ("k",), {"by": True}, "by must be an integer, not True", id="incr-bool-by"),
        pytest.param("incr", ("k", 2.0), {}, "by must be an integer, not 2.0", id="incr-float-by"),
        pytest.param("incr", ("k",), {"if_version": False}, "if_version must be an integer",
                     id="incr-bool-if-version"),
        pytest.param("keys", (), {"limit": True}, "limit must be an integer, not True", id="keys-bool-limit"),
        pytest.param("iter_keys", (), {"page_size": "10"}, "page_size must be an integer, not '10'",
                     id="iter-keys-str-size"),
        pytest.param("batch", ({"ops": OPS},), {}, "ops must be a list of ops, not dict", id="batch-the-whole-body"),
        pytest.param("batch", ('[{"op": "get"}]',), {}, "ops must be a list of ops, not str", id="batch-text"),
    ],
)
def test_an_obviously_bad_argument_is_refused_before_anything_is_sent(
    call: Call, recorder: Recorder, fixed_signer: Signer, method: str, args: tuple[Any, ...],
    kwargs: dict[str, Any], message: str,
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        call(recorder.url, fixed_signer, method, *args, **kwargs)
    assert recorder.seen == []


def entries(*names: str) -> list[dict[str, Any]]:
    return [{"key": name, "version": i + 1, "expires_at": None, "value": name.upper()} for i, name in
            enumerate(names)]


@pytest.fixture
def counting_signer() -> Signer:
    """The fixed clock with a new nonce for every request: ``auth`` verifies a whole paging."""
    numbers = itertools.count()
    return Signer(TEST_KEY_ID, TEST_SECRET, clock=lambda: NOW, nonce=lambda: f"nonce-{next(numbers):016d}")


def test_iter_keys_follows_the_cursors_to_the_end(call: Call, recorder: Recorder, counting_signer: Signer,
                                                  auth: Authenticator) -> None:
    recorder.answers += [Answer(200, {"keys": entries("a", "b"), "cursor": "after b"}),
                         Answer(200, {"keys": entries("c", "d"), "cursor": "after+d"}),
                         Answer(200, {"keys": entries("e"), "cursor": None})]

    got = call(recorder.url, counting_signer, "iter_keys", "p/", values=True, page_size=2)

    assert got == entries("a", "b") + entries("c", "d") + entries("e")
    assert [seen.target for seen in recorder.seen] == [
        "/keys?prefix=p%2F&limit=2&values=1",
        "/keys?prefix=p%2F&limit=2&cursor=after%20b&values=1",
        "/keys?prefix=p%2F&limit=2&cursor=after%2Bd&values=1",
    ]
    assert [verify_seen(auth, seen) for seen in recorder.seen] == [TEST_KEY_ID] * 3


def test_iter_keys_defaults_to_pages_of_100_without_values(call: Call, recorder: Recorder,
                                                           fixed_signer: Signer) -> None:
    recorder.answers.append(Answer(200, {"keys": [], "cursor": None}))

    assert call(recorder.url, fixed_signer, "iter_keys") == []
    assert [seen.target for seen in recorder.seen] == ["/keys?limit=100"]


def test_iter_keys_refuses_a_cursor_that_does_not_advance(call: Call, recorder: Recorder,
                                                          counting_signer: Signer) -> None:
    recorder.answers += [Answer(200, {"keys": entries("a"), "cursor": "c1"}),
                         Answer(200, {"keys": entries("a"), "cursor": "c1"}),
                         Answer(200, {"keys": [], "cursor": None})]

    with pytest.raises(KVProtocolError, match=re.escape("the cursor it was asked for ('c1')")):
        call(recorder.url, counting_signer, "iter_keys")
    assert len(recorder.seen) == 2  # stopped there, not paged on


def test_iter_keys_stops_at_an_error_page(call: Call, recorder: Recorder, counting_signer: Signer) -> None:
    recorder.answers += [Answer(200, {"keys": entries("a"), "cursor": "c1"}),
                         Answer(400, {"error": "bad_request", "message": "Bad cursor."}),
                         Answer(200, {"keys": [], "cursor": None})]

    with pytest.raises(KVClientError) as info:
        call(recorder.url, counting_signer, "iter_keys")
    assert (info.value.status, info.value.code) == (400, "bad_request")
    assert len(recorder.seen) == 2


def test_iter_keys_is_a_generator_in_both_clients() -> None:
    assert inspect.isgeneratorfunction(KVClient.iter_keys)
    assert inspect.isasyncgenfunction(AsyncKVClient.iter_keys)


def test_kvclient_iter_keys_asks_for_a_page_only_when_the_iteration_gets_there(
    recorder: Recorder, counting_signer: Signer
) -> None:
    recorder.answers += [Answer(200, {"keys": entries("a", "b"), "cursor": "c1"}),
                         Answer(200, {"keys": entries("c"), "cursor": None})]
    with KVClient(recorder.url, counting_signer, timeout_s=5) as client:
        listing = client.iter_keys(page_size=2)
        assert recorder.seen == []
        assert [next(listing)["key"], next(listing)["key"]] == ["a", "b"]
        assert len(recorder.seen) == 1
        assert [e["key"] for e in listing] == ["c"]
    assert len(recorder.seen) == 2


# --- KVClient: one keep-alive connection, and a request is sent at most once ---------------------


def test_a_keep_alive_connection_the_server_closed_is_replaced_before_sending(
    recorder: Recorder, fixed_signer: Signer
) -> None:
    recorder.answers += [Answer(200, {"n": 1}, then_close=True), Answer(200, {"n": 2}), Answer(200, {"n": 3})]
    with KVClient(recorder.url, fixed_signer, timeout_s=5) as client:
        assert client.request("GET", "/authorize").json() == {"n": 1}
        assert recorder.closed.acquire(timeout=5)  # the server has dropped the idle connection
        assert client.request("GET", "/authorize").json() == {"n": 2}
        assert client.request("GET", "/authorize").json() == {"n": 3}

    first, second, third = recorder.seen
    assert first.peer != second.peer == third.peer  # a new connection, then kept alive


def test_a_request_that_was_sent_is_never_sent_again(recorder: Recorder, fixed_signer: Signer) -> None:
    recorder.answers += [Answer(drop=True), Answer(200, {"n": 2})]
    with KVClient(recorder.url, fixed_signer, timeout_s=5) as client:
        with pytest.raises(ConnectionError):
            client.save("k", "v")
        assert len(recorder.seen) == 1  # not retried: the server may have acted on it
        assert client.request("GET", "/authorize").json() == {"n": 2}  # and the client goes on
    assert len(recorder.seen) == 2


# --- against a real exercise 3: a body refused from its Content-Length ---------------------------

MAX_BODY = 128 * 1024


@pytest.fixture(scope="module")
def exercise3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("exercise3")
    write_keys(folder / "keys" / "kv.keys", [f"{TEST_KEY_ID} {TEST_SECRET.decode()}"])
    cfg = write_config(folder, {"server": {"max_body_bytes": MAX_BODY}})
    with ServerProcess.start(3, cfg) as server:
        server.wait_listening()
        yield server
        assert server.stop() == 0, server.lines


def access_log_of(server: ServerProcess, action: Callable[[], Any]) -> list[str]:
    """The server's access-log lines for what ``action`` sent (each ends with an unsigned marker request,
    which the server logs after everything sent before it)."""
    mark = f"/mark-{uuid.uuid4().hex}"
    start = len(server.lines)
    try:
        action()
    finally:
        with KVClient(server.base_url, None, timeout_s=5) as c:
            assert c.request("GET", mark, sign=False).status == 404
        server.wait_for(re.escape(mark))
    lines = server.lines[start:]
    return [line for line in lines[: next(i for i, line in enumerate(lines) if mark in line)]
            if "kvtornado.access" in line]


# Just over the limit fits in the socket buffers, so the whole body is sent before the answer is read; 64 MiB
# is more than Linux's TCP buffers can ever hold (tcp_rmem + tcp_wmem maxima), so that upload surely breaks
# off midway; 3 MB is either, depending on the machine.
BIG_VALUES = [pytest.param(MAX_BODY, id="just-over"), pytest.param(3_000_000, id="3MB"),
              pytest.param(64 << 20, id="64MiB")]


def assert_too_large(err: KVClientError) -> None:
    assert (err.status, err.code) == (413, "too_large")
    assert set(err.doc) == {"error", "message"} and err.doc["error"] == "too_large"
    assert f"the limit is {MAX_BODY}" in err.doc["message"]


def requests_in(lines: list[str]) -> list[str]:
    """``["413 POST /save", ...]`` from access-log lines."""
    return [re.sub(r" \(.*$", "", line.split("kvtornado.access: ", 1)[1]) for line in lines]


@pytest.mark.parametrize("size", BIG_VALUES)
def test_kvclient_raises_the_servers_413_and_uploads_once(exercise3: ServerProcess, signer: Signer,
                                                          size: int) -> None:
    errors: list[KVClientError] = []
    with KVClient(exercise3.base_url, signer, timeout_s=10) as client:

        def save() -> None:
            with pytest.raises(KVClientError) as raised:
                client.save("big", "x" * size)
            errors.append(raised.value)

        lines = access_log_of(exercise3, save)
        assert client.ping() == {"ping": "pong"}  # the same client goes on, on a new connection

    (err,) = errors
    assert_too_large(err)
    assert requests_in(lines) == ["413 POST /save"]


@pytest.mark.parametrize("size", BIG_VALUES)
def test_async_client_raises_the_servers_413_and_uploads_once(exercise3: ServerProcess, signer: Signer,
                                                              io_loop: Any, size: int) -> None:
    async def save() -> KVClientError:
        with pytest.raises(KVClientError) as raised:
            await AsyncKVClient(exercise3.base_url, signer, timeout_s=10).save("big", "x" * size)
        return raised.value

    errors: list[KVClientError] = []
    lines = access_log_of(exercise3, lambda: errors.append(io_loop.run_sync(save, timeout=20)))
    (err,) = errors
    assert_too_large(err)
    assert requests_in(lines) == ["413 POST /save"]


def test_a_value_near_the_limit_is_saved_by_both_clients(call: Call, exercise3: ServerProcess,
                                                         signer: Signer) -> None:
    """Past 64 KiB AsyncKVClient sends its body after the server's ``100 Continue``; KVClient at once."""
    value = "é" * 60_000 + "x" * 8_000  # 128 000 bytes of body: under the limit, over 64 KiB
    assert call(exercise3.base_url, signer, "save", "near", value)["saved"] is True
    assert call(exercise3.base_url, signer, "get", "near") == value
