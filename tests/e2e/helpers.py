"""Shared helpers for the end-to-end tests: signed requests, raw sockets, error-shape checks, processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tornado.httpclient import AsyncHTTPClient
from tornado.testing import bind_unused_port
from tornado.web import Application

from kvtornado.client import Signer
from kvtornado.config import ServerConfig
from kvtornado.server import build_http_server

ROOT = Path(__file__).resolve().parent.parent.parent
JSON_CT = "application/json; charset=UTF-8"
FORM_CT = "application/x-www-form-urlencoded"
# How long any single exchange may take before the test fails instead of hanging.
EXCHANGE_TIMEOUT_S = 4.0  # below pytest-tornado's 5 s gen_test timeout, so ours reports first
PROCESS_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class Reply:
    """One HTTP answer: status, headers (case-insensitive look-up via ``header``) and raw body."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        want = name.lower()
        for k, v in self.headers.items():
            if k.lower() == want:
                return v
        return None

    def json(self) -> Any:
        return json.loads(self.body)


@contextlib.asynccontextmanager
async def serving(app: Application, server_config: ServerConfig | None = None) -> AsyncIterator[str]:
    """A second server in the test's own loop, built like production; yields its base URL."""
    sock, port = bind_unused_port()
    server = build_http_server(app, server_config)
    server.add_socket(sock)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        await server.close_all_connections()


def host_of(base_url: str) -> str:
    return urlsplit(base_url).netloc


async def send(
    http_client: AsyncHTTPClient,
    base_url: str,
    method: str,
    path: str,
    *,
    query: str = "",
    body: bytes = b"",
    content_type: str | None = None,
    signer: Signer | None = None,
    headers: Mapping[str, str] | None = None,
    sign_as: Mapping[str, Any] | None = None,
) -> Reply:
    """Send one request; when ``signer`` is given it is signed for exactly what is sent, except for the
    fields named in ``sign_as`` (method, host, path, query, body), which are signed as given instead:
    "sign one thing, send another"."""
    host = host_of(base_url)
    hdrs: dict[str, str] = {"Host": host}
    if content_type is not None:
        hdrs["Content-Type"] = content_type
    if signer is not None:
        signed = {"method": method, "host": host, "path": path, "query": query, "body": body, **(sign_as or {})}
        hdrs["Authorization"] = signer.authorization(
            signed["method"], signed["host"], signed["path"], signed["query"], signed["body"]
        )
    hdrs.update(headers or {})
    return await fetch(http_client, base_url, method, path + ("?" + query if query else ""), hdrs, body)


async def fetch(
    http_client: AsyncHTTPClient, base_url: str, method: str, target: str, headers: Mapping[str, str], body: bytes
) -> Reply:
    """Send exactly these headers and body (no signing); never raises on an HTTP error status."""
    r = await http_client.fetch(
        base_url + target, method=method, headers=dict(headers),
        body=body if body or method in ("POST", "PUT", "PATCH") else None,
        allow_nonstandard_methods=True, raise_error=False, request_timeout=EXCHANGE_TIMEOUT_S,
        follow_redirects=False, decompress_response=False,
    )
    if r.code == 599:  # the client's own failure (timeout, reset): never a server answer
        raise AssertionError(f"{method} {target}: no HTTP answer ({r.error})")
    return Reply(r.code, dict(r.headers.get_all()), r.body or b"")


def assert_json(resp: Reply, status: int) -> Any:
    """The status, the JSON content type, and the decoded body."""
    assert resp.status == status, (resp.status, resp.body[:300])
    assert resp.header("Content-Type") == JSON_CT, resp.headers
    return resp.json()


# Messages that open with the name of a field (or a count) keep its case: ``ts must be ...``, ``3 writes ...``.
LOWERCASE_OPENERS = frozenset({"ts", "sig", "nonce", "keyid", "durable", "sqlite"})


def is_sentence(message: str) -> bool:
    """SPEC §5's ``message``: one sentence for a person. It ends with a full stop (or ?), is not shouted, and
    starts with a capital letter, a digit, or a field name (``LOWERCASE_OPENERS``)."""
    first = message.split(" ", 1)[0].rstrip(":,;")
    opens = message[:1].isupper() or message[:1].isdigit() or first in LOWERCASE_OPENERS
    return opens and message.endswith((".", "?")) and not message.isupper()


def assert_error(resp: Reply, status: int, code: str) -> dict[str, Any]:
    """SPEC §5's error shape exactly: ``{"error": code, "message": <one sentence>}``, JSON content type,
    no store; for a 401 also ``WWW-Authenticate: KV-HMAC-SHA256 error="<code>"``."""
    doc = assert_json(resp, status)
    assert isinstance(doc, dict) and set(doc) == {"error", "message"}, doc
    assert doc["error"] == code, doc
    message = doc["message"]
    assert isinstance(message, str) and message.strip(), doc
    assert "\n" not in message and "Traceback" not in message, doc
    assert is_sentence(message), doc
    assert resp.header("Cache-Control") == "no-store", resp.headers
    if status == 401:
        assert resp.header("WWW-Authenticate") == f'KV-HMAC-SHA256 error="{code}"', resp.headers
    else:
        assert resp.header("WWW-Authenticate") is None, resp.headers
    return doc


# --- raw sockets: what an HTTP client library will not send -------------------------------------------


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    m = re.fullmatch(r"HTTP/1\.[01] (\d{3})(?: .*)?", lines[0])
    assert m, f"not an HTTP status line: {lines[0]!r}"
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip()] = value.strip()
    return int(m.group(1)), headers


class RawConnection:
    """A plain TCP connection to 127.0.0.1:``port`` for requests no HTTP client library will send
    (no Content-Type at all, a huge Content-Length with no body, a chunked body that never ends)."""

    def __init__(self, port: int, timeout_s: float = EXCHANGE_TIMEOUT_S) -> None:
        self.port = port
        self.timeout_s = timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> RawConnection:
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", self.port), self.timeout_s)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._writer is not None
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionResetError, BrokenPipeError):
            pass

    async def send(self, *parts: bytes) -> None:
        assert self._writer is not None
        for part in parts:
            self._writer.write(part)
        await asyncio.wait_for(self._writer.drain(), self.timeout_s)

    async def read_reply(self, *, to_head: bool = False) -> Reply:
        """One answer, framed by its Content-Length (no body ``to_head`` requests); fails at the deadline
        instead of hanging."""
        assert self._reader is not None
        raw_head = await asyncio.wait_for(self._reader.readuntil(b"\r\n\r\n"), self.timeout_s)
        status, headers = _parse_head(raw_head[:-4])
        length = next((int(v) for k, v in headers.items() if k.lower() == "content-length"), 0)
        if to_head or not length:
            return Reply(status, headers, b"")
        return Reply(status, headers, await asyncio.wait_for(self._reader.readexactly(length), self.timeout_s))

    async def closed_by_server(self) -> bool:
        """True once the server closes the connection (EOF or reset) without sending more; fails at the
        deadline if it keeps the connection open."""
        assert self._reader is not None
        try:
            rest = await asyncio.wait_for(self._reader.read(1), self.timeout_s)
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        assert rest == b"", f"unexpected bytes after the answer: {rest!r}"
        return True


def raw_head(method: str, target: str, headers: Mapping[str, str]) -> bytes:
    return (f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            + "\r\n").encode("latin-1")


def chunked(*chunks: bytes) -> bytes:
    """Chunked transfer coding of ``chunks``, without the final zero-length chunk."""
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)


async def raw_send(
    port: int,
    method: str,
    path: str,
    *,
    query: str = "",
    body: bytes = b"",
    content_type: str | None = None,
    signer: Signer | None = None,
    headers: Mapping[str, str] | None = None,
) -> Reply:
    """Like ``send`` but over a raw socket: only the headers given here are sent (``Connection: close``)."""
    host = f"127.0.0.1:{port}"
    hdrs = {"Host": host, "Connection": "close"}
    if content_type is not None:
        hdrs["Content-Type"] = content_type
    if body or method in ("POST", "PUT", "PATCH"):
        hdrs["Content-Length"] = str(len(body))
    if signer is not None:
        hdrs["Authorization"] = signer.authorization(method, host, path, query, body)
    hdrs.update(headers or {})
    async with RawConnection(port) as conn:
        await conn.send(raw_head(method, path + ("?" + query if query else ""), hdrs), body)
        return await conn.read_reply(to_head=method == "HEAD")


# Framing errors SPEC §5 "HTTP hygiene" calls 400 bad_request: each must close the connection.
FRAMING_ERRORS = {
    "unsupported Transfer-Encoding": "Transfer-Encoding: gzip",
    "non-integer Content-Length": "Content-Length: abc",
    "both framing headers": "Content-Length: 5\r\nTransfer-Encoding: chunked",
    "two different Content-Lengths": "Content-Length: 5, 6",
}


async def pipelined_behind_framing_error(port: int, framing: str, hidden: bytes, version: str = "1.1") -> list[Reply]:
    """``POST /ping`` with a framing error and ``hidden`` (a whole request) right behind it, in one write;
    every answer read until the server closes the connection."""
    head = f"POST /ping HTTP/{version}\r\nHost: 127.0.0.1:{port}\r\n{framing}\r\n\r\n".encode("latin-1")
    replies: list[Reply] = []
    async with RawConnection(port) as conn:
        await conn.send(head + hidden)
        while True:
            try:
                replies.append(await conn.read_reply())
            except (asyncio.IncompleteReadError, ConnectionResetError):
                return replies


# --- real exercise processes ------------------------------------------------------------------------------


@dataclass
class ServerProcess:
    """``python exerciseN.py ...`` with its stderr drained on a thread (so the pipe never fills)."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    _queue: queue.Queue[str | None] = field(default_factory=queue.Queue)
    port: int = 0
    _thread: threading.Thread | None = None

    @classmethod
    def start(cls, exercise: int, config: Path, *extra: str, cwd: Path | None = None) -> ServerProcess:
        return cls.spawn([sys.executable, str(ROOT / f"exercise{exercise}.py"), "--config", str(config),
                          "--port", "0", *extra], cwd=cwd or config.parent)

    @classmethod
    def spawn(cls, argv: list[str], *, cwd: Path) -> ServerProcess:
        """Any server command line (e.g. an installed ``kvtornado serve``), stderr drained the same way."""
        proc = subprocess.Popen(
            argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, encoding="utf-8", errors="replace",
        )
        sp = cls(proc)
        sp._thread = threading.Thread(target=sp._drain, daemon=True)
        sp._thread.start()
        return sp

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout_s: float = PROCESS_TIMEOUT_S) -> re.Match[str]:
        """The first stderr line (from now on) matching ``pattern``; fails at the deadline or at EOF."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line matching {pattern!r} within {timeout_s} s: {self.lines}")
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"the process ended without a line matching {pattern!r}: {self.lines}")
            m = re.search(pattern, line)
            if m:
                return m

    def wait_listening(self) -> int:
        self.port = int(self.wait_for(r"listening on http://127\.0\.0\.1:(\d+)").group(1))
        return self.port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, timeout_s: float = PROCESS_TIMEOUT_S) -> int:
        """SIGTERM, then the exit status (killed and failed if it does not stop in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=timeout_s)
            raise AssertionError(f"the process did not stop within {timeout_s} s of SIGTERM: {self.lines}") from None
        finally:
            self._close_pipe()

    def _close_pipe(self) -> None:
        # The process has ended: the drain thread reaches EOF on its own; only then is the pipe closed.
        if self._thread is not None:
            self._thread.join(timeout=PROCESS_TIMEOUT_S)
        if self.proc.stderr is not None and not self.proc.stderr.closed:
            self.proc.stderr.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=PROCESS_TIMEOUT_S)
        self._close_pipe()


class _AnyVersion:
    """Equal to any valid version (an int, 1 <= v < 2^53, not a bool): for answers whose exact version is not
    what the test is about. Tests about versions compare exact numbers."""

    def __eq__(self, other: object) -> bool:
        return type(other) is int and 1 <= other < 2**53

    def __repr__(self) -> str:
        return "VERSION"

    __hash__ = None  # type: ignore[assignment]


VERSION: object = _AnyVersion()
