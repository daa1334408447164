"""kvtornado/codec.py: JSON bodies, keys, values, /save bodies and query strings."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from kvtornado import codec as _codec
from kvtornado.codec import (
    MAX_JSON_DEPTH,
    check_key,
    encode_value,
    json_depth,
    key_from_query,
    parse_body_fields,
    parse_json,
    parse_key_body,
    parse_save,
    query_fields,
)
from kvtornado.errors import (
    BadRequest,
    InvalidJSON,
    InvalidKey,
    KVError,
    MissingKey,
    MissingValue,
    TooLarge,
    UnsupportedMediaType,
)
from kvtornado.ops import MAX_SAFE

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
LIMITS = {"max_key_bytes": 16, "max_value_bytes": 64}


def nested_lists(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def nested_objects(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def depth_of(doc: Any) -> int:
    depth = 0
    while isinstance(doc, (list, dict)):
        depth += 1
        doc = doc[0] if isinstance(doc, list) and doc else doc.get("a") if isinstance(doc, dict) else None
    return depth


# --- parse_json --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"key":"k","value":"\xff"}', id="invalid-utf8"),
        pytest.param(b'{"key":"k","value":"\xc3"}', id="truncated-utf8"),
        pytest.param(b'"\xed\xa0\x80"', id="utf8-encoded-surrogate"),
        pytest.param(b'{"value": NaN}', id="NaN"),
        pytest.param(b'{"value": Infinity}', id="Infinity"),
        pytest.param(b'{"value": -Infinity}', id="minus-Infinity"),
        pytest.param(b"", id="empty"),
        pytest.param(b"{", id="truncated"),
        pytest.param(b"{'key': 'k'}", id="single-quotes"),
        pytest.param(b'{"a": 1} {"b": 2}', id="two-documents"),
        pytest.param(b"\xef\xbb\xbf{}", id="utf8-bom"),
        pytest.param(nested_lists(MAX_JSON_DEPTH + 1), id="lists-depth-1001"),
        pytest.param(nested_objects(MAX_JSON_DEPTH + 1), id="objects-depth-1001"),
        pytest.param(nested_lists(100_000), id="lists-depth-100000"),
    ],
)
def test_parse_json_rejects(body: bytes) -> None:
    with pytest.raises(InvalidJSON) as info:
        parse_json(body)
    assert info.value.status == 400 and info.value.code == "invalid_json"
    assert "\n" not in info.value.message


@pytest.mark.parametrize("make", [nested_lists, nested_objects], ids=["lists", "objects"])
def test_parse_json_accepts_depth_1000(make: Any) -> None:
    doc = parse_json(make(MAX_JSON_DEPTH))
    assert depth_of(doc) == 1000


def test_depth_1000_is_accepted_when_there_are_more_than_1000_brackets() -> None:
    # siblings push the bracket count past 1000, so the exact depth is measured, and 1000 is still fine
    body = b"[" + b"[]," * 5 + nested_lists(MAX_JSON_DEPTH - 1) + b"]"
    assert json_depth(body) == MAX_JSON_DEPTH
    assert depth_of(parse_json(body)[5]) == MAX_JSON_DEPTH - 1
    with pytest.raises(InvalidJSON):
        parse_json(b"[" + b"[]," * 5 + nested_lists(MAX_JSON_DEPTH) + b"]")


def test_depth_1001_message_names_the_limit() -> None:
    with pytest.raises(InvalidJSON, match="deeper than 1000 levels"):
        parse_json(nested_lists(1001))


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    text = json.dumps({"key": "k", "value": "[" * 1500 + '\\"{' * 600})
    assert json_depth(text.encode()) == 1
    assert parse_json(text.encode())["value"].startswith("[[[")


def test_many_shallow_brackets_are_fine() -> None:
    body = json.dumps({"key": "k", "value": [[1]] * 2000}).encode()
    assert len(parse_json(body)["value"]) == 2000


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(b'{"key":"k","value":1}', {"key": "k", "value": 1}, id="object"),
        pytest.param(b"[1, 2]", [1, 2], id="array"),
        pytest.param('"é€😀"'.encode(), "é€😀", id="unicode"),
        pytest.param(b'"\\u00e9\\ud83d\\ude00"', "é😀", id="escaped-pair"),
        pytest.param(b"  null \n", None, id="null-with-white-space"),
        pytest.param(b"1e400", float("inf"), id="overflowing-float-decodes"),
    ],
)
def test_parse_json_accepts(body: bytes, expected: Any) -> None:
    assert parse_json(body) == expected


# --- check_key ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "error"),
    [
        pytest.param(1, InvalidKey, id="int"),
        pytest.param(None, InvalidKey, id="null"),
        pytest.param(["k"], InvalidKey, id="list"),
        pytest.param(True, InvalidKey, id="bool"),
        pytest.param("", InvalidKey, id="empty"),
        pytest.param("a\ud800b", InvalidKey, id="lone-surrogate"),
        pytest.param("k" * 17, TooLarge, id="over-limit"),
        pytest.param("é" * 9, TooLarge, id="multibyte-over-limit"),  # 9 chars, 18 bytes
        pytest.param("😀" * 5, TooLarge, id="emoji-over-limit"),  # 5 chars, 20 bytes
    ],
)
def test_check_key_refuses(key: Any, error: type[KVError]) -> None:
    with pytest.raises(error) as info:
        check_key(key, 16)
    assert info.value.code == ("too_large" if error is TooLarge else "invalid_key")
    assert info.value.status == (413 if error is TooLarge else 400)


@pytest.mark.parametrize(
    "key",
    [
        pytest.param("k" * 16, id="exactly-at-limit"),
        pytest.param("é" * 8, id="multibyte-at-limit"),
        pytest.param("😀" * 4, id="emoji-at-limit"),
        pytest.param(" ", id="space"),
        pytest.param("a/b?c=d&e", id="punctuation"),
    ],
)
def test_check_key_accepts(key: str) -> None:
    assert check_key(key, 16) == key


def test_too_large_key_message_counts_bytes() -> None:
    with pytest.raises(TooLarge, match="18 bytes; the limit is 16"):
        check_key("é" * 9, 16)


# --- encode_value --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        pytest.param({"a": [1, 2, {"b": None}]}, '{"a":[1,2,{"b":null}]}', id="compact"),
        pytest.param("é€😀", '"é€😀"', id="unicode-kept"),
        pytest.param(True, "true", id="bool"),
        pytest.param(None, "null", id="null"),
        pytest.param(1.5, "1.5", id="float"),
        pytest.param(10**30, "1" + "0" * 30, id="big-int"),
        pytest.param("", '""', id="empty-string"),
        pytest.param({"k": "a\nb\"c"}, '{"k":"a\\nb\\"c"}', id="escapes"),
    ],
)
def test_encode_value(value: Any, text: str) -> None:
    encoded = encode_value(value, 1000)
    assert encoded == text
    assert json.loads(encoded) == value


def test_encode_value_limit_is_in_bytes_of_the_compact_text() -> None:
    assert encode_value("é" * 31, 64) == '"' + "é" * 31 + '"'  # 62 + 2 = 64 bytes: at the limit
    with pytest.raises(TooLarge, match="66 bytes"):
        encode_value("é" * 32, 64)
    # white space in the request does not count: the value is measured compact
    assert encode_value(parse_json(b"[1,    2,    3]"), 7) == "[1,2,3]"


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(float("nan"), id="nan"),
        pytest.param(float("inf"), id="inf"),
        pytest.param("\udc80", id="lone-surrogate"),
    ],
)
def test_encode_value_refuses_what_is_not_json(value: Any) -> None:
    with pytest.raises(InvalidJSON):
        encode_value(value, 1000)


def test_encode_value_round_trips_depth_1000() -> None:
    doc = parse_json(nested_lists(MAX_JSON_DEPTH))
    assert encode_value(doc, 10_000) == nested_lists(MAX_JSON_DEPTH).decode()


# --- parse_save ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "body", "expected"),
    [
        pytest.param(JSON, b'{"key":"k","value":{"a":[1,"\xc3\xa9"]}}', ("k", '{"a":[1,"é"]}'), id="json-object"),
        pytest.param(JSON, b'{"key":"k","value":null}', ("k", "null"), id="json-null-is-a-value"),
        pytest.param("application/json; charset=UTF-8", b'{"key":"k","value":1}', ("k", "1"), id="json-charset"),
        pytest.param("Application/JSON", b'{"key":"k","value":1}', ("k", "1"), id="json-case"),
        pytest.param(FORM, b"key=k&value=1", ("k", '"1"'), id="form-value-is-a-string"),
        pytest.param(FORM, b"value=%7B%7D&key=a+b%2Fc", ("a b/c", '"{}"'), id="form-percent-and-plus"),
        pytest.param(FORM, b"key=%E2%82%AC&value=", ("€", '""'), id="form-utf8-blank-value"),
        pytest.param(FORM + "; charset=utf-8", b"key=k&value=v", ("k", '"v"'), id="form-charset"),
    ],
)
def test_parse_save(content_type: str, body: bytes, expected: tuple[str, str]) -> None:
    assert parse_save(content_type, body, **LIMITS) == expected


@pytest.mark.parametrize(
    ("content_type", "body", "error"),
    [
        pytest.param(JSON, b'{"value":1}', MissingKey, id="json-missing-key"),
        pytest.param(JSON, b'{"key":"k"}', MissingValue, id="json-missing-value"),
        pytest.param(JSON, b"{}", MissingKey, id="json-empty-object"),
        pytest.param(JSON, b'{"key":1,"value":1}', InvalidKey, id="json-key-not-string"),
        pytest.param(JSON, b'{"key":"","value":1}', InvalidKey, id="json-key-empty"),
        pytest.param(JSON, b'{"key":"\\ud800","value":1}', InvalidKey, id="json-key-lone-surrogate"),
        pytest.param(JSON, b'{"key":"' + b"k" * 17 + b'","value":1}', TooLarge, id="json-key-too-large"),
        pytest.param(JSON, b'{"key":"k","value":"' + b"v" * 63 + b'"}', TooLarge, id="json-value-too-large"),
        pytest.param(JSON, b'{"key":"k","value":"\\udc00"}', InvalidJSON, id="json-value-lone-surrogate"),
        pytest.param(JSON, b'{"key":"k","value":1e400}', InvalidJSON, id="json-value-overflow"),
        pytest.param(JSON, b'[{"key":"k","value":1}]', InvalidJSON, id="json-array-body"),
        pytest.param(JSON, b'"key"', InvalidJSON, id="json-string-body"),
        pytest.param(JSON, b"null", InvalidJSON, id="json-null-body"),
        pytest.param(JSON, b"key=k&value=v", InvalidJSON, id="form-sent-as-json"),
        pytest.param(FORM, b"value=v", MissingKey, id="form-missing-key"),
        pytest.param(FORM, b"key=k", MissingValue, id="form-missing-value"),
        pytest.param(FORM, b"key=&value=v", InvalidKey, id="form-key-empty"),
        pytest.param(FORM, b"key=%FF&value=v", InvalidJSON, id="form-bad-percent-utf8"),
        pytest.param(FORM, b"key=\xff&value=v", InvalidJSON, id="form-raw-invalid-utf8"),
        pytest.param("text/plain", b'{"key":"k","value":1}', UnsupportedMediaType, id="text-plain"),
        pytest.param("multipart/form-data; boundary=x", b"--x--", UnsupportedMediaType, id="multipart"),
        pytest.param("application/jsonx", b'{"key":"k","value":1}', UnsupportedMediaType, id="json-lookalike"),
        pytest.param(None, b'{"key":"k","value":1}', UnsupportedMediaType, id="absent"),
        pytest.param("", b'{"key":"k","value":1}', UnsupportedMediaType, id="empty"),
    ],
)
def test_parse_save_refuses(content_type: str | None, body: bytes, error: type[KVError]) -> None:
    with pytest.raises(error):
        parse_save(content_type, body, **LIMITS)


def test_unsupported_media_type_is_415_and_names_the_type() -> None:
    with pytest.raises(UnsupportedMediaType) as info:
        parse_save("text/plain; charset=utf-8", b"x", **LIMITS)
    assert info.value.status == 415 and info.value.code == "unsupported_media_type"
    assert "text/plain" in info.value.message
    with pytest.raises(UnsupportedMediaType, match=r"\(none\)"):
        parse_save(None, b"x", **LIMITS)


def test_parse_body_fields_says_whether_it_was_json() -> None:
    assert parse_body_fields(JSON, b'{"key":"k"}') == ({"key": "k"}, True)
    assert parse_body_fields(FORM, b"key=k") == ({"key": "k"}, False)


@pytest.mark.parametrize(
    ("content_type", "body", "expected"),
    [
        pytest.param(JSON, b'{"key":"k"}', "k", id="json"),
        pytest.param(FORM, b"key=a%20b", "a b", id="form"),
    ],
)
def test_parse_key_body(content_type: str, body: bytes, expected: str) -> None:
    assert parse_key_body(content_type, body, max_key_bytes=16) == expected


def test_parse_key_body_refuses_a_missing_key() -> None:
    with pytest.raises(MissingKey):
        parse_key_body(JSON, b'{}', max_key_bytes=16)


@pytest.mark.parametrize(("content_type", "body"), [
    pytest.param(JSON, b'{"value":"v","key":"k","extra":1}', id="json-extra-field"),
    pytest.param(JSON, b'{"key":"k","value":1,"ttl":5}', id="json-ttl-in-the-body"),
    pytest.param(FORM, b"key=k&value=a&value=b", id="form-repeated-field"),
    pytest.param(FORM, b"key=k&value=a&durable=1", id="form-unknown-field"),
])
def test_parse_save_refuses_unknown_and_repeated_fields(content_type: str, body: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_save(content_type, body, **LIMITS)


@pytest.mark.parametrize("body", [b'{"key":"k","value":1}', b'{"key":"k","durable":1}'])
def test_parse_key_body_takes_the_key_alone(body: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_key_body(JSON, body, max_key_bytes=16)


@pytest.mark.parametrize(("query", "allowed"), [
    pytest.param("key=a&key=b", {"key"}, id="repeated"),
    pytest.param("key=a&durable=1&key=p1", {"key", "durable"}, id="repeated-apart"),
    pytest.param("key=a&k%65y=b", {"key"}, id="repeated-after-percent-decoding"),
    pytest.param("key=a&x=1", {"key"}, id="unknown"),
    pytest.param("x", set(), id="unknown-without-value"),
])
def test_query_fields_refuse_repeated_and_unknown_parameters(query: str, allowed: set[str]) -> None:
    with pytest.raises(BadRequest):
        query_fields(query, frozenset(allowed))


# --- query strings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        pytest.param("key=a%20b", {"key": "a b"}, id="percent-space"),
        pytest.param("key=a+b", {"key": "a b"}, id="plus-space"),
        pytest.param("key=a%2Bb", {"key": "a+b"}, id="encoded-plus"),
        pytest.param("key=%E2%82%AC%2F%26%3D", {"key": "€/&="}, id="utf8-and-reserved"),
        pytest.param("key=k&durable=1", {"key": "k", "durable": "1"}, id="two-fields"),
        pytest.param("key=", {"key": ""}, id="blank-kept"),
        pytest.param("", {}, id="empty"),
    ],
)
def test_query_fields(query: str, expected: dict[str, str]) -> None:
    assert query_fields(query) == expected


@pytest.mark.parametrize("query", ["key=%FF", "key=%C3", "key=%ED%A0%80"], ids=["ff", "truncated", "surrogate"])
def test_query_fields_refuse_invalid_utf8(query: str) -> None:
    with pytest.raises(InvalidKey):
        query_fields(query)


def test_key_from_query() -> None:
    assert key_from_query(query_fields("key=a+b%2Fc"), max_key_bytes=16) == "a b/c"
    with pytest.raises(MissingKey):
        key_from_query(query_fields("durable=1"), max_key_bytes=16)
    with pytest.raises(InvalidKey):
        key_from_query(query_fields("key="), max_key_bytes=16)
    with pytest.raises(TooLarge):
        key_from_query(query_fields("key=" + "%C3%A9" * 9), max_key_bytes=16)


@pytest.mark.parametrize("body", [
    pytest.param(b'{"key":"a","key":"b","value":1}', id="top-level"),
    pytest.param(b'{"key":"k","value":{"n":1,"n":2}}', id="inside-the-value"),
    pytest.param(b'{"key":"k","value":[{"x":1},{"y":1,"y":1}]}', id="deep-inside-the-value"),
])
def test_a_json_object_that_names_a_member_twice_is_refused(body: bytes) -> None:
    with pytest.raises(BadRequest, match="more than once"):
        parse_save(JSON, body, **LIMITS)


# --- the data model's parameters and bodies -------------------------------------------------------

JSON_CT = JSON


@pytest.mark.parametrize(("text", "expected"), [("1", 1), ("10", 10), ("0010", 10), ("315360000", 315360000)])
def test_query_int_takes_plain_digits_within_its_range(text: str, expected: int) -> None:
    assert _codec.query_int({"ttl": text}, "ttl", 1, 315360000) == expected


@pytest.mark.parametrize("text", ["", "0", "-1", "+1", "1.5", "1e3", " 1", "\uff11", "315360001", "9" * 17, "0x10"])
def test_query_int_refuses_everything_else_with_400(text: str) -> None:
    with pytest.raises(BadRequest, match="ttl must be an integer from 1 to 315360000"):
        _codec.query_int({"ttl": text}, "ttl", 1, 315360000)


def test_query_int_of_an_absent_parameter_is_none() -> None:
    assert _codec.query_int({}, "if_version", 0, MAX_SAFE) is None
    assert _codec.query_int({"if_version": "0"}, "if_version", 0, MAX_SAFE) == 0


def test_parse_incr_defaults_by_to_one_and_checks_by_first() -> None:
    assert _codec.parse_incr(JSON_CT, b'{"key":"n"}', max_key_bytes=8) == ("n", 1)
    assert _codec.parse_incr(JSON_CT, b'{"key":"n","by":-3}', max_key_bytes=8) == ("n", -3)
    # by is checked before the key: a bad by with a bad key is the by's error
    with pytest.raises(BadRequest, match="by must be an integer"):
        _codec.parse_incr(JSON_CT, b'{"key":"' + b"x" * 20 + b'","by":true}', max_key_bytes=8)


@pytest.mark.parametrize("by", ["true", "1.0", "1e2", '"1"', "null", str(MAX_SAFE + 1), str(-MAX_SAFE - 1)])
def test_parse_incr_refuses_a_by_that_is_not_a_safe_integer(by: str) -> None:
    with pytest.raises(BadRequest, match="by must be an integer"):
        _codec.parse_incr(JSON_CT, b'{"key":"n","by":' + by.encode() + b"}", max_key_bytes=8)


@pytest.mark.parametrize(("content_type", "body", "error"), [
    ("application/x-www-form-urlencoded", b"key=n", UnsupportedMediaType),
    (None, b'{"key":"n"}', UnsupportedMediaType),
    (JSON_CT, b'{"by":1}', MissingKey),
    (JSON_CT, b'{"key":"n","step":1}', BadRequest),
    (JSON_CT, b'["n"]', InvalidJSON),
])
def test_parse_incr_refusals(content_type: str | None, body: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        _codec.parse_incr(content_type, body, max_key_bytes=8)


def parse_batch(body: Any, **limits: int) -> list[Any]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    args = {"max_ops": 3, "max_key_bytes": 8, "max_value_bytes": 16, "max_ttl_s": 100} | limits
    return _codec.parse_batch(JSON_CT, raw, **args)


def test_parse_batch_reads_every_kind_of_op() -> None:
    ops = parse_batch({"ops": [{"op": "get", "key": "a"},
                               {"op": "save", "key": "a", "value": [1, "é"], "ttl": 5, "if_version": 0},
                               {"op": "incr", "key": "n", "by": -2, "if_version": 7}]})
    assert [(o.kind, o.key, o.value, o.ttl, o.if_version, o.by) for o in ops] == [
        ("get", "a", None, None, None, 1), ("save", "a", '[1,"é"]', 5, 0, 1), ("incr", "n", None, None, 7, -2)]
    (delete,) = parse_batch({"ops": [{"op": "delete", "key": "d"}]})
    assert (delete.kind, delete.if_version) == ("delete", None)


@pytest.mark.parametrize("body", [
    b'{"ops":[]}', b'{"ops":{}}', b'{"op":"get","key":"a"}', b'{"ops":[{"op":"get","key":"a"}],"durable":1}',
    json.dumps({"ops": [{"op": "get", "key": "a"}] * 4}).encode(),
])
def test_a_batch_that_is_not_1_to_max_ops_ops_is_400_without_an_index(body: bytes) -> None:
    with pytest.raises(BadRequest) as err:
        parse_batch(body)
    assert "index" not in err.value.extra


@pytest.mark.parametrize(("op", "error"), [
    ({"op": "put", "key": "a"}, BadRequest),
    ({"key": "a"}, BadRequest),
    ("get a", BadRequest),
    ({"op": "get", "key": "a", "if_version": 1}, BadRequest),  # a get takes no condition
    ({"op": "save", "key": "a"}, MissingValue),
    ({"op": "save", "value": 1}, MissingKey),
    ({"op": "save", "key": "", "value": 1}, InvalidKey),
    ({"op": "save", "key": "a", "value": 1, "ttl": 0}, BadRequest),
    ({"op": "save", "key": "a", "value": 1, "ttl": 101}, BadRequest),
    ({"op": "save", "key": "a", "value": 1, "ttl": 5.0}, BadRequest),
    ({"op": "save", "key": "a", "value": 1, "if_version": -1}, BadRequest),
    ({"op": "save", "key": "a", "value": 1, "if_version": True}, BadRequest),
    ({"op": "save", "key": "a", "value": "x" * 20}, TooLarge),
    ({"op": "save", "key": "k" * 9, "value": 1}, TooLarge),
    ({"op": "delete", "key": "a", "value": 1}, BadRequest),
    ({"op": "incr", "key": "a", "by": 1.5}, BadRequest),
])
def test_an_invalid_op_fails_the_batch_with_its_index(op: Any, error: type[KVError]) -> None:
    with pytest.raises(error) as err:
        parse_batch({"ops": [{"op": "get", "key": "ok"}, op]})
    assert err.value.extra == {"index": 1}


def test_a_batch_is_json_only() -> None:
    with pytest.raises(UnsupportedMediaType):
        _codec.parse_batch("application/x-www-form-urlencoded", b"ops=1", max_ops=3, max_key_bytes=8,
                           max_value_bytes=16, max_ttl_s=100)


@pytest.mark.parametrize(("prefix", "key"), [("", "a"), ("app/", "app/ü/😀"), ("a b", "a b&c=d"), ("x", "x")])
def test_a_cursor_round_trips_for_its_prefix_only(prefix: str, key: str) -> None:
    cursor = _codec.encode_cursor(prefix, key)
    assert cursor.isascii() and "=" not in cursor and "/" not in cursor and "+" not in cursor
    assert _codec.decode_cursor(cursor, prefix) == key
    with pytest.raises(BadRequest, match="another prefix"):
        _codec.decode_cursor(cursor, prefix + "z")


# ["", "\ud800"]: JSON that decodes to a lone surrogate, which no key can hold (it was a 500 once)
FORGED_SURROGATE = base64.urlsafe_b64encode(b'["","\\ud800"]').rstrip(b"=").decode()


@pytest.mark.parametrize("cursor", ["", "!!!", "bm90IGpzb24", _codec.encode_cursor("", "a") + "A", "WyJhIl0",
                                    "WyIiLDFd", "é", FORGED_SURROGATE])
def test_a_cursor_the_server_did_not_make_is_400(cursor: str) -> None:
    with pytest.raises(BadRequest, match="not one this server gave out"):
        _codec.decode_cursor(cursor, "")


@pytest.mark.parametrize(
    ("body", "only_gets"),
    [
        pytest.param(b'{"ops": [{"op": "get", "key": "a"}, {"op": "get"}]}', True, id="gets-even-invalid-ones"),
        pytest.param(b'{"ops": [{"op": "get", "key": "a"}, {"op": "save", "key": "a"}]}', False, id="a-save"),
        pytest.param(b'{"ops": [{"op": "delete"}]}', False, id="a-delete"),
        pytest.param(b'{"ops": [{"op": "incr", "key": "a"}]}', False, id="an-incr"),
        pytest.param(b'{"ops": [{"op": "GET", "key": "a"}]}', False, id="op-names-are-exact"),
        pytest.param(b'{"ops": [7]}', False, id="an-element-that-is-no-op"),
        pytest.param(b'{"ops": [{"key": "a"}]}', False, id="an-op-without-op"),
        pytest.param(b'{"ops": []}', True, id="no-ops"),
        pytest.param(b'{"ops": "get"}', True, id="ops-not-a-list"),
        pytest.param(b'[{"op": "save"}]', True, id="not-an-object"),
        pytest.param(b'{"ops": [{"op": "save"', True, id="not-json"),
        pytest.param(b"", True, id="empty"),
        pytest.param(b'{"ops": [{"op": "save"}], "ops": []}', False, id="repeated-ops-each-reading-counts"),
        pytest.param(b'{"ops": [{"op": "get", "key": "a"}], "ops": [{"op": "get"}]}', True, id="repeated-ops-of-gets"),
        pytest.param(b'{"ops": [{"op": "get", "key": "x", "op": "save", "value": 1}]}', False,
                     id="repeated-op-each-reading-counts"),
        pytest.param(b'{"ops": [{"op": "get", "key": "x", "op": "get"}]}', True, id="repeated-op-get"),
        pytest.param(b'{"ops": {"op": "save"}}', True, id="ops-an-object"),
        pytest.param(b'{"ops": [{"op": "save"}]}\xff', True, id="not-utf8"),
        pytest.param(b'{"ops": [' + b"[" * 1100 + b"]" * 1100 + b"]}", True, id="too-deep"),
        pytest.param(b'{"ops": [{"op": "get", "key": NaN}]}', True, id="nan-is-a-get-all-the-same"),
    ],
)
def test_only_get_ops(body: bytes, only_gets: bool) -> None:
    assert _codec.only_get_ops(body) is only_gets
