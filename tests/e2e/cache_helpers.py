"""Helpers for the exercise 4/5 end-to-end tests: the in-process write-behind app, the sqlite file as a
second connection sees it, a real ``exercise4.py`` process, and bounded polling."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from tornado.ioloop import IOLoop
from tornado.web import Application

from kvtornado.app import make_app
from kvtornado.auth import Authenticator
from kvtornado.cache import WriteBehindCache
from kvtornado.client import KVClient, Response, Signer
from kvtornado.config import Config
from kvtornado.scheduler import Clock
from kvtornado.store import MAX_BUSY_TIMEOUT_MS, SqliteStore
from tests.conftest import TEST_KEY_ID, TEST_SECRET
from tests.e2e.helpers import is_sentence

ROOT = Path(__file__).resolve().parent.parent.parent
JSON_CT = "application/json; charset=UTF-8"
STARTUP_TIMEOUT_S = 20.0
EXIT_TIMEOUT_S = 20.0
T = TypeVar("T")


# --- values as the server stores them ----------------------------------------------------------------


def stored(value: Any) -> str:
    """A value's text in the ``kv.value`` column: compact UTF-8 JSON (SPEC §6)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


# --- the sqlite file, seen through a second connection --------------------------------------------------


def db_rows(path: Path) -> dict[str, str]:
    """Every committed row of ``kv`` as ``{key: value JSON text}``."""
    with closing(sqlite3.connect(str(path), timeout=10.0)) as conn:
        return dict(conn.execute("SELECT key, value FROM kv").fetchall())


def integrity(path: Path) -> str:
    with closing(sqlite3.connect(str(path), timeout=10.0)) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


@contextmanager
def write_lock(path: Path) -> Iterator[sqlite3.Connection]:
    """Hold sqlite's write lock on ``path`` (``BEGIN IMMEDIATE``) until the block ends, then roll back."""
    conn = sqlite3.connect(str(path), timeout=10.0, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield conn
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()


# --- answers ------------------------------------------------------------------------------------------


def header(resp: Response, name: str) -> str | None:
    want = name.lower()
    return next((v for k, v in resp.headers.items() if k.lower() == want), None)


def assert_ok(resp: Response) -> Any:
    assert resp.status == 200, (resp.status, resp.body[:300])
    assert header(resp, "Content-Type") == JSON_CT, resp.headers
    return resp.json()


def assert_error(resp: Response, status: int, code: str) -> dict[str, Any]:
    """SPEC §5's error shape: ``{"error": code, "message": <one sentence>}`` as JSON, never cached."""
    assert resp.status == status, (resp.status, resp.body[:300])
    assert header(resp, "Content-Type") == JSON_CT, resp.headers
    doc = resp.json()
    assert isinstance(doc, dict) and set(doc) == {"error", "message"}, doc
    assert doc["error"] == code, doc
    assert isinstance(doc["message"], str) and doc["message"].strip() and "\n" not in doc["message"], doc
    assert is_sentence(doc["message"]), doc
    assert header(resp, "Cache-Control") == "no-store", resp.headers
    return doc


def assert_overloaded(resp: Response) -> int:
    """503 ``overloaded`` with a ``Retry-After`` of whole seconds >= 1; returns it."""
    assert_error(resp, 503, "overloaded")
    retry_after = header(resp, "Retry-After")
    assert retry_after is not None and retry_after.isdigit() and int(retry_after) >= 1, resp.headers
    return int(retry_after)


def poll(probe: Callable[[], T | None], *, timeout_s: float, what: str, interval_s: float = 0.02) -> T:
    """Call ``probe`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {result!r})")
        time.sleep(interval_s)


async def apoll(probe: Callable[[], Awaitable[T | None]], *, timeout_s: float, what: str,
                interval_s: float = 0.02) -> T:
    """``poll`` for a test running on the event loop: waits with ``asyncio.sleep``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {result!r})")
        await asyncio.sleep(interval_s)


# --- the write-behind app in this process (pytest-tornado) ---------------------------------------------


class CacheApp:
    """A ``SqliteStore`` + ``WriteBehindCache`` + admin ``make_app``, built as ``exercise4.py`` builds them."""

    def __init__(self, io_loop: IOLoop, config: Config, *, busy_timeout_ms: int = MAX_BUSY_TIMEOUT_MS,
                 clock: Clock | None = None) -> None:
        self.io_loop = io_loop
        self.config = config
        self.store = SqliteStore(config.storage.path, synchronous=config.storage.synchronous,
                                 busy_timeout_ms=busy_timeout_ms)
        io_loop.run_sync(self.store.open)
        self.cache = WriteBehindCache(self.store, config.cache, clock=clock)
        io_loop.run_sync(self.cache.start)
        authenticator = Authenticator({TEST_KEY_ID: TEST_SECRET}, max_skew_s=config.auth.max_skew_s,
                                      max_nonces=config.auth.max_nonces)
        self.app: Application = make_app(config, authenticator=authenticator, kv=self.cache, admin=True)

    @property
    def db(self) -> Path:
        return self.config.storage.path

    def close(self) -> None:
        async def stop() -> None:
            left = await self.cache.stop(5)
            await self.store.close()
            assert left == 0, f"{left} acknowledged writes were not flushed at teardown"

        self.io_loop.run_sync(stop, timeout=30)


# --- a real exercise4.py process -------------------------------------------------------------------------


class Exercise4:
    """``python exercise4.py --config CONFIG --port 0`` with stderr collected on a thread."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "exercise4.py"), "--config", str(config), "--port", "0"],
            cwd=config.parent, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, encoding="utf-8", errors="replace",
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._drain, name="exercise4-stderr", daemon=True)
        self._reader.start()
        self.port = 0

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    @property
    def log(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_line(self, pattern: str, timeout_s: float = STARTUP_TIMEOUT_S) -> re.Match[str]:
        """The first stderr line so far or to come that matches; fails at the deadline or at EOF."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                if self._eof:
                    raise AssertionError(f"exercise4.py ended without a line matching {pattern!r}:\n{self.log}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no line matching {pattern!r} within {timeout_s} s:\n{self.log}")
                self._changed.wait(left)

    def wait_listening(self) -> Exercise4:
        self.port = int(self.wait_line(r"exercise 4 listening on http://127\.0\.0\.1:(\d+)").group(1))
        return self

    @property
    def base_url(self) -> str:
        assert self.port, "not listening yet"
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> KVClient:
        return KVClient(self.base_url, Signer(TEST_KEY_ID, TEST_SECRET), timeout_s=15.0)

    def send(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout_s: float = EXIT_TIMEOUT_S) -> int:
        """The exit status, once stderr is read to its end (fails, after killing it, past ``timeout_s``)."""
        try:
            status = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"exercise4.py did not exit within {timeout_s} s:\n{self.log}") from None
        self._reader.join(timeout_s)
        return status

    def kill(self) -> None:
        """SIGKILL (if still running) and reap; safe to call more than once."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=EXIT_TIMEOUT_S)
        self._reader.join(EXIT_TIMEOUT_S)
        if self.proc.stderr is not None and not self._reader.is_alive():
            self.proc.stderr.close()


def stats_of(c: KVClient) -> Mapping[str, Any]:
    stats: Mapping[str, Any] = c.stats()
    return stats
