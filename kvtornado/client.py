"""A signing client: a Python API (blocking and asyncio) and a command line.

    python -m kvtornado.client [--config PATH] [--url URL] [--key-id ID] COMMAND ...
        ping | authorize | get KEY
        | save KEY VALUE [--json] [--durable] [--ttl S] [--if-version N]
        | delete KEY [--durable] [--if-version N]
        | incr KEY [--by N] [--if-version N] [--durable]
        | keys [--prefix P] [--limit N] [--values] [--all]
        | batch FILE
        | flush | stats
    (VALUE: text; '-' reads stdin, '@path' a file; --json parses it. FILE: JSON, {"ops": [...]} or a bare
    list of ops; '-' reads stdin. keys --all follows the cursors and prints each page's answer on its own line.)

The command line reads the same config and keys file as the server, so nobody signs by hand.

``KVClient`` (blocking, ``http.client``) and ``AsyncKVClient`` (Tornado's ``AsyncHTTPClient``) share one
core, ``_ClientCore``: the URL, request building (query encoding, headers, signing, body), the endpoints
and the mapping of error answers to ``KVClientError``. Only the transport, ``_send``, differs (the shape of
httpx's ``Client``/``AsyncClient``). Both always sign for themselves: ``headers`` naming ``Authorization``
(or ``Host``, ``Content-Length``, ``Transfer-Encoding``) is refused with ``ValueError``, never merged.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import select
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from kvtornado.auth import new_nonce, sign_request

JSON = "application/json"
_BODY_METHODS = ("POST", "PUT", "PATCH")
# Headers the core owns: a caller's copy is refused, never merged (see ``_ClientCore.build``).
_CORE_HEADERS = frozenset({"authorization", "host", "content-length", "transfer-encoding"})
# AsyncKVClient asks before sending a body past this size (``Expect: 100-continue``), so a server that
# refuses it from its Content-Length (413) answers before any of it is sent. Smaller bodies fit in the
# socket buffers, and one round trip is cheap next to sending a larger one.
_ASK_FIRST_BYTES = 64 * 1024


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class KVClientError(Exception):
    """A non-2xx answer: ``status``, ``code`` (the server's error code), ``message`` and ``doc``, the server's
    whole JSON error body (it may carry more than ``error`` and ``message``, e.g. ``current_version``)."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None,
                 doc: Mapping[str, Any] | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.doc: dict[str, Any] = dict(doc) if doc is not None else {"error": code, "message": message}

    @property
    def current_version(self) -> int | None:
        """A 412 ``version_mismatch``'s ``current_version`` (0: the key is absent); None when not in the body."""
        return _int_field(self.doc, "current_version")

    @property
    def index(self) -> int | None:
        """The position of the op that failed a ``/batch``; None when not in the body (the batch as a whole)."""
        return _int_field(self.doc, "index")


def _int_field(doc: Mapping[str, Any], name: str) -> int | None:
    value = doc.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class KVProtocolError(Exception):
    """An answer the protocol rules out, so the client stops rather than guess (a ``/keys`` page whose cursor
    is the one it was asked for would be paged forever)."""


class KVConnectionError(ConnectionError):
    """The server at ``url`` could not be reached (refused, unknown host, timed out): nothing was sent."""

    def __init__(self, url: str, cause: OSError) -> None:
        self.url = url
        self.reason = cause.strerror or str(cause) or type(cause).__name__
        super().__init__(f"cannot connect to {url}: {self.reason}")


@dataclass
class Signer:
    """Signs requests for one key; clock and nonce source are injectable."""

    key_id: str
    secret: bytes = field(repr=False)  # never shown in a repr, a log or a traceback
    clock: Callable[[], float] = time.time
    nonce: Callable[[], str] = new_nonce

    def authorization(self, method: str, host: str, path: str, query: str, body: bytes, *,
                      ts: int | None = None) -> str:
        return sign_request(
            self.secret, key_id=self.key_id, method=method, host=host, path=path, query=query, body=body,
            ts=int(self.clock()) if ts is None else ts, nonce=self.nonce(),
        )


def encode_query(params: Mapping[str, Any] | None) -> str:
    """``key=...`` with ``%20`` for spaces: the exact text that is both sent and signed."""
    return urlencode({k: str(v) for k, v in (params or {}).items()}, quote_via=quote) if params else ""


def _check(resp: Response) -> Any:
    """The decoded JSON of a 2xx answer; any other answer raises ``KVClientError``."""
    doc: Any = None
    try:
        doc = resp.json()
    except ValueError:
        if 200 <= resp.status < 300:
            raise KVProtocolError(f"a {resp.status} answer that is not JSON: "
                                  f"{resp.body[:200].decode('utf-8', 'replace')!r}") from None
    if 200 <= resp.status < 300:
        return doc
    if isinstance(doc, dict) and "error" in doc:
        raise KVClientError(resp.status, str(doc["error"]), str(doc.get("message", "")), resp.headers, doc)
    raise KVClientError(resp.status, "http_error", resp.body[:200].decode("utf-8", "replace"), resp.headers)


@dataclass(frozen=True)
class Request:
    """One request exactly as it goes on the wire: the query text and body are the ones that were signed."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    body: bytes

    @property
    def target(self) -> str:
        return self.path + ("?" + self.query if self.query else "")


@dataclass(frozen=True)
class _Call:
    """One endpoint call: what to send, and which field of the answer to return (``None``: all of it)."""

    method: str
    path: str
    params: Mapping[str, Any] | None = None
    body: bytes = b""
    sign: bool = True
    pick: str | None = None

    def result(self, resp: Response) -> Any:
        doc = _check(resp)
        if self.pick is None:
            return doc
        if not isinstance(doc, dict) or self.pick not in doc:
            raise KVProtocolError(f"{self.path} answered without {self.pick!r}: {resp.body[:200]!r}")
        return doc[self.pick]


def _durable(durable: bool) -> dict[str, Any]:
    return {"durable": 1} if durable else {}


def _integer(name: str, value: Any) -> int:
    """``value`` if it is an int: a bool or a string would go out as ``True`` or ``"3"``, which no server means."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, not {value!r}")
    return value


def _optional(**params: Any) -> dict[str, Any]:
    """The query parameters that were given (not None), each an int, in the order named."""
    return {name: _integer(name, value) for name, value in params.items() if value is not None}


def _json_body(doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def _next_cursor(sent: str | None, page: Mapping[str, Any]) -> str | None:
    """The cursor of the page after ``page`` (None: it was the last). A server that hands back the cursor it
    was given would be paged forever: that is refused, not followed."""
    cursor: str | None = page.get("cursor")
    if cursor is not None and cursor == sent:
        raise KVProtocolError(f"/keys answered with the cursor it was asked for ({cursor!r}): it does not advance")
    return cursor


class _ClientCore:
    """What both clients share; subclasses add a transport (``request``) and the endpoint methods on it.

    The client owns ``Authorization``, ``Host``, ``Content-Length`` and ``Transfer-Encoding``: it signs every
    request itself (unless ``sign=False`` or there is no signer), and a caller's ``headers`` naming any of
    these, in any case, is refused with ``ValueError`` before anything is sent. A caller's header never
    overrides the signature, and no request leaves with a header other than the one that was signed.
    """

    def __init__(self, base_url: str, signer: Signer | None, *, timeout_s: float = 30.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            # The path on the request line is what is signed: a prefix would be signed by no one.
            raise ValueError(f"the base URL must be scheme://host[:port] only: {base_url!r}")
        self.base_url = f"{parts.scheme}://{parts.netloc}"
        self.host_header = parts.netloc
        self.signer = signer
        self.timeout_s = timeout_s

    def build(
        self, method: str, path: str, *, params: Mapping[str, Any] | None = None, body: bytes = b"",
        content_type: str | None = None, headers: Mapping[str, str] | None = None, sign: bool = True,
        ts: int | None = None,
    ) -> Request:
        """The request to send: query encoded once (that text is both sent and signed), headers, signature."""
        query = encode_query(params)
        hdrs: dict[str, str] = {"Host": self.host_header}
        if body or method in _BODY_METHODS:
            hdrs["Content-Type"] = content_type or JSON
        for name, value in (headers or {}).items():
            lower = name.lower()
            if lower in _CORE_HEADERS:
                raise ValueError(f"the client sets the {name} header itself; it cannot be passed in headers")
            for own in [k for k in hdrs if k.lower() == lower]:  # e.g. a caller's content-type replaces ours
                del hdrs[own]
            hdrs[name] = value
        if sign and self.signer is not None:
            hdrs["Authorization"] = self.signer.authorization(method, self.host_header, path, query, body, ts=ts)
        return Request(method, path, query, hdrs, body)

    @staticmethod
    def resign_at(req: Request, resp: Response) -> int | None:
        """The timestamp to sign a refused request anew with, or None when it is not to be sent again.

        A ``stale_timestamp`` refusal carries the server's clock in ``X-KV-Server-Time``: the request was not
        served (a clock too far off, or signed before the server restarted), so it is signed once more just
        after that time, with a fresh nonce. Nothing else is ever sent twice."""
        if resp.status != 401 or "Authorization" not in req.headers:
            return None
        server_time = next((v for k, v in resp.headers.items() if k.lower() == "x-kv-server-time"), None)
        if server_time is None or not server_time.isdigit():
            return None
        try:
            code = json.loads(resp.body).get("error")
        except (ValueError, AttributeError):
            return None
        return int(server_time) + 1 if code == "stale_timestamp" else None

    # The endpoints, once: each client method is ``self._call(<one of these>)``.

    @staticmethod
    def _ping() -> _Call:
        return _Call("GET", "/ping", sign=False)

    @staticmethod
    def _authorize() -> _Call:
        return _Call("GET", "/authorize")

    @staticmethod
    def _save(key: str, value: Any, durable: bool, ttl: int | None, if_version: int | None) -> _Call:
        params = {**_optional(ttl=ttl, if_version=if_version), **_durable(durable)}
        return _Call("POST", "/save", params, _json_body({"key": key, "value": value}))

    @staticmethod
    def _get(key: str, pick: str | None = "value") -> _Call:
        return _Call("GET", "/get", {"key": key}, pick=pick)

    @staticmethod
    def _delete(key: str, durable: bool, if_version: int | None) -> _Call:
        return _Call("DELETE", "/delete", {"key": key, **_optional(if_version=if_version), **_durable(durable)})

    @staticmethod
    def _incr(key: str, by: int, durable: bool, if_version: int | None) -> _Call:
        params = {**_optional(if_version=if_version), **_durable(durable)}
        return _Call("POST", "/incr", params, _json_body({"key": key, "by": _integer("by", by)}))

    @staticmethod
    def _keys(prefix: str | None, limit: int | None, cursor: str | None, values: bool) -> _Call:
        params: dict[str, Any] = {} if prefix is None else {"prefix": prefix}  # "" is sent: it means all keys
        params.update(_optional(limit=limit))
        if cursor is not None:
            params["cursor"] = cursor
        if values:
            params["values"] = 1
        return _Call("GET", "/keys", params)

    @staticmethod
    def _batch(ops: Iterable[Mapping[str, Any]], durable: bool) -> _Call:
        if isinstance(ops, (str, bytes, Mapping)):  # {"ops": [...]} itself, or text: not a sequence of ops
            raise ValueError(f"ops must be a list of ops, not {type(ops).__name__}")
        return _Call("POST", "/batch", _durable(durable), _json_body({"ops": list(ops)}), pick="results")

    @staticmethod
    def _flush() -> _Call:
        return _Call("POST", "/flush")

    @staticmethod
    def _stats() -> _Call:
        return _Call("GET", "/stats")


def _has_input(sock: socket.socket) -> bool:
    """True when an idle socket is readable: the server closed it (EOF), reset it, or spoke out of turn."""
    try:
        poller = select.poll()
    except AttributeError:  # no poll() (Windows)
        return bool(select.select([sock], [], [], 0)[0])
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def tls_context(cafile: str | None) -> ssl.SSLContext:
    """The system's CAs, or only ``cafile``'s (a private CA); the host name is always checked. ``ValueError``
    naming the file when it cannot be read or holds no PEM certificate."""
    try:
        return ssl.create_default_context(cafile=cafile)
    except OSError as exc:  # ssl.SSLError is one: the file is there but is not PEM certificates
        reason = exc.strerror or getattr(exc, "reason", None) or str(exc)
        raise ValueError(f"CA file {cafile}: cannot load it ({reason})") from None


class KVClient(_ClientCore):
    """Blocking client over one keep-alive ``http.client`` connection (one client per thread).

    A request is sent at most once. Before reusing the connection the client checks that the server has not
    closed it meanwhile, and opens a fresh one if it has: nothing was sent yet, so that is safe. Once any byte
    has gone out, a failure is raised, never retried: the server may have acted on what it received. If the
    server answers before reading the whole body (413 ``too_large`` from ``Content-Length``) and closes,
    that answer is read and raised as ``KVClientError``, not the broken pipe of the unfinished upload.
    """

    def __init__(self, base_url: str, signer: Signer | None, *, timeout_s: float = 30.0,
                 cafile: str | None = None) -> None:
        super().__init__(base_url, signer, timeout_s=timeout_s)
        parts = urlsplit(self.base_url)
        self._conn: http.client.HTTPConnection
        if parts.scheme == "https":
            self._conn = http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=timeout_s,
                                                     context=tls_context(cafile))
        else:
            self._conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout_s)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> KVClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self, method: str, path: str, *, params: Mapping[str, Any] | None = None, body: bytes = b"",
        content_type: str | None = None, headers: Mapping[str, str] | None = None, sign: bool = True,
    ) -> Response:
        """Send one request (built and signed by ``build``) and return the answer, whatever its status; a
        ``stale_timestamp`` refusal is signed anew once at the server's time (``resign_at``)."""
        req = self.build(method, path, params=params, body=body, content_type=content_type, headers=headers,
                         sign=sign)
        resp = self._send(req)
        ts = self.resign_at(req, resp)
        if ts is None:
            return resp
        return self._send(self.build(method, path, params=params, body=body, content_type=content_type,
                                     headers=headers, sign=sign, ts=ts))

    def _send(self, req: Request) -> Response:
        conn = self._conn
        if conn.sock is not None and _has_input(conn.sock):
            conn.close()  # closed by the server while idle; nothing of this request was sent
        if conn.sock is None:
            try:
                conn.connect()
            except OSError as exc:
                raise KVConnectionError(self.base_url, exc) from exc
        try:
            try:
                conn.request(req.method, req.target, body=req.body or None, headers=dict(req.headers))
            except (BrokenPipeError, ConnectionResetError) as exc:
                # http.client sends the headers, then the body. A server that refuses the body from its
                # Content-Length answers and closes while we are still sending: its answer is waiting.
                try:
                    return self._read_response()
                except (OSError, http.client.HTTPException):
                    raise exc from None
            return self._read_response()
        except BaseException:
            conn.close()
            raise

    def _read_response(self) -> Response:
        r = self._conn.getresponse()  # closes the connection itself when the answer says it will close
        return Response(r.status, dict(r.getheaders()), r.read())

    def _call(self, call: _Call) -> Any:
        return call.result(self.request(call.method, call.path, params=call.params, body=call.body,
                                        sign=call.sign))

    def ping(self) -> Any:
        """``GET /ping`` (unsigned): ``{"ping": "pong"}``."""
        return self._call(self._ping())

    def authorize(self) -> Any:
        """``GET /authorize``: who the server says this key is."""
        return self._call(self._authorize())

    def save(self, key: str, value: Any, *, durable: bool = False, ttl: int | None = None,
             if_version: int | None = None) -> Any:
        """``POST /save``: any JSON value; ``{"key", "saved": true, "version"}``. ``durable`` waits for the
        commit, ``ttl`` (seconds) makes the key expire, ``if_version`` saves only over that version (0: only if
        the key is absent; else 412 ``version_mismatch``, see ``KVClientError.current_version``)."""
        return self._call(self._save(key, value, durable, ttl, if_version))

    def get(self, key: str) -> Any:
        """``GET /get``: the value exactly as saved (``KVClientError`` 404 ``not_found`` when absent)."""
        return self._call(self._get(key))

    def get_record(self, key: str) -> Any:
        """``GET /get``, the whole answer: ``{"key", "value", "version", "expires_at"}``."""
        return self._call(self._get(key, pick=None))

    def delete(self, key: str, *, durable: bool = False, if_version: int | None = None) -> Any:
        """``DELETE /delete``: ``{"key", "deleted": true, "version"}``; ``durable`` waits for the commit,
        ``if_version`` deletes only that version."""
        return self._call(self._delete(key, durable, if_version))

    def incr(self, key: str, by: int = 1, *, durable: bool = False, if_version: int | None = None) -> Any:
        """``POST /incr``: ``{"key", "value", "version"}`` (an absent key counts from 0; 409 ``not_an_integer``
        when the stored value is not an integer)."""
        return self._call(self._incr(key, by, durable, if_version))

    def keys(self, prefix: str | None = None, limit: int | None = None, cursor: str | None = None,
             values: bool = False) -> Any:
        """``GET /keys``, one page: ``{"keys": [{"key", "version", "expires_at"[, "value"]}, ...], "cursor"}``;
        pass ``cursor`` back for the next page (null: none follows)."""
        return self._call(self._keys(prefix, limit, cursor, values))

    def iter_keys(self, prefix: str | None = None, values: bool = False,
                  page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Every entry of ``/keys`` under ``prefix``, page after page (one request per ``page_size`` keys, sent
        as the iteration gets there)."""
        limit = _integer("page_size", page_size)
        cursor: str | None = None
        while True:
            page = self.keys(prefix, limit, cursor, values)
            yield from page["keys"]
            cursor = _next_cursor(cursor, page)
            if cursor is None:
                return

    def batch(self, ops: Iterable[Mapping[str, Any]], *, durable: bool = False) -> Any:
        """``POST /batch``: the list of results, one per op, all applied or none (a failing op raises
        ``KVClientError`` with its position in ``index``)."""
        return self._call(self._batch(ops, durable))

    def flush(self) -> Any:
        """``POST /flush`` (exercise 4): ``{"flushed": n}`` once everything dirty is committed."""
        return self._call(self._flush())

    def stats(self) -> Any:
        """``GET /stats`` (exercise 4): the counters."""
        return self._call(self._stats())


class AsyncKVClient(_ClientCore):
    """The same client on Tornado's ``AsyncHTTPClient``, for code already on an event loop (tests, bench).

    Create it on the loop it will run on. A body over 64 KiB is sent with ``Expect: 100-continue``, so a 413
    from ``Content-Length`` arrives before the body is sent and is raised as ``KVClientError``.
    """

    def __init__(self, base_url: str, signer: Signer | None, *, timeout_s: float = 30.0,
                 cafile: str | None = None) -> None:
        from tornado.httpclient import AsyncHTTPClient

        super().__init__(base_url, signer, timeout_s=timeout_s)
        self._http = AsyncHTTPClient()
        self._tls = tls_context(cafile) if self.base_url.startswith("https:") else None

    async def request(
        self, method: str, path: str, *, params: Mapping[str, Any] | None = None, body: bytes = b"",
        content_type: str | None = None, headers: Mapping[str, str] | None = None, sign: bool = True,
    ) -> Response:
        """Send one request (built and signed by ``build``) and return the answer, whatever its status; a
        ``stale_timestamp`` refusal is signed anew once at the server's time (``resign_at``)."""
        req = self.build(method, path, params=params, body=body, content_type=content_type, headers=headers,
                         sign=sign)
        resp = await self._send(req)
        ts = self.resign_at(req, resp)
        if ts is None:
            return resp
        return await self._send(self.build(method, path, params=params, body=body, content_type=content_type,
                                           headers=headers, sign=sign, ts=ts))

    async def _send(self, req: Request) -> Response:
        try:
            r = await self._http.fetch(
                self.base_url + req.target, method=req.method, headers=dict(req.headers),
                body=req.body if req.body or req.method in _BODY_METHODS else None,
                allow_nonstandard_methods=True, raise_error=False, request_timeout=self.timeout_s,
                follow_redirects=False,  # a signature is for one URL: never resent elsewhere
                expect_100_continue=len(req.body) > _ASK_FIRST_BYTES, ssl_options=self._tls,
            )
        except (ConnectionRefusedError, socket.gaierror) as exc:
            raise KVConnectionError(self.base_url, exc) from exc
        return Response(r.code, dict(r.headers.get_all()), r.body or b"")

    async def _call(self, call: _Call) -> Any:
        return call.result(await self.request(call.method, call.path, params=call.params, body=call.body,
                                              sign=call.sign))

    async def ping(self) -> Any:
        """``GET /ping`` (unsigned): ``{"ping": "pong"}``."""
        return await self._call(self._ping())

    async def authorize(self) -> Any:
        """``GET /authorize``: who the server says this key is."""
        return await self._call(self._authorize())

    async def save(self, key: str, value: Any, *, durable: bool = False, ttl: int | None = None,
                   if_version: int | None = None) -> Any:
        """``POST /save``: as ``KVClient.save``."""
        return await self._call(self._save(key, value, durable, ttl, if_version))

    async def get(self, key: str) -> Any:
        """``GET /get``: the value exactly as saved (``KVClientError`` 404 ``not_found`` when absent)."""
        return await self._call(self._get(key))

    async def get_record(self, key: str) -> Any:
        """``GET /get``, the whole answer: ``{"key", "value", "version", "expires_at"}``."""
        return await self._call(self._get(key, pick=None))

    async def delete(self, key: str, *, durable: bool = False, if_version: int | None = None) -> Any:
        """``DELETE /delete``: as ``KVClient.delete``."""
        return await self._call(self._delete(key, durable, if_version))

    async def incr(self, key: str, by: int = 1, *, durable: bool = False, if_version: int | None = None) -> Any:
        """``POST /incr``: as ``KVClient.incr``."""
        return await self._call(self._incr(key, by, durable, if_version))

    async def keys(self, prefix: str | None = None, limit: int | None = None, cursor: str | None = None,
                   values: bool = False) -> Any:
        """``GET /keys``, one page: as ``KVClient.keys``."""
        return await self._call(self._keys(prefix, limit, cursor, values))

    async def iter_keys(self, prefix: str | None = None, values: bool = False,
                        page_size: int = 100) -> AsyncIterator[dict[str, Any]]:
        """Every entry of ``/keys`` under ``prefix`` (``async for``), page after page, as ``KVClient.iter_keys``."""
        limit = _integer("page_size", page_size)
        cursor: str | None = None
        while True:
            page = await self.keys(prefix, limit, cursor, values)
            for entry in page["keys"]:
                yield entry
            cursor = _next_cursor(cursor, page)
            if cursor is None:
                return

    async def batch(self, ops: Iterable[Mapping[str, Any]], *, durable: bool = False) -> Any:
        """``POST /batch``: as ``KVClient.batch``."""
        return await self._call(self._batch(ops, durable))

    async def flush(self) -> Any:
        """``POST /flush`` (exercise 4): ``{"flushed": n}`` once everything dirty is committed."""
        return await self._call(self._flush())

    async def stats(self) -> Any:
        """``GET /stats`` (exercise 4): the counters."""
        return await self._call(self._stats())


# --- command line --------------------------------------------------------------------------------

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _default_config() -> Path:
    return Path(__file__).resolve().parent.parent / "config.yaml"


def _natural(text: str) -> int:
    """An argument that is a base-10 integer >= 0, spelled with digits only (no sign, no ``_``, no spaces),
    so what is sent is exactly what was typed."""
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"not a decimal integer >= 0: {text!r}")
    return int(text)


def _signed(text: str) -> int:
    """A base-10 integer, digits with an optional leading ``-``."""
    digits = text[1:] if text.startswith("-") else text
    if not (digits.isascii() and digits.isdigit()):
        raise argparse.ArgumentTypeError(f"not a decimal integer: {text!r}")
    return int(text)


def _parser(prog: str = "python -m kvtornado.client", default_config: Path | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Signed requests to a kvtornado server, with the key from the server's own keys file. "
                    "Each command prints the server's JSON answer on one line (keys --all: one line a page).",
        epilog="VALUE is text as given; '-' reads it from stdin and '@path' from a file (UTF-8, exactly as "
               "read, trailing newline included), which also passes values too long for the command line. "
               "Exit status: 0 done; 1 the server refused (the error JSON is on stderr, e.g. a 412 with its "
               "current_version) or could not be reached; 2 bad usage, config, keys file, VALUE or FILE.",
    )
    p.add_argument("--config", type=Path, default=default_config or _default_config(), metavar="PATH",
                   help="config file: the server's address and keys file (default: %(default)s)")
    p.add_argument("--url", help="server URL, e.g. http://127.0.0.1:8888 (default: from the config's "
                                 "server.host and server.port)")
    p.add_argument("--key-id", metavar="ID", help="key id to sign with (default: the first in the keys file)")
    p.add_argument("--cafile", metavar="PEM", help="trust only this CA for an https:// server (default: the "
                   "system's CAs)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           help="one of these (each takes --help):")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text)

    def durable(cmd: argparse.ArgumentParser) -> None:
        cmd.add_argument("--durable", action="store_true", help="answer only once committed to the database")

    def if_version(cmd: argparse.ArgumentParser, what: str) -> None:
        cmd.add_argument("--if-version", type=_natural, metavar="N",
                         help=f"{what} only if KEY is at version N (0: only if KEY is absent); "
                              "else exit 1 with 412 version_mismatch and the current_version")

    command("ping", "check that the server answers (unsigned: needs no keys file, nor a config with --url)")
    command("authorize", "check that the server accepts this key; prints its key id, role and prefix")
    s = command("save", "save KEY = VALUE (a string, or any JSON value with --json); prints the new version")
    s.add_argument("key", metavar="KEY", help="the key (any non-empty text)")
    s.add_argument("value", metavar="VALUE",
                   help="the value: text as given, '-' to read stdin, '@path' to read a file")
    s.add_argument("--json", action="store_true", help="parse VALUE as JSON (number, list, object, ...)")
    durable(s)
    s.add_argument("--ttl", type=_natural, metavar="S", help="KEY expires S seconds after the save")
    if_version(s, "save")
    g = command("get", "print the value of KEY as JSON (exit 1 with 404 not_found when it is absent)")
    g.add_argument("key", metavar="KEY", help="the key")
    d = command("delete", "delete KEY (exit 1 with 404 not_found when it is absent)")
    d.add_argument("key", metavar="KEY", help="the key")
    durable(d)
    if_version(d, "delete")
    i = command("incr", "add N to the integer at KEY (an absent KEY counts from 0); prints its new value and version")
    i.add_argument("key", metavar="KEY", help="the key")
    i.add_argument("--by", type=_signed, default=1, metavar="N", help="the integer to add, may be negative "
                                                                       "(default: %(default)s)")
    if_version(i, "add")
    durable(i)
    k = command("keys", "list keys in order, with their versions and expiry: one page, or every page with --all")
    k.add_argument("--prefix", metavar="P", help="only keys that start with P (default: all keys)")
    k.add_argument("--limit", type=_natural, metavar="N",
                   help="at most N keys a page (the server's default: 100)")
    k.add_argument("--values", action="store_true", help="include each key's value")
    k.add_argument("--all", action="store_true",
                   help="follow the cursors to the last page, printing each page's answer on its own line")
    b = command("batch", "apply the ops of FILE in order, all or nothing; prints the list of results")
    b.add_argument("file", metavar="FILE",
                   help='a JSON file holding {"ops": [...]} or a bare list of ops; \'-\' reads stdin')
    command("flush", "commit every pending write now (exercise 4); prints how many")
    command("stats", "print the server's counters (exercise 4)")
    return p


class _UsageError(Exception):
    """A problem with the command line's own input: exit 2 with this one line."""


class _StdoutClosed(Exception):
    """The reader of stdout went away (``... | head -c1``)."""


def _read_input(path: str | None) -> tuple[str, bytes]:
    """The bytes of a file, or of stdin when ``path`` is None, with the name a message gives them."""
    if path is None:
        return "stdin", sys.stdin.buffer.read()
    try:
        return path, Path(path).read_bytes()
    except OSError as exc:
        raise _UsageError(f"cannot read {path}: {exc.strerror or exc}") from None


def _text(what: str, where: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _UsageError(f"{what} from {where} is not UTF-8 text") from None


def _read_value(arg: str) -> str:
    """VALUE as given, or the text of stdin (``-``) or of a file (``@path``), exactly as read."""
    if arg == "-":
        where, data = _read_input(None)
    elif arg.startswith("@"):
        if arg == "@":
            raise _UsageError("'@' needs a file name: @path")
        where, data = _read_input(arg[1:])
    else:
        return arg
    return _text("VALUE", where, data)


def _read_ops(arg: str) -> list[Any]:
    """The ops of a batch FILE (``-``: stdin): ``{"ops": [...]}`` or a bare list. What each op holds is the
    server's to judge."""
    where, data = _read_input(None if arg == "-" else arg)
    try:
        doc = json.loads(_text("FILE", where, data))
    except ValueError as exc:
        raise _UsageError(f"FILE {where} is not JSON ({exc})") from None
    if isinstance(doc, dict) and set(doc) == {"ops"}:
        doc = doc["ops"]
    if not isinstance(doc, list):
        raise _UsageError(f'FILE {where} must hold {{"ops": [...]}} or a list of ops')
    return doc


def _server_url(host: str, port: int, scheme: str = "http") -> str:
    # A server bound to every interface is reached on loopback.
    host = host if host not in ("0.0.0.0", "::", "") else "127.0.0.1"  # noqa: S104
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def _stdout_to_devnull() -> None:
    """After a broken stdout pipe: the interpreter flushes stdout again at exit, so point it at devnull
    instead of letting that flush fail too (the recipe in Python's ``signal`` documentation)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _emit(out: Any) -> None:
    """One answer, one line, flushed at once (so ``keys --all`` shows each page as it arrives)."""
    try:
        print(json.dumps(out, ensure_ascii=False))
        sys.stdout.flush()
    except BrokenPipeError:
        raise _StdoutClosed from None


def _answers(client: KVClient, args: argparse.Namespace, value: Any) -> Iterator[Any]:
    """What the command prints: one answer, or one a page for ``keys --all``."""
    if args.command == "save":
        yield client.save(args.key, value, durable=args.durable, ttl=args.ttl, if_version=args.if_version)
    elif args.command == "get":
        yield client.get(args.key)
    elif args.command == "delete":
        yield client.delete(args.key, durable=args.durable, if_version=args.if_version)
    elif args.command == "incr":
        yield client.incr(args.key, args.by, durable=args.durable, if_version=args.if_version)
    elif args.command == "batch":
        yield client.batch(value)
    elif args.command == "keys":
        cursor: str | None = None
        while True:
            page = client.keys(args.prefix, args.limit, cursor, args.values)
            yield page
            cursor = _next_cursor(cursor, page) if args.all else None
            if cursor is None:
                return
    else:
        yield getattr(client, args.command)()


def cli(argv: list[str] | None = None, *, prog: str = "python -m kvtornado.client",
        default_config: Path | None = None) -> int:
    """The command line; returns the exit status. ``kvtornado client`` (``kvtornado.cli``) passes its own name
    and its ``--config`` default (config.yaml in the working directory)."""
    from kvtornado.auth import load_keys
    from kvtornado.config import load_config
    from kvtornado.errors import ConfigError

    args = _parser(prog, default_config).parse_args(argv)
    signer: Signer | None = None
    try:
        value: Any = None
        if args.command == "save":
            value = _read_value(args.value)
            if args.json:
                try:
                    value = json.loads(value)
                except ValueError as exc:
                    raise _UsageError(f"VALUE is not JSON ({exc})") from None
        elif args.command == "batch":
            value = _read_ops(args.file)
        url: str | None = args.url
        if args.command != "ping" or url is None:  # ping is unsigned: it needs no keys file
            cfg = load_config(args.config)
            url = url or _server_url(cfg.server.host, cfg.server.port,
                                     "https" if cfg.server.tls_cert is not None else "http")
            if args.command != "ping":
                keys = load_keys(cfg.auth.secret_file, create=False).secrets
                key_id = args.key_id or next(iter(keys), None)
                if key_id not in keys:
                    raise _UsageError(f"key id {key_id!r} is not in {cfg.auth.secret_file}")
                signer = Signer(key_id, keys[key_id])
        client = KVClient(url, signer, cafile=args.cafile)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except (_UsageError, ValueError) as exc:  # ValueError: a --url that is not one
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    try:
        with client:
            for out in _answers(client, args, value):
                _emit(out)
    except _StdoutClosed:  # the reader went away: stop quietly
        _stdout_to_devnull()
        return EXIT_FAILED
    except KVClientError as exc:
        # The server's own answer, as it sent it: status, then its JSON error body (current_version, index...).
        print(f"error: {exc.status} {json.dumps(exc.doc, ensure_ascii=False)}", file=sys.stderr)
        return EXIT_FAILED
    except (KVConnectionError, KVProtocolError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (OSError, http.client.HTTPException) as exc:
        reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or type(exc).__name__
        print(f"error: request to {client.base_url} failed: {reason}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(cli())
