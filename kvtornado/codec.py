"""Request bodies, keys and values: parsing and limits shared by every data endpoint.

Values are stored as their compact UTF-8 JSON text, so ``/get`` returns exactly what was saved
(same JSON type, same unicode) without decoding it again.
"""

from __future__ import annotations

import base64
import json
import re
import sys
from typing import Any
from urllib.parse import parse_qsl

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
from kvtornado.ops import DELETE, GET, INCR, MAX_SAFE, SAVE, Op

MAX_JSON_DEPTH = 1000


def allow_json_depth() -> None:
    """The C JSON decoder and encoder recurse once per nesting level: give them room for ``MAX_JSON_DEPTH``
    levels plus the stack of the handler that calls them. Process-wide, so the app factory calls it once
    (not an import's side effect); it only ever raises the limit."""
    if sys.getrecursionlimit() < MAX_JSON_DEPTH + 2000:
        sys.setrecursionlimit(MAX_JSON_DEPTH + 2000)

# A JSON string, or one bracket: enough to measure nesting without decoding.
_DEPTH_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')
_OPENERS = frozenset(b"[{")

JSON_TYPES = ("application/json",)
FORM_TYPES = ("application/x-www-form-urlencoded",)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# Built once: json.loads/json.dumps with any keyword argument build a new decoder/encoder on every call.
class _RepeatedMember(ValueError):
    """A JSON object names one member twice: two readers of the body could disagree on it."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise _RepeatedMember(name)
            seen.add(name)
    return obj


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_unique_members)
_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
compact_json = _COMPACT.encode


def json_depth(body: bytes) -> int:
    """Deepest array/object nesting of a JSON text (strings skipped); cheap when brackets are few."""
    depth = deepest = 0
    for m in _DEPTH_TOKEN.finditer(body):
        c = m.group()[0]
        if c == 0x22:  # a string
            continue
        if c in _OPENERS:
            depth += 1
            if depth > deepest:
                deepest = depth
        else:
            depth -= 1
    return deepest


def too_deep(body: bytes) -> bool:
    """Whether a JSON text nests deeper than ``MAX_JSON_DEPTH``; only a body with more brackets than that can,
    so they are counted first (far cheaper than measuring)."""
    return body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and json_depth(body) > MAX_JSON_DEPTH


def parse_json(body: bytes) -> Any:
    """Decode a JSON body; invalid UTF-8, NaN/Infinity or nesting deeper than 1000 is ``InvalidJSON``."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidJSON("The request body is not valid UTF-8.") from None
    if too_deep(body):
        raise InvalidJSON(f"The JSON nests deeper than {MAX_JSON_DEPTH} levels.")
    try:
        return _DECODER.decode(text)
    except _RepeatedMember as exc:
        raise BadRequest(f"The JSON body names the member {exc.name!r} more than once.") from None
    except (ValueError, RecursionError) as exc:
        detail = f" ({exc.msg} at position {exc.pos})" if isinstance(exc, json.JSONDecodeError) else ""
        raise InvalidJSON(f"The request body is not valid JSON{detail}.") from None


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def check_key(key: Any, max_key_bytes: int) -> str:
    if not isinstance(key, str):
        raise InvalidKey("The key must be a string.")
    if not key:
        raise InvalidKey("The key must not be empty.")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidKey("The key is not valid unicode (it holds a lone surrogate).") from None
    if size > max_key_bytes:
        raise TooLarge(f"The key is {size} bytes; the limit is {max_key_bytes}.")
    return key


def encode_value(value: Any, max_value_bytes: int) -> str:
    """The value's compact JSON text, checked against the value limit."""
    try:
        text = compact_json(value)
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidJSON("The value is not valid unicode (it holds a lone surrogate).") from None
    except (ValueError, RecursionError):
        raise InvalidJSON("The value cannot be stored as JSON.") from None
    if size > max_value_bytes:
        raise TooLarge(f"The value is {size} bytes as compact JSON; the limit is {max_value_bytes}.")
    return text


def _unique(pairs: list[tuple[str, str]], where: str) -> dict[str, str]:
    """The pairs as a dict; a repeated name is 400, so no two readers of a request can disagree on it."""
    fields: dict[str, str] = {}
    for name, value in pairs:
        if name in fields:
            raise BadRequest(f"The {where} field {name!r} appears more than once.")
        fields[name] = value
    return fields


def _only(fields: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(set(fields) - allowed)
    if unknown:
        takes = "only " + ", ".join(sorted(allowed)) if allowed else "none"
        raise BadRequest(f"Unknown {where} field {unknown[0]!r}; this route takes {takes}.")


def _form_fields(body: bytes) -> dict[str, str]:
    try:
        text = body.decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, encoding="utf-8", errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise InvalidJSON("The form body is not valid percent-encoded UTF-8.") from None
    return _unique(pairs, "form")


def parse_body_fields(content_type: str | None, body: bytes) -> tuple[dict[str, Any], bool]:
    """The body's fields, and whether it was JSON (form values are always strings)."""
    mt = media_type(content_type)
    if mt in JSON_TYPES:
        doc = parse_json(body)
        if not isinstance(doc, dict):
            raise InvalidJSON("The request body must be a JSON object.")
        return doc, True
    if mt in FORM_TYPES:
        return _form_fields(body), False
    raise UnsupportedMediaType(
        f"Content-Type {mt or '(none)'} is not supported; send application/json or application/x-www-form-urlencoded."
    )


SAVE_FIELDS = frozenset({"key", "value"})
KEY_FIELDS = frozenset({"key"})


def parse_save(content_type: str | None, body: bytes, *, max_key_bytes: int, max_value_bytes: int) -> tuple[str, str]:
    """``(key, value_json)`` from a ``/save`` body."""
    fields, _ = parse_body_fields(content_type, body)
    _only(fields, SAVE_FIELDS, "body")
    if "key" not in fields:
        raise MissingKey("The body has no \"key\".")
    key = check_key(fields["key"], max_key_bytes)
    if "value" not in fields:
        raise MissingValue("The body has no \"value\".")
    return key, encode_value(fields["value"], max_value_bytes)


def parse_key_body(content_type: str | None, body: bytes, *, max_key_bytes: int) -> str:
    fields, _ = parse_body_fields(content_type, body)
    _only(fields, KEY_FIELDS, "body")
    if "key" not in fields:
        raise MissingKey("The body has no \"key\".")
    return check_key(fields["key"], max_key_bytes)


def query_fields(query: str, allowed: frozenset[str] | None = None) -> dict[str, str]:
    """The query's parameters, decoded; a repeated one, or one not in ``allowed`` (when given), is 400."""
    if not query:
        return {}
    if "&" not in query and "%" not in query and "+" not in query:
        # One plain field (the common ?key=abc): nothing to split or decode.
        name, _, value = query.partition("=")
        fields = {name: value}
    else:
        try:
            pairs = parse_qsl(query, keep_blank_values=True, encoding="utf-8", errors="strict")
        except (UnicodeDecodeError, ValueError):
            raise InvalidKey("The query string is not valid percent-encoded UTF-8.") from None
        fields = _unique(pairs, "query")
    if allowed is not None:
        _only(fields, allowed, "query")
    return fields


def key_from_query(fields: dict[str, str], *, max_key_bytes: int) -> str:
    if "key" not in fields:
        raise MissingKey("Name the key in the query, as ?key=<key>.")
    return check_key(fields["key"], max_key_bytes)


# -- the data model's parameters and bodies (SPEC §5: versions, expiry, listing, increment, batch) -----------

_DIGITS = re.compile(r"[0-9]{1,16}")  # 16 digits hold every integer the API takes (< 2^53)


def query_int(fields: dict[str, str], name: str, low: int, high: int) -> int | None:
    """``?name=N`` as an integer within [low, high], or None when absent; anything else (empty, a sign, a
    fraction, out of range) is 400."""
    text = fields.get(name)
    if text is None:
        return None
    if not _DIGITS.fullmatch(text) or not low <= int(text) <= high:
        raise BadRequest(f"{name} must be an integer from {low} to {high}.")
    return int(text)


def json_int(value: Any, name: str, low: int, high: int) -> int:
    """A JSON body's integer field within [low, high]: ``true`` and ``1.0`` are not integers."""
    if type(value) is not int or not low <= value <= high:
        raise BadRequest(f"{name} must be an integer from {low} to {high}.")
    return value


def parse_json_object(content_type: str | None, body: bytes, route: str) -> dict[str, Any]:
    """A JSON-only route's body (``/incr``, ``/batch``): 415 for any other media type."""
    if media_type(content_type) not in JSON_TYPES:
        raise UnsupportedMediaType(f"{route} takes an application/json body.")
    doc = parse_json(body)
    if not isinstance(doc, dict):
        raise InvalidJSON("The request body must be a JSON object.")
    return doc


INCR_FIELDS = frozenset({"key", "by"})


def parse_incr(content_type: str | None, body: bytes, *, max_key_bytes: int) -> tuple[str, int]:
    """``(key, by)`` from an ``/incr`` body; ``by`` is checked before anything else (SPEC §5)."""
    fields = parse_json_object(content_type, body, "/incr")
    _only(fields, INCR_FIELDS, "body")
    by = json_int(fields.get("by", 1), "by", -MAX_SAFE, MAX_SAFE)
    if "key" not in fields:
        raise MissingKey("The body has no \"key\".")
    return check_key(fields["key"], max_key_bytes), by


_OP_FIELDS = {
    GET: frozenset({"op", "key"}),
    SAVE: frozenset({"op", "key", "value", "ttl", "if_version"}),
    DELETE: frozenset({"op", "key", "if_version"}),
    INCR: frozenset({"op", "key", "by", "if_version"}),
}


def _batch_op(raw: Any, *, max_key_bytes: int, max_value_bytes: int, max_ttl_s: int) -> Op:
    if not isinstance(raw, dict):
        raise BadRequest("Each op must be a JSON object.")
    kind = raw.get("op")
    if kind not in _OP_FIELDS:
        raise BadRequest("Each op needs \"op\": one of get, save, delete, incr.")
    _only(raw, _OP_FIELDS[kind], f"{kind} op")
    by = json_int(raw["by"], "by", -MAX_SAFE, MAX_SAFE) if "by" in raw else 1
    if "key" not in raw:
        raise MissingKey("The op has no \"key\".")
    key = check_key(raw["key"], max_key_bytes)
    if_version = json_int(raw["if_version"], "if_version", 0, MAX_SAFE) if "if_version" in raw else None
    value = ttl = None
    if kind == SAVE:
        if "value" not in raw:
            raise MissingValue("The save op has no \"value\".")
        value = encode_value(raw["value"], max_value_bytes)
        ttl = json_int(raw["ttl"], "ttl", 1, max_ttl_s) if "ttl" in raw else None
    return Op(kind, key, value=value, ttl=ttl, if_version=if_version, by=by)


def parse_batch(content_type: str | None, body: bytes, *, max_ops: int, max_key_bytes: int,
                max_value_bytes: int, max_ttl_s: int) -> list[Op]:
    """A ``/batch`` body as ops, every one checked before any is applied; an op's error carries its index."""
    fields = parse_json_object(content_type, body, "/batch")
    if set(fields) != {"ops"} or not isinstance(fields["ops"], list):
        raise BadRequest("The body must be {\"ops\": [...]} and nothing else.")
    raw_ops = fields["ops"]
    if not 1 <= len(raw_ops) <= max_ops:
        raise BadRequest(f"A batch holds 1 to {max_ops} ops; this one has {len(raw_ops)}.")
    ops: list[Op] = []
    for index, raw in enumerate(raw_ops):
        try:
            ops.append(_batch_op(raw, max_key_bytes=max_key_bytes, max_value_bytes=max_value_bytes,
                                 max_ttl_s=max_ttl_s))
        except KVError as exc:
            raise exc.at(index) from None
    return ops


class _Members(list):  # type: ignore[type-arg]
    """A JSON object as every (name, value) pair it holds, repeated names included."""


_EVERY_READING = json.JSONDecoder(object_pairs_hook=_Members)


def only_get_ops(body: bytes) -> bool:
    """Whether a ``/batch`` body, whatever its other faults, holds no op but ``get`` (what a read key may send).

    Any content type is read as JSON here, and every reading of it counts: a repeated member (two ``"ops"``,
    two ``"op"`` in one op) is looked at under each of its values, so a read key's batch of saves is 403 even
    when it would also be 415, or 400 for its repeated member. A body that is not ``{"ops": [...]}`` at all
    holds no op, and its validation says what is wrong with it; an element of the list that is not
    ``{"op": "get", ...}`` counts as an op other than get."""
    if too_deep(body):
        return True  # too deep to be a batch: invalid_json
    try:
        doc = _EVERY_READING.decode(body.decode("utf-8"))
    except (ValueError, RecursionError):  # not UTF-8 or not JSON: invalid_json, whoever sends it
        return True
    if not isinstance(doc, _Members):
        return True
    for name, ops in doc:
        if name != "ops" or not isinstance(ops, list) or isinstance(ops, _Members):
            continue
        for op in ops:
            if not isinstance(op, _Members):
                return False
            kinds = [value for field, value in op if field == "op"]
            if not kinds or any(kind != GET for kind in kinds):
                return False
    return True


def encode_cursor(prefix: str, last_key: str) -> str:
    """An opaque ``/keys`` cursor: the position after ``last_key``, for ``prefix`` only (base64url JSON)."""
    raw = compact_json([prefix, last_key]).encode("utf-8")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str, prefix: str) -> str:
    """The key a cursor names; 400 when it cannot be decoded or was made for another prefix."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        doc = _DECODER.decode(raw.decode("utf-8"))
        # Only the exact text encode_cursor makes: a forged one naming a lone surrogate cannot be re-encoded
        # (UnicodeEncodeError, a ValueError) and is refused like any other.
        canonical = (isinstance(doc, list) and len(doc) == 2 and all(isinstance(part, str) for part in doc)
                     and cursor.isascii() and encode_cursor(*doc) == cursor)
    except (ValueError, RecursionError):
        raise BadRequest("The cursor is not one this server gave out.") from None
    if not canonical:
        raise BadRequest("The cursor is not one this server gave out.")
    if doc[0] != prefix:
        raise BadRequest("The cursor was made for another prefix.")
    return str(doc[1])
