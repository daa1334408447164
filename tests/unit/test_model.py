"""The data model against a plain dict (Hypothesis stateful), on both exercises' key/value implementations:
exercise 3's ``SqliteStore`` (write-through, a real sqlite file) and exercise 4's ``WriteBehindCache`` (over
``FakeStore``, flushed and restarted at random).

Saves (with and without ttl and conditions), deletes, increments, gets, batches, listings paged by position,
and time moving on an injected wall clock. The model is written here from SPEC §5, not from kvtornado/ops.py:
it knows values, expiry and which version each write answered, and checks that every version handed out is
above every earlier one (never handed out twice), that a refused op or batch changes nothing, and that a
listing is exactly the live keys of the prefix in code-point order.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvtornado.cache import WriteBehindCache
from kvtornado.config import CacheConfig
from kvtornado.errors import KVError, NotAnInteger, NotFound, VersionMismatch
from kvtornado.ops import Op
from kvtornado.store import SqliteStore
from tests.unit.fakes import FakeStore, ManualClock

KEYS = st.sampled_from(["a", "ab", "b", "ba", "é", "😀"])
VALUES = st.sampled_from(["1", "-2", "9007199254740990", '"text"', "true", "1.5", "[1]"])
TTLS = st.none() | st.integers(min_value=1, max_value=3)
# How a condition is chosen: none, the key's current version, "must not exist", or a version it does not have.
CONDITIONS = st.sampled_from([None, "current", "zero", "wrong"])
BY = st.sampled_from([1, -1, 5, 2**53 - 1])
MAX_SAFE = 2**53 - 1

Entry = tuple[str, int, "float | None"]  # value JSON text, version, expires_at


class Refused(Exception):
    """What the model expects a refused op to raise: the error class and the batch index (None: single)."""

    def __init__(self, cls: type[KVError], index: int | None, current: int | None = None) -> None:
        super().__init__(cls.__name__)
        self.cls, self.index, self.current = cls, index, current


class DataModel(RuleBasedStateMachine):
    """Subclasses say which key/value implementation runs (``_open``) and how it restarts."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.now = 1_700_000_000.0
        self.model: dict[str, Entry] = {}
        self.top = 0  # the highest version handed out so far
        self.kv: Any = self._open()

    def wall(self) -> float:
        return self.now

    def _open(self) -> Any:
        raise NotImplementedError

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout=10))

    # -- the model ------------------------------------------------------------------------------

    def live(self, model: dict[str, Entry], key: str) -> Entry | None:
        entry = model.get(key)
        return entry if entry is not None and (entry[2] is None or entry[2] > self.now) else None

    def condition(self, key: str, how: str | None) -> int | None:
        entry = self.live(self.model, key)
        current = entry[1] if entry is not None else 0
        # "wrong": a version no write of a test ever reaches, so it can never hold by chance
        return {None: None, "current": current, "zero": 0, "wrong": current + 2**40}[how]

    def expect(self, model: dict[str, Entry], ops: list[Op], batch: bool) -> list[tuple[str, Any]]:
        """Apply ``ops`` to ``model`` in place (the caller passes a copy); what each op answers, as
        ("version", None) for a write (its version is the implementation's), ("get", entry or None),
        ("deleted", False). Raises ``Refused`` for the first op that must fail."""
        answers: list[tuple[str, Any]] = []
        for index, op in enumerate(ops):
            where = index if batch else None
            entry = self.live(model, op.key)
            current = entry[1] if entry is not None else 0
            if op.if_version is not None and op.if_version != current:
                # -1: an earlier op of the batch wrote the key, with a version only the implementation knows
                raise Refused(VersionMismatch, where, None if current == -1 else current)
            if op.kind == "get":
                answers.append(("get", entry))
                continue
            if op.kind == "delete":
                if entry is None:
                    if not batch:
                        raise Refused(NotFound, None)
                    answers.append(("deleted", False))
                    continue
                model.pop(op.key)
            elif op.kind == "incr":
                old = 0
                if entry is not None:
                    text = entry[0]
                    if not (text.lstrip("-").isdigit() and text == str(int(text))):
                        raise Refused(NotAnInteger, where)
                    old = int(text)
                if abs(old + op.by) > MAX_SAFE:
                    raise Refused(NotAnInteger, where)
                model[op.key] = (str(old + op.by), -1, entry[2] if entry is not None else None)
            else:
                assert op.value is not None
                model[op.key] = (op.value, -1, None if op.ttl is None else self.now + op.ttl)
            answers.append(("version", op.key))
        return answers

    def check_versions(self, ops: list[Op], outcomes: list[Any], model: dict[str, Entry]) -> None:
        """Every write got a version above all earlier ones; the model learns each key's (its last write's)."""
        last: dict[str, int] = {}
        for op, outcome in zip(ops, outcomes, strict=True):
            if op.kind == "get" or (op.kind == "delete" and not outcome.done):
                continue
            version = outcome.record.version
            assert version > self.top, f"version {version} handed out again (top was {self.top})"
            self.top = last[op.key] = version
        for key, version in last.items():
            if key in model:  # else its last write was a delete
                value, _, expires = model[key]
                model[key] = (value, version, expires)

    def submit(self, ops: list[Op], *, batch: bool) -> None:
        model = dict(self.model)
        try:
            answers = self.expect(model, ops, batch)
        except Refused as refused:
            try:
                self.run(self.kv.apply(ops, batch=batch))
            except KVError as exc:
                assert type(exc) is refused.cls, (exc, refused.cls)
                assert exc.extra.get("index") == refused.index
                if refused.current is not None:
                    assert exc.extra["current_version"] == refused.current
                event(f"refused: {refused.cls.__name__}")
                return
            raise AssertionError(f"{ops} should have been refused with {refused.cls.__name__}") from None
        outcomes = self.run(self.kv.apply(ops, batch=batch))
        assert len(outcomes) == len(ops)
        for (what, detail), outcome in zip(answers, outcomes, strict=True):
            if what == "get":
                if detail is None:
                    assert outcome.record is None and not outcome.done
                else:
                    got = outcome.record
                    assert (got.value, got.expires_at) == (detail[0], detail[2])
                    if detail[1] != -1:  # a key no earlier op of the batch wrote: its version is known
                        assert got.version == detail[1]
            elif what == "deleted":
                assert not outcome.done
        self.check_versions(ops, outcomes, model)
        self.model = model

    # -- rules ----------------------------------------------------------------------------------

    @rule(key=KEYS, value=VALUES, ttl=TTLS, how=CONDITIONS)
    def save(self, key: str, value: str, ttl: int | None, how: str | None) -> None:
        self.submit([Op("save", key, value=value, ttl=ttl, if_version=self.condition(key, how))], batch=False)

    @rule(key=KEYS, value=VALUES, ttl=TTLS)
    def put(self, key: str, value: str, ttl: int | None) -> None:
        version = self.run(self.kv.put(key, value, ttl=ttl))
        assert version > self.top
        self.top = version
        self.model[key] = (value, version, None if ttl is None else self.now + ttl)

    @rule(key=KEYS, how=CONDITIONS)
    def delete(self, key: str, how: str | None) -> None:
        self.submit([Op("delete", key, if_version=self.condition(key, how))], batch=False)

    @rule(key=KEYS, by=BY, how=CONDITIONS)
    def incr(self, key: str, by: int, how: str | None) -> None:
        self.submit([Op("incr", key, by=by, if_version=self.condition(key, how))], batch=False)

    @rule(specs=st.lists(st.tuples(st.sampled_from(["get", "save", "delete", "incr"]), KEYS, VALUES, TTLS,
                                   CONDITIONS, BY), min_size=1, max_size=4))
    def batch(self, specs: list[tuple[str, str, str, int | None, str | None, int]]) -> None:
        ops = []
        for kind, key, value, ttl, how, by in specs:
            cond = None if kind == "get" else self.condition(key, how)  # against the state before the batch
            if kind == "save":
                ops.append(Op("save", key, value=value, ttl=ttl, if_version=cond))
            elif kind == "incr":
                ops.append(Op("incr", key, by=by, if_version=cond))
            else:
                ops.append(Op(kind, key, if_version=cond))
        self.submit(ops, batch=True)

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        record = self.run(self.kv.get_record(key))
        entry = self.live(self.model, key)
        if entry is None:
            assert record is None
        else:
            assert record is not None and (record.value, record.version, record.expires_at) == entry

    @rule(prefix=st.sampled_from(["", "a", "b", "é", "z"]), page=st.integers(min_value=1, max_value=3))
    def list_all(self, prefix: str, page: int) -> None:
        """Page through the prefix by position: exactly the live keys, in code-point order, each once."""
        seen: list[str] = []
        after: str | None = None
        while True:
            rows = self.run(self.kv.list_keys(prefix, after, page))
            assert len(rows) <= page
            for key, record in rows:
                entry = self.live(self.model, key)
                assert entry is not None, f"{key} listed but absent"
                assert (record.value, record.version, record.expires_at) == entry
            seen += [key for key, _ in rows]
            if len(rows) < page:
                break
            after = rows[-1][0]
        assert seen == sorted(k for k in self.model if k.startswith(prefix) and self.live(self.model, k))

    @rule(seconds=st.sampled_from([0.5, 1, 2, 3]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    def sweep(self) -> None:
        self.run(self.kv.sweep())

    @invariant()
    def every_live_key_reads_back(self) -> None:
        for key in self.model:
            self.get(key)

    def teardown(self) -> None:
        self.loop.close()


class WriteBehindModel(DataModel):
    def _open(self) -> WriteBehindCache:
        if not hasattr(self, "store"):
            self.store = FakeStore()
            self.store.clock = self.wall
        config = CacheConfig(max_entries=3, max_bytes=10_000, flush_interval_ms=100, flush_batch_size=4,
                             max_dirty=100, durable_timeout_ms=5000)
        cache = WriteBehindCache(self.store, config, clock=ManualClock(), wall=self.wall)
        self.run(cache.start())
        return cache

    @rule()
    def flush(self) -> None:
        self.run(self.kv.flush())
        assert self.kv.pending() == {}

    @rule()
    def restart(self) -> None:
        """A graceful restart: everything is flushed, memory is gone, versions go on above the old ones."""
        assert self.run(self.kv.stop(5)) == 0
        self.kv = self._open()

    @precondition(lambda self: self.kv.dirty_count > 0)
    @rule()
    def crash(self) -> None:
        """kill -9: the pending writes are lost (G8); no version may come back (G10)."""
        self.kv.scheduler.close()
        for key in self.kv.pending():
            committed = self.store.records.get(key)
            if committed is None:
                self.model.pop(key, None)
            else:
                self.model[key] = (committed.value, committed.version, committed.expires_at)  # type: ignore[assignment]
        self.kv = self._open()

    def teardown(self) -> None:
        self.kv.scheduler.close()
        for task in asyncio.all_tasks(self.loop):
            task.cancel()
        self.loop.run_until_complete(asyncio.sleep(0))
        super().teardown()


class WriteThroughModel(DataModel):
    def _open(self) -> SqliteStore:
        if not hasattr(self, "folder"):
            self.folder = Path(tempfile.mkdtemp(prefix="kv-model-"))
        store = SqliteStore(self.folder / "kv.sqlite3", synchronous="OFF", clock=self.wall)
        self.run(store.open())
        return store

    @rule()
    def restart(self) -> None:
        self.run(self.kv.close())
        self.kv = self._open()

    def teardown(self) -> None:
        self.run(self.kv.close())
        shutil.rmtree(self.folder, ignore_errors=True)
        super().teardown()


# Seed and database come from the profile tests/conftest.py loads (a fixed seed in `make test`); the number of
# examples is a share of the profile's, so `HYPOTHESIS_PROFILE=deep` still runs ten times more.
WriteBehindModel.TestCase.settings = settings(stateful_step_count=30, max_examples=settings.default.max_examples // 2)
TestWriteBehindModel = WriteBehindModel.TestCase
# Real sqlite: every step is a commit on a thread, so fewer examples.
WriteThroughModel.TestCase.settings = settings(stateful_step_count=30,
                                               max_examples=max(settings.default.max_examples // 8, 10))
TestWriteThroughModel = WriteThroughModel.TestCase
