"""Running an exercise as a process: arguments, logging, start-up refusals, serving, graceful stop."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from tornado import gen
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, StreamClosedError
from tornado.netutil import bind_sockets
from tornado.web import Application

from kvtornado import logs
from kvtornado.app import make_app
from kvtornado.auth import Authenticator, NonceJournal, load_keys
from kvtornado.cache import SWEEP_INTERVAL_S, WriteBehindCache
from kvtornado.config import Config, ServerConfig, load_config, redact_url
from kvtornado.errors import ConfigError, StorageError
from kvtornado.handlers import JSON_CONTENT_TYPE, Admission, KeyValue, json_bytes
from kvtornado.store import SqliteStore, WriteThrough, open_store

if TYPE_CHECKING:
    from kvtornado.metrics import MetricsServer
    from kvtornado.pgstore import PostgresStore
    from kvtornado.rediscache import RedisCache

log = logging.getLogger("kvtornado.server")

# Tornado refuses a body past its own limit with a bare 400; ours answers 413 in JSON first and then
# closes the connection, so Tornado's limit must never be the one that triggers.
_TORNADO_MAX_BODY = 1 << 62
DRAIN_TIMEOUT_S = 5.0
# A connection refused past server.max_connections: its request is read and dropped for at most this long
# after the 503, so closing it does not reset the connection before the client has read the answer.
REFUSED_LINGER_S = 2.0
EXIT_UNFLUSHED = 1  # G7: a stop that could not flush everything in time
# The sqlite writer thread does Python work too (binding rows, planning a flush). With CPython's default
# 5 ms switch interval the event loop can wait that long for the GIL on every wake-up during a flush;
# 1 ms keeps request latency and loop lag low at a small cost in thread switches.
GIL_SWITCH_INTERVAL_S = 0.001


def _overloaded_answer() -> bytes:
    body = json_bytes({"error": "overloaded", "message": "The server has too many open connections; retry shortly."})
    head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: " + JSON_CONTENT_TYPE + "\r\n"
            "Cache-Control: no-store\r\nRetry-After: 1\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode("ascii") + body


class KVHTTPServer(HTTPServer):
    """Tornado's HTTP server with a cap on open connections (``server.max_connections``)."""

    _OVERLOADED = _overloaded_answer()

    def initialize(self, *args: Any, max_connections: int, **kwargs: Any) -> None:  # type: ignore[override]
        super().initialize(*args, **kwargs)
        self.max_connections = max_connections
        self.open_connections = 0

    def handle_stream(self, stream: IOStream, address: tuple[Any, ...]) -> None:
        if self.open_connections >= self.max_connections:
            IOLoop.current().spawn_callback(self._refuse, stream)
            return
        self.open_connections += 1
        super().handle_stream(stream, address)

    def on_close(self, server_conn: object) -> None:
        self.open_connections -= 1
        super().on_close(server_conn)

    async def _refuse(self, stream: IOStream) -> None:
        """Answer 503 without parsing anything, stop sending, and drop what the client sends for a moment."""
        try:
            await stream.write(self._OVERLOADED)
            stream.socket.shutdown(socket.SHUT_WR)
            deadline = IOLoop.current().time() + REFUSED_LINGER_S
            while True:
                await gen.with_timeout(deadline, stream.read_bytes(65536, partial=True),
                                       quiet_exceptions=StreamClosedError)
        except (StreamClosedError, OSError, TimeoutError):
            pass
        finally:
            stream.close()


def tls_context(server: ServerConfig) -> ssl.SSLContext | None:
    """SPEC §11: with ``server.tls_cert`` and ``server.tls_key``, HTTPS only (TLS 1.2 or later); a file that
    cannot be read or does not hold a certificate and its key stops start-up with one line."""
    if server.tls_cert is None or server.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(server.tls_cert, server.tls_key)
    except (OSError, ssl.SSLError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc.args[-1] if exc.args else exc)
        raise ConfigError(f"server.tls_cert/server.tls_key: cannot load {server.tls_cert} and {server.tls_key} "
                          f"({why})") from None
    return context


def build_http_server(app: Application, server: ServerConfig | None = None) -> KVHTTPServer:
    """The HTTP server every exercise (and the test suite) uses, with our body, time and connection limits,
    HTTPS when the config names a certificate."""
    server = server or ServerConfig()
    return KVHTTPServer(
        app, max_body_size=_TORNADO_MAX_BODY, idle_connection_timeout=float(server.idle_timeout_s),
        body_timeout=float(server.body_timeout_s), max_connections=server.max_connections,
        ssl_options=tls_context(server),
    )


def nonce_journal_path(cfg: Config, exercise: int) -> Path:
    """Beside the database for exercises 3 and 4 (``kv.sqlite3.nonces``: one server a database, one journal a
    server); exercise 2 has no database, so beside its keys file (``kv.keys.nonces``)."""
    beside = cfg.storage.path if exercise >= 3 else cfg.auth.secret_file
    return beside.with_name(beside.name + ".nonces")


def parse_args(argv: list[str], *, exercise: int, default_config: Path, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog or f"exercise{exercise}.py", description=f"kvtornado, exercise {exercise}")
    p.add_argument("--config", type=Path, default=default_config, help="config file (default: %(default)s)")
    p.add_argument("--host", help="address to listen on (overrides server.host)")
    p.add_argument("--port", type=int, help="port to listen on, 0 for any free port (overrides server.port)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--log-format", default="text", choices=logs.FORMATS,
                   help="text, or json: one object a line (time, level, logger, message, request_id)")
    return p.parse_args(argv)


def _with_overrides(cfg: Config, host: str | None, port: int | None) -> Config:
    from dataclasses import replace

    server = cfg.server
    if host is not None:
        server = replace(server, host=host)
    if port is not None:
        if not 0 <= port <= 65535:
            raise ConfigError(f"--port must be an integer between 0 and 65535, got {port}")
        if port == cfg.metrics.port:  # as config.py refuses server.port equal to it
            raise ConfigError(f"--port must differ from metrics.port (the metrics have no auth and never share "
                              f"the API's port), got {port}")
        server = replace(server, port=port)
    return replace(cfg, server=server)


def main(argv: list[str], *, exercise: int, default_config: Path, prog: str | None = None) -> int:
    """Run one exercise until SIGINT/SIGTERM; returns the process exit status (``prog``: the name in usage)."""
    args = parse_args(argv, exercise=exercise, default_config=default_config, prog=prog)
    logs.setup(args.log_level, args.log_format)
    try:
        cfg = _with_overrides(load_config(args.config), args.host, args.port)
        tls_context(cfg.server)  # a certificate that cannot be loaded is refused before anything is opened
        authenticator = None
        journal = None
        if exercise >= 2:
            keys = load_keys(cfg.auth.secret_file)
            if not (exercise >= 4 and cfg.cache.backend == "redis"):  # there the nonces are in Redis (§10)
                journal = NonceJournal(nonce_journal_path(cfg, exercise))  # opened by _serve, once the store is
            authenticator = Authenticator(
                keys.secrets, grants=keys.grants, max_skew_s=cfg.auth.max_skew_s, max_nonces=cfg.auth.max_nonces,
                public_host=cfg.auth.public_host, journal=journal,
            )
    except ConfigError as exc:
        # SPEC §3: the refusal is the one line itself, starting with the file it is about.
        logs.refuse(str(exc))
        return 2
    served = False
    refused = False  # start-up failed: nothing was served
    try:
        if exercise >= 4 and cfg.server.processes != 1:  # several workers on the Redis cache (SPEC §10)
            from kvtornado.workers import supervise

            status = supervise(cfg, lambda sockets: _serve(cfg, exercise, authenticator, sockets=sockets,
                                                           lock=False))
        else:
            status = asyncio.run(_serve(cfg, exercise, authenticator))
        served = True
    except (ConfigError, StorageError) as exc:
        refused = True
        logs.refuse(str(exc))
        return 2
    except OSError as exc:  # e.g. the port is taken
        refused = True
        logs.refuse(f"cannot listen on {cfg.server.host}:{cfg.server.port} ({exc.strerror})")
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the loop took over SIGINT: nothing was served, nothing to flush
        refused = True
        log.info("interrupted during start-up")
        return 0
    finally:
        if journal is not None and authenticator is not None:
            # A graceful stop keeps every nonce still in the window; so does a start that served nothing after a
            # clean stop (what it restored is all there is). Any other end leaves the journal unclean.
            keep = served or (refused and journal.was_clean is True)
            try:
                journal.close(authenticator.nonces.entries() if keep else None)
            except OSError as exc:  # the next start then takes it as unclean: refusing, never replaying
                log.error("cannot save the nonces to %s (%s)", journal.path, exc.strerror)
    if status == EXIT_UNFLUSHED:
        _leave_now(status)
    return status


def _leave_now(status: int) -> NoReturn:  # pragma: no cover - the process ends in here, before coverage saves
    """Exit at once, without joining threads. The writer thread may still be inside sqlite's busy wait (up to
    5 s), and the interpreter would join it at exit, running past shutdown_timeout_s. Nothing more can be
    committed; sqlite's WAL rolls the unfinished transaction back on the next open. What it does is checked
    from outside: test_exercise5's ``test_sigterm_that_cannot_flush_in_time_exits_nonzero_with_the_count``
    (a failure status, within the timeout, the log line flushed, the database intact)."""
    logging.shutdown()
    sys.stderr.flush()
    os._exit(status)


async def _sweep_forever(store: WriteThrough) -> None:
    """Exercise 3's expiry reclaim: expired rows are deleted every ``SWEEP_INTERVAL_S`` (the write-behind cache
    runs its own sweep, of memory and sqlite, on the same period)."""
    while True:
        await asyncio.sleep(SWEEP_INTERVAL_S)
        try:
            await store.sweep()
        except StorageError as exc:
            log.warning("expiry sweep failed: %s", exc)


async def _serve(cfg: Config, exercise: int, authenticator: Authenticator | None, *,
                 sockets: list[socket.socket] | None = None, lock: bool = True) -> int:
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    # Stop signals are handled from the start: one that arrives while sqlite opens, or as soon as a supervisor
    # reads the listening line, still gets a graceful stop (and exit 0) rather than a kill or a traceback.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    store: SqliteStore | PostgresStore | None = None
    kv: KeyValue | None = None
    shared = exercise >= 4 and cfg.cache.backend == "redis"
    if exercise >= 3:
        # storage.backend: sqlite (the default) or postgresql; shared by every server with the Redis cache (§10)
        store = open_store(cfg.storage, shared=shared, lock=lock)
        if not isinstance(store, SqliteStore):  # PostgresStore, imported only with that backend
            store.on_fenced = stop.set  # another server took the database over: stop serving at once
        await store.open()
        kv = store
    sweeper: asyncio.Task[None] | None = None
    if exercise == 3:
        assert store is not None
        sweeper = asyncio.ensure_future(_sweep_forever(store))
    cache: WriteBehindCache | RedisCache | None = None
    if exercise >= 4:
        assert store is not None
        try:
            if shared:
                from kvtornado.rediscache import RedisCache  # redis is imported only for this backend

                assert cfg.cache.redis_url is not None  # the config refuses redis without a url
                cache = RedisCache(store, cfg.cache, url=cfg.cache.redis_url)
                if authenticator is not None:
                    authenticator.shared_nonces = cache.claim_nonce
            else:
                cache = WriteBehindCache(store, cfg.cache)
            await cache.start()
        except BaseException:
            await store.close()
            raise
        kv = cache
    metrics_server: MetricsServer | None = None
    try:
        if authenticator is not None and authenticator.journal is not None:
            # SPEC §4 "Across restarts": the nonces an earlier process accepted come back from the journal;
            # after an unclean stop, nothing dated at or before this second is accepted either.
            kept, clean = await asyncio.to_thread(authenticator.journal.open)
            authenticator.restore(kept, clean=clean)
            if not clean:
                log.info("no clean stop recorded in %s: requests signed before now are refused",
                         authenticator.journal.path)
        admission = Admission()
        metrics = None
        if cfg.metrics.port is not None:  # SPEC §11; prometheus-client is imported only then
            from kvtornado.metrics import Metrics

            metrics = Metrics(cache=cache, authenticator=authenticator)
        app = make_app(cfg, authenticator=authenticator, kv=kv, admin=exercise >= 4, admission=admission,
                       metrics=metrics)
        server = build_http_server(app, cfg.server)
        if metrics is not None and cfg.metrics.port is not None:  # its own listener, before the API takes requests
            metrics_server = metrics.listen(cfg.server.host, cfg.metrics.port, api=server)
        if sockets is None:
            sockets = bind_sockets(cfg.server.port, cfg.server.host)
        server.add_sockets(sockets)
    except BaseException:
        if metrics_server is not None:
            await metrics_server.stop()
        if sweeper is not None:
            sweeper.cancel()
        if cache is not None:
            await cache.stop(cfg.cache.shutdown_timeout_s)
        if store is not None:
            await store.close()
        raise
    host, port = sockets[0].getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    details = ""
    if store is not None:
        details += f", db {store.where}"
    if exercise >= 4:
        details += f", flush every {cfg.cache.flush_interval_ms} ms"
        if shared:
            details += f", cache {redact_url(cfg.cache.redis_url or '')} (shared)"
    if metrics_server is not None:
        details += f", metrics on http://{shown}:{metrics_server.port}/metrics"
    scheme = "https" if cfg.server.tls_cert is not None else "http"
    log.info("exercise %d listening on %s://%s:%d%s", exercise, scheme, shown, port, details)

    await stop.wait()
    log.info("signal received: stopping")

    server.stop()  # no new connections
    admission.stop()  # new requests on open keep-alive connections get 503
    # The whole stop, draining included, stays within cache.shutdown_timeout_s (G7).
    stop_deadline = time.monotonic() + (cfg.cache.shutdown_timeout_s if cache is not None else DRAIN_TIMEOUT_S)
    drain_deadline = min(stop_deadline, time.monotonic() + DRAIN_TIMEOUT_S)
    # Let requests already being served finish (a durable write waits for a flush, which keeps running).
    try:
        await asyncio.wait_for(admission.idle(), timeout=max(0.0, drain_deadline - time.monotonic()))
    except TimeoutError:
        log.warning("%d requests were still being served when the drain timed out", admission.in_flight)
    status = 0
    if sweeper is not None:
        sweeper.cancel()
        await asyncio.gather(sweeper, return_exceptions=True)
    if cache is not None:
        remaining = await cache.stop(max(0.0, stop_deadline - time.monotonic()))
        if remaining:
            log.error("could not flush %d acknowledged writes within %d s", remaining, cfg.cache.shutdown_timeout_s)
            return EXIT_UNFLUSHED  # main() exits at once: waiting on sqlite now would outlast the timeout
    try:
        await asyncio.wait_for(server.close_all_connections(), timeout=DRAIN_TIMEOUT_S)
    except TimeoutError:
        log.warning("some connections did not close in time")
    if metrics_server is not None:  # scrapable until here: the drain and the last flush can be watched
        await metrics_server.stop()
    if store is not None:
        await store.close()
    log.info("stopped")
    return status
