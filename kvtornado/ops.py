"""The data model: a key's record (value, version, expiry) and what a write does to it, as one pure step.

``apply_ops`` is the only place that decides what a save, delete, incr or batch get means: conditions,
expiry, increments, versions and the results. Exercise 3 runs it inside one sqlite transaction on the
writer thread; exercise 4 runs it on the event loop over its maps once the records it needs are loaded.
Both then write what it returns, so the two exercises give the same answers by construction.

A record whose ``expires_at`` has passed is absent for everything (SPEC §5 "Expiry"); so is a tombstone
(``value is None``), which the write-behind cache holds for a delete until it is committed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from kvtornado.errors import KVError, NotAnInteger, NotFound, VersionMismatch

# SPEC §5: versions are 1 <= v < 2^53 (exact in every JSON reader); incr works within the same range.
MAX_SAFE = 2**53 - 1
# A JSON integer as compact JSON text: no fraction, no exponent, no leading zero, no plus sign.
_INTEGER = re.compile(r"-?(?:0|[1-9][0-9]*)")

GET, SAVE, DELETE, INCR = "get", "save", "delete", "incr"
WRITES = frozenset({SAVE, DELETE, INCR})


class Record:
    """What is stored for one key: its value's JSON text (None: deleted), version, expiry (unix s or None)."""

    __slots__ = ("expires_at", "value", "version")

    def __init__(self, value: str | None, version: int, expires_at: float | None = None) -> None:
        self.value = value
        self.version = version
        self.expires_at = expires_at

    def live(self, now: float) -> bool:
        """The key exists: not a tombstone and not expired at ``now``."""
        return self.value is not None and (self.expires_at is None or self.expires_at > now)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Record) and self.value == other.value and self.version == other.version
                and self.expires_at == other.expires_at)

    def __repr__(self) -> str:
        return f"Record({self.value!r}, {self.version}, {self.expires_at!r})"

    __hash__ = None  # type: ignore[assignment]  # mutable-looking value object: equality only


class Op:
    """One parsed operation (a single route's, or one of a batch's), already checked against the limits."""

    __slots__ = ("by", "if_version", "key", "kind", "ttl", "value")

    def __init__(self, kind: str, key: str, *, value: str | None = None, ttl: int | None = None,
                 if_version: int | None = None, by: int = 1) -> None:
        self.kind = kind
        self.key = key
        self.value = value  # save: the value's compact JSON text
        self.ttl = ttl  # save: seconds to live, or None for no expiry
        self.if_version = if_version
        self.by = by  # incr

    def __repr__(self) -> str:
        return f"Op({self.kind}, {self.key!r}, value={self.value!r}, ttl={self.ttl}, if_version={self.if_version})"

    @property
    def needs_current(self) -> bool:
        """Whether applying this op needs the key's current record (an unconditional save does not)."""
        return self.kind != SAVE or self.if_version is not None


class Outcome:
    """What one op did: ``record`` is the record after it (a get's record found, a delete's tombstone, None
    when a get found nothing or a delete had nothing to delete); ``done`` is a get's found / a delete's deleted."""

    __slots__ = ("done", "op", "record")

    def __init__(self, op: Op, record: Record | None, done: bool) -> None:
        self.op = op
        self.record = record
        self.done = done


def integer_value(text: str) -> int | None:
    """The integer a stored value's JSON text holds, or None when it is not a JSON integer."""
    return int(text) if _INTEGER.fullmatch(text) else None


def current_version(record: Record | None, now: float) -> int:
    """The version a condition compares with: 0 when the key is absent (never written, deleted or expired)."""
    return record.version if record is not None and record.live(now) else 0


def apply_ops(
    ops: Sequence[Op],
    lookup: Callable[[str], Record | None],
    now: float,
    new_version: Callable[[], int],
    *,
    batch: bool,
) -> tuple[list[Outcome], dict[str, Record]]:
    """Apply ``ops`` in order over the records ``lookup`` gives (committed or pending, expired ones
    included), all or nothing: the outcomes, and the record to write per key (the last one; a tombstone for a
    delete). Raises the first op's ``KVError`` (with its ``index`` when ``batch``), and then nothing may be
    written; versions it drew are simply never used (versions may have gaps).

    Later ops see earlier ones (a staged overlay), so a batch can save a key and incr it, or delete it and
    create it again with ``if_version=0``. A single ``/delete`` of an absent key is 404; in a batch it is the
    result ``{"deleted": false}``.
    """
    staged: dict[str, Record] = {}
    outcomes: list[Outcome] = []

    def current(key: str) -> Record | None:
        record = staged[key] if key in staged else lookup(key)
        return record if record is not None and record.live(now) else None

    for index, op in enumerate(ops):
        try:
            record = current(op.key)
            if op.if_version is not None:
                have = record.version if record is not None else 0
                if have != op.if_version:
                    raise VersionMismatch(have, op.if_version)
            if op.kind == GET:
                outcomes.append(Outcome(op, record, record is not None))
                continue
            if op.kind == DELETE:
                if record is None:
                    if not batch:
                        raise NotFound()  # its message: "No such key."
                    outcomes.append(Outcome(op, None, False))
                    continue
                new = Record(None, new_version())
            elif op.kind == INCR:
                old = 0
                if record is not None:
                    held = integer_value(record.value)  # type: ignore[arg-type]  # live: never None
                    if held is None:
                        raise NotAnInteger(f"The value of {op.key!r} is not a JSON integer: nothing was written.")
                    old = held
                total = old + op.by
                if not -MAX_SAFE <= total <= MAX_SAFE:
                    raise NotAnInteger(f"{old} + {op.by} is outside ±(2^53 - 1): nothing was written.")
                # /incr keeps the key's expiry (an expired key is absent, so it starts again with none).
                new = Record(str(total), new_version(), record.expires_at if record is not None else None)
            else:  # SAVE: without a ttl, any expiry is cleared
                new = Record(op.value, new_version(), None if op.ttl is None else now + op.ttl)
        except KVError as exc:
            if batch:
                exc.at(index)
            raise
        staged[op.key] = new
        outcomes.append(Outcome(op, new, True))
    return outcomes, staged


def writes_in(ops: Sequence[Op]) -> int:
    """How many versions applying ``ops`` can draw at most (one per write op)."""
    return sum(1 for op in ops if op.kind in WRITES)
