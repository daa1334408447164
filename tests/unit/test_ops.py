"""kvtornado/ops.py: what a save, delete, incr, get and batch mean (conditions, expiry, increments, versions)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from kvtornado.errors import KVError, NotAnInteger, NotFound, VersionMismatch
from kvtornado.ops import MAX_SAFE, Op, Record, apply_ops, current_version, integer_value, writes_in

NOW = 1000.0


def versions(start: int = 11) -> Callable[[], int]:
    counter: Iterator[int] = iter(range(start, start + 10_000))
    return lambda: next(counter)


def run(ops: list[Op], table: dict[str, Record], *, batch: bool = False, now: float = NOW):
    return apply_ops(ops, table.get, now, versions(), batch=batch)


def test_a_record_is_live_until_it_expires_and_a_tombstone_never_is() -> None:
    assert Record('"v"', 1).live(NOW)
    assert Record('"v"', 1, NOW + 0.001).live(NOW)
    assert not Record('"v"', 1, NOW).live(NOW)  # expired at its expires_at, not a moment later
    assert not Record(None, 1).live(NOW)
    assert current_version(Record('"v"', 7), NOW) == 7
    assert current_version(Record('"v"', 7, NOW - 1), NOW) == 0
    assert current_version(Record(None, 7), NOW) == 0
    assert current_version(None, NOW) == 0


def test_save_gets_a_new_version_and_its_ttl_sets_expires_at_while_no_ttl_clears_it() -> None:
    table = {"k": Record('"old"', 3, NOW + 50)}
    outcomes, writes = run([Op("save", "k", value='"new"')], table)
    assert writes == {"k": Record('"new"', 11, None)}
    assert outcomes[0].record is writes["k"] and outcomes[0].done
    _, writes = run([Op("save", "k", value='"new"', ttl=30)], table)
    assert writes == {"k": Record('"new"', 11, NOW + 30)}


@pytest.mark.parametrize(("record", "if_version", "holds"), [
    (None, 0, True), (None, 1, False),
    (Record("1", 5), 5, True), (Record("1", 5), 4, False), (Record("1", 5), 0, False),
    (Record("1", 5, NOW), 0, True), (Record("1", 5, NOW), 5, False),  # expired: absent
    (Record(None, 5), 0, True), (Record(None, 5), 5, False),  # a tombstone: absent
])
def test_if_version_compares_with_the_current_version_zero_when_absent(
    record: Record | None, if_version: int, holds: bool
) -> None:
    table = {} if record is None else {"k": record}
    op = Op("save", "k", value="2", if_version=if_version)
    if holds:
        _, writes = run([op], table)
        assert writes["k"].value == "2"
        return
    with pytest.raises(VersionMismatch) as err:
        run([op], table)
    expected = record.version if record is not None and record.live(NOW) else 0
    assert err.value.extra == {"current_version": expected}
    assert err.value.status == 412 and err.value.code == "version_mismatch"
    assert f"current version is {expected}" in err.value.message


def test_a_single_delete_of_an_absent_key_is_404_after_its_condition_and_in_a_batch_a_result() -> None:
    with pytest.raises(NotFound):
        run([Op("delete", "k")], {})
    with pytest.raises(NotFound):
        run([Op("delete", "k", if_version=0)], {})  # the condition holds; nothing to delete
    with pytest.raises(VersionMismatch):
        run([Op("delete", "k", if_version=3)], {})
    with pytest.raises(NotFound):
        run([Op("delete", "k")], {"k": Record("1", 2, NOW - 1)})  # expired is absent
    outcomes, writes = run([Op("delete", "k")], {}, batch=True)
    assert writes == {} and outcomes[0].record is None and outcomes[0].done is False


def test_delete_writes_a_tombstone_with_a_new_version() -> None:
    outcomes, writes = run([Op("delete", "k", if_version=2)], {"k": Record("1", 2)})
    assert writes == {"k": Record(None, 11)}
    assert outcomes[0].done


@pytest.mark.parametrize(("stored", "by", "result"), [
    (None, 1, "1"), ("41", 1, "42"), ("-5", 3, "-2"), ("0", -1, "-1"), ("10", 0, "10"),
    (str(MAX_SAFE - 1), 1, str(MAX_SAFE)), (str(-MAX_SAFE + 1), -1, str(-MAX_SAFE)),
])
def test_incr_adds_to_a_json_integer_or_counts_from_zero(stored: str | None, by: int, result: str) -> None:
    table = {} if stored is None else {"k": Record(stored, 4)}
    _, writes = run([Op("incr", "k", by=by)], table)
    assert writes == {"k": Record(result, 11)}


@pytest.mark.parametrize("stored", ["true", "1.0", "1e3", '"1"', "null", "[1]", '{"n":1}', "01", "-0.5", "false"])
def test_incr_of_anything_but_a_json_integer_is_409_and_writes_nothing(stored: str) -> None:
    with pytest.raises(NotAnInteger):
        run([Op("incr", "k")], {"k": Record(stored, 4)})


@pytest.mark.parametrize(("stored", "by"), [(str(MAX_SAFE), 1), (str(-MAX_SAFE), -1), ("1", MAX_SAFE)])
def test_incr_past_the_safe_range_is_409(stored: str, by: int) -> None:
    with pytest.raises(NotAnInteger, match="outside"):
        run([Op("incr", "k", by=by)], {"k": Record(stored, 4)})


def test_incr_keeps_the_expiry_and_an_expired_key_counts_from_zero_with_none() -> None:
    _, writes = run([Op("incr", "k")], {"k": Record("5", 4, NOW + 9)})
    assert writes == {"k": Record("6", 11, NOW + 9)}
    _, writes = run([Op("incr", "k", by=2)], {"k": Record("5", 4, NOW)})
    assert writes == {"k": Record("2", 11, None)}


def test_integer_value_reads_only_json_integers() -> None:
    assert [integer_value(t) for t in ("0", "-0", "12", "-7")] == [0, 0, 12, -7]
    assert [integer_value(t) for t in ("1.0", "1e2", "+1", "01", " 1", "true", '"1"')] == [None] * 7


def test_later_ops_of_a_batch_see_earlier_ones_and_each_write_has_its_own_version() -> None:
    ops = [
        Op("save", "c", value="1", if_version=0),
        Op("incr", "c", by=2, if_version=11),  # the version the first op just gave it
        Op("get", "c"),
        Op("delete", "c"),
        Op("get", "c"),
        Op("save", "c", value='"again"', if_version=0),  # deleted within the batch: absent again
    ]
    outcomes, writes = run(ops, {}, batch=True)
    assert [(o.op.kind, o.done, o.record.version if o.record else None) for o in outcomes] == [
        ("save", True, 11), ("incr", True, 12), ("get", True, 12), ("delete", True, 13), ("get", False, None),
        ("save", True, 14),
    ]
    assert outcomes[2].record.value == "3"
    assert writes == {"c": Record('"again"', 14)}  # one row per key: the last


@pytest.mark.parametrize(("ops", "index", "error"), [
    ([Op("save", "a", value="1"), Op("save", "b", value="1", if_version=3)], 1, VersionMismatch),
    ([Op("save", "a", value='"x"'), Op("incr", "a")], 1, NotAnInteger),
    ([Op("incr", "n", if_version=1)], 0, VersionMismatch),
])
def test_a_failing_op_of_a_batch_names_its_index(ops: list[Op], index: int, error: type[KVError]) -> None:
    with pytest.raises(error) as err:
        run(ops, {}, batch=True)
    assert err.value.extra["index"] == index


def test_a_single_op_error_carries_no_index() -> None:
    with pytest.raises(VersionMismatch) as err:
        run([Op("save", "a", value="1", if_version=2)], {})
    assert "index" not in err.value.extra


def test_writes_in_counts_the_write_ops() -> None:
    assert writes_in([Op("get", "a"), Op("save", "a", value="1"), Op("delete", "a"), Op("incr", "a")]) == 3
    assert not Op("save", "a", value="1").needs_current
    assert Op("save", "a", value="1", if_version=0).needs_current
    assert all(Op(kind, "a").needs_current for kind in ("get", "delete", "incr"))
