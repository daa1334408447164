"""Exercise 3 over real HTTP: ``/save``, ``/get``, ``/delete`` written through to sqlite, every SPEC §5 error,
body limits on the wire, and a real ``exercise3.py`` process signed with openssl and driven with curl."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from tornado.web import Application

from kvtornado.app import make_app
from kvtornado.auth import Authenticator
from kvtornado.client import AsyncKVClient, KVClient, KVClientError, Signer
from kvtornado.config import Config
from kvtornado.store import SqliteStore
from tests.conftest import TEST_KEY_ID, TEST_SECRET, write_config
from tests.e2e.helpers import (
    FORM_CT,
    FRAMING_ERRORS,
    PROCESS_TIMEOUT_S,
    VERSION,
    RawConnection,
    ServerProcess,
    assert_error,
    assert_json,
    chunked,
    pipelined_behind_framing_error,
    raw_head,
    raw_send,
    send,
    serving,
)

# Small limits keep the oversized requests small; the value limit sits below the body limit so that
# each of the two 413s can be reached on its own.
MAX_BODY = 8192
MAX_VALUE = 4096
MAX_KEY = 512
JSON_T = "application/json"


@pytest.fixture
def config(make_config: Callable[..., Config]) -> Config:
    return make_config(server={"max_body_bytes": MAX_BODY}, limits={"max_value_bytes": MAX_VALUE})


@pytest.fixture
def store(io_loop: Any, config: Config) -> Iterator[SqliteStore]:
    s = SqliteStore(config.storage.path, synchronous=config.storage.synchronous)
    io_loop.run_sync(s.open)
    yield s
    io_loop.run_sync(s.close)


@pytest.fixture
def app(io_loop: Any, config: Config, authenticator: Authenticator, store: SqliteStore) -> Application:
    return make_app(config, authenticator=authenticator, kv=store)


@pytest.fixture
def kv(http_client: Any, base_url: str, signer: Signer) -> AsyncKVClient:
    return AsyncKVClient(base_url, signer)


def committed(config: Config, key: str) -> str | None:
    """The value text committed in sqlite, read on a connection of our own (not the server's)."""
    conn = sqlite3.connect(str(config.storage.path))
    try:
        row = conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
    finally:
        conn.close()
    return None if row is None else str(row[0])


def save_body(key: Any, value: Any) -> bytes:
    return json.dumps({"key": key, "value": value}, ensure_ascii=False).encode()


# --- the happy paths -----------------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_save_get_delete_round_trip(http_client: Any, base_url: str, signer: Signer, config: Config) -> None:
    resp = await send(http_client, base_url, "POST", "/save", body=save_body("fruit", "apple"), content_type=JSON_T,
                      signer=signer)
    assert assert_json(resp, 200) == {"key": "fruit", "saved": True, "version": VERSION}
    assert resp.header("Cache-Control") == "no-store"
    # Write-through: committed before the answer.
    assert committed(config, "fruit") == '"apple"'

    resp = await send(http_client, base_url, "GET", "/get", query="key=fruit", signer=signer)
    assert assert_json(resp, 200) == {"key": "fruit", "value": "apple", "version": VERSION, "expires_at": None}
    assert resp.header("Cache-Control") == "no-store"

    resp = await send(http_client, base_url, "POST", "/save", body=save_body("fruit", ["pear"]), content_type=JSON_T,
                      signer=signer)
    assert assert_json(resp, 200) == {"key": "fruit", "saved": True, "version": VERSION}
    resp = await send(http_client, base_url, "GET", "/get", query="key=fruit", signer=signer)
    assert assert_json(resp, 200) == {"key": "fruit", "value": ["pear"], "version": VERSION, "expires_at": None}

    resp = await send(http_client, base_url, "DELETE", "/delete", query="key=fruit", signer=signer)
    assert assert_json(resp, 200) == {"key": "fruit", "deleted": True, "version": VERSION}
    assert committed(config, "fruit") is None
    resp = await send(http_client, base_url, "GET", "/get", query="key=fruit", signer=signer)
    assert_error(resp, 404, "not_found")
    resp = await send(http_client, base_url, "DELETE", "/delete", query="key=fruit", signer=signer)
    assert_error(resp, 404, "not_found")


VALUES: dict[str, Any] = {
    "string": "hello",
    "empty string": "",
    "unicode": "héllo wörld · 日本語 · Ελληνικά · עברית",
    "emoji with skin tone and zwj": "👍🏽 👨‍👩‍👧",
    "combining characters stay unnormalised": "e\u0301 n\u0303 \u0041\u030a",
    "control characters and escapes": 'tab\tnew\nline "quoted" back\\slash \u0000 \u2028 </script>',
    "zero": 0,
    "negative int": -42,
    "big int": 2**200,
    "float": 3.14159,
    "float that looks whole": 1.0,
    "negative zero": -0.0,
    "tiny float": 5e-324,
    "huge float": 1.7976931348623157e308,
    "true": True,
    "false": False,
    "null": None,
    "empty object": {},
    "empty array": [],
    "nested": {"a": [1, {"b": None, "c": [True, False, "x"]}], "d": {"e": {"f": [[], {}]}}, "é": "ü"},
    "array of mixed": [1, "1", 1.5, None, True, {"k": "v"}, ["x"]],
    "deep but allowed": json.loads("[" * 999 + "]" * 999),
}


def exact(value: Any) -> str:
    # json.dumps tells 1 from 1.0 from True and -0.0 from 0.0, which == does not.
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


@pytest.mark.parametrize("value", list(VALUES.values()), ids=list(VALUES))
@pytest.mark.gen_test
async def test_every_json_value_round_trips_exactly(kv: AsyncKVClient, value: Any) -> None:
    assert await kv.save("v", value) == {"key": "v", "saved": True, "version": VERSION}
    assert exact(await kv.get("v")) == exact(value)


@pytest.mark.gen_test
async def test_escaped_unicode_in_the_body_comes_back_as_characters(
    http_client: Any, base_url: str, signer: Signer
) -> None:
    body = b'{"key": "\\u00e9t\\u00e9", "value": "\\ud83d\\udc4d \\u00e9"}'
    resp = await send(http_client, base_url, "POST", "/save", body=body, content_type=JSON_T, signer=signer)
    assert assert_json(resp, 200) == {"key": "été", "saved": True, "version": VERSION}
    resp = await send(http_client, base_url, "GET", "/get", query="key=" + quote("été"), signer=signer)
    assert assert_json(resp, 200) == {"key": "été", "value": "👍 é", "version": VERSION, "expires_at": None}


ODD_KEYS: dict[str, str] = {
    "slash": "a/b",
    "only a slash": "/",
    "question mark": "what?",
    "ampersand": "a&b",
    "equals": "a=b",
    "hash": "a#b",
    "percent": "100%",
    "percent escape lookalike": "%2F%20",
    "plus": "a+b",
    "space": "a b",
    "leading and trailing spaces": "  padded  ",
    "double quote": 'say "hi"',
    "single quote": "it's",
    "sql injection": "'; DROP TABLE kv; --",
    "backslash": "C:\\temp",
    "newline and tab": "line1\nline2\tx",
    "dots": "../../etc/passwd",
    "unicode": "clé-ünïcødé-日本",
    "emoji": "🔑👍🏽",
    "combining": "e\u0301",
    "512 ascii bytes": "k" * MAX_KEY,
    "512 bytes of 2-byte chars": "é" * (MAX_KEY // 2),
    "512 bytes of 4-byte chars": "😀" * (MAX_KEY // 4),
}


@pytest.mark.parametrize("key", list(ODD_KEYS.values()), ids=list(ODD_KEYS))
@pytest.mark.gen_test
async def test_odd_keys_round_trip_through_the_query(
    http_client: Any, base_url: str, signer: Signer, config: Config, key: str
) -> None:
    resp = await send(http_client, base_url, "POST", "/save", body=save_body(key, {"k": key}), content_type=JSON_T,
                      signer=signer)
    assert assert_json(resp, 200) == {"key": key, "saved": True, "version": VERSION}
    assert committed(config, key) == json.dumps({"k": key}, ensure_ascii=False, separators=(",", ":"))
    query = "key=" + quote(key, safe="")
    resp = await send(http_client, base_url, "GET", "/get", query=query, signer=signer)
    assert assert_json(resp, 200) == {"key": key, "value": {"k": key}, "version": VERSION, "expires_at": None}
    resp = await send(http_client, base_url, "DELETE", "/delete", query=query, signer=signer)
    assert assert_json(resp, 200) == {"key": key, "deleted": True, "version": VERSION}
    resp = await send(http_client, base_url, "GET", "/get", query=query, signer=signer)
    assert_error(resp, 404, "not_found")


@pytest.mark.gen_test
async def test_sql_injection_key_leaves_the_table_alone(kv: AsyncKVClient, config: Config) -> None:
    await kv.save("keep", 1)
    await kv.save("'; DROP TABLE kv; --", 2)
    await kv.save("x' OR '1'='1", 3)
    assert await kv.get("keep") == 1
    assert await kv.get("x' OR '1'='1") == 3
    assert committed(config, "keep") == "1"


@pytest.mark.gen_test
async def test_query_plus_means_space_and_other_params_are_refused(
    http_client: Any, base_url: str, signer: Signer, kv: AsyncKVClient
) -> None:
    await kv.save("a b", "spaced")
    await kv.save("a+b", "plussed")
    resp = await send(http_client, base_url, "GET", "/get", query="key=a+b", signer=signer)
    assert assert_json(resp, 200) == {"key": "a b", "value": "spaced", "version": VERSION, "expires_at": None}
    resp = await send(http_client, base_url, "GET", "/get", query="key=a%2Bb", signer=signer)
    assert assert_json(resp, 200) == {"key": "a+b", "value": "plussed", "version": VERSION, "expires_at": None}
    resp = await send(http_client, base_url, "GET", "/get", query="key=a%2Bb&other=1", signer=signer)
    assert_error(resp, 400, "bad_request")


@pytest.mark.parametrize(
    ("body", "key", "value"),
    [
        pytest.param(b"key=color&value=blue", "color", "blue", id="plain"),
        pytest.param(b"key=n&value=42", "n", "42", id="number stays a string"),
        pytest.param(b"key=j&value=%7B%22a%22%3A1%7D", "j", '{"a":1}', id="json text stays a string"),
        pytest.param(b"key=t&value=true", "t", "true", id="true stays a string"),
        pytest.param(b"key=e&value=", "e", "", id="empty value"),
        pytest.param(b"key=a+b%26c&value=x+y%3Dz", "a b&c", "x y=z", id="plus and escapes"),
        pytest.param("key=clé&value=😀".encode(), "clé", "😀", id="raw utf-8"),
        pytest.param(b"key=cl%C3%A9&value=%F0%9F%98%80", "clé", "😀", id="percent-encoded utf-8"),
    ],
)
@pytest.mark.gen_test
async def test_form_encoded_save_stores_a_string(
    http_client: Any, base_url: str, signer: Signer, kv: AsyncKVClient, body: bytes, key: str, value: str
) -> None:
    resp = await send(http_client, base_url, "POST", "/save", body=body, content_type=FORM_CT, signer=signer)
    assert assert_json(resp, 200) == {"key": key, "saved": True, "version": VERSION}
    assert exact(await kv.get(key)) == exact(value)


@pytest.mark.parametrize("content_type", ["application/json; charset=UTF-8", "Application/JSON", "application/json;"
                                          "charset=utf-8", f"{FORM_CT}; charset=UTF-8"])
@pytest.mark.gen_test
async def test_content_type_parameters_and_case_are_accepted(
    http_client: Any, base_url: str, signer: Signer, kv: AsyncKVClient, content_type: str
) -> None:
    body = b'{"key":"ct","value":"ok"}' if "json" in content_type.lower() else b"key=ct&value=ok"
    resp = await send(http_client, base_url, "POST", "/save", body=body, content_type=content_type, signer=signer)
    assert assert_json(resp, 200) == {"key": "ct", "saved": True, "version": VERSION}
    assert await kv.get("ct") == "ok"


@pytest.mark.gen_test
async def test_delete_by_post_with_a_json_body_or_a_query(
    http_client: Any, base_url: str, signer: Signer, kv: AsyncKVClient, config: Config
) -> None:
    for key in ("one", "two", "three"):
        await kv.save(key, key)
    resp = await send(http_client, base_url, "POST", "/delete", body=b'{"key":"one"}', content_type=JSON_T,
                      signer=signer)
    assert assert_json(resp, 200) == {"key": "one", "deleted": True, "version": VERSION}
    resp = await send(http_client, base_url, "POST", "/delete", body=b"key=two", content_type=FORM_CT, signer=signer)
    assert assert_json(resp, 200) == {"key": "two", "deleted": True, "version": VERSION}
    resp = await send(http_client, base_url, "POST", "/delete", query="key=three", body=b"", content_type=JSON_T,
                      signer=signer)
    assert assert_json(resp, 200) == {"key": "three", "deleted": True, "version": VERSION}
    for key in ("one", "two", "three"):
        assert committed(config, key) is None
        resp = await send(http_client, base_url, "POST", "/delete", body=json.dumps({"key": key}).encode(),
                          content_type=JSON_T, signer=signer)
        assert_error(resp, 404, "not_found")


@pytest.mark.parametrize("flag", ["1", "0"])
@pytest.mark.gen_test
async def test_durable_save_and_delete_are_committed_before_the_answer(
    http_client: Any, base_url: str, signer: Signer, config: Config, flag: str
) -> None:
    resp = await send(http_client, base_url, "POST", "/save", query="durable=" + flag, body=save_body("d", [1, 2]),
                      content_type=JSON_T, signer=signer)
    assert assert_json(resp, 200) == {"key": "d", "saved": True, "version": VERSION}
    assert committed(config, "d") == "[1,2]"
    resp = await send(http_client, base_url, "DELETE", "/delete", query="key=d&durable=" + flag, signer=signer)
    assert assert_json(resp, 200) == {"key": "d", "deleted": True, "version": VERSION}
    assert committed(config, "d") is None


@pytest.mark.gen_test
async def test_concurrent_requests_all_land(kv: AsyncKVClient, config: Config) -> None:
    keys = [f"c{i}" for i in range(40)]
    saved = await asyncio.gather(*(kv.save(k, {"i": i}) for i, k in enumerate(keys)))
    assert saved == [{"key": k, "saved": True, "version": VERSION} for k in keys]
    assert await asyncio.gather(*(kv.get(k) for k in keys)) == [{"i": i} for i in range(len(keys))]
    assert all(committed(config, k) == json.dumps({"i": i}, separators=(",", ":")) for i, k in enumerate(keys))
    deleted = await asyncio.gather(*(kv.delete(k) for k in keys[::2]))
    assert deleted == [{"key": k, "deleted": True, "version": VERSION} for k in keys[::2]]
    assert [committed(config, k) is None for k in keys] == [i % 2 == 0 for i in range(len(keys))]


@pytest.mark.gen_test
async def test_bodies_up_to_the_limit_are_read(http_client: Any, base_url: str, signer: Signer,
                                              kv: AsyncKVClient) -> None:
    head = b'{"key":"edge","value":1'
    body = head + b" " * (MAX_BODY - len(head) - 1) + b"}"  # white space is not part of the value
    assert len(body) == MAX_BODY
    resp = await send(http_client, base_url, "POST", "/save", body=body, content_type=JSON_T, signer=signer)
    assert assert_json(resp, 200) == {"key": "edge", "saved": True, "version": VERSION}
    value = "v" * (MAX_VALUE - 2)  # its JSON text is exactly MAX_VALUE bytes with the quotes
    assert await kv.save("edge", value) == {"key": "edge", "saved": True, "version": VERSION}
    assert await kv.get("edge") == value


@pytest.mark.gen_test
async def test_a_chunked_body_under_the_limit_is_read_and_signed(
    http_server: Any, http_port: int, signer: Signer, kv: AsyncKVClient
) -> None:
    body = save_body("chunky", {"parts": 3})
    host = f"127.0.0.1:{http_port}"
    head = raw_head("POST", "/save", {
        "Host": host, "Content-Type": JSON_T, "Transfer-Encoding": "chunked",
        "Authorization": signer.authorization("POST", host, "/save", "", body),
    })
    async with RawConnection(http_port) as conn:
        await conn.send(head, chunked(body[:5], body[5:12], body[12:]), b"0\r\n\r\n")
        assert assert_json(await conn.read_reply(), 200) == {"key": "chunky", "saved": True, "version": VERSION}
    assert await kv.get("chunky") == {"parts": 3}


# --- every error of SPEC §5 -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    status: int
    code: str
    method: str = "POST"
    path: str = "/save"
    query: str = ""
    body: bytes = b""
    content_type: str | None = JSON_T
    signed: bool = True
    headers: dict[str, str] | None = None


ERRORS: dict[str, Bad] = {
    "bad JSON": Bad(400, "invalid_json", body=b'{"key": "k", "value": '),
    "JSON with trailing garbage": Bad(400, "invalid_json", body=b'{"key":"k","value":1} x'),
    "NaN is not JSON": Bad(400, "invalid_json", body=b'{"key":"k","value":NaN}'),
    "single quotes are not JSON": Bad(400, "invalid_json", body=b"{'key':'k','value':1}"),
    "empty JSON body": Bad(400, "invalid_json", body=b""),
    "invalid UTF-8": Bad(400, "invalid_json", body=b'{"key":"k","value":"\xff\xfe"}'),
    "overlong UTF-8": Bad(400, "invalid_json", body=b'{"key":"\xc0\xaf","value":1}'),
    "UTF-16 body": Bad(400, "invalid_json", body='{"key":"k","value":1}'.encode("utf-16")),
    "nesting 1001 deep": Bad(400, "invalid_json", body=b'{"key":"k","value":' + b"[" * 1000 + b"]" * 1000 + b"}"),
    "nesting 1001 deep in objects": Bad(400, "invalid_json",
                                        body=b'{"key":"k","value":' + b'{"a":' * 1000 + b"1" + b"}" * 1000 + b"}"),
    "body is an array": Bad(400, "invalid_json", body=b'[{"key":"k","value":1}]'),
    "body is a string": Bad(400, "invalid_json", body=b'"k"'),
    "body is null": Bad(400, "invalid_json", body=b"null"),
    "lone surrogate in the value": Bad(400, "invalid_json", body=b'{"key":"k","value":"\\ud800"}'),
    "form body not UTF-8": Bad(400, "invalid_json", body=b"key=%ff&value=1", content_type=FORM_CT),
    "key is a number": Bad(400, "invalid_key", body=b'{"key":1,"value":1}'),
    "key is null": Bad(400, "invalid_key", body=b'{"key":null,"value":1}'),
    "key is an array": Bad(400, "invalid_key", body=b'{"key":["k"],"value":1}'),
    "key is an object": Bad(400, "invalid_key", body=b'{"key":{"k":1},"value":1}'),
    "empty key": Bad(400, "invalid_key", body=b'{"key":"","value":1}'),
    "empty form key": Bad(400, "invalid_key", body=b"key=&value=1", content_type=FORM_CT),
    "lone surrogate in the key": Bad(400, "invalid_key", body=b'{"key":"\\udc00","value":1}'),
    "missing key": Bad(400, "missing_key", body=b'{"value":1}'),
    "empty object": Bad(400, "missing_key", body=b"{}"),
    "missing form key": Bad(400, "missing_key", body=b"value=1", content_type=FORM_CT),
    "missing value": Bad(400, "missing_value", body=b'{"key":"k"}'),
    "missing form value": Bad(400, "missing_value", body=b"key=k", content_type=FORM_CT),
    "key over max_key_bytes": Bad(413, "too_large", body=save_body("k" * (MAX_KEY + 1), 1)),
    "2-byte key over max_key_bytes": Bad(413, "too_large", body=save_body("é" * (MAX_KEY // 2 + 1), 1)),
    "value over max_value_bytes": Bad(413, "too_large", body=save_body("k", "v" * (MAX_VALUE - 1))),
    "unicode value over max_value_bytes": Bad(413, "too_large", body=save_body("k", "é" * (MAX_VALUE // 2))),
    "wrong content type text/plain": Bad(415, "unsupported_media_type", body=b'{"key":"k","value":1}',
                                         content_type="text/plain"),
    "wrong content type multipart": Bad(415, "unsupported_media_type", body=b"--x--",
                                        content_type="multipart/form-data; boundary=x"),
    "json lookalike content type": Bad(415, "unsupported_media_type", body=b'{"key":"k","value":1}',
                                       content_type="application/jsonp"),
    "missing content type": Bad(415, "unsupported_media_type", body=b'{"key":"k","value":1}', content_type=None),
    "PUT /save signed": Bad(405, "method_not_allowed", method="PUT", body=b'{"key":"k","value":1}'),
    "GET /save signed": Bad(405, "method_not_allowed", method="GET", content_type=None),
    "DELETE /save signed": Bad(405, "method_not_allowed", method="DELETE", content_type=None),
    "POST /get signed": Bad(405, "method_not_allowed", path="/get", query="key=k", body=b"{}"),
    "PUT /delete signed": Bad(405, "method_not_allowed", method="PUT", path="/delete", body=b'{"key":"k"}'),
    "PATCH /get signed": Bad(405, "method_not_allowed", method="PATCH", path="/get", body=b"{}"),
    "unsigned PUT /save": Bad(401, "missing_auth", method="PUT", body=b'{"key":"k","value":1}', signed=False),
    "unsigned POST /save": Bad(401, "missing_auth", body=b'{"key":"k","value":1}', signed=False),
    "unsigned bad JSON": Bad(401, "missing_auth", body=b"{", signed=False),
    "unsigned GET /get": Bad(401, "missing_auth", method="GET", path="/get", query="key=k", content_type=None,
                             signed=False),
    "unsigned DELETE /delete": Bad(401, "missing_auth", method="DELETE", path="/delete", query="key=k",
                                   content_type=None, signed=False),
    "get of an absent key": Bad(404, "not_found", method="GET", path="/get", query="key=absent", content_type=None),
    "delete of an absent key": Bad(404, "not_found", method="DELETE", path="/delete", query="key=absent",
                                   content_type=None),
    "POST delete of an absent key": Bad(404, "not_found", path="/delete", body=b'{"key":"absent"}'),
    "unknown route signed": Bad(404, "not_found", method="GET", path="/list", content_type=None),
    "missing key param on /get": Bad(400, "missing_key", method="GET", path="/get", content_type=None),
    "other params but no key on /get": Bad(400, "bad_request", method="GET", path="/get", query="k=1&Key=2",
                                           content_type=None),
    "empty key param on /get": Bad(400, "invalid_key", method="GET", path="/get", query="key=", content_type=None),
    "key param not UTF-8": Bad(400, "invalid_key", method="GET", path="/get", query="key=%ff", content_type=None),
    "key param over max_key_bytes": Bad(413, "too_large", method="GET", path="/get", query="key=" + "k" * 513,
                                        content_type=None),
    "missing key param on DELETE /delete": Bad(400, "missing_key", method="DELETE", path="/delete",
                                               content_type=None),
    "POST /delete without a key": Bad(400, "missing_key", path="/delete", body=b"{}"),
    "POST /delete with no body and no query": Bad(400, "missing_key", path="/delete"),
    "POST /delete with a bad body": Bad(400, "invalid_json", path="/delete", body=b"{"),
    "POST /delete with a numeric key": Bad(400, "invalid_key", path="/delete", body=b'{"key":7}'),
    "repeated key on /get": Bad(400, "bad_request", method="GET", path="/get", query="key=a&key=b",
                                content_type=None),
    "empty durable on /save": Bad(400, "bad_request", query="durable=", body=b'{"key":"k","value":1}'),
    "bare durable on /save": Bad(400, "bad_request", query="durable", body=b'{"key":"k","value":1}'),
    "bare durable on DELETE /delete": Bad(400, "bad_request", method="DELETE", path="/delete", query="key=k&durable",
                                          content_type=None),
    "repeated key member in the JSON body": Bad(400, "bad_request", body=b'{"key":"k","key":"k2","value":1}'),
    "repeated value member in the JSON body": Bad(400, "bad_request", body=b'{"key":"k","value":1,"value":2}'),
    "repeated durable on /save": Bad(400, "bad_request", query="durable=0&durable=1", body=b'{"key":"k","value":1}'),
    "unknown query parameter on /save": Bad(400, "bad_request", query="expire=5", body=b'{"key":"k","value":1}'),
    "a query parameter of /delete on /save": Bad(400, "bad_request", query="key=k", body=b'{"key":"k","value":1}'),
    "unknown body field on /save": Bad(400, "bad_request", body=b'{"key":"k","value":1,"ttl":5}'),
    "repeated form field on /save": Bad(400, "bad_request", body=b"key=k&value=1&value=2", content_type=FORM_CT),
    "key in both the body and the query of POST /delete": Bad(400, "bad_request", path="/delete", query="key=k",
                                                              body=b'{"key":"k"}'),
    "If-Match on /save": Bad(400, "bad_request", body=b'{"key":"k","value":1}', headers={"If-Match": '"3"'}),
    "If-None-Match on /save": Bad(400, "bad_request", body=b'{"key":"k","value":1}', headers={"If-None-Match": "*"}),
    "If-Match on DELETE /delete": Bad(400, "bad_request", method="DELETE", path="/delete", query="key=k",
                                      content_type=None, headers={"If-Match": "*"}),
    "POST /delete as text/plain": Bad(415, "unsupported_media_type", path="/delete", body=b'{"key":"k"}',
                                      content_type="text/plain"),
}


@pytest.mark.parametrize("bad", list(ERRORS.values()), ids=list(ERRORS))
@pytest.mark.gen_test
async def test_every_error_has_its_status_and_code(
    http_server: Any, http_port: int, signer: Signer, config: Config, bad: Bad
) -> None:
    resp = await raw_send(http_port, bad.method, bad.path, query=bad.query, body=bad.body,
                          content_type=bad.content_type, signer=signer if bad.signed else None, headers=bad.headers)
    assert_error(resp, bad.status, bad.code)
    if bad.status == 405:
        assert resp.header("Allow") == {"/save": "POST", "/get": "GET", "/delete": "POST, DELETE"}[bad.path]
    # Nothing was written by a refused request.
    assert committed(config, "k") is None


@pytest.mark.parametrize("query", ["key=zz&key=p1", "key=p1&key=zz", "key=zz&k%65y=p1", "key=p1&durable=1&key=p1"])
@pytest.mark.gen_test
async def test_a_repeated_key_parameter_deletes_nothing(
    http_client: Any, base_url: str, signer: Signer, kv: AsyncKVClient, query: str
) -> None:
    await kv.save("p1", "kept")
    await kv.save("zz", "kept too")
    resp = await send(http_client, base_url, "DELETE", "/delete", query=query, signer=signer)
    assert_error(resp, 400, "bad_request")
    assert await kv.get("p1") == "kept"
    assert await kv.get("zz") == "kept too"


@pytest.mark.gen_test
async def test_errors_leave_earlier_data_alone(kv: AsyncKVClient, http_server: Any, http_port: int,
                                               signer: Signer) -> None:
    await kv.save("k", "original")
    for bad in (ERRORS["value over max_value_bytes"], ERRORS["missing value"], ERRORS["invalid UTF-8"]):
        resp = await raw_send(http_port, bad.method, bad.path, body=bad.body, content_type=bad.content_type,
                              signer=signer)
        assert_error(resp, bad.status, bad.code)
    assert await kv.get("k") == "original"


# --- bodies over server.max_body_bytes, on the wire ------------------------------------------------------------


@pytest.mark.parametrize("size", [10**12, 10**30], ids=["1 TB", "past tornado's own limit"])
@pytest.mark.parametrize("path", ["/save", "/delete", "/authorize", "/get", "/nowhere"])
@pytest.mark.gen_test
async def test_a_huge_content_length_is_refused_before_the_body_is_sent(
    http_server: Any, http_port: int, signer: Signer, path: str, size: int
) -> None:
    # Only the headers go out: if the server waited for the body the read would hit its deadline.
    host = f"127.0.0.1:{http_port}"
    head = raw_head("POST", path, {
        "Host": host, "Content-Type": JSON_T, "Content-Length": str(size),
        "Authorization": signer.authorization("POST", host, path, "", b"never sent"),
    })
    async with RawConnection(http_port) as conn:
        await conn.send(head)
        resp = await conn.read_reply()
        assert_error(resp, 413, "too_large")
        assert await conn.closed_by_server()


@pytest.mark.parametrize("framing", [
    pytest.param({"Content-Length": "abc"}, id="non-integer Content-Length"),
    pytest.param({"Content-Length": "-1"}, id="negative Content-Length"),
    pytest.param({"Content-Length": "5, 6"}, id="two different Content-Lengths"),
    pytest.param({"Content-Length": "5", "Transfer-Encoding": "chunked"}, id="Content-Length and chunked"),
    pytest.param({"Transfer-Encoding": "gzip"}, id="unsupported Transfer-Encoding"),
])
@pytest.mark.gen_test
async def test_unusable_body_framing_gets_a_json_400_and_the_connection_closes(
    http_server: Any, http_port: int, kv: AsyncKVClient, framing: dict[str, str]
) -> None:
    # Tornado itself answers these with an empty 400; every error must be the JSON shape instead.
    head = raw_head("POST", "/save", {"Host": f"127.0.0.1:{http_port}", "Content-Type": JSON_T, **framing})
    async with RawConnection(http_port) as conn:
        await conn.send(head, b"hello")
        assert_error(await conn.read_reply(), 400, "bad_request")
        assert await conn.closed_by_server()
    assert await kv.save("after framing", 3) == {"key": "after framing", "saved": True, "version": VERSION}


@pytest.mark.parametrize(("method", "target", "body"), [
    pytest.param("GET", "/get?key=raw/\u00e9t\u00e9", b"", id="raw UTF-8 in the query"),
    pytest.param("POST", "/save?ttl=60&x=\u2603", b'{"key": "raw/snow", "value": 1}', id="raw UTF-8 after a body"),
    pytest.param("GET", "/g\u00e9t", b"", id="raw UTF-8 in the path"),
])
@pytest.mark.gen_test
async def test_a_raw_non_ascii_request_target_is_400_before_auth(
    http_server: Any, http_port: int, kv: AsyncKVClient, signer: Signer, method: str, target: str, body: bytes
) -> None:
    # Signed over the UTF-8 text, as a client sending those bytes would: never read as Latin-1 and served.
    host = f"127.0.0.1:{http_port}"
    path, _, query = target.partition("?")
    head = (f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {JSON_T}\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"Authorization: {signer.authorization(method, host, path, query, body)}\r\n\r\n").encode()
    async with RawConnection(http_port) as conn:
        await conn.send(head, body)
        err = assert_error(await conn.read_reply(), 400, "bad_request")
        assert "ASCII" in err["message"]
        assert await conn.closed_by_server()
    for key in ("raw/snow", "raw/\u00c3\u00a9t\u00c3\u00a9"):
        with pytest.raises(KVClientError) as info:
            await kv.get(key)
        assert info.value.status == 404


@pytest.mark.parametrize("framing", list(FRAMING_ERRORS.values()), ids=list(FRAMING_ERRORS))
@pytest.mark.gen_test
async def test_a_request_smuggled_behind_a_framing_error_is_never_executed(
    http_server: Any, http_port: int, kv: AsyncKVClient, signer: Signer, framing: str
) -> None:
    await kv.save("victim", "still here")
    host = f"127.0.0.1:{http_port}"
    hidden = raw_head("DELETE", "/delete?key=victim", {
        "Host": host, "Authorization": signer.authorization("DELETE", host, "/delete", "key=victim", b""),
    })
    replies = await pipelined_behind_framing_error(http_port, framing, hidden)
    assert [r.status for r in replies] == [400], replies
    assert replies[0].header("Connection") == "close"
    assert await kv.get("victim") == "still here"


@pytest.mark.gen_test
async def test_transfer_encoding_in_http_1_0_is_a_framing_error(
    http_server: Any, http_port: int, kv: AsyncKVClient, signer: Signer
) -> None:
    # RFC 9112 §6.1: a 1.0 message with Transfer-Encoding is faulty framing, even a well-formed chunked one.
    await kv.save("victim", "still here")
    host = f"127.0.0.1:{http_port}"
    hidden = raw_head("DELETE", "/delete?key=victim", {
        "Host": host, "Authorization": signer.authorization("DELETE", host, "/delete", "key=victim", b""),
    })
    framing = "Connection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n0"  # an empty chunked body
    replies = await pipelined_behind_framing_error(http_port, framing, hidden, version="1.0")
    assert [r.status for r in replies] == [400], replies
    assert_error(replies[0], 400, "bad_request")
    assert await kv.get("victim") == "still here"


@pytest.mark.gen_test
async def test_content_length_one_over_the_limit_is_refused(http_server: Any, http_port: int,
                                                            kv: AsyncKVClient) -> None:
    head = raw_head("POST", "/save", {"Host": f"127.0.0.1:{http_port}", "Content-Type": JSON_T,
                                      "Content-Length": str(MAX_BODY + 1)})
    async with RawConnection(http_port) as conn:
        await conn.send(head)
        assert_error(await conn.read_reply(), 413, "too_large")
        assert await conn.closed_by_server()
    # The server is fine afterwards.
    assert await kv.save("after", 1) == {"key": "after", "saved": True, "version": VERSION}


@pytest.mark.gen_test
async def test_a_chunked_body_that_grows_past_the_limit_is_refused(
    http_server: Any, http_port: int, signer: Signer, kv: AsyncKVClient
) -> None:
    host = f"127.0.0.1:{http_port}"
    head = raw_head("POST", "/save", {
        "Host": host, "Content-Type": JSON_T, "Transfer-Encoding": "chunked",
        "Authorization": signer.authorization("POST", host, "/save", "", b"whatever"),
    })
    async with RawConnection(http_port) as conn:
        await conn.send(head)
        # 1 KiB at a time, without the final chunk: the answer must come once the limit is passed.
        for _ in range(MAX_BODY // 1024 + 1):
            await conn.send(chunked(b"x" * 1024))
        resp = await conn.read_reply()
        assert_error(resp, 413, "too_large")
        assert await conn.closed_by_server()
    assert await kv.save("after", 2) == {"key": "after", "saved": True, "version": VERSION}


@pytest.mark.gen_test
async def test_a_body_one_byte_over_the_limit_is_refused(http_client: Any, base_url: str, signer: Signer,
                                                        config: Config) -> None:
    head = b'{"key":"edge","value":1,"pad":"'
    body = head + b"x" * (MAX_BODY + 1 - len(head) - 2) + b'"}'
    resp = await send(http_client, base_url, "POST", "/save", body=body, content_type=JSON_T, signer=signer)
    assert_error(resp, 413, "too_large")
    assert committed(config, "edge") is None


# --- persistence --------------------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_data_survives_closing_and_reopening_the_store(
    http_client: Any, config: Config, authenticator: Authenticator, signer: Signer
) -> None:
    values = {"s": "text", "n": 12.5, "o": {"a": [1, None]}, "gone": True, "ключ": "значение"}
    # A file of its own: the fixture's store (behind http_client) holds the lock on the default one.
    path = config.storage.path.with_name("reopened.sqlite3")

    async def serve_once(work: Callable[[AsyncKVClient], Any]) -> None:
        store = SqliteStore(path, synchronous=config.storage.synchronous)
        await store.open()
        try:
            async with serving(make_app(config, authenticator=authenticator, kv=store)) as url:
                await work(AsyncKVClient(url, signer))
        finally:
            await store.close()

    async def write(c: AsyncKVClient) -> None:
        for key, value in values.items():
            await c.save(key, value)
        await c.delete("gone")

    async def read(c: AsyncKVClient) -> None:
        for key, value in values.items():
            if key == "gone":
                resp = await c.request("GET", "/get", params={"key": key})
                assert resp.status == 404
            else:
                assert exact(await c.get(key)) == exact(value)

    await serve_once(write)
    await serve_once(read)


# --- a real exercise3.py process ------------------------------------------------------------------------------


@pytest.fixture
def exercise3(tmp_path: Path, keys_file: Path) -> Iterator[ServerProcess]:
    cfg = write_config(tmp_path, {"server": {"max_body_bytes": MAX_BODY}})
    with ServerProcess.start(3, cfg) as proc:
        proc.wait_listening()
        yield proc
        assert proc.stop() == 0, proc.lines


# The README recipe: body hash with openssl, the nine lines with printf, the HMAC with openssl, curl to send.
SIGN_AND_CURL = r"""
set -eu
body_hash=$(printf '%s' "$BODY" | openssl dgst -sha256 | sed 's/^.*= //')
ts=${TS:-$(date +%s)}
nonce=${NONCE:-$(openssl rand -hex 16)}
sig=$(printf '%s\n%s\n%s\n%s\n%s\n%s\n%s\n%s\n%s' KV-HMAC-SHA256 "$KEY_ID" "$ts" "$nonce" "$METHOD" "$HOST" \
      "$URL_PATH" "${SIGN_QUERY-$QUERY}" "$body_hash" | openssl dgst -sha256 -hmac "$SECRET" | sed 's/^.*= //')
auth="KV-HMAC-SHA256 keyid=$KEY_ID, ts=$ts, nonce=$nonce, sig=$sig"
if [ -n "${SIGN_ONLY:-}" ]; then printf '%s' "$sig"; exit 0; fi
url="http://$HOST$URL_PATH"
if [ -n "$QUERY" ]; then url="$url?$QUERY"; fi
if [ -n "$BODY" ]; then
  curl -sS --max-time 10 -X "$METHOD" -H "Content-Type: application/json" -H "Authorization: $auth" \
       --data-binary "$BODY" -w '\n%{http_code}' "$url"
else
  curl -sS --max-time 10 -X "$METHOD" -H "Authorization: $auth" -w '\n%{http_code}' "$url"
fi
"""


def _shell(env: dict[str, str]) -> str:
    for tool in ("openssl", "curl", "sh"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    base = {"PATH": "/usr/local/bin:/usr/bin:/bin", "KEY_ID": TEST_KEY_ID, "SECRET": TEST_SECRET.decode(),
            "BODY": "", "QUERY": "", "LC_ALL": "C"}
    done = subprocess.run(["sh", "-c", SIGN_AND_CURL], env={**base, **env}, capture_output=True, text=True,
                          timeout=PROCESS_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def curl(method: str, host: str, path: str, query: str = "", body: str = "", **env: str) -> tuple[int, Any]:
    out = _shell({"METHOD": method, "HOST": host, "URL_PATH": path, "QUERY": query, "BODY": body, **env})
    text, _, status = out.rpartition("\n")
    return int(status), json.loads(text)


def test_openssl_recipe_reproduces_the_spec_test_vector() -> None:
    sig = _shell({"SIGN_ONLY": "1", "METHOD": "POST", "HOST": "localhost:8888", "URL_PATH": "/save",
                  "QUERY": "durable=1", "BODY": '{"key":"foo","value":"bar"}', "TS": "1700000000",
                  "NONCE": "00112233445566778899aabbccddeeff"})
    assert sig == "a3d3177c11550a4fe1770acb243357135db65d7d7175f55d0df4a235ede7bc78"


def test_curl_and_openssl_against_a_real_exercise3(exercise3: ServerProcess) -> None:
    host = f"127.0.0.1:{exercise3.port}"
    assert curl("GET", host, "/authorize") == (200, {"authorized": True, "key_id": TEST_KEY_ID, "role": "admin",
                                                     "prefix": None})
    body = '{"key":"a key/with?odd=chars","value":{"café":["☕",1.5,null]}}'
    assert curl("POST", host, "/save", "durable=1", body) == (200, {"key": "a key/with?odd=chars", "saved": True,
                                                                    "version": VERSION})
    query = "key=" + quote("a key/with?odd=chars", safe="")
    assert curl("GET", host, "/get", query) == (200, {"key": "a key/with?odd=chars",
                                                      "value": {"café": ["☕", 1.5, None]},
                                                      "version": VERSION, "expires_at": None})
    assert curl("DELETE", host, "/delete", query) == (200, {"key": "a key/with?odd=chars", "deleted": True,
                                                            "version": VERSION})
    status, doc = curl("GET", host, "/get", query)
    assert (status, doc["error"]) == (404, "not_found")
    # A signature over a different query is refused.
    status, doc = curl("GET", host, "/get", "key=other", SIGN_QUERY="key=mine")
    assert (status, doc["error"]) == (401, "bad_signature")


def test_a_real_exercise3_keeps_its_data_across_a_restart(tmp_path: Path, keys_file: Path) -> None:
    cfg = write_config(tmp_path)
    db = tmp_path / "data" / "kv.sqlite3"
    with ServerProcess.start(3, cfg) as first:
        first.wait_listening()
        assert str(db) in first.lines[-1]
        with KVClient(first.base_url, Signer(TEST_KEY_ID, TEST_SECRET)) as c:
            assert c.save("kept", {"n": 1}) == {"key": "kept", "saved": True, "version": VERSION}
            assert c.save("dropped", 1) == {"key": "dropped", "saved": True, "version": VERSION}
            assert c.delete("dropped") == {"key": "dropped", "deleted": True, "version": VERSION}
        assert first.stop() == 0, first.lines
    assert any("stopped" in line for line in first.lines)
    with ServerProcess.start(3, cfg) as second:
        second.wait_listening()
        with KVClient(second.base_url, Signer(TEST_KEY_ID, TEST_SECRET)) as c:
            assert c.get("kept") == {"n": 1}
            resp = c.request("GET", "/get", params={"key": "dropped"})
            assert resp.status == 404 and resp.json()["error"] == "not_found"
        assert second.stop() == 0, second.lines
    conn = sqlite3.connect(str(db))
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT key FROM kv").fetchall() == [("kept",)]
    finally:
        conn.close()


def test_sigterm_stops_exercise3_promptly_with_status_0(exercise3: ServerProcess) -> None:
    deadline = time.monotonic() + PROCESS_TIMEOUT_S
    with KVClient(exercise3.base_url, None) as c:
        assert c.ping() == {"ping": "pong"}
    assert exercise3.stop() == 0, exercise3.lines
    assert time.monotonic() < deadline
