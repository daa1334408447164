"""Exercise 2 over real HTTP: ``KV-HMAC-SHA256`` on ``/authorize``, every failure with its SPEC §4 code."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from tornado.web import Application

from kvtornado.app import make_app
from kvtornado.auth import Authenticator, sign_request
from kvtornado.client import AsyncKVClient, Signer
from kvtornado.config import Config
from tests.conftest import TEST_KEY_ID, TEST_SECRET
from tests.e2e.helpers import assert_error, assert_json, fetch, host_of, send, serving

NONCE = "00112233445566778899aabbccddeeff"


@pytest.fixture
def app(config: Config, authenticator: Authenticator) -> Application:
    return make_app(config, authenticator=authenticator)


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.gen_test
async def test_signed_authorize_is_200(http_client: Any, base_url: str, signer: Signer, method: str) -> None:
    body = b'{"hello":"world"}' if method == "POST" else b""
    resp = await send(http_client, base_url, method, "/authorize", body=body, content_type="application/json",
                      signer=signer)
    assert assert_json(resp, 200) == {"authorized": True, "key_id": TEST_KEY_ID, "role": "admin", "prefix": None}
    assert resp.header("Cache-Control") == "no-store"


@pytest.mark.gen_test
async def test_signed_authorize_refuses_a_query_and_takes_the_project_client(http_client: Any, base_url: str,
                                                                            signer: Signer) -> None:
    # /authorize takes no query parameters (SPEC §5): a signed one is still 400, after the signature check.
    resp = await send(http_client, base_url, "GET", "/authorize", query="a=1&b=%20x%2F&c", signer=signer)
    assert_error(resp, 400, "bad_request")
    resp = await send(http_client, base_url, "GET", "/authorize", query="a=1", signer=None)
    assert_error(resp, 401, "missing_auth")
    assert await AsyncKVClient(base_url, signer).authorize() == {"authorized": True, "key_id": TEST_KEY_ID,
                                                                 "role": "admin", "prefix": None}


@pytest.mark.gen_test
async def test_every_key_of_the_keys_file_is_accepted(http_client: Any, config: Config) -> None:
    # Rotation: several keys are active at once; each request answers with its own key id.
    auth = Authenticator({"old": b"o" * 40, "new": b"n" * 40})
    async with serving(make_app(config, authenticator=auth)) as url:
        for key_id, secret in (("old", b"o" * 40), ("new", b"n" * 40)):
            resp = await send(http_client, url, "GET", "/authorize", signer=Signer(key_id, secret))
            assert assert_json(resp, 200) == {"authorized": True, "key_id": key_id, "role": "admin", "prefix": None}
        resp = await send(http_client, url, "GET", "/authorize", signer=Signer("old", b"n" * 40))
        assert_error(resp, 401, "bad_signature")


@pytest.mark.gen_test
async def test_parameters_in_any_order_with_white_space(http_client: Any, base_url: str) -> None:
    ts, nonce = int(time.time()), "abcdefABCDEF0123_-xy"
    header = sign_request(TEST_SECRET, key_id=TEST_KEY_ID, method="GET", host=host_of(base_url), path="/authorize",
                          ts=ts, nonce=nonce)
    sig = header.rsplit("sig=", 1)[1]
    shuffled = f"KV-HMAC-SHA256   sig={sig} ,nonce = {nonce},\tts={ts},  keyid={TEST_KEY_ID}  "
    resp = await fetch(http_client, base_url, "GET", "/authorize", {"Authorization": shuffled}, b"")
    assert assert_json(resp, 200) == {"authorized": True, "key_id": TEST_KEY_ID, "role": "admin", "prefix": None}


@pytest.mark.gen_test
async def test_the_host_is_signed_in_lower_case(http_client: Any, base_url: str, signer: Signer) -> None:
    upper = host_of(base_url).upper()
    resp = await send(http_client, base_url, "GET", "/authorize", signer=signer, headers={"Host": upper},
                      sign_as={"host": upper.lower()})
    assert assert_json(resp, 200)["authorized"] is True


@pytest.mark.gen_test
async def test_public_host_is_signed_in_place_of_the_host_header(http_client: Any, config: Config,
                                                                 signer: Signer) -> None:
    auth = Authenticator({TEST_KEY_ID: TEST_SECRET}, public_host="KV.example.com")
    async with serving(make_app(config, authenticator=auth)) as url:
        resp = await send(http_client, url, "GET", "/authorize", signer=signer, sign_as={"host": "kv.example.com"})
        assert assert_json(resp, 200)["key_id"] == TEST_KEY_ID
        resp = await send(http_client, url, "GET", "/authorize", signer=signer)  # signed with the Host header
        assert_error(resp, 401, "bad_signature")


# --- the failure table --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One request to ``/authorize``: what is sent, and (``sign_as``) what was signed instead."""

    code: str
    method: str = "POST"
    query: str = ""
    body: bytes = b'{"a":1}'
    authorization: str | None = "sign"  # "sign": a correct header for ``sign_as``; None: no header
    sign_as: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    signer: Signer | None = None


def _header(**params: str) -> str:
    return "KV-HMAC-SHA256 " + ", ".join(f"{k}={v}" for k, v in params.items())


_SIG = "0" * 64
_OK = {"keyid": TEST_KEY_ID, "ts": "1700000000", "nonce": NONCE, "sig": _SIG}

AUTH_FAILURES = {
    "missing header": Case("missing_auth", authorization=None),
    "empty header": Case("malformed_auth", authorization=""),
    "wrong scheme bearer": Case("malformed_auth", authorization="Bearer abcdef"),
    "wrong scheme basic": Case("malformed_auth", authorization="Basic azE6c2VjcmV0"),
    "scheme only": Case("malformed_auth", authorization="KV-HMAC-SHA256"),
    "scheme in lower case": Case("malformed_auth", authorization=_header(**_OK).replace("KV-HMAC-SHA256", "kv-hmac")),
    "missing sig": Case("malformed_auth", authorization=_header(keyid="k1", ts="1700000000", nonce=NONCE)),
    "missing ts": Case("malformed_auth", authorization=_header(keyid="k1", nonce=NONCE, sig=_SIG)),
    "duplicated nonce param": Case("malformed_auth", authorization=_header(**_OK) + f", nonce={NONCE}"),
    "unknown param": Case("malformed_auth", authorization=_header(**_OK, realm="x")),
    "param without value sign": Case("malformed_auth", authorization=_header(**_OK) + ", sig"),
    "ts not an integer": Case("malformed_auth", authorization=_header(**{**_OK, "ts": "1700000000.5"})),
    "ts in hex": Case("malformed_auth", authorization=_header(**{**_OK, "ts": "0x6553f100"})),
    "nonce too short": Case("malformed_auth", authorization=_header(**{**_OK, "nonce": "abc"})),
    "nonce with a dot": Case("malformed_auth", authorization=_header(**{**_OK, "nonce": "0011223344556677.8"})),
    "sig upper case": Case("malformed_auth", authorization=_header(**{**_OK, "sig": "A" * 64})),
    "sig too short": Case("malformed_auth", authorization=_header(**{**_OK, "sig": "0" * 63})),
    "key id with a space": Case("malformed_auth", authorization=_header(**{**_OK, "keyid": "k 1"})),
    "unknown key id": Case("unknown_key", signer=Signer("nobody", TEST_SECRET)),
    "wrong secret": Case("bad_signature", signer=Signer(TEST_KEY_ID, b"b" * 64)),
    "made-up sig": Case("bad_signature", authorization=_header(**{**_OK, "ts": str(int(time.time()))})),
    "tampered method": Case("bad_signature", method="POST", sign_as={"method": "GET"}),
    "tampered path": Case("bad_signature", sign_as={"path": "/save"}),
    "tampered path encoding": Case("bad_signature", sign_as={"path": "/%61uthorize"}),
    "tampered query": Case("bad_signature", query="x=2", sign_as={"query": "x=1"}),
    "query added": Case("bad_signature", query="x=1", sign_as={"query": ""}),
    "query re-encoded": Case("bad_signature", query="k=a+b", sign_as={"query": "k=a%20b"}),
    "tampered host": Case("bad_signature", sign_as={"host": "evil.example:80"}),
    "tampered body": Case("bad_signature", body=b'{"a":2}', sign_as={"body": b'{"a":1}'}),
    "body dropped": Case("bad_signature", body=b"", sign_as={"body": b'{"a":1}'}),
    "stale past timestamp": Case("stale_timestamp", signer=Signer(TEST_KEY_ID, TEST_SECRET,
                                                                  clock=lambda: time.time() - 301 - 5)),
    "stale future timestamp": Case("stale_timestamp", signer=Signer(TEST_KEY_ID, TEST_SECRET,
                                                                    clock=lambda: time.time() + 301 + 5)),
    "timestamp zero": Case("stale_timestamp", signer=Signer(TEST_KEY_ID, TEST_SECRET, clock=lambda: 0.0)),
}


@pytest.mark.parametrize("case", list(AUTH_FAILURES.values()), ids=list(AUTH_FAILURES))
@pytest.mark.gen_test
async def test_auth_failure(http_client: Any, base_url: str, signer: Signer, case: Case) -> None:
    host = host_of(base_url)
    headers = {"Host": host, "Content-Type": "application/json", **case.headers}
    if case.authorization == "sign":
        signed = {"method": case.method, "host": host, "path": "/authorize", "query": case.query,
                  "body": case.body, **case.sign_as}
        headers["Authorization"] = (case.signer or signer).authorization(
            signed["method"], signed["host"], signed["path"], signed["query"], signed["body"])
    elif case.authorization is not None:
        headers["Authorization"] = case.authorization
    target = "/authorize" + ("?" + case.query if case.query else "")
    resp = await fetch(http_client, base_url, case.method, target, headers, case.body)
    assert_error(resp, 401, case.code)
    if case.code == "stale_timestamp":
        server_time = resp.header("X-KV-Server-Time")
        assert server_time is not None and server_time.isdigit(), resp.headers
        assert abs(int(server_time) - time.time()) < 60
    else:
        assert resp.header("X-KV-Server-Time") is None


@pytest.mark.gen_test
async def test_a_failure_does_not_spend_the_nonce(http_client: Any, base_url: str) -> None:
    # The MAC is checked before the nonce: a forged request with a nonce does not block the real one.
    ts = int(time.time())
    forged = sign_request(b"x" * 64, key_id=TEST_KEY_ID, method="GET", host=host_of(base_url), path="/authorize",
                          ts=ts, nonce=NONCE)
    resp = await fetch(http_client, base_url, "GET", "/authorize", {"Authorization": forged}, b"")
    assert_error(resp, 401, "bad_signature")
    real = sign_request(TEST_SECRET, key_id=TEST_KEY_ID, method="GET", host=host_of(base_url), path="/authorize",
                        ts=ts, nonce=NONCE)
    resp = await fetch(http_client, base_url, "GET", "/authorize", {"Authorization": real}, b"")
    assert assert_json(resp, 200)["key_id"] == TEST_KEY_ID


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.gen_test
async def test_replayed_request_is_refused(http_client: Any, base_url: str, signer: Signer, method: str) -> None:
    body = b'{"a":1}' if method == "POST" else b""
    headers = {"Host": host_of(base_url), "Content-Type": "application/json",
               "Authorization": signer.authorization(method, host_of(base_url), "/authorize", "", body)}
    first = await fetch(http_client, base_url, method, "/authorize", headers, body)
    assert assert_json(first, 200) == {"authorized": True, "key_id": TEST_KEY_ID, "role": "admin", "prefix": None}
    second = await fetch(http_client, base_url, method, "/authorize", headers, body)
    assert_error(second, 401, "replayed_nonce")


@pytest.mark.gen_test
async def test_each_fresh_nonce_is_accepted(http_client: Any, base_url: str, signer: Signer) -> None:
    for _ in range(5):
        resp = await send(http_client, base_url, "GET", "/authorize", signer=signer)
        assert assert_json(resp, 200)["authorized"] is True


@pytest.mark.gen_test
async def test_ping_stays_open_and_unknown_routes_are_404(http_client: Any, base_url: str, signer: Signer) -> None:
    resp = await send(http_client, base_url, "GET", "/ping")
    assert assert_json(resp, 200) == {"ping": "pong"}
    # Exercise 2 has no data routes: a signed /save is an unknown route, not an auth question.
    resp = await send(http_client, base_url, "POST", "/save", body=b'{"key":"k","value":1}',
                      content_type="application/json", signer=signer)
    assert_error(resp, 404, "not_found")


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
@pytest.mark.gen_test
async def test_wrong_method_on_authorize(http_client: Any, base_url: str, signer: Signer, method: str) -> None:
    # Auth runs first: unsigned is 401, signed is 405.
    body = b"{}" if method != "DELETE" else b""
    resp = await send(http_client, base_url, method, "/authorize", body=body, content_type="application/json")
    assert_error(resp, 401, "missing_auth")
    resp = await send(http_client, base_url, method, "/authorize", body=body, content_type="application/json",
                      signer=signer)
    assert_error(resp, 405, "method_not_allowed")
