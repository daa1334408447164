"""Scoped keys (SPEC §4): the keys file's options, what each role may do, and the prefix fence in front of
the data (``ScopedKV``): a refused request never reaches the store."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvtornado.auth import Authenticator, key_line, parse_keys
from kvtornado.errors import ConfigError, KVError
from kvtornado.ops import DELETE, GET, INCR, SAVE, Op, Outcome, Record
from kvtornado.policy import (
    ADMIN,
    ADMIN_GRANT,
    READ,
    ROLES,
    WRITE,
    Grant,
    ScopedKV,
    decode_prefix,
    encode_prefix,
    parse_options,
)

SECRET = "s" * 40


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        pytest.param("", Grant(ADMIN, None), id="no-options-is-admin-without-prefix"),
        pytest.param("role=read", Grant(READ, None), id="read"),
        pytest.param("role=write", Grant(WRITE, None), id="write"),
        pytest.param("role=admin", Grant(ADMIN, None), id="admin-spelled-out"),
        pytest.param("prefix=app/", Grant(ADMIN, "app/"), id="prefix-alone-keeps-admin"),
        pytest.param("prefix=app/ role=read", Grant(READ, "app/"), id="any-order"),
        pytest.param("role=write\tprefix=team%20a/", Grant(WRITE, "team a/"), id="percent-decoded-tab-separated"),
        pytest.param("prefix=a+b/", Grant(ADMIN, "a+b/"), id="plus-is-a-plus-not-a-space"),
        pytest.param("prefix=%C3%A9t%C3%A9/", Grant(ADMIN, "été/"), id="utf-8"),
        pytest.param("prefix=100%25/", Grant(ADMIN, "100%/"), id="escaped-percent"),
        pytest.param("prefix==x", Grant(ADMIN, "=x"), id="value-may-hold-an-equals-sign"),
    ],
)
def test_keys_file_options(options: str, expected: Grant) -> None:
    keys = parse_keys(f"k1 {SECRET} {options}\n", label="kv.keys")
    assert keys.grants == {"k1": expected}
    assert keys.secrets == {"k1": SECRET.encode()}


def test_each_line_has_its_own_grant() -> None:
    keys = parse_keys(f"a {SECRET}\nb {SECRET} role=read\n# c {SECRET} role=write\nd {SECRET} prefix=d/\n",
                      label="x")
    assert keys.grants == {"a": ADMIN_GRANT, "b": Grant(READ), "d": Grant(ADMIN, "d/")}


def test_option_errors_name_the_line_and_never_the_value() -> None:
    for options in (f"role={SECRET}", f"{SECRET}", f"prefix={SECRET} prefix=x"):
        with pytest.raises(ConfigError) as info:
            parse_options(options.split(), where="kv.keys line 7")
        assert str(info.value).startswith("kv.keys line 7: ") and SECRET not in str(info.value)


@pytest.mark.parametrize("have", ROLES)
@pytest.mark.parametrize("need", ROLES)
def test_a_role_may_do_what_the_roles_before_it_may(have: str, need: str) -> None:
    assert Grant(have).may(need) is (ROLES.index(have) >= ROLES.index(need))
    if Grant(have).may(need):
        Grant(have).check_role(need, "call /x")
    else:
        with pytest.raises(KVError) as info:
            Grant(have).check_role(need, "call POST /save")
        assert (info.value.status, info.value.code) == (403, "forbidden")
        assert "call POST /save" in info.value.message and need in info.value.message


@pytest.mark.parametrize(
    ("prefix", "key", "covered"),
    [
        (None, "anything", True),
        ("app/", "app/", True),
        ("app/", "app/x", True),
        ("app/", "app", False),
        ("app/", "App/x", False),
        ("app/", "xapp/", False),
        ("été/", "été/x", True),
        ("été/", "e\u0301te\u0301/x", False),  # decomposed: other code points, another key
        ("team a/", "team%20a/x", False),
    ],
)
def test_covers_compares_code_points(prefix: str | None, key: str, covered: bool) -> None:
    assert Grant(WRITE, prefix).covers(key) is covered


def test_list_prefix_defaults_to_the_grants_own() -> None:
    assert Grant(READ, "app/").list_prefix("") == "app/"
    assert Grant(READ, "app/").list_prefix("app/x") == "app/x"
    assert Grant(READ, "app/").list_prefix("other/") == "other/"  # refused later, by ScopedKV
    assert Grant(READ).list_prefix("") == ""


def test_authenticator_grants_default_to_admin() -> None:
    auth = Authenticator({"a": SECRET.encode(), "b": SECRET.encode()}, grants={"b": Grant(READ, "b/")})
    assert auth.grant("a") == ADMIN_GRANT and auth.grant("b") == Grant(READ, "b/")


class Recording:
    """A ``KeyValue`` that records what reached it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    async def get_record(self, key: str) -> Record | None:
        self.calls.append(("get_record", key))
        return None

    async def put(self, key: str, value: str, *, durable: bool = False, ttl: int | None = None,
                  if_version: int | None = None) -> int:
        self.calls.append(("put", (key, value, durable, ttl, if_version)))
        return 7

    async def apply(self, ops: Sequence[Op], *, durable: bool = False, batch: bool = False) -> list[Outcome]:
        self.calls.append(("apply", ([op.key for op in ops], durable, batch)))
        return []

    async def list_keys(self, prefix: str, after: str | None, limit: int) -> list[tuple[str, Record]]:
        self.calls.append(("list_keys", (prefix, after, limit)))
        return []

    async def sweep(self) -> int:
        self.calls.append(("sweep", None))
        return 0

    async def flush(self) -> int:
        self.calls.append(("flush", None))
        return 3

    def stats(self) -> dict[str, Any]:
        return {"cache": {}}


def refused(coro: Any) -> KVError:
    with pytest.raises(KVError) as info:
        asyncio.run(coro)
    assert (info.value.status, info.value.code) == (403, "forbidden")
    return info.value


def test_scoped_kv_refuses_every_key_outside_before_the_store_sees_it() -> None:
    inner = Recording()
    kv = ScopedKV(inner, Grant(WRITE, "app/"))
    refused(kv.get_record("other"))
    refused(kv.put("other", "1"))
    refused(kv.apply([Op(DELETE, "other")]))
    refused(kv.list_keys("ap", None, 10))
    assert inner.calls == []
    assert "index" not in refused(kv.apply([Op(INCR, "x")])).extra  # a single route's op has no index


def test_scoped_kv_refuses_a_batch_whole_with_the_index_of_the_first_op_outside() -> None:
    inner = Recording()
    kv = ScopedKV(inner, Grant(WRITE, "app/"))
    ops = [Op(SAVE, "app/a", value="1"), Op(GET, "app/b"), Op(GET, "zzz"), Op(SAVE, "yyy", value="1")]
    assert refused(kv.apply(ops, batch=True)).extra == {"index": 2}
    assert inner.calls == []


def test_scoped_kv_passes_keys_inside_through_unchanged() -> None:
    inner = Recording()
    kv = ScopedKV(inner, Grant(WRITE, "app/"))

    async def run() -> None:
        assert await kv.get_record("app/") is None
        assert await kv.put("app/a", "1", durable=True, ttl=5, if_version=0) == 7
        await kv.apply([Op(SAVE, "app/a", value="1"), Op(GET, "app/b")], durable=True, batch=True)
        await kv.list_keys("app/x", "app/x1", 11)
        assert await kv.flush() == 3
        await kv.sweep()
        assert kv.stats() == {"cache": {}}

    asyncio.run(run())
    assert inner.calls == [
        ("get_record", "app/"),
        ("put", ("app/a", "1", True, 5, 0)),
        ("apply", (["app/a", "app/b"], True, True)),
        ("list_keys", ("app/x", "app/x1", 11)),
        ("flush", None),
        ("sweep", None),
    ]


def test_scoped_kv_refusals_say_the_prefix_and_what_is_outside_it() -> None:
    kv = ScopedKV(Recording(), Grant(WRITE, "app/"))
    single = "This key id may only use keys that start with 'app/'; this key does not."
    assert refused(kv.get_record("x")).message == single
    assert refused(kv.put("x", "1")).message == single
    assert refused(kv.apply([Op(DELETE, "x")])).message == single
    assert refused(kv.apply([Op(DELETE, "x")], batch=True)).message == (
        "This key id may only use keys that start with 'app/'; this op's key does not.")
    assert refused(kv.list_keys("x", None, 1)).message == (
        "This key id may only use keys that start with 'app/'; the prefix listed must start with it too.")


def test_scoped_kv_defaults_are_the_stores_own() -> None:
    inner = Recording()
    kv = ScopedKV(inner, Grant(WRITE, "app/"))

    async def run() -> None:
        await kv.put("app/a", "1")
        await kv.apply([Op(GET, "app/a")])

    asyncio.run(run())
    assert inner.calls == [("put", ("app/a", "1", False, None, None)), ("apply", (["app/a"], False, False))]


# Any prefix a key can have: non-empty text without lone surrogates (keys hold none).
PREFIXES = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1)


@given(PREFIXES)
def test_an_encoded_prefix_decodes_to_itself(prefix: str) -> None:
    """``kvtornado keys add --prefix P``: whatever P is, the keys file line reads back as P."""
    encoded = encode_prefix(prefix)
    assert encoded.isascii() and not any(ch in encoded for ch in " \t\r\n#")
    assert decode_prefix(encoded, where="x") == prefix


@given(PREFIXES, st.sampled_from(ROLES))
def test_a_key_line_reads_back_as_its_grant(prefix: str, role: str) -> None:
    line = key_line("k", SECRET, Grant(role, prefix))
    keys = parse_keys(line, label="x")
    assert keys.grants == {"k": Grant(role, prefix)}
    assert keys.secrets == {"k": SECRET.encode()}
