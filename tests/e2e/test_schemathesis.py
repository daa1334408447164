"""``docs/openapi.yaml`` against a live ``python exercise4.py``, driven by Schemathesis.

Every operation gets generated cases (valid and invalid data), each signed with the project's own
``kvtornado.auth.sign_request`` over the request exactly as it goes on the wire. Every answer must be
documented (status, content type, headers, body), no answer may be a 5xx, and no signed request may be
refused as unauthenticated. A second pass sends the protected operations unsigned and must see only 401.
Generation is derandomized and bounded, so the run is the same every time.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from requests.auth import AuthBase
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from kvtornado.client import KVClient, Signer
from kvtornado.codec import only_get_ops
from tests.conftest import TEST_KEY_ID, TEST_SECRET, write_config, write_keys
from tests.e2e.helpers import ROOT, VERSION, ServerProcess

SCHEMA_PATH = ROOT / "docs" / "openapi.yaml"
# Cases per operation and generation mode: enough to reach every documented answer, small enough for seconds.
MAX_EXAMPLES = 20
UNSIGNED_EXAMPLES = 8
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
HTTP_TIMEOUT_S = 10.0


DOC = yaml.safe_load(SCHEMA_PATH.read_text(encoding="utf-8"))
LABELS = [f"{method.upper()} {path}" for path, item in DOC["paths"].items() for method in item]


PUBLIC = ("GET /ping", "HEAD /ping", "GET /healthz", "GET /readyz")  # SPEC §5, §11: no signature


def _is_protected(label: str) -> bool:
    return label not in PUBLIC


def _signed_runs() -> list[tuple[str, GenerationMode]]:
    """Every operation with valid data; with invalid data too, unless it has nothing to make invalid
    (``GET /ping``, ``/healthz`` and ``/readyz`` take no parameter, no body and no credentials)."""
    runs = []
    for path, item in DOC["paths"].items():
        for method, op in item.items():
            label = f"{method.upper()} {path}"
            runs.append((label, GenerationMode.POSITIVE))
            if op.get("parameters") or op.get("requestBody") or _is_protected(label):
                runs.append((label, GenerationMode.NEGATIVE))
    return runs


class KVHmacAuth(AuthBase):
    """Signs the final prepared request: method, Host, path and query as on the request line, body bytes.

    ``requests`` runs auth after it has encoded the URL and the body, so what is signed is what is sent;
    ``Signer.authorization`` is ``kvtornado.auth.sign_request`` with the signer's clock and nonces.
    With ``signer=None`` it strips any ``Authorization`` instead (the unsigned pass). ``then`` headers are
    set after signing: for requests that must be refused.
    """

    def __init__(self, signer: Signer | None, then: Mapping[str, str | None] | None = None) -> None:
        self.signer = signer
        self.then = dict(then or {})

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers.pop("Authorization", None)
        if self.signer is not None:
            self._sign(r, self.signer)
        for name, value in self.then.items():
            if value is None:
                r.headers.pop(name, None)
            else:
                r.headers[name] = value
        return r

    @staticmethod
    def _sign(r: requests.PreparedRequest, signer: Signer) -> None:
        body = r.body or b""
        if isinstance(body, str):
            # http.client would send a str as Latin-1: send (and sign) its UTF-8 bytes instead; requests
            # recomputes Content-Length after auth.
            body = body.encode("utf-8")
            r.body = body
        assert isinstance(body, bytes), f"cannot sign a streamed body: {type(body)!r}"
        host = urlsplit(r.url).netloc
        r.headers["Host"] = host  # sent as given, so the signed Host is the sent one
        path, _, query = r.path_url.partition("?")
        r.headers["Authorization"] = signer.authorization(r.method or "", host, path, query, body)


@pytest.fixture(scope="module")
def schema() -> Any:
    loaded = schemathesis.openapi.from_path(SCHEMA_PATH)
    loaded.validate()  # a valid OpenAPI 3.1 document, or nothing below means anything
    return loaded


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("schemathesis")
    write_keys(folder / "keys" / "kv.keys", [f"{TEST_KEY_ID} {TEST_SECRET.decode()}",
                                             f"{READ_KEY_ID} {READ_SECRET.decode()} role=read"])
    config = write_config(folder)
    with ServerProcess.start(4, config) as proc:
        proc.wait_listening()
        yield proc
        assert proc.stop() == 0, proc.lines


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


# What valid, signed data must reach at least once per operation: the work itself, not only refusals.
REACHED = {
    "GET /ping": {200}, "GET /healthz": {200}, "GET /readyz": {200},
    "GET /authorize": {200}, "POST /authorize": {200}, "POST /save": {200},
    "POST /flush": {200}, "GET /stats": {200}, "GET /keys": {200}, "POST /incr": {200}, "POST /batch": {200},
    # 200 or 404: a valid, signed request reached the key/value store.
    "GET /get": {200, 404}, "DELETE /delete": {200, 404}, "POST /delete": {200, 404},
}


def _run(
    schema: Any, label: str, mode: GenerationMode, max_examples: int, send: Callable[[Case], None]
) -> None:
    operation = schema.find_operation_by_label(label)
    assert operation is not None, f"{label} is not in {SCHEMA_PATH}"

    # No shrinking: a failure is reported as found, at once, with its curl command.
    @settings(
        max_examples=max_examples, derandomize=True, database=None, deadline=None,
        phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Case) -> None:
        send(case)

    run()


def _call(case: Case, server: ServerProcess, session: requests.Session, auth: KVHmacAuth) -> Any:
    return case.call(base_url=server.base_url, session=session, auth=auth, timeout=HTTP_TIMEOUT_S,
                     allow_redirects=False)


@pytest.mark.parametrize(("label", "mode"), _signed_runs(), ids=lambda v: getattr(v, "value", v))
def test_signed_requests_get_documented_answers(
    schema: Any, server: ServerProcess, session: requests.Session, label: str, mode: GenerationMode,
) -> None:
    auth = KVHmacAuth(Signer(TEST_KEY_ID, TEST_SECRET))
    statuses: Counter[int] = Counter()

    def send(case: Case) -> None:
        response = _call(case, server, session, auth)
        statuses[response.status_code] += 1
        case.validate_response(response, checks=CHECKS)
        # 401 is documented, so the conformance checks would let a signing mistake through.
        assert response.status_code != 401, (case.as_curl_command(), response.text)

    _run(schema, label, mode, MAX_EXAMPLES, send)
    assert sum(statuses.values()) > 0
    if mode == GenerationMode.POSITIVE and label in REACHED:
        assert sum(statuses[s] for s in REACHED[label]) > 0, (label, statuses)


@pytest.mark.parametrize("label", [label for label in LABELS if _is_protected(label)])
def test_unsigned_requests_are_401_missing_auth(
    schema: Any, server: ServerProcess, session: requests.Session, label: str
) -> None:
    auth = KVHmacAuth(None)
    count = 0

    def send(case: Case) -> None:
        nonlocal count
        response = _call(case, server, session, auth)
        count += 1
        case.validate_response(response, checks=CHECKS)
        assert response.status_code == 401, (case.as_curl_command(), response.status_code, response.text)
        assert response.json()["error"] == "missing_auth"
        assert response.headers["www-authenticate"] == ['KV-HMAC-SHA256 error="missing_auth"']  # lower-cased names

    _run(schema, label, GenerationMode.POSITIVE, UNSIGNED_EXAMPLES, send)
    assert count > 0


# A read-only key (SPEC §4 "Scoped keys"): every generated request to a route it may not call — valid data or
# not, since the role is checked before the request is validated — is 403, and those it may call never are
# (a /batch is 403 exactly when it holds an op other than get).
READ_KEY_ID, READ_SECRET = "dashboard", b"d" * 48
READ_ROUTES = {"GET /authorize", "POST /authorize", "GET /get", "GET /keys", "POST /batch"}
READ_ONLY_EXAMPLES = 5


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
@pytest.mark.parametrize("label", [label for label in LABELS if _is_protected(label)])
def test_a_read_only_key_sees_no_5xx_and_only_403_for_writes(
    schema: Any, server: ServerProcess, session: requests.Session, label: str, mode: GenerationMode
) -> None:
    auth = KVHmacAuth(Signer(READ_KEY_ID, READ_SECRET))
    statuses: Counter[int] = Counter()

    def send(case: Case) -> None:
        response = _call(case, server, session, auth)
        statuses[response.status_code] += 1
        case.validate_response(response, checks=CHECKS)
        assert response.status_code != 401, (case.as_curl_command(), response.text)
        if label not in READ_ROUTES:
            expected = response.status_code == 403
        elif label == "POST /batch":
            sent = response.request.body or b""
            expected = (response.status_code == 403) != only_get_ops(sent if isinstance(sent, bytes) else b"")
        else:
            expected = response.status_code != 403
        assert expected, (case.as_curl_command(), response.status_code, response.text)
        if response.status_code == 403:
            assert response.json()["error"] == "forbidden"

    _run(schema, label, mode, READ_ONLY_EXAMPLES, send)
    assert sum(statuses.values()) > 0
    if mode == GenerationMode.POSITIVE and label not in READ_ROUTES:
        assert statuses == Counter({403: sum(statuses.values())}), statuses
    if mode == GenerationMode.POSITIVE and label in READ_ROUTES - {"POST /batch"}:
        assert sum(statuses[s] for s in REACHED[label]) > 0, (label, statuses)


# Answers generated data rarely reaches, each checked against the schema like the generated ones.
# (label, query, body, signer, headers set after signing, status, error code or None)
_GOOD = Signer(TEST_KEY_ID, TEST_SECRET)
EdgeCase = tuple[str, dict[str, str] | None, Any, Signer | None, dict[str, str] | None, int, str | None]
EDGE_CASES: dict[str, EdgeCase] = {
    # condition headers are not signed, so they are refused rather than ignored (SPEC §5)
    "conditional GET /ping": ("GET /ping", None, None, None, {"If-None-Match": "*"}, 400, "bad_request"),
    "conditional GET /authorize": ("GET /authorize", None, None, _GOOD, {"If-None-Match": "*"}, 400, "bad_request"),
    "If-Match on GET /stats": ("GET /stats", None, None, _GOOD, {"If-Match": '"1"'}, 400, "bad_request"),
    "stale timestamp": ("GET /authorize", None, None, Signer(TEST_KEY_ID, TEST_SECRET, clock=lambda: 1_000_000_000),
                        None, 401, "stale_timestamp"),
    "bad signature": ("POST /flush", None, None, Signer(TEST_KEY_ID, b"b" * 64), None, 401, "bad_signature"),
    "unknown key": ("GET /get", {"key": "k"}, None, Signer("nobody", TEST_SECRET), None, 401, "unknown_key"),
    "malformed auth": ("GET /stats", None, None, None, {"Authorization": "Bearer x"}, 401, "malformed_auth"),
    "key over 512 bytes": ("GET /get", {"key": "é" * 257}, None, _GOOD, None, 413, "too_large"),
    # requests recomputes Content-Length after auth whenever there is a body: these announce one and send none.
    "body announced too large, unsigned": ("POST /save", None, None, None, {"Content-Length": str(10**12)},
                                           413, "too_large"),
    "body announced too large on /ping": ("GET /ping", None, None, None, {"Content-Length": str(10**12)},
                                          413, "too_large"),
    "two Content-Lengths": ("GET /ping", None, None, None, {"Content-Length": "1, 2"}, 400, "bad_request"),
    "gzip Transfer-Encoding": ("GET /stats", None, None, _GOOD, {"Transfer-Encoding": "gzip"}, 400, "bad_request"),
    "durable=maybe": ("DELETE /delete", {"key": "k", "durable": "maybe"}, None, _GOOD, None, 400, "bad_request"),
    "POST /delete with neither body nor key": ("POST /delete", None, None, _GOOD, None, 400, "missing_key"),
    "text body": ("POST /save", None, "key=k", _GOOD, {"Content-Type": "text/plain"}, 415,
                  "unsupported_media_type"),
    "form body on /incr": ("POST /incr", None, "key=k", _GOOD, None, 415, "unsupported_media_type"),
    "form body on /batch": ("POST /batch", None, "ops=k", _GOOD, None, 415, "unsupported_media_type"),
    # versions, conditions and expiry (SPEC §5)
    "ttl=0": ("POST /save", {"ttl": "0"}, {"key": "edge-ttl", "value": 1}, _GOOD, None, 400, "bad_request"),
    "empty if_version": ("POST /save", {"if_version": ""}, {"key": "edge-cond", "value": 1}, _GOOD, None, 400,
                         "bad_request"),
    "ttl in the /save body": ("POST /save", None, {"key": "edge-ttl", "value": 1, "ttl": 5}, _GOOD, None, 400,
                              "bad_request"),
    "if_version of an absent key": ("POST /save", {"if_version": "7"}, {"key": "edge-absent", "value": 1}, _GOOD,
                                    None, 412, "version_mismatch"),
    "delete?if_version=0 of an absent key": ("DELETE /delete", {"key": "edge-absent", "if_version": "0"}, None,
                                             _GOOD, None, 404, "not_found"),
    "incr by 1.5": ("POST /incr", None, {"key": "edge-n", "by": 1.5}, _GOOD, None, 400, "bad_request"),
    "limit=0": ("GET /keys", {"limit": "0"}, None, _GOOD, None, 400, "bad_request"),
    "values=2": ("GET /keys", {"values": "2"}, None, _GOOD, None, 400, "bad_request"),
    "empty batch": ("POST /batch", None, {"ops": []}, _GOOD, None, 400, "bad_request"),
    "batch incr of a non-integer": ("POST /batch", None, {"ops": [{"op": "save", "key": "edge-text", "value": "x"},
                                                                 {"op": "incr", "key": "edge-text"}]},
                                    _GOOD, None, 409, "not_an_integer"),
}
# What the error body carries besides error and message (SPEC §5).
EDGE_FIELDS = {
    "if_version of an absent key": {"current_version": 0},
    "batch incr of a non-integer": {"index": 1},
}


def _check_error_answer(response: Any, status: int, code: str | None) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    if code is not None:
        assert response.json()["error"] == code, response.text


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_edge_answers_are_documented(schema: Any, server: ServerProcess, name: str) -> None:
    label, query, body, signer, headers, status, code = EDGE_CASES[name]
    operation = schema.find_operation_by_label(label)
    if body is None:
        case = operation.Case(query=query)
    elif isinstance(body, str):  # sent as it is, under the Content-Type set after signing
        case = operation.Case(query=query, body=body, media_type="application/x-www-form-urlencoded")
    else:
        case = operation.Case(query=query, body=body, media_type="application/json")
    # No shared session: a request refused before its body is read has its connection closed after the answer.
    response = case.call(base_url=server.base_url, auth=KVHmacAuth(signer, headers), timeout=HTTP_TIMEOUT_S)
    _check_error_answer(response, status, code)
    case.validate_response(response, checks=CHECKS)
    if code == "stale_timestamp":
        assert abs(int(response.headers["x-kv-server-time"][0]) - time.time()) < 60
    for field, value in EDGE_FIELDS.get(name, {}).items():
        assert response.json()[field] == value, response.text
    assert "etag" not in response.headers, response.headers


def test_versions_expiry_and_etag_as_documented(schema: Any, server: ServerProcess) -> None:
    """One key through save (with a ttl), get, a conditional incr, a listing and a batch: every answer
    documented, every write a greater version, the ETag the quoted version, the expiry kept by incr."""
    auth = KVHmacAuth(Signer(TEST_KEY_ID, TEST_SECRET))

    def call(label: str, query: dict[str, str] | None = None, body: Any = None) -> Any:
        operation = schema.find_operation_by_label(label)
        if body is None:
            case = operation.Case(query=query)
        else:
            case = operation.Case(query=query, body=body, media_type="application/json")
        response = case.call(base_url=server.base_url, auth=auth, timeout=HTTP_TIMEOUT_S)
        _check_error_answer(response, 200, None)
        case.validate_response(response, checks=CHECKS)
        return response

    key = "edge-versions/n"
    saved = call("POST /save", {"ttl": "3600"}, {"key": key, "value": 41}).json()
    got = call("GET /get", {"key": key})
    assert got.headers["etag"] == [f'"{saved["version"]}"']
    assert got.json()["version"] == saved["version"]
    expires_at = got.json()["expires_at"]
    assert 3500 < expires_at - time.time() <= 3601  # set when the save was acknowledged
    incr = call("POST /incr", {"if_version": str(saved["version"])}, {"key": key}).json()
    assert incr == {"key": key, "value": 42, "version": incr["version"]} and incr["version"] > saved["version"]
    listed = call("GET /keys", {"prefix": "edge-versions/", "values": "1"}).json()
    assert listed == {"keys": [{"key": key, "version": incr["version"], "expires_at": expires_at, "value": 42}],
                      "cursor": None}
    ops = [{"op": "incr", "key": key, "by": -2, "if_version": incr["version"]}, {"op": "get", "key": key},
           {"op": "delete", "key": key}, {"op": "delete", "key": key}, {"op": "get", "key": key}]
    results = call("POST /batch", None, {"ops": ops}).json()["results"]
    assert results[0]["value"] == 40 and results[0]["version"] > incr["version"]
    assert results[1] == {"key": key, "found": True, "value": 40, "version": results[0]["version"],
                          "expires_at": expires_at}
    assert results[2]["deleted"] is True and results[2]["version"] > results[0]["version"]
    assert results[3:] == [{"key": key, "deleted": False}, {"key": key, "found": False}]


def test_a_replayed_nonce_is_401_as_documented(schema: Any, server: ServerProcess) -> None:
    auth = KVHmacAuth(Signer(TEST_KEY_ID, TEST_SECRET, nonce=lambda: "replayed-nonce-0123456789"))
    case = schema.find_operation_by_label("POST /authorize").Case()
    first = case.call(base_url=server.base_url, auth=auth, timeout=HTTP_TIMEOUT_S)
    again = case.call(base_url=server.base_url, auth=auth, timeout=HTTP_TIMEOUT_S)
    _check_error_answer(first, 200, None)
    _check_error_answer(again, 401, "replayed_nonce")
    case.validate_response(again, checks=CHECKS)


def test_overloaded_is_503_with_retry_after_as_documented(schema: Any, tmp_path: Path) -> None:
    """A second server that takes one pending write and cannot commit it (sqlite is locked by the test):
    the next new key is 503."""
    write_keys(tmp_path / "keys" / "kv.keys", [f"{TEST_KEY_ID} {TEST_SECRET.decode()}"])
    config = write_config(tmp_path, {"cache": {"max_dirty": 1, "flush_interval_ms": 3_600_000}})
    auth = KVHmacAuth(Signer(TEST_KEY_ID, TEST_SECRET))
    save = schema.find_operation_by_label("POST /save")
    with ServerProcess.start(4, config) as proc:
        proc.wait_listening()
        first = save.Case(body={"key": "one", "value": 1}, media_type="application/json")
        second = save.Case(body={"key": "two", "value": 2}, media_type="application/json")
        lock = sqlite3.connect(str(tmp_path / "data" / "kv.sqlite3"), isolation_level=None)
        try:
            lock.execute("BEGIN IMMEDIATE")  # the flush that max_dirty starts waits on this lock
            _check_error_answer(first.call(base_url=proc.base_url, auth=auth, timeout=HTTP_TIMEOUT_S), 200, None)
            refused = second.call(base_url=proc.base_url, auth=auth, timeout=HTTP_TIMEOUT_S)
        finally:
            lock.close()
        _check_error_answer(refused, 503, "overloaded")
        # Every check but not_a_server_error: this 5xx is the documented answer.
        second.validate_response(refused, checks=CHECKS[1:])
        assert int(refused.headers["retry-after"][0]) >= 1
        flush = schema.find_operation_by_label("POST /flush").Case()
        flushed = flush.call(base_url=proc.base_url, auth=auth, timeout=HTTP_TIMEOUT_S)
        flush.validate_response(flushed, checks=CHECKS)
        # The flush held up by the lock may already have committed "one" when this arrives.
        assert flushed.json()["flushed"] in (0, 1)
        check = sqlite3.connect(str(tmp_path / "data" / "kv.sqlite3"))
        try:
            assert check.execute("SELECT key, value FROM kv").fetchall() == [("one", "1")]
        finally:
            check.close()
        assert proc.stop() == 0, proc.lines


def test_generated_requests_leave_the_server_healthy(
    schema: Any, server: ServerProcess, session: requests.Session
) -> None:
    """On its own (no reliance on the other tests' order): a generated run of every operation, valid and
    invalid, then the server still serves, and nothing went wrong inside it."""
    auth = KVHmacAuth(Signer(TEST_KEY_ID, TEST_SECRET))
    for label, mode in _signed_runs():
        _run(schema, label, mode, 3, lambda case: _call(case, server, session, auth))
    assert server.proc.poll() is None, server.lines
    with KVClient(server.base_url, Signer(TEST_KEY_ID, TEST_SECRET)) as client:
        assert client.ping() == {"ping": "pong"}
        value = {"after": "schemathesis", "n": [1, 2.5, None, True], "text": "héllo ☃"}
        assert client.save("health-check", value) == {"key": "health-check", "saved": True, "version": VERSION}
        assert client.get("health-check") == value
        assert client.flush()["flushed"] >= 1
        assert client.get("health-check") == value
    # Nothing went wrong inside the server either: no traceback, no 5xx in the access log.
    log_text = "\n".join(server.lines)
    assert "Traceback" not in log_text
    assert not re.search(r"kvtornado\.access: 5\d\d ", log_text), log_text


def test_the_schema_documents_every_operation_of_spec_section_5() -> None:
    expected = {
        "GET /ping", "HEAD /ping", "GET /authorize", "POST /authorize", "POST /save", "GET /get", "DELETE /delete",
        "POST /delete", "GET /keys", "POST /incr", "POST /batch", "POST /flush", "GET /stats",
        "GET /healthz", "GET /readyz",
    }
    assert set(LABELS) == expected
    for path, item in DOC["paths"].items():
        for method, op in item.items():
            protected = _is_protected(f"{method.upper()} {path}")
            assert ("401" in op["responses"]) == protected, (method, path)
            assert op.get("security", DOC["security"]) == ([{"kvHmac": []}] if protected else []), (method, path)
