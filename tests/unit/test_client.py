"""kvtornado/client.py: the query text that is sent is the one that is signed; the secret never shows."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

import pytest

from kvtornado.auth import Authenticator, parse_authorization
from kvtornado.client import KVClient, KVClientError, Signer, encode_query
from kvtornado.codec import query_fields
from kvtornado.errors import AuthError
from tests.conftest import TEST_KEY_ID, TEST_SECRET

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


# --- KVClient: what goes on the wire is what was signed -----------------------------------------


class FakeResponse:
    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self._body = body

    def getheaders(self) -> list[tuple[str, str]]:
        return [("Content-Type", "application/json; charset=UTF-8")]

    def read(self) -> bytes:
        return self._body


class FakeConnection:
    """Stands in for ``http.client.HTTPConnection``: records requests, answers from a list."""

    def __init__(self, answers: list[tuple[int, Any]]) -> None:
        self.sent: list[tuple[str, str, bytes | None, dict[str, str]]] = []
        self.answers = answers

    def request(self, method: str, target: str, body: bytes | None = None, headers: Any = None) -> None:
        self.sent.append((method, target, body, dict(headers or {})))

    def getresponse(self) -> FakeResponse:
        status, doc = self.answers.pop(0)
        return FakeResponse(status, json.dumps(doc).encode())

    def close(self) -> None:
        pass


def verify_sent(auth: Authenticator, sent: tuple[str, str, bytes | None, dict[str, str]]) -> str:
    method, target, body, headers = sent
    parts = urlsplit(target)
    return auth.verify(
        authorization=headers.get("Authorization"), method=method, host=headers["Host"], path=parts.path,
        query=parts.query, body=body or b"",
    )


def test_kvclient_get_sends_what_it_signed(fixed_signer: Signer, auth: Authenticator) -> None:
    conn = FakeConnection([(200, {"key": "a b/é", "value": [1]})])
    client = KVClient(f"http://{HOST}", fixed_signer)
    client._conn = conn  # type: ignore[assignment]

    assert client.get("a b/é") == [1]

    (sent,) = conn.sent
    assert sent[1] == "/get?key=a%20b%2F%C3%A9"
    assert sent[3]["Host"] == HOST
    assert verify_sent(auth, sent) == TEST_KEY_ID


def test_kvclient_durable_save_signs_body_and_query(fixed_signer: Signer, auth: Authenticator) -> None:
    conn = FakeConnection([(200, {"key": "k", "saved": True})])
    client = KVClient(f"http://{HOST}", fixed_signer)
    client._conn = conn  # type: ignore[assignment]

    assert client.save("k", {"é": None}, durable=True) == {"key": "k", "saved": True}

    (sent,) = conn.sent
    method, target, body, headers = sent
    assert (method, target) == ("POST", "/save?durable=1")
    assert json.loads(body or b"") == {"key": "k", "value": {"é": None}}
    assert headers["Content-Type"] == "application/json"
    assert verify_sent(auth, sent) == TEST_KEY_ID


def test_kvclient_raises_the_server_error_code(fixed_signer: Signer) -> None:
    conn = FakeConnection([(404, {"error": "not_found", "message": "No such key."})])
    client = KVClient(f"http://{HOST}", fixed_signer)
    client._conn = conn  # type: ignore[assignment]

    with pytest.raises(KVClientError) as info:
        client.get("absent")
    assert (info.value.status, info.value.code, info.value.message) == (404, "not_found", "No such key.")


def test_kvclient_ping_is_unsigned(fixed_signer: Signer) -> None:
    conn = FakeConnection([(200, {"ping": "pong"})])
    client = KVClient(f"http://{HOST}", fixed_signer)
    client._conn = conn  # type: ignore[assignment]

    assert client.ping() == {"ping": "pong"}
    assert "Authorization" not in conn.sent[0][3]


def test_kvclient_refuses_a_non_http_url() -> None:
    with pytest.raises(ValueError, match="not an http"):
        KVClient("ftp://example.com", None)
