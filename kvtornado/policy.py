"""Scoped keys (SPEC §4): what a key id may do — its role — and which keys it may name — its prefix.

A ``Grant`` is the decision for one key id, read from its line of the keys file. The base handler asks it
once per request whether the route's role is enough (before the request is validated), and every key the
request names reaches the data through a ``ScopedKV`` when the key id has a prefix, so no route and no op
of a batch can name a key outside it: the check sits in front of the store, not in each handler.

Keys are compared as the server stores them, code point by code point, after the request's own decoding
(percent-decoding of the query, JSON or form decoding of the body): no normalisation, no case folding, so
``team a/`` and ``team%20a/`` are the same prefix only because the keys file's prefix is percent-decoded too.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

from kvtornado.errors import ConfigError, Forbidden

if TYPE_CHECKING:
    from kvtornado.handlers import KeyValue
    from kvtornado.ops import Op, Outcome, Record

READ, WRITE, ADMIN = "read", "write", "admin"
# Each role may do what the roles before it may.
_RANK = {READ: 0, WRITE: 1, ADMIN: 2}
ROLES = tuple(_RANK)
_OPTION_NAME = re.compile(r"[a-z_]{1,20}")  # short: a misplaced secret (>= 32 characters) is never echoed
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


@dataclass(frozen=True)
class Grant:
    """What one key id may do: ``role`` (read, write or admin) over the keys starting with ``prefix``."""

    role: str = ADMIN
    prefix: str | None = None

    def may(self, role: str) -> bool:
        return _RANK[self.role] >= _RANK[role]

    def check_role(self, role: str, what: str) -> None:
        """403 unless this grant's role reaches ``role``; ``what`` names the refused call for the message."""
        if not self.may(role):
            raise Forbidden(f"A {self.role} key may not {what}; it needs the {role} role.")

    def covers(self, key: str) -> bool:
        return self.prefix is None or key.startswith(self.prefix)

    def list_prefix(self, requested: str) -> str:
        """The prefix a ``/keys`` call lists: the one it asks for, or (absent or empty) the key id's own."""
        return requested or self.prefix or ""

    def describe(self) -> dict[str, Any]:
        return {"role": self.role, "prefix": self.prefix}


ADMIN_GRANT = Grant()


def parse_options(options: Sequence[str], *, where: str) -> Grant:
    """A keys-file line's options (``role=…``, ``prefix=…``, each at most once) as a ``Grant``.

    Errors start with ``where`` (the file and line) and never repeat a field that could be a secret."""
    found: dict[str, str] = {}
    for position, option in enumerate(options, start=3):
        name, eq, value = option.partition("=")
        if not eq or name not in ("role", "prefix"):
            shown = f"option {name!r}" if _OPTION_NAME.fullmatch(name) else f"field {position}"
            raise _bad(where, f"{shown} is not an option; the options are role=read|write|admin and prefix=<P>")
        if name in found:
            raise _bad(where, f"{name} is given more than once")
        found[name] = value
    role = found.get("role", ADMIN)
    if role not in _RANK:
        raise _bad(where, "role must be read, write or admin")
    prefix = found.get("prefix")
    if prefix is not None:
        prefix = decode_prefix(prefix, where=where)
    return Grant(role, prefix)


def decode_prefix(raw: str, *, where: str) -> str:
    """A ``prefix=`` value, percent-decoded (``%20`` is a space, ``+`` stays a plus) to a non-empty string."""
    if not raw:
        raise _bad(where, "prefix must not be empty")
    if _BAD_ESCAPE.search(raw):
        raise _bad(where, "prefix has a '%' that is not followed by two hex digits (write '%25' for '%')")
    try:
        return unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise _bad(where, "prefix does not percent-decode to UTF-8") from None


def encode_prefix(prefix: str) -> str:
    """The keys file's spelling of ``prefix``, which ``decode_prefix`` reads back: percent-encoded UTF-8 with only
    letters, digits, ``-._~`` and ``/`` as they are, so a space, ``%``, ``#``, ``+`` or any non-ASCII character
    can neither split the line nor change its meaning. ``UnicodeEncodeError`` for a lone surrogate."""
    return quote(prefix, safe="/", errors="strict")


def _bad(where: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {message}")


class ScopedKV:
    """The ``KeyValue`` of a key id with a prefix: every key a request names is checked before the store sees
    it (a batch is refused whole, with the ``index`` of the first op outside the prefix)."""

    def __init__(self, kv: KeyValue, grant: Grant) -> None:
        assert grant.prefix is not None
        self._kv = kv
        self._grant = grant

    def _refuse(self, what: str) -> Forbidden:
        return Forbidden(f"This key id may only use keys that start with {self._grant.prefix!r}; {what}.")

    def _check(self, key: str) -> None:
        if not self._grant.covers(key):
            raise self._refuse("this key does not")

    async def get_record(self, key: str) -> Record | None:
        self._check(key)
        return await self._kv.get_record(key)

    async def put(self, key: str, value: str, *, durable: bool = False, ttl: int | None = None,
                  if_version: int | None = None) -> int:
        self._check(key)
        return await self._kv.put(key, value, durable=durable, ttl=ttl, if_version=if_version)

    async def apply(self, ops: Sequence[Op], *, durable: bool = False, batch: bool = False) -> list[Outcome]:
        for index, op in enumerate(ops):
            if not self._grant.covers(op.key):
                exc = self._refuse("this op's key does not" if batch else "this key does not")
                raise exc.at(index) if batch else exc
        return await self._kv.apply(ops, durable=durable, batch=batch)

    async def list_keys(self, prefix: str, after: str | None, limit: int) -> list[tuple[str, Record]]:
        if not self._grant.covers(prefix):
            raise self._refuse("the prefix listed must start with it too")
        return await self._kv.list_keys(prefix, after, limit)

    async def sweep(self) -> int:
        return await self._kv.sweep()

    async def flush(self) -> int:
        return await self._kv.flush()

    async def readiness(self) -> str | None:
        return await self._kv.readiness()

    def stats(self) -> dict[str, Any]:
        return self._kv.stats()
