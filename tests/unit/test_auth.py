"""kvtornado/auth.py: the SPEC §4 vector, header parsing, verification order, the nonce store, the keys file."""

from __future__ import annotations

import hashlib
import logging
import re
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from kvtornado.auth import (
    EMPTY_BODY_SHA256,
    Authenticator,
    AuthParams,
    NonceJournal,
    NonceStore,
    authorization_header,
    body_sha256,
    load_keys,
    parse_authorization,
    parse_keys,
    sign_request,
    signature,
    string_to_sign,
)
from kvtornado.errors import AuthError, ConfigError
from tests.conftest import TEST_KEY_ID, TEST_SECRET, write_keys

# SPEC §4 test vector
VECTOR_SIG = "a3d3177c11550a4fe1770acb243357135db65d7d7175f55d0df4a235ede7bc78"
VECTOR_TS = 1700000000
VECTOR_NONCE = "00112233445566778899aabbccddeeff"
VECTOR_BODY = b'{"key":"foo","value":"bar"}'
VECTOR_REQUEST: dict[str, Any] = {
    "method": "POST", "host": "localhost:8888", "path": "/save", "query": "durable=1", "body": VECTOR_BODY,
}
NOW = VECTOR_TS
SKEW_S = 300
SIG = "0" * 64
NONCE = "n" * 16


def header(**overrides: str) -> str:
    params = {"keyid": "k1", "ts": "1700000000", "nonce": NONCE, "sig": SIG} | overrides
    return "KV-HMAC-SHA256 " + ", ".join(f"{k}={v}" for k, v in params.items())


def signed(
    secret: bytes = TEST_SECRET, *, key_id: str = TEST_KEY_ID, ts: int = NOW, nonce: str | None = None, **request: Any
) -> dict[str, Any]:
    """The keyword arguments of ``Authenticator.verify`` for one correctly signed request."""
    req = VECTOR_REQUEST | request
    auth = sign_request(secret, key_id=key_id, ts=ts, nonce=nonce, **req)
    return {"authorization": auth, **req}


def auth_error(authenticator: Authenticator, **kwargs: Any) -> AuthError:
    with pytest.raises(AuthError) as info:
        authenticator.verify(**kwargs)
    err = info.value
    assert err.status == 401
    assert err.headers["WWW-Authenticate"] == f'KV-HMAC-SHA256 error="{err.code}"'
    return err


@pytest.fixture
def auth() -> Authenticator:
    return Authenticator({TEST_KEY_ID: TEST_SECRET}, max_skew_s=SKEW_S, max_nonces=1000, clock=lambda: NOW)


# --- the test vector ---------------------------------------------------------------------------


def test_vector_through_sign_request() -> None:
    value = sign_request(TEST_SECRET, key_id="k1", ts=VECTOR_TS, nonce=VECTOR_NONCE, **VECTOR_REQUEST)
    assert value == f"KV-HMAC-SHA256 keyid=k1, ts=1700000000, nonce={VECTOR_NONCE}, sig={VECTOR_SIG}"


def test_vector_through_string_to_sign_and_signature() -> None:
    sts = string_to_sign(
        key_id="k1", ts=VECTOR_TS, nonce=VECTOR_NONCE, method="post", host="LocalHost:8888", path="/save",
        query="durable=1", body_hash=body_sha256(VECTOR_BODY),
    )

    assert sts == "\n".join([
        "KV-HMAC-SHA256", "k1", "1700000000", VECTOR_NONCE, "POST", "localhost:8888", "/save", "durable=1",
        hashlib.sha256(VECTOR_BODY).hexdigest(),
    ])
    assert not sts.endswith("\n")
    assert signature(b"a" * 64, sts) == VECTOR_SIG


def test_vector_verifies(auth: Authenticator) -> None:
    value = authorization_header(key_id="k1", ts=VECTOR_TS, nonce=VECTOR_NONCE, sig=VECTOR_SIG)
    assert auth.verify(authorization=value, **VECTOR_REQUEST) == "k1"


def test_empty_body_hash() -> None:
    assert body_sha256(b"") == EMPTY_BODY_SHA256
    assert EMPTY_BODY_SHA256 == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_sign_request_defaults_to_now_and_a_fresh_nonce() -> None:
    a = parse_authorization(sign_request(TEST_SECRET, key_id="k1", method="GET", host="h", path="/authorize"))
    b = parse_authorization(sign_request(TEST_SECRET, key_id="k1", method="GET", host="h", path="/authorize"))
    assert a.nonce != b.nonce
    assert re.fullmatch(r"[0-9a-f]{32}", a.nonce)


# --- parse_authorization -----------------------------------------------------------------------


def test_missing_header_is_missing_auth() -> None:
    with pytest.raises(AuthError) as info:
        parse_authorization(None)
    assert info.value.code == "missing_auth"


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("", id="empty"),
        pytest.param("Bearer abcdef", id="wrong-scheme"),
        pytest.param(header().replace("KV-HMAC-SHA256", "kv-hmac-sha256"), id="scheme-lowercase"),
        pytest.param(header().replace("KV-HMAC-SHA256 ", "KV-HMAC-SHA256,"), id="scheme-glued"),
        pytest.param("KV-HMAC-SHA256", id="scheme-only"),
        pytest.param(f"KV-HMAC-SHA256 keyid=k1, ts=1700000000, nonce={NONCE}", id="missing-sig"),
        pytest.param(f"KV-HMAC-SHA256 keyid=k1, ts=1700000000, sig={SIG}", id="missing-nonce"),
        pytest.param(f"KV-HMAC-SHA256 ts=1700000000, nonce={NONCE}, sig={SIG}", id="missing-keyid"),
        pytest.param(f"KV-HMAC-SHA256 keyid=k1, nonce={NONCE}, sig={SIG}", id="missing-ts"),
        pytest.param(header() + ", ts=1700000000", id="duplicated-ts"),
        pytest.param(header() + ", keyid=k1", id="duplicated-keyid"),
        pytest.param(header() + ", extra=1", id="unknown-param"),
        pytest.param(header().replace("keyid=", "KeyId="), id="param-name-case"),
        pytest.param(header() + ", sig", id="param-without-equals"),
        pytest.param(header() + ",", id="trailing-comma"),
        pytest.param(header(keyid=""), id="empty-keyid"),
        pytest.param(header(keyid="k/1"), id="keyid-charset"),
        pytest.param(header(keyid="k" * 65), id="keyid-too-long"),
        pytest.param(header(keyid='"k1"'), id="keyid-quoted"),
        pytest.param(header(nonce="n" * 15), id="nonce-too-short"),
        pytest.param(header(nonce="n" * 65), id="nonce-too-long"),
        pytest.param(header(nonce="n" * 15 + "+"), id="nonce-plus"),
        pytest.param(header(nonce="n" * 15 + "."), id="nonce-dot"),
        pytest.param(header(nonce="n" * 15 + "é"), id="nonce-non-ascii"),
        pytest.param(header(sig="A" * 64), id="sig-uppercase"),
        pytest.param(header(sig="0" * 63), id="sig-too-short"),
        pytest.param(header(sig="0" * 65), id="sig-too-long"),
        pytest.param(header(sig="g" * 64), id="sig-not-hex"),
        pytest.param(header(ts="1700000000.5"), id="ts-fraction"),
        pytest.param(header(ts="1.7e9"), id="ts-exponent"),
        pytest.param(header(ts="soon"), id="ts-word"),
        pytest.param(header(ts=""), id="ts-empty"),
        pytest.param(header(ts="0x65"), id="ts-hex"),
        pytest.param(header(ts="\u0661\u0667\u0660\u0660"), id="ts-non-ascii-digits"),
        pytest.param(header(ts="1" * 21), id="ts-too-many-digits"),
        # One spelling per number: the server signs ts back as text, so "0170..." may not stand for "170...".
        pytest.param(header(ts="0" + str(NOW)), id="ts-leading-zero"),
        pytest.param(header(ts="-0"), id="ts-minus-zero"),
        pytest.param(header(ts="00"), id="ts-double-zero"),
        pytest.param(header() + "\r\nX-Other: 1", id="crlf-after"),
        pytest.param(header(keyid="k\n1"), id="lf-inside"),
        pytest.param(header(nonce=NONCE + "\r"), id="cr-inside"),
        pytest.param(header() + "\n", id="trailing-lf"),
    ],
)
def test_malformed_headers(value: str) -> None:
    with pytest.raises(AuthError) as info:
        parse_authorization(value)
    assert info.value.code == "malformed_auth"
    assert info.value.headers["WWW-Authenticate"] == 'KV-HMAC-SHA256 error="malformed_auth"'


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(f"KV-HMAC-SHA256 keyid=k1, ts=1700000000, nonce={NONCE}, sig={SIG}", id="spec-order"),
        pytest.param(f"KV-HMAC-SHA256 sig={SIG}, nonce={NONCE}, ts=1700000000, keyid=k1", id="reversed"),
        pytest.param(f"KV-HMAC-SHA256 nonce={NONCE},keyid=k1,sig={SIG},ts=1700000000", id="no-spaces"),
        pytest.param(f"KV-HMAC-SHA256    keyid=k1 ,  ts=1700000000,\tnonce={NONCE} ,sig={SIG}  ", id="odd-spaces"),
        pytest.param(f"  KV-HMAC-SHA256 keyid = k1, ts= 1700000000, nonce ={NONCE}, sig\t=\t{SIG}", id="around-eq"),
    ],
)
def test_params_in_any_order_and_white_space(value: str) -> None:
    assert parse_authorization(value) == AuthParams(key_id="k1", ts=1700000000, nonce=NONCE, sig=SIG)


def test_nonce_bounds_and_charset_accepted() -> None:
    for nonce in ("a" * 16, "Z" * 64, "aZ09_-" * 3):
        assert parse_authorization(header(nonce=nonce)).nonce == nonce


# --- Authenticator.verify -----------------------------------------------------------------------


def test_valid_request_returns_the_key_id(auth: Authenticator) -> None:
    assert auth.verify(**signed()) == TEST_KEY_ID
    assert len(auth.nonces) == 1


def test_missing_and_malformed_come_first(auth: Authenticator) -> None:
    req = signed()
    assert auth_error(auth, **(req | {"authorization": None})).code == "missing_auth"
    assert auth_error(auth, **(req | {"authorization": req["authorization"] + "\n"})).code == "malformed_auth"


def test_unknown_key(auth: Authenticator) -> None:
    err = auth_error(auth, **signed(b"b" * 64, key_id="k2"))
    assert err.code == "unknown_key"


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param({"method": "PUT"}, id="method"),
        pytest.param({"host": "localhost:8889"}, id="host"),
        pytest.param({"host": "evil.example"}, id="host-name"),
        pytest.param({"path": "/save2"}, id="path"),
        pytest.param({"path": "/%73ave"}, id="path-encoding"),
        pytest.param({"query": "durable=0"}, id="query"),
        pytest.param({"query": ""}, id="query-dropped"),
        pytest.param({"body": b'{"key":"foo","value":"baz"}'}, id="body"),
        pytest.param({"body": VECTOR_BODY + b" "}, id="body-trailing-space"),
        pytest.param({"body": b""}, id="body-dropped"),
    ],
)
def test_tampered_request_is_bad_signature(auth: Authenticator, tamper: dict[str, Any]) -> None:
    req = signed() | tamper
    assert auth_error(auth, **req).code == "bad_signature"


def test_method_and_host_case_do_not_matter(auth: Authenticator) -> None:
    req = signed() | {"method": "post", "host": "LOCALHOST:8888"}
    assert auth.verify(**req) == TEST_KEY_ID


def test_wrong_secret_is_bad_signature(auth: Authenticator) -> None:
    assert auth_error(auth, **signed(b"b" * 64)).code == "bad_signature"


@pytest.mark.parametrize(
    ("offset_s", "accepted"),
    [
        pytest.param(-SKEW_S - 1, False, id="past"),
        pytest.param(SKEW_S + 1, False, id="future"),
        pytest.param(-SKEW_S, True, id="past-edge"),
        pytest.param(SKEW_S, True, id="future-edge"),
        pytest.param(-10**6, False, id="far-past"),
    ],
)
def test_timestamp_window(auth: Authenticator, offset_s: int, accepted: bool) -> None:
    req = signed(ts=NOW + offset_s)
    if accepted:
        assert auth.verify(**req) == TEST_KEY_ID
        return
    err = auth_error(auth, **req)
    assert err.code == "stale_timestamp"
    assert err.headers["X-KV-Server-Time"] == str(NOW)


def test_server_time_header_is_an_integer_from_the_injected_now(auth: Authenticator) -> None:
    err = auth_error(auth, **signed(ts=NOW), now=NOW + 1000.75)
    assert err.code == "stale_timestamp"
    assert err.headers["X-KV-Server-Time"] == str(NOW + 1000)


def test_replayed_nonce(auth: Authenticator) -> None:
    req = signed(nonce="replay-me-0123456789")
    assert auth.verify(**req) == TEST_KEY_ID
    assert auth_error(auth, **req).code == "replayed_nonce"
    # the same nonce under a fresh timestamp (a new signature) is still a replay
    assert auth_error(auth, **signed(nonce="replay-me-0123456789", ts=NOW + 1)).code == "replayed_nonce"


def test_injected_now_overrides_the_clock() -> None:
    auth = Authenticator({TEST_KEY_ID: TEST_SECRET}, max_skew_s=SKEW_S, clock=lambda: 0.0)
    assert auth_error(auth, **signed()).code == "stale_timestamp"
    assert auth.verify(**signed(), now=NOW + 5) == TEST_KEY_ID


@pytest.mark.parametrize(
    ("make", "code"),
    [
        # each request fails several checks at once; the earliest one in SPEC §4 order wins
        pytest.param(lambda: signed(b"b" * 64, key_id="k2", ts=NOW - 10**5), "unknown_key", id="unknown-before-mac"),
        pytest.param(lambda: signed(b"b" * 64, ts=NOW - 10**5), "bad_signature", id="mac-before-stale"),
        pytest.param(lambda: signed(ts=NOW - 10**5, nonce="used-nonce-0123456"), "stale_timestamp",
                     id="stale-before-replay"),
    ],
)
def test_verification_order(auth: Authenticator, make: Any, code: str) -> None:
    assert auth.verify(**signed(nonce="used-nonce-0123456")) == TEST_KEY_ID
    assert auth_error(auth, **make()).code == code


def test_bad_mac_does_not_consume_the_nonce(auth: Authenticator) -> None:
    good = signed(nonce="fresh-nonce-0123456")
    forged = good | {"body": b'{"key":"foo","value":"evil"}'}

    assert auth_error(auth, **forged).code == "bad_signature"
    assert len(auth.nonces) == 0
    assert not auth.nonces.seen(TEST_KEY_ID, "fresh-nonce-0123456")
    assert auth.verify(**good) == TEST_KEY_ID


def test_stale_request_does_not_consume_the_nonce(auth: Authenticator) -> None:
    assert auth_error(auth, **signed(ts=NOW - 1000, nonce="fresh-nonce-0123456")).code == "stale_timestamp"
    assert len(auth.nonces) == 0
    assert auth.verify(**signed(nonce="fresh-nonce-0123456")) == TEST_KEY_ID


def test_public_host_is_signed_in_place_of_the_host_header() -> None:
    auth = Authenticator({TEST_KEY_ID: TEST_SECRET}, public_host="KV.Example.com", clock=lambda: NOW)
    via_proxy = signed(host="kv.example.com") | {"host": "127.0.0.1:8888"}
    assert auth.verify(**via_proxy) == TEST_KEY_ID
    # a client that signs the Host header it sees to the backend no longer matches
    assert auth_error(auth, **signed(host="127.0.0.1:8888")).code == "bad_signature"


def test_two_keys_active_at_once() -> None:
    old, new = b"o" * 40, b"N" * 64
    auth = Authenticator({"old-key": old, "new.key_2": new}, clock=lambda: NOW)

    assert auth.verify(**signed(old, key_id="old-key", nonce="shared-nonce-000000")) == "old-key"
    assert auth.verify(**signed(new, key_id="new.key_2", nonce="shared-nonce-000000")) == "new.key_2"
    # each key signs only for itself
    assert auth_error(auth, **signed(old, key_id="new.key_2")).code == "bad_signature"
    # nonces are remembered per key id
    assert auth_error(auth, **signed(old, key_id="old-key", nonce="shared-nonce-000000")).code == "replayed_nonce"


def test_keys_are_copied() -> None:
    keys = {TEST_KEY_ID: TEST_SECRET}
    auth = Authenticator(keys, clock=lambda: NOW)
    keys.clear()
    assert auth.verify(**signed()) == TEST_KEY_ID


def test_conftest_authenticator_uses_the_config(authenticator: Authenticator, signer: Any) -> None:
    assert authenticator.max_skew_s == 300
    value = signer.authorization("GET", "h:1", "/authorize", "", b"")
    assert authenticator.verify(authorization=value, method="GET", host="h:1", path="/authorize", query="", body=b"")


# --- NonceStore --------------------------------------------------------------------------------


def test_nonce_store_is_bounded_and_drops_the_oldest_first() -> None:
    store = NonceStore(max_entries=3, max_skew_s=SKEW_S)
    for i in range(3):
        store.add("k", f"n{i}", NOW + i, NOW + i)
    assert len(store) == 3 and store.floor is None

    store.add("k", "n3", NOW + 3, NOW + 3)

    assert len(store) == 3
    assert not store.seen("k", "n0")
    assert all(store.seen("k", f"n{i}") for i in (1, 2, 3))
    assert store.floor == NOW
    assert store.below_floor(NOW) and store.below_floor(NOW - 1)
    assert not store.below_floor(NOW + 1)


def test_nonce_store_drops_by_timestamp_not_by_arrival() -> None:
    store = NonceStore(max_entries=3, max_skew_s=SKEW_S)
    store.add("k", "late", NOW + 5, NOW)
    store.add("k", "early", NOW - 5, NOW)
    store.add("k", "middle", NOW, NOW)

    store.add("k", "next", NOW + 1, NOW)

    assert not store.seen("k", "early")
    assert store.seen("k", "late") and store.seen("k", "middle") and store.seen("k", "next")
    assert store.floor == NOW - 5


def test_nonce_store_drops_every_entry_at_the_dropped_timestamp() -> None:
    store = NonceStore(max_entries=2, max_skew_s=SKEW_S)
    store.add("k", "a", NOW, NOW)
    store.add("k", "b", NOW, NOW)

    store.add("k", "c", NOW + 1, NOW + 1)

    assert len(store) == 1 and store.seen("k", "c")
    assert store.floor == NOW


def test_nonce_store_floor_only_rises() -> None:
    store = NonceStore(max_entries=1, max_skew_s=SKEW_S)
    store.add("k", "a", NOW + 10, NOW)
    store.add("k", "b", NOW, NOW)  # drops a (ts NOW + 10)
    store.add("k", "c", NOW + 20, NOW)  # drops b (ts NOW)
    assert store.floor == NOW + 10


def test_nonce_store_expires_entries_outside_the_window() -> None:
    store = NonceStore(max_entries=10, max_skew_s=SKEW_S)
    store.add("k", "old", NOW, NOW)
    store.add("k", "edge", NOW + 1, NOW + 1)

    store.add("k", "new", NOW + SKEW_S + 1, NOW + SKEW_S + 1)

    assert not store.seen("k", "old")  # its timestamp is now stale anyway
    assert store.seen("k", "edge")  # exactly at the edge of the window: still acceptable, so kept
    assert len(store) == 2
    assert store.floor is None  # expiry is not a drop: nothing inside the window was forgotten


def test_full_nonce_store_refuses_at_or_below_the_floor_as_stale() -> None:
    auth = Authenticator({TEST_KEY_ID: TEST_SECRET}, max_skew_s=SKEW_S, max_nonces=2, clock=lambda: NOW)
    first = signed(ts=NOW - 2, nonce="first-nonce-0000000")
    assert auth.verify(**first) == TEST_KEY_ID
    assert auth.verify(**signed(ts=NOW - 1)) == TEST_KEY_ID
    assert auth.verify(**signed(ts=NOW)) == TEST_KEY_ID  # drops "first"

    assert len(auth.nonces) == 2
    replay = auth_error(auth, **first)
    assert replay.code == "stale_timestamp"
    assert replay.headers["X-KV-Server-Time"] == str(NOW)
    # a brand-new nonce at the floor is refused too: the store cannot tell it from a dropped one
    assert auth_error(auth, **signed(ts=NOW - 2)).code == "stale_timestamp"
    assert auth.verify(**signed(ts=NOW - 1)) == TEST_KEY_ID


def test_fresh_requests_keep_working_after_the_store_filled() -> None:
    clock = [float(NOW)]
    auth = Authenticator({TEST_KEY_ID: TEST_SECRET}, max_skew_s=SKEW_S, max_nonces=5, clock=lambda: clock[0])
    sent = []
    for i in range(60):
        clock[0] = NOW + i
        req = signed(ts=NOW + i, nonce=f"nonce-{i:012d}")
        assert auth.verify(**req) == TEST_KEY_ID
        assert len(auth.nonces) <= 5
        sent.append(req)

    # and no request ever sent is accepted again, remembered or dropped
    codes = {auth_error(auth, **req).code for req in sent}
    assert codes == {"stale_timestamp", "replayed_nonce"}


# --- keys file ---------------------------------------------------------------------------------


def test_load_keys_creates_a_missing_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "secrets" / "kv.keys"
    caplog.set_level(logging.DEBUG)

    keys = load_keys(path).secrets

    assert list(keys) == ["default"]
    secret = keys["default"].decode("ascii")
    assert re.fullmatch(r"[0-9a-f]{64}", secret)
    assert path.read_text(encoding="ascii") == f"default {secret}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert str(path) in caplog.text
    assert secret not in caplog.text
    assert all(secret not in str(r.args) for r in caplog.records)
    # a second start uses the same key, it does not make a new one
    assert load_keys(path).secrets == keys


def test_load_keys_makes_a_new_secret_each_time(tmp_path: Path) -> None:
    a = load_keys(tmp_path / "a" / "kv.keys").secrets["default"]
    b = load_keys(tmp_path / "b" / "kv.keys").secrets["default"]
    assert a != b


def test_load_keys_without_create_refuses_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "kv.keys"
    with pytest.raises(ConfigError, match="keys file not found"):
        load_keys(path, create=False)
    assert not path.exists()


def test_load_keys_reads_the_conftest_file(keys_file: Path) -> None:
    assert load_keys(keys_file).secrets == {TEST_KEY_ID: TEST_SECRET}


GOOD = "s" * 32
SECRET_LIKE = "S3cr3t-" * 6  # 42 printable characters: must never be echoed


@pytest.mark.parametrize(
    ("lines", "mode", "expected"),
    [
        pytest.param([f"k1 {SECRET_LIKE}"], 0o640, "run: chmod 600 ", id="group-readable"),
        pytest.param([f"k1 {SECRET_LIKE}"], 0o604, "run: chmod 600 ", id="other-readable"),
        pytest.param([f"k1 {SECRET_LIKE}"], 0o620, "run: chmod 600 ", id="group-writable"),
        pytest.param(["# header", f"k1 {GOOD}", SECRET_LIKE], 0o600,
                     "line 3: expected '<key_id> <secret> [role=R] [prefix=P]'",
                     id="one-field"),
        pytest.param(["", f"k1 {SECRET_LIKE} extra"], 0o600, "line 2: option 'extra' is not an option",
                     id="third-field-not-an-option"),
        pytest.param([f"k1 {SECRET_LIKE} {SECRET_LIKE}"], 0o600, "line 1: field 3 is not an option",
                     id="second-secret-is-not-echoed"),
        pytest.param([f"k1 {GOOD} colour=red"], 0o600, "line 1: option 'colour' is not an option", id="unknown-option"),
        pytest.param([f"k1 {GOOD} Role=read"], 0o600, "line 1: field 3 is not an option",
                     id="option-names-are-lower-case"),
        pytest.param([f"k1 {GOOD} role=owner"], 0o600, "line 1: role must be read, write or admin", id="bad-role"),
        pytest.param([f"k1 {GOOD} role="], 0o600, "line 1: role must be read, write or admin", id="empty-role"),
        pytest.param([f"k1 {GOOD} role=read role=read"], 0o600, "line 1: role is given more than once",
                     id="role-twice"),
        pytest.param([f"k1 {GOOD} prefix=a/ role=write prefix=b/"], 0o600, "line 1: prefix is given more than once",
                     id="prefix-twice"),
        pytest.param([f"k1 {GOOD} prefix="], 0o600, "line 1: prefix must not be empty", id="empty-prefix"),
        pytest.param([f"k1 {GOOD} prefix=%ff/"], 0o600, "line 1: prefix does not percent-decode to UTF-8",
                     id="prefix-not-utf8"),
        pytest.param([f"k1 {GOOD} prefix=50%/"], 0o600, "line 1: prefix has a '%' that is not followed by two hex",
                     id="prefix-bad-escape"),
        pytest.param([f"k1 {GOOD}", f"k2 {SECRET_LIKE} role=reader"], 0o600, "line 2: role must be",
                     id="bad-role-on-second-line"),
        pytest.param([f"k1 {SECRET_LIKE[:31]}"], 0o600, "line 1: secret for key id 'k1' is too short (31 characters",
                     id="short-secret"),
        pytest.param([f"k1 {SECRET_LIKE}", f"k2 {GOOD}", f"k1 {SECRET_LIKE}"], 0o600, "line 3: duplicate key id 'k1'",
                     id="duplicate-key-id"),
        pytest.param([f"k/1 {SECRET_LIKE}"], 0o600, "line 1: key id must match", id="bad-key-id"),
        pytest.param([f"{'k' * 65} {SECRET_LIKE}"], 0o600, "line 1: key id must match", id="key-id-too-long"),
        pytest.param([f"k1 {SECRET_LIKE}\x01"], 0o600, "line 1: secret for key id 'k1' must be printable ASCII",
                     id="control-char-in-secret"),
        pytest.param([f"k1 {SECRET_LIKE[:16]}\x0c{SECRET_LIKE[16:]}"], 0o600,
                     "line 1: secret for key id 'k1' must be printable ASCII", id="form-feed-inside-secret"),
        pytest.param(["# a\x0bcomment", f"k1 {SECRET_LIKE}", "k2"], 0o600,
                     "line 3: expected '<key_id> <secret> [role=R] [prefix=P]'",
                     id="vertical-tab-does-not-shift-line-numbers"),
        pytest.param(["# no keys yet", "", "   "], 0o600, ": no keys", id="no-keys"),
        pytest.param([], 0o600, ": no keys", id="empty-file"),
        pytest.param([f"k1 {SECRET_LIKE}\x0b"], 0o600, "line 1: secret for key id 'k1' must be printable ASCII",
                     id="vertical-tab-after-secret"),
        pytest.param([f"\x0ck1 {SECRET_LIKE}"], 0o600, "line 1: key id must match", id="form-feed-before-key-id"),
        pytest.param([f"k1 {SECRET_LIKE}\x7f"], 0o600, "line 1: secret for key id 'k1' must be printable ASCII",
                     id="delete-just-above-tilde"),
        pytest.param([f"{SECRET_LIKE} role=admin"], 0o600, "line 1: the second field is an option; expected",
                     id="key-id-missing-before-options"),
        pytest.param([f"{SECRET_LIKE} {SECRET_LIKE[:20]}"], 0o600, "line 1: secret is too short (20 characters",
                     id="a-first-field-as-long-as-a-secret-is-not-quoted"),
        pytest.param([f"{SECRET_LIKE} x\x01"], 0o600, "line 1: secret must be printable ASCII",
                     id="a-long-first-field-is-not-quoted-either"),
        pytest.param([f"k1 {SECRET_LIKE[:20]} {SECRET_LIKE[20:]}"], 0o600,
                     "line 1: secret for key id 'k1' is too short (20 characters",
                     id="space-just-below-bang-separates"),
    ],
)
def test_keys_file_refusals(tmp_path: Path, lines: list[str], mode: int, expected: str) -> None:
    path = write_keys(tmp_path / "kv.keys", lines, mode)

    with pytest.raises(ConfigError) as info:
        load_keys(path)

    message = str(info.value)
    assert expected in message
    assert message.startswith(str(path))
    assert "\n" not in message
    assert SECRET_LIKE not in message and SECRET_LIKE[:31] not in message and GOOD not in message


def test_permission_message_gives_the_exact_command(tmp_path: Path) -> None:
    path = write_keys(tmp_path / "kv.keys", [f"k1 {GOOD}"], 0o644)
    with pytest.raises(ConfigError) as info:
        load_keys(path)
    assert str(info.value).endswith(f"(mode 0644); run: chmod 600 {path}")


def test_non_ascii_keys_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "kv.keys"
    path.write_bytes(f"k1 {GOOD}é\n".encode())
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="must be ASCII"):
        load_keys(path)


def test_a_folder_is_not_a_keys_file(tmp_path: Path) -> None:
    folder = tmp_path / "kv.keys"
    folder.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_keys(folder)


def test_comments_and_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = write_keys(
        tmp_path / "kv.keys",
        ["# rotation in progress", "", f"old {GOOD}", "   ", "  # indented comment", f"new.key_2 {SECRET_LIKE}",
         "\t"],
    )
    assert load_keys(path).secrets == {"old": GOOD.encode(), "new.key_2": SECRET_LIKE.encode()}


def test_secret_of_exactly_32_characters_is_enough() -> None:
    assert parse_keys(f"k1 {GOOD}\n", label="x").secrets == {"k1": GOOD.encode("ascii")}


def test_secret_is_used_as_its_ascii_bytes() -> None:
    keys = parse_keys("k1 " + "a" * 64, label="x").secrets
    assert signature(keys["k1"], "msg") == signature(TEST_SECRET, "msg")


# --- across restarts: the start-up floor and the nonce journal --------------------------------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_after_an_unclean_stop_nothing_signed_at_or_before_the_start_up_second_is_accepted() -> None:
    a = Authenticator({TEST_KEY_ID: TEST_SECRET}, max_skew_s=SKEW_S, clock=lambda: NOW + 0.9)
    a.restore([], clean=False)
    for ts in (NOW - 10, NOW):
        err = auth_error(a, **signed(ts=ts))
        assert err.code == "stale_timestamp"
        assert err.headers["X-KV-Server-Time"] == str(NOW)
    assert a.verify(**signed(ts=NOW + 1)) == TEST_KEY_ID  # signed anew after that second: judged as usual


def test_after_a_clean_stop_there_is_no_floor_and_the_kept_nonces_are_refused() -> None:
    a = Authenticator({TEST_KEY_ID: TEST_SECRET}, max_skew_s=SKEW_S, clock=lambda: NOW)
    kept = [(NOW - 5, TEST_KEY_ID, "a" * 16), (NOW - SKEW_S - 1, TEST_KEY_ID, "b" * 16)]
    a.restore(kept, clean=True)
    assert auth_error(a, **signed(ts=NOW - 5, nonce="a" * 16)).code == "replayed_nonce"
    assert a.verify(**signed(ts=NOW - 5, nonce="c" * 16)) == TEST_KEY_ID  # same second, new nonce: fine
    assert len(a.nonces) == 2  # the entry outside the window was not taken in


def test_journal_first_start_is_clean_and_a_crash_leaves_it_unclean(tmp_path: Path) -> None:
    path = tmp_path / "j" / "kv.nonces"
    j = NonceJournal(path, clock=lambda: NOW)
    assert j.open() == ([], True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    j.close(None)  # as after a crash: no clean line
    again = NonceJournal(path, clock=lambda: NOW)
    assert again.open() == ([], False)
    again.close([(NOW, "k1", "a" * 16)])  # a graceful stop
    third = NonceJournal(path, clock=lambda: NOW)
    assert third.open() == ([(NOW, "k1", "a" * 16)], True)
    third.close(None)


@pytest.mark.gen_test
async def test_journal_keeps_what_it_recorded_through_a_crash_and_skips_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "kv.nonces"
    j = NonceJournal(path, clock=lambda: NOW)
    j.open()
    await j.record("k1", "a" * 16, NOW + 100)
    await j.record("k1", "b" * 16, NOW + 200)
    with path.open("a", encoding="ascii") as f:
        f.write(f"{NOW + 300} k1 cccc")  # cut short by the crash
    j.close(None)  # the process died: nothing more is written
    later = NonceJournal(path, clock=lambda: NOW + 150)  # restarted 150 s later
    entries, clean = later.open()
    assert not clean
    assert entries == [(NOW + 100, "k1", "a" * 16), (NOW + 200, "k1", "b" * 16)]
    later.close(None)
    # Reopening rewrote the file with only what a later floor would not cover (dated after NOW + 150).
    assert path.read_text(encoding="ascii") == f"{NOW + 200} k1 {'b' * 16}\n"


@pytest.mark.gen_test
async def test_journal_compaction_drops_what_the_floor_covers(tmp_path: Path) -> None:
    path = tmp_path / "kv.nonces"
    clock = Clock(NOW)
    j = NonceJournal(path, clock=clock)
    j.COMPACT_EVERY = 3
    j.open()
    await j.record("k1", "a" * 16, NOW + 1)
    await j.record("k1", "b" * 16, NOW + 50)
    clock.now = NOW + 10
    await j.record("k1", "c" * 16, NOW + 60)  # the third append compacts: NOW + 1 is covered by now
    assert path.read_text(encoding="ascii").split() == ["1700000050", "k1", "b" * 16, "1700000060", "k1", "c" * 16]
    j.close(None)


def test_one_process_a_journal(tmp_path: Path) -> None:
    path = tmp_path / "kv.nonces"
    first = NonceJournal(path)
    first.open()
    with pytest.raises(ConfigError, match="another server is using this nonce journal"):
        NonceJournal(path).open()
    first.close(None)
    second = NonceJournal(path)
    second.open()
    second.close(None)


@pytest.mark.gen_test
async def test_authenticate_journals_only_requests_dated_ahead_of_the_clock(tmp_path: Path) -> None:
    path = tmp_path / "kv.nonces"
    journal = NonceJournal(path, clock=lambda: NOW)
    journal.open()
    a = Authenticator({TEST_KEY_ID: TEST_SECRET}, max_skew_s=SKEW_S, clock=lambda: NOW + 0.5, journal=journal)
    assert await a.authenticate(**signed(ts=NOW, nonce="p" * 16)) == TEST_KEY_ID
    assert await a.authenticate(**signed(ts=NOW - 100, nonce="q" * 16)) == TEST_KEY_ID
    assert path.read_text(encoding="ascii") == ""  # nothing ahead of the current second: nothing written
    assert await a.authenticate(**signed(ts=NOW + 1, nonce="r" * 16)) == TEST_KEY_ID
    assert path.read_text(encoding="ascii") == f"{NOW + 1} {TEST_KEY_ID} {'r' * 16}\n"
    with pytest.raises(AuthError):
        await a.authenticate(**signed(ts=NOW + 1, nonce="r" * 16))
    journal.close(None)


# --- error messages a client can rely on ----------------------------------------------------------------


def assert_client_message(message: str, *names: str) -> None:
    """One sentence (a capital or a parameter name first, a full stop last, not shouted) naming the culprit."""
    assert "\n" not in message and message.endswith("."), message
    assert message != message.upper(), message
    first_word = message.split(" ", 1)[0]
    assert first_word[0].isupper() or first_word in ("keyid", "ts", "nonce", "sig"), message
    for name in names:
        assert name in message, (name, message)


@pytest.mark.parametrize(
    ("value", "code", "names"),
    [
        pytest.param(None, "missing_auth", ("Authorization", "KV-HMAC-SHA256"), id="missing"),
        pytest.param(header() + "\r\nX-Other: 1", "malformed_auth", ("Authorization header", "CR or LF"), id="crlf"),
        pytest.param("Bearer abcdef", "malformed_auth", ("Authorization scheme", "KV-HMAC-SHA256"), id="scheme"),
        pytest.param(header() + ", extra=1", "malformed_auth", ("keyid, ts, nonce and sig", "name=value"),
                     id="unknown-param"),
        pytest.param(header() + ", ts=1700000000", "malformed_auth", ("parameter ts", "more than once"),
                     id="duplicated-ts"),
        pytest.param("KV-HMAC-SHA256 keyid=k1, ts=1700000000", "malformed_auth", ("lacks nonce, sig",),
                     id="missing-nonce-and-sig"),
        pytest.param(header(keyid="k/1"), "malformed_auth", ("keyid", "[A-Za-z0-9._-]{1,64}"), id="keyid"),
        pytest.param(header(ts="soon"), "malformed_auth", ("ts", "base-10 integer"), id="ts"),
        # a value holding '=' is a bad value of its parameter, not an unknown parameter
        pytest.param(header(ts="1=2"), "malformed_auth", ("ts must be", "base-10 integer"), id="ts-with-equals"),
        pytest.param(header(nonce="n" * 15), "malformed_auth", ("nonce", "[A-Za-z0-9_-]{16,64}"), id="nonce"),
        pytest.param(header(sig="A" * 64), "malformed_auth", ("sig", "64 lowercase hex"), id="sig"),
    ],
)
def test_header_refusals_name_what_is_wrong(value: str | None, code: str, names: tuple[str, ...]) -> None:
    with pytest.raises(AuthError) as info:
        parse_authorization(value)
    assert info.value.code == code
    assert_client_message(info.value.message, *names)


def test_verification_refusals_name_what_is_wrong() -> None:
    clock = Clock(NOW)
    auth = Authenticator({TEST_KEY_ID: TEST_SECRET}, max_skew_s=SKEW_S, max_nonces=1, clock=clock, started_s=NOW - 50)
    cases: list[tuple[dict[str, Any], str, tuple[str, ...]]] = [
        (signed(b"b" * 64, key_id="k2"), "unknown_key", ("key id", "not known")),
        (signed(b"b" * 64), "bad_signature", ("signature", "does not match")),
        (signed(ts=NOW - SKEW_S - 1), "stale_timestamp", (f"window of {SKEW_S} s", "X-KV-Server-Time")),
        (signed(ts=NOW - 50), "stale_timestamp", ("restarted", "X-KV-Server-Time")),
    ]
    for request, code, names in cases:
        err = auth_error(auth, **request)
        assert err.code == code
        assert_client_message(err.message, *names)

    used = signed(ts=NOW - 10, nonce="used-nonce-0123456")
    assert auth.verify(**used) == TEST_KEY_ID
    err = auth_error(auth, **used)
    assert err.code == "replayed_nonce"
    assert_client_message(err.message, "nonce", "used already")

    assert auth.verify(**signed(ts=NOW - 5)) == TEST_KEY_ID  # the store (1 entry) is full: drops NOW - 10
    err = auth_error(auth, **signed(ts=NOW - 10))
    assert err.code == "stale_timestamp"
    assert_client_message(err.message, "nonce store is full")


# --- more of the Authenticator ----------------------------------------------------------------------------


def test_default_window_is_300_s_and_default_store_holds_a_million_nonces() -> None:
    auth = Authenticator({TEST_KEY_ID: TEST_SECRET}, clock=lambda: NOW)
    assert auth.verify(**signed(ts=NOW - 300)) == TEST_KEY_ID
    err = auth_error(auth, **signed(ts=NOW - 301))
    assert err.code == "stale_timestamp"
    assert "300 s" in err.message
    assert auth.nonces.max_entries == 1_000_000  # README: auth.max_nonces defaults to 1000000


def test_public_host_is_lower_cased_as_the_client_lower_cases_it() -> None:
    # an internationalised name written in Unicode: "ß".upper().lower() is "ss", so only .lower() matches
    auth = Authenticator({TEST_KEY_ID: TEST_SECRET}, public_host="KV.Straße.example", clock=lambda: NOW)
    via_proxy = signed(host="kv.straße.example") | {"host": "127.0.0.1:8888"}
    assert auth.verify(**via_proxy) == TEST_KEY_ID


def test_started_s_given_at_construction_refuses_up_to_that_second() -> None:
    auth = Authenticator({TEST_KEY_ID: TEST_SECRET}, max_skew_s=SKEW_S, clock=lambda: NOW + 10, started_s=NOW)
    err = auth_error(auth, **signed(ts=NOW))
    assert err.code == "stale_timestamp"
    assert err.headers["X-KV-Server-Time"] == str(NOW + 10)
    assert auth.verify(**signed(ts=NOW + 1)) == TEST_KEY_ID


def test_restore_keeps_an_entry_at_the_edge_of_the_window_and_drops_one_just_outside() -> None:
    auth = Authenticator({TEST_KEY_ID: TEST_SECRET}, max_skew_s=SKEW_S, clock=lambda: NOW)
    edge = (NOW - SKEW_S, TEST_KEY_ID, "e" * 16)
    outside = (NOW - SKEW_S - 1, TEST_KEY_ID, "o" * 16)
    auth.restore([edge, outside], clean=True)

    assert auth.nonces.entries() == [edge]
    assert not auth.nonces.seen(TEST_KEY_ID, "o" * 16)
    # the remembered one is still a replay, judged at the very edge of the window
    assert auth_error(auth, **signed(ts=NOW - SKEW_S, nonce="e" * 16)).code == "replayed_nonce"


def test_remember_takes_in_a_nonce_once_even_if_the_journal_lists_it_twice() -> None:
    clock = Clock(NOW)
    auth = Authenticator({TEST_KEY_ID: TEST_SECRET}, max_skew_s=SKEW_S, clock=clock)
    auth.remember([(NOW - 5, TEST_KEY_ID, "d" * 16), (NOW - 3, TEST_KEY_ID, "d" * 16), (NOW - 3, "k2", "d" * 16)])

    assert sorted(auth.nonces.entries()) == [(NOW - 5, TEST_KEY_ID, "d" * 16), (NOW - 3, "k2", "d" * 16)]
    # once both seconds have left the window, they expire cleanly and requests go on being served
    clock.now = NOW + SKEW_S + 10
    assert auth.verify(**signed(ts=NOW + SKEW_S + 10)) == TEST_KEY_ID
    assert len(auth.nonces) == 1


def test_restore_after_a_clean_stop_sets_no_start_up_floor() -> None:
    auth = Authenticator({TEST_KEY_ID: TEST_SECRET}, max_skew_s=SKEW_S, clock=lambda: NOW)
    auth.restore([], clean=True)
    assert auth.verify(**signed(ts=NOW - 1)) == TEST_KEY_ID


# --- more of the NonceStore --------------------------------------------------------------------------------


def test_nonce_store_entries_lists_every_remembered_nonce_with_its_timestamp() -> None:
    store = NonceStore(max_entries=10, max_skew_s=SKEW_S)
    assert store.entries() == []
    store.add("old-key", "nonce_A-000000000", NOW - 1, NOW)
    store.add("new.key_2", "nonce_B-000000000", NOW, NOW)
    store.add("old-key", "nonce_C-000000000", NOW, NOW)

    assert sorted(store.entries()) == [
        (NOW - 1, "old-key", "nonce_A-000000000"),
        (NOW, "new.key_2", "nonce_B-000000000"),
        (NOW, "old-key", "nonce_C-000000000"),
    ]


def test_nonce_store_does_not_keep_a_nonce_of_the_second_it_just_dropped() -> None:
    store = NonceStore(max_entries=1, max_skew_s=SKEW_S)
    store.add("k", "a", NOW, NOW)
    store.add("k", "b", NOW, NOW)  # full: NOW is dropped, and with it the floor refuses b's second anyway
    assert store.floor == NOW
    assert len(store) == 0 and not store.seen("k", "b")
    assert store.entries() == []


def test_nonce_store_floor_never_falls_when_an_older_entry_is_dropped_later() -> None:
    store = NonceStore(max_entries=2, max_skew_s=SKEW_S)
    store.add("k", "a", NOW + 10, NOW)
    store.add("k", "b", NOW + 20, NOW)
    store.add("k", "c", NOW + 30, NOW)  # full: drops NOW + 10
    assert store.floor == NOW + 10
    store.add("k", "g", NOW + 331, NOW + 331)  # b and c leave the window
    store.add("k", "d", NOW + 5, NOW)  # the clock stepped back: an entry older than the floor comes in
    store.add("k", "e", NOW + 40, NOW)  # full: drops NOW + 5, below the floor
    assert store.floor == NOW + 10
    assert store.below_floor(NOW + 10)


# --- more of the keys file ---------------------------------------------------------------------------------


def test_secret_may_use_the_first_and_last_printable_characters() -> None:
    secret = "!~" * 16
    assert parse_keys(f"k1 {secret}\n", label="x").secrets == {"k1": secret.encode("ascii")}


def test_crlf_keys_file_and_x_at_either_end_of_a_field() -> None:
    text = f"XkeyX {'X' * 40}\r\nk2 {GOOD}X\r\n"
    assert parse_keys(text, label="x").secrets == {"XkeyX": b"X" * 40, "k2": (GOOD + "X").encode()}


def test_load_keys_creates_the_folders_and_the_file_with_private_modes(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "kv.keys"
    assert list(load_keys(path).secrets) == ["default"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_load_keys_creates_the_file_in_an_existing_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kvtornado.auth")
    path = tmp_path / "kv.keys"
    keys = load_keys(path).secrets
    assert list(keys) == ["default"] and len(keys["default"]) == 64
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [f"created keys file {path} with one new key 'default'"]


def test_load_keys_under_a_file_says_a_parent_is_not_a_folder(tmp_path: Path) -> None:
    (tmp_path / "not-a-folder").write_text("", encoding="ascii")
    path = tmp_path / "not-a-folder" / "kv.keys"
    with pytest.raises(ConfigError) as info:
        load_keys(path)
    assert str(info.value) == f"{path}: keys file is missing and cannot be created (a parent is not a folder)"

    with pytest.raises(ConfigError) as info:
        load_keys(path, create=False)
    assert str(info.value).startswith(f"{path}: cannot read keys file (")


# --- more of the NonceJournal ------------------------------------------------------------------------------


def test_journal_creates_its_folders_private(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "kv.nonces"
    j = NonceJournal(path, clock=lambda: NOW)
    assert j.open() == ([], True)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    j.close(None)


def test_journal_under_a_file_names_its_lock_file(tmp_path: Path) -> None:
    (tmp_path / "not-a-folder").write_text("", encoding="ascii")
    j = NonceJournal(tmp_path / "not-a-folder" / "kv.nonces", clock=lambda: NOW)
    with pytest.raises(ConfigError) as info:
        j.open()
    assert str(info.value).startswith(
        f"{tmp_path / 'not-a-folder' / 'kv.nonces.lock'}: cannot open the nonce journal's lock file (")
    j.close(None)


@pytest.mark.parametrize(("in_the_way", "refusal"), [
    ("kv.nonces", "cannot read the nonce journal ("),
    ("kv.nonces.tmp", "cannot write the nonce journal ("),  # the rewrite goes through <path>.tmp
])
def test_a_journal_that_cannot_be_read_or_rewritten_is_refused(tmp_path: Path, in_the_way: str, refusal: str) -> None:
    path = tmp_path / "kv.nonces"
    (tmp_path / in_the_way).mkdir()  # a folder where the journal (or its rewrite) must be a file
    j = NonceJournal(path, clock=lambda: NOW)
    with pytest.raises(ConfigError) as info:
        j.open()
    assert str(info.value).startswith(f"{path}: {refusal}")
    j.close(None)


def test_journal_skips_garbled_and_non_ascii_lines(tmp_path: Path) -> None:
    path = tmp_path / "kv.nonces"
    path.write_bytes("".join([
        f"{NOW + 100} k1 {'a' * 16}\n",
        f"{NOW + 101} k/1 {'b' * 16}\n",  # a key id that no key file can hold
        f"{NOW + 102} ké {'c' * 16}\n",  # not ASCII
        f"{NOW + 103}  k1 {'d' * 16}\n",  # two spaces
        f"{NOW + 104} k1 {'e' * 16}\n",
    ]).encode())
    j = NonceJournal(path, clock=lambda: NOW)
    entries, clean = j.open()
    j.close(None)
    assert not clean
    assert entries == [(NOW + 100, "k1", "a" * 16), (NOW + 104, "k1", "e" * 16)]


def test_journal_open_drops_entries_of_the_current_second_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "kv.nonces"
    path.write_text(f"{NOW + 150} k1 {'a' * 16}\n{NOW + 151} k1 {'b' * 16}\n", encoding="ascii")
    j = NonceJournal(path, clock=lambda: NOW + 150.5)
    entries, _ = j.open()
    j.close(None)
    assert entries == [(NOW + 150, "k1", "a" * 16), (NOW + 151, "k1", "b" * 16)]  # all returned, to remember
    assert path.read_text(encoding="ascii") == f"{NOW + 151} k1 {'b' * 16}\n"  # only those a floor cannot cover


@pytest.mark.gen_test
async def test_journal_compacts_every_n_appends_and_drops_the_current_second(tmp_path: Path) -> None:
    path = tmp_path / "kv.nonces"
    clock = Clock(NOW)
    j = NonceJournal(path, clock=clock)
    j.COMPACT_EVERY = 3
    j.open()

    def lines() -> list[str]:
        return path.read_text(encoding="ascii").splitlines()

    await j.record("k1", "a" * 16, NOW + 1)
    await j.record("k1", "b" * 16, NOW + 2)
    clock.now = NOW + 2.5
    await j.record("k1", "c" * 16, NOW + 50)  # 3rd append: compacts; NOW + 2 is the current second, covered
    assert lines() == [f"{NOW + 50} k1 {'c' * 16}"]

    clock.now = NOW + 60
    await j.record("k1", "d" * 16, NOW + 70)
    await j.record("k1", "e" * 16, NOW + 80)  # two appends since: no compaction yet, NOW + 50 stays
    assert lines() == [f"{NOW + 50} k1 {'c' * 16}", f"{NOW + 70} k1 {'d' * 16}", f"{NOW + 80} k1 {'e' * 16}"]
    await j.record("k1", "f" * 16, NOW + 90)  # the 3rd: compacts again
    assert lines() == [f"{NOW + 70} k1 {'d' * 16}", f"{NOW + 80} k1 {'e' * 16}", f"{NOW + 90} k1 {'f' * 16}"]
    j.close(None)


@pytest.mark.gen_test
async def test_journal_writes_on_its_own_named_thread(tmp_path: Path) -> None:
    threads: list[str] = []

    def clock() -> float:  # compaction reads the clock on the thread that writes
        threads.append(threading.current_thread().name)
        return NOW

    j = NonceJournal(tmp_path / "kv.nonces", clock=clock)
    j.COMPACT_EVERY = 1
    j.open()
    threads.clear()
    await j.record("k1", "a" * 16, NOW + 1)
    await j.record("k1", "b" * 16, NOW + 2)
    j.close(None)
    assert len(threads) == 2
    assert all(name.startswith("kv-nonce-journal") for name in threads), threads


def test_journal_close_with_entries_writes_them_and_the_clean_line(tmp_path: Path) -> None:
    path = tmp_path / "kv.nonces"
    j = NonceJournal(path, clock=lambda: NOW)
    j.open()
    j.close([(NOW - 1, "k1", "a" * 16), (NOW, "k2", "b" * 16)])
    assert path.read_text(encoding="ascii") == f"{NOW - 1} k1 {'a' * 16}\n{NOW} k2 {'b' * 16}\nclean\n"
    assert not (tmp_path / "kv.nonces.tmp").exists()
