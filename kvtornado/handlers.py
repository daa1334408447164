"""HTTP handlers. ``BaseHandler`` authenticates, reads the body under its limit and renders every error.

Handlers implement ``do_<method>`` and raise ``KVError``s; they never format an error. There is one path
for every request (``serve``) and one into the renderer: whatever is raised, in ``prepare``, ``serve`` or a
``do_<method>``, reaches ``write_error`` through Tornado's own exception handling, which renders it as
``{"error": code, "message": ...}`` with the status and headers its ``errors.py`` class carries. Every
handler streams its body (``stream_request_body``) so an oversized request is refused with a JSON 413
before it is read, instead of Tornado's bare 400.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from tornado.web import Finish, HTTPError, RequestHandler, stream_request_body

from kvtornado import codec
from kvtornado.auth import Authenticator
from kvtornado.config import Config
from kvtornado.errors import (
    AuthError,
    BadRequest,
    KVError,
    MethodNotAllowed,
    MissingKey,
    NotFound,
    Overloaded,
    StorageError,
    TooLarge,
    for_status,
)
from kvtornado.ops import DELETE, GET, INCR, MAX_SAFE, Op, Outcome, Record
from kvtornado.policy import ADMIN, ADMIN_GRANT, READ, WRITE, Grant, ScopedKV

if TYPE_CHECKING:
    from kvtornado.metrics import Metrics  # prometheus-client is imported only with metrics.port

log = logging.getLogger("kvtornado.handlers")

JSON_CONTENT_TYPE = "application/json; charset=UTF-8"
CONTENT_TYPE = "Content-Type"
CONTENT_LENGTH = "Content-Length"
TRANSFER_ENCODING = "Transfer-Encoding"
AUTHORIZATION = "Authorization"
HOST = "Host"
CONNECTION = "Connection"
REQUEST_ID = "X-Request-Id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
# Every JSON answer carries these (header names are case-insensitive: Tornado normalises them).
_JSON_HEADERS = ((CONTENT_TYPE, JSON_CONTENT_TYPE), ("Cache-Control", "no-store"))
_CONDITION_HEADERS = ("If-Match", "If-None-Match")
_DISCARD_ANY = 1 << 62  # a body size limit no body reaches: Tornado reads and drops what is on the wire


class KeyValue(Protocol):
    """What the data handlers need; ``SqliteStore`` (write-through) and ``WriteBehindCache`` both provide it."""

    async def get_record(self, key: str) -> Record | None: ...
    async def put(self, key: str, value: str, *, durable: bool = False, ttl: int | None = None,
                  if_version: int | None = None) -> int: ...
    async def apply(self, ops: Sequence[Op], *, durable: bool = False, batch: bool = False) -> list[Outcome]: ...
    async def list_keys(self, prefix: str, after: str | None, limit: int) -> list[tuple[str, Record]]: ...
    async def sweep(self) -> int: ...
    async def flush(self) -> int: ...
    async def readiness(self) -> str | None: ...
    def stats(self) -> dict[str, Any]: ...


class Admission:
    """Whether new requests are served, and how many are being served: what a graceful stop needs.

    The server owns one and hands it to ``make_app``; once it calls ``stop()``, every request not yet
    being served is answered 503, and ``idle()`` returns when those already being served are done.
    """

    def __init__(self) -> None:
        self.stopping = False
        self.in_flight = 0
        self._idle: asyncio.Event | None = None

    def enter(self) -> None:
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    def stop(self) -> None:
        self.stopping = True

    async def idle(self) -> None:
        """Return once no request is being served."""
        if self.in_flight == 0:
            return
        self._idle = asyncio.Event()
        await self._idle.wait()


@dataclass
class Service:
    """Collaborators and counters shared by every handler of one application."""

    config: Config
    authenticator: Authenticator | None = None
    kv: KeyValue | None = None
    admission: Admission = field(default_factory=Admission)
    rejected: dict[str, int] = field(default_factory=lambda: {"overloaded": 0})
    metrics: Metrics | None = None  # with metrics.port (SPEC §11)


def json_bytes(obj: Any) -> bytes:
    return codec.compact_json(obj).encode("utf-8")


def _framing_error(content_length: str | None, transfer_encoding: str | None, version: str = "HTTP/1.1") -> str | None:
    """Why the body's framing is unusable (the cases Tornado refuses with a bare 400), or None."""
    if transfer_encoding is not None:
        if version == "HTTP/1.0":
            # RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing (1.0 has no chunking,
            # so an intermediary may frame it differently): refused, and the connection closed.
            return "Transfer-Encoding is not allowed in an HTTP/1.0 request."
        if content_length is not None:
            return "A request must not have both Content-Length and Transfer-Encoding."
        if transfer_encoding.strip().lower() != "chunked":
            return "The only supported Transfer-Encoding is chunked."
        return None
    if content_length is None:
        return None
    pieces = {p.strip() for p in content_length.split(",")}
    value = pieces.pop()
    if pieces or not value.isascii() or not value.isdigit():
        return "Content-Length must be one non-negative integer."
    return None


@stream_request_body
class BaseHandler(RequestHandler):
    """Auth, body limits, one JSON error shape. Subclasses define ``do_get``/``do_post``/..."""

    auth_required = True
    # SPEC §4 "Scoped keys": the least role that may call this route. A new route is admin-only until it says.
    role = ADMIN
    query_params: frozenset[str] = frozenset()  # SPEC §5: each route takes only its own query parameters
    body_methods: frozenset[str] = frozenset()  # the methods whose body this route reads; others take none

    def initialize(self, svc: Service) -> None:
        self.svc = svc
        # SPEC §11: every answer carries X-Request-Id, the client's own when it is a sane token
        given = self.request.headers.get(REQUEST_ID, "")
        self.request_id = given if _REQUEST_ID.fullmatch(given) else secrets.token_hex(8)
        self.set_header(REQUEST_ID, self.request_id)
        self.key_id: str | None = None
        self.grant: Grant = ADMIN_GRANT
        self._kv: KeyValue | None = svc.kv
        self.fields: dict[str, str] = {}  # the query's parameters, checked against ``query_params``
        self._chunks: list[bytes] = []
        self._body_bytes = 0
        self._refused = False
        self._counted = False

    # -- request life cycle ---------------------------------------------------------------------

    def prepare(self) -> None:
        self.svc.admission.enter()
        self._counted = True
        stream = getattr(self.request.connection, "stream", None)
        if stream is not None and stream.closed():
            # Tornado's IOStream still hands out bytes it had buffered before the connection was closed, so a
            # request pipelined behind a refused one (a framing error, an unread body) reaches us here. The
            # client was told the connection is closed: nothing it sent after that is ever processed.
            self._refused = True
            self.set_status(400)
            raise Finish()
        headers = self.request.headers
        limit = self.svc.config.server.max_body_bytes
        announced = headers.get(CONTENT_LENGTH)
        framing = _framing_error(announced, headers.get(TRANSFER_ENCODING), self.request.version)
        if framing is not None:
            # Tornado would answer these with a bare 400 after us; with the framing headers gone it reads
            # no body and closes the connection once our JSON answer is written.
            for name in (CONTENT_LENGTH, TRANSFER_ENCODING):
                if name in headers:
                    del headers[name]
            self._refused = True
            raise BadRequest(framing)
        if not (self.request.uri or "").isascii():
            # RFC 3986 allows only ASCII in a request target. Tornado reads the request line as Latin-1, so raw
            # UTF-8 bytes would name a key no client could sign (it signs the bytes it sent) and differ from
            # the same bytes percent-encoded: refused before anything else reads the request.
            self._stop_reading()
            raise BadRequest("The request target must be ASCII: percent-encode every other byte (RFC 3986).")
        if announced is not None:
            size = int(announced.split(",")[0])
            if size > limit:
                self._stop_reading(size)
                raise TooLarge(f"The body is {size} bytes; the limit is {limit}.")

    def _stop_reading(self, announced: int = 0) -> None:
        """The body will not be read: the answer goes out now and the connection closes once it is sent."""
        self._refused = True
        self._chunks = []
        # Let Tornado discard what is on the wire instead of answering a bare 400 over our 413;
        # the connection closes as soon as our response is written, so it is not read in full.
        self.request.connection.set_max_body_size(max(announced, _DISCARD_ANY))  # type: ignore[union-attr]

    def data_received(self, chunk: bytes) -> None:
        if self._refused:
            return
        self._body_bytes += len(chunk)
        limit = self.svc.config.server.max_body_bytes
        if self._body_bytes > limit:
            # A chunked body has no Content-Length: it is refused as soon as it passes the limit. Tornado does
            # not route an exception from data_received to write_error, so the answer is sent from here.
            self._stop_reading()
            exc = TooLarge(f"The body is over the limit of {limit} bytes.")
            self.send_error(exc.status, exc_info=(type(exc), exc, None))
            return
        self._chunks.append(chunk)

    def on_finish(self) -> None:
        if self._counted:
            self._counted = False
            self.svc.admission.leave()

    def on_connection_close(self) -> None:
        super().on_connection_close()
        self.on_finish()

    @property
    def body(self) -> bytes:
        if len(self._chunks) != 1:
            self._chunks = [b"".join(self._chunks)]
        return self._chunks[0]

    async def serve(self) -> None:
        """The one path of every request, whatever its method: refused while stopping, authenticated, then
        the route's ``do_<method>`` with its query parameters checked. Raise to answer an error."""
        if self.svc.admission.stopping:
            raise Overloaded("The server is shutting down.")
        if self.auth_required:
            self.key_id = await self._authenticate()
        try:
            impl: Callable[[], Awaitable[None]] | None = getattr(self, "do_" + self.request.method.lower(), None)
            if impl is None:
                raise self.method_not_allowed()
            if self.auth_required:
                self._apply_grant()
            if self.body and self.request.method not in self.body_methods:
                # A body nobody reads is a second, unchecked reading of the request: refused, not ignored.
                raise BadRequest(f"{self.request.method} {self.request.path} takes no body.")
            self._check_conditions()
            self.fields = codec.query_fields(self.request.query, self.query_params)
            await impl()
            # impl wrote its answer; it leaves (Tornado's finish) only once the nonce is claimed.
            await self._settle_nonce()
        except Exception as exc:
            # A replayed nonce (found with the data, or claimed now) is the answer, before any other error.
            refusal = exc if isinstance(exc, AuthError) else await self._replay_refusal()
            if refusal is None:
                raise
            if self.svc.metrics is not None:
                self.svc.metrics.auth_refused(refusal.code)
            if refusal is exc:
                raise
            raise refusal from None

    async def _settle_nonce(self) -> None:
        """SPEC §10: the nonce ``_authenticate`` deferred, claimed now unless the data's first step in Redis
        claimed it already (same round trip); without shared nonces there is none."""
        authenticator = self.svc.authenticator
        if authenticator is not None and authenticator.shared_nonces is not None:
            await authenticator.settle()

    async def _replay_refusal(self) -> AuthError | None:
        try:
            await self._settle_nonce()
        except AuthError as refused:
            return refused
        except Exception:  # noqa: S110 - Redis trouble: the error being answered already says so
            pass
        return None

    async def _any_method(self, *args: str) -> None:
        await self.serve()  # looked up on the instance: a subclass's serve() is the one that runs

    # Tornado calls the method named after the request's. All of them are the same call, bound once here: a
    # route changes what it does with ``do_<method>`` (or ``serve``), never by rebinding these.
    get = post = put = delete = patch = options = head = _any_method

    def _apply_grant(self) -> None:
        """SPEC §4's order: after authentication and 405, the role (403) before the request is validated; the
        prefix is checked later, on every key the request names, by the ``ScopedKV`` the data goes through."""
        assert self.svc.authenticator is not None and self.key_id is not None
        self.grant = grant = self.svc.authenticator.grant(self.key_id)
        grant.check_role(self.role_needed(grant), f"call {self.request.method} {self.request.path}")
        if grant.prefix is not None and self._kv is not None:
            self._kv = ScopedKV(self._kv, grant)

    def role_needed(self, grant: Grant) -> str:
        """The role this request needs (a route whose requests differ overrides it: ``/batch``)."""
        return self.role

    def method_not_allowed(self) -> KVError:
        return MethodNotAllowed(f"{self.request.method} is not allowed on {self.request.path}.",
                                allow=self.allowed_methods())

    def allowed_methods(self) -> list[str]:
        """The methods this route serves (its ``do_<method>``s), for the 405's ``Allow`` header."""
        return [m for m in self.SUPPORTED_METHODS if callable(getattr(self, "do_" + m.lower(), None))]

    def _check_conditions(self) -> None:
        # The signature covers the query, not the headers: a condition header could be stripped in transit and
        # the write applied unconditionally, so conditions are only ever taken from the signed query.
        for name in _CONDITION_HEADERS:
            if name in self.request.headers:
                raise BadRequest(f"{name} is not supported: the signature does not cover headers; "
                                 "put the condition in the query as ?if_version=N.")

    async def _authenticate(self) -> str:
        assert self.svc.authenticator is not None
        req = self.request
        # SPEC §4: path and query exactly as on the request line, still percent-encoded.
        path, _, query = req.uri.partition("?") if req.uri else ("", "", "")
        try:
            return await self.svc.authenticator.authenticate(
                authorization=req.headers.get(AUTHORIZATION),
                method=req.method or "",
                host=req.headers.get(HOST, ""),
                path=path,
                query=query,
                body=self.body,
                defer=True,  # claimed by serve(): with the data in Redis, in the same round trip
            )
        except AuthError as exc:
            if self.svc.metrics is not None:
                self.svc.metrics.auth_refused(exc.code)
            raise
        except OSError as exc:  # the nonce journal could not be written: the request is not served
            log.warning("cannot record a nonce in the journal: %s", exc.strerror or exc)
            raise Overloaded("The server cannot record this request's nonce right now; retry shortly.") from None

    # -- responses -------------------------------------------------------------------------------

    def compute_etag(self) -> None:
        # Answers are no-store data: no ETag, so no conditional 304 either (and no SHA-1 of every body).
        return None

    def clear(self) -> None:
        super().clear()  # an error answer starts from clear headers: the request id stays
        request_id = getattr(self, "request_id", None)
        if request_id is not None:
            self.set_header(REQUEST_ID, request_id)

    def send_json(self, payload: bytes, status: int = 200) -> None:
        """The answer, written but not sent: Tornado finishes it once ``serve`` returns (after the nonce is
        claimed); an error raised before then replaces it whole."""
        self.set_status(status)
        self._set_json_headers()
        self.write(payload)

    def _set_json_headers(self) -> None:
        for name, value in _JSON_HEADERS:
            self.set_header(name, value)

    def log_exception(
        self, typ: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        if isinstance(value, KVError):
            return  # an answer to the client, not a failure of the server
        if isinstance(value, HTTPError) and value.status_code < 500:
            return  # Tornado's refusal of what a client sent (a 405 for TRACE, ...): the access line says it
        extra = {"request_id": getattr(self, "request_id", None)}
        if isinstance(value, StorageError):
            log.warning("storage error on %s %s: %s", self.request.method, self.request.path, value, extra=extra)
            return
        # Tornado's own line would print the whole request, query (keys) included: the path only, as elsewhere.
        log.error("uncaught exception on %s %s", self.request.method, self.request.path, extra=extra,
                  exc_info=(typ, value, tb) if typ is not None and value is not None else None)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Render what was raised: a ``KVError`` as itself, sqlite trouble as 503, Tornado's own ``HTTPError``s
        (405 for a method it does not know, ...) as the ``errors.py`` class of their status, anything else
        as a 500 that says nothing about its cause."""
        raised = kwargs.get("exc_info", (None, None, None))[1]
        exc = self._as_kv_error(raised, status_code)
        if isinstance(exc, Overloaded):
            self.svc.rejected["overloaded"] += 1
        self.set_status(exc.status)
        for name, value in exc.headers.items():
            self.set_header(name, value)
        if self._refused:  # the body was not read: the connection closes after this answer
            self.set_header(CONNECTION, "close")
        self._set_json_headers()
        self.finish(json_bytes({"error": exc.code, "message": exc.message, **exc.extra}))

    def _as_kv_error(self, raised: BaseException | None, status_code: int) -> KVError:
        if isinstance(raised, KVError):
            return raised
        if isinstance(raised, StorageError):
            return Overloaded("The storage is not available right now; retry shortly.")
        if isinstance(raised, HTTPError):
            status_code = raised.status_code
        # A bug is Tornado's send_error(500): a KVError 500 that says nothing about its cause.
        if status_code == 405:  # Tornado's answer to a method outside SUPPORTED_METHODS (PROPFIND, ...)
            return self.method_not_allowed()
        return for_status(status_code)

    # -- helpers for subclasses ------------------------------------------------------------------

    @property
    def kv(self) -> KeyValue:
        """The data, as this key id may see it: through a ``ScopedKV`` when it has a prefix."""
        assert self._kv is not None
        return self._kv

    def durable(self) -> bool:
        flag = self.fields.get("durable")
        # An empty ?durable= (or a bare ?durable) is refused, not read as "no": whoever wrote it meant something.
        if flag is None or flag in ("0", "false"):
            return False
        if flag in ("1", "true"):
            return True
        raise BadRequest("durable must be 1, 0, true or false.")

    def if_version(self) -> int | None:
        return codec.query_int(self.fields, "if_version", 0, MAX_SAFE)

    @property
    def max_key_bytes(self) -> int:
        return self.svc.config.limits.max_key_bytes


class PingHandler(BaseHandler):
    auth_required = False
    _PONG = json_bytes({"ping": "pong"})

    async def do_get(self) -> None:
        self.send_json(self._PONG)

    do_head = do_get  # Tornado sends the headers of a HEAD answer and never its body


class HealthHandler(BaseHandler):
    """SPEC §11: the process serves (no auth, no store)."""

    auth_required = False
    _OK = json_bytes({"status": "ok"})

    async def do_get(self) -> None:
        self.send_json(self._OK)

    do_head = do_get


class ReadyHandler(BaseHandler):
    """SPEC §11: ready when the store (and Redis) answer and the server neither stops nor refuses writes (G9).
    Answered while stopping too: that is when a load balancer most needs to hear it."""

    auth_required = False

    async def serve(self) -> None:
        if self.svc.admission.stopping:  # every other route answers 503 overloaded then; this one says why
            self._unavailable("The server is stopping.")
            return
        await super().serve()

    async def do_get(self) -> None:
        reason = None if self.svc.kv is None else await self.svc.kv.readiness()
        if reason is None:
            self.send_json(self._READY)
        else:
            self._unavailable(reason)

    do_head = do_get
    _READY = json_bytes({"status": "ready"})

    def _unavailable(self, reason: str) -> None:
        self.send_json(json_bytes({"status": "unavailable", "reason": reason}), status=503)


class NotFoundHandler(BaseHandler):
    auth_required = False

    async def serve(self) -> None:
        raise self.method_not_allowed()

    def method_not_allowed(self) -> KVError:
        return NotFound(f"There is no endpoint at {self.request.path}.")  # whatever the method


class AuthorizeHandler(BaseHandler):
    role = READ
    body_methods = frozenset({"GET", "POST"})  # any body: it is signed, and that is what /authorize checks

    async def do_get(self) -> None:
        self.send_json(json_bytes({"authorized": True, "key_id": self.key_id, **self.grant.describe()}))

    do_post = do_get


def _expires(record: Record) -> str:
    return "null" if record.expires_at is None else codec.compact_json(record.expires_at)


def _key(key: str) -> str:
    return codec.compact_json(key)


def render_outcome(outcome: Outcome) -> str:
    """One batch result as JSON text (SPEC §5); stored values are spliced in as the JSON text they are."""
    op, record = outcome.op, outcome.record
    key = _key(op.key)
    if op.kind == GET:
        if record is None:
            return '{"key":' + key + ',"found":false}'
        return ('{"key":' + key + ',"found":true,"value":' + str(record.value) + ',"version":'
                + str(record.version) + ',"expires_at":' + _expires(record) + "}")
    if record is None:  # only a delete that found nothing has no record
        return '{"key":' + key + ',"deleted":false}'
    version = str(record.version)
    if op.kind == DELETE:
        return '{"key":' + key + ',"deleted":true,"version":' + version + "}"
    if op.kind == INCR:
        return '{"key":' + key + ',"value":' + str(record.value) + ',"version":' + version + "}"
    return '{"key":' + key + ',"version":' + version + "}"


class SaveHandler(BaseHandler):
    role = WRITE
    query_params = frozenset({"durable", "ttl", "if_version"})
    body_methods = frozenset({"POST"})

    async def do_post(self) -> None:
        limits = self.svc.config.limits
        durable = self.durable()
        ttl = codec.query_int(self.fields, "ttl", 1, limits.max_ttl_s)
        if_version = self.if_version()
        key, value = codec.parse_save(
            self.request.headers.get(CONTENT_TYPE), self.body,
            max_key_bytes=limits.max_key_bytes, max_value_bytes=limits.max_value_bytes,
        )
        version = await self.kv.put(key, value, durable=durable, ttl=ttl, if_version=if_version)
        self.send_json(('{"key":' + _key(key) + ',"saved":true,"version":' + str(version) + "}").encode("utf-8"))


class GetHandler(BaseHandler):
    role = READ
    query_params = frozenset({"key"})

    async def do_get(self) -> None:
        key = codec.key_from_query(self.fields, max_key_bytes=self.max_key_bytes)
        record = await self.kv.get_record(key)
        if record is None:
            raise NotFound()  # its message: "No such key."
        # Set by hand (compute_etag gives none): the version names the value, so it is the entity tag.
        self.set_header("ETag", f'"{record.version}"')
        # The stored value is already compact JSON text: splice it in instead of decoding it again.
        self.send_json(('{"key":' + _key(key) + ',"value":' + str(record.value) + ',"version":'
                        + str(record.version) + ',"expires_at":' + _expires(record) + "}").encode("utf-8"))


class DeleteHandler(BaseHandler):
    role = WRITE
    query_params = frozenset({"key", "durable", "if_version"})
    body_methods = frozenset({"POST"})  # DELETE names its key in the query only

    async def _remove(self, key: str, durable: bool) -> None:
        if_version = self.if_version()
        outcomes = await self.kv.apply([Op(DELETE, key, if_version=if_version)], durable=durable)
        self.send_json(json_bytes({"key": key, "deleted": True,
                                   "version": outcomes[0].record.version}))  # type: ignore[union-attr]

    async def do_delete(self) -> None:
        key = codec.key_from_query(self.fields, max_key_bytes=self.max_key_bytes)
        await self._remove(key, self.durable())

    async def do_post(self) -> None:
        fields = self.fields
        max_key = self.max_key_bytes
        durable = self.durable()
        if not self.body and "key" not in fields:
            raise MissingKey("Send the key as {\"key\": ...} in the body or as ?key=...")
        if self.body:
            if "key" in fields:
                raise BadRequest("Name the key once: in the body or in the query, not both.")
            key = codec.parse_key_body(self.request.headers.get(CONTENT_TYPE), self.body, max_key_bytes=max_key)
        else:
            key = codec.key_from_query(fields, max_key_bytes=max_key)
        await self._remove(key, durable)


class IncrHandler(BaseHandler):
    role = WRITE
    query_params = frozenset({"durable", "if_version"})
    body_methods = frozenset({"POST"})

    async def do_post(self) -> None:
        key, by = codec.parse_incr(self.request.headers.get(CONTENT_TYPE), self.body,
                                   max_key_bytes=self.max_key_bytes)
        durable = self.durable()
        op = Op(INCR, key, by=by, if_version=self.if_version())
        outcomes = await self.kv.apply([op], durable=durable)
        self.send_json(render_outcome(outcomes[0]).encode("utf-8"))


class BatchHandler(BaseHandler):
    role = READ  # a batch of gets only; any other op needs write (role_needed)
    query_params = frozenset({"durable"})
    body_methods = frozenset({"POST"})

    def role_needed(self, grant: Grant) -> str:
        # Only a read key needs to look: SPEC §4 refuses its batch holding any op other than get with 403,
        # whatever else is wrong with it, so this reads the ops before the body is validated.
        if grant.may(WRITE) or codec.only_get_ops(self.body):
            return READ
        return WRITE

    async def do_post(self) -> None:
        limits = self.svc.config.limits
        durable = self.durable()
        ops = codec.parse_batch(self.request.headers.get(CONTENT_TYPE), self.body, max_ops=limits.max_batch_ops,
                                max_key_bytes=limits.max_key_bytes, max_value_bytes=limits.max_value_bytes,
                                max_ttl_s=limits.max_ttl_s)
        outcomes = await self.kv.apply(ops, durable=durable, batch=True)
        self.send_json(('{"results":[' + ",".join(map(render_outcome, outcomes)) + "]}").encode("utf-8"))


MAX_LIST_LIMIT = 1000
DEFAULT_LIST_LIMIT = 100


class KeysHandler(BaseHandler):
    role = READ
    query_params = frozenset({"prefix", "limit", "cursor", "values"})

    async def do_get(self) -> None:
        fields = self.fields
        # A prefixed key id lists under its prefix when it names none; its cursors belong to that prefix.
        prefix = self.grant.list_prefix(fields.get("prefix", ""))
        limit = codec.query_int(fields, "limit", 1, MAX_LIST_LIMIT) or DEFAULT_LIST_LIMIT
        values = fields.get("values", "0")
        if values not in ("0", "1"):
            raise BadRequest("values must be 0 or 1.")
        cursor = fields.get("cursor")
        after = None if cursor is None else codec.decode_cursor(cursor, prefix)
        rows = await self.kv.list_keys(prefix, after, limit + 1)  # one more: is there a next page?
        page = rows[:limit]
        items = []
        for key, record in page:
            item = '{"key":' + _key(key) + ',"version":' + str(record.version) + ',"expires_at":' + _expires(record)
            items.append(item + (',"value":' + str(record.value) + "}" if values == "1" else "}"))
        next_cursor = codec.compact_json(codec.encode_cursor(prefix, page[-1][0])) if len(rows) > limit else "null"
        self.send_json(('{"keys":[' + ",".join(items) + '],"cursor":' + next_cursor + "}").encode("utf-8"))


class FlushHandler(BaseHandler):
    role = ADMIN
    async def do_post(self) -> None:
        flushed = await self.kv.flush()
        self.send_json(json_bytes({"flushed": flushed}))


class StatsHandler(BaseHandler):
    role = ADMIN
    async def do_get(self) -> None:
        stats = dict(self.kv.stats())
        stats["rejected"] = dict(self.svc.rejected)
        self.send_json(json_bytes(stats))
