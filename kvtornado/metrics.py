"""Prometheus metrics (SPEC §11): one registry per application, served on a listener of its own.

Counted as they happen: requests by route and status with a latency histogram, auth refusals by code, and
each flush's duration (the caches' ``on_flush`` hook). Read when scraped: the cache's and the flusher's
figures from ``stats()``, the nonce store's size and the API server's open connections. A label holds a
route's path, a status or a refusal code, nothing else: no key, query, key id, secret or URL reaches a metric.
The listener has no auth, so it never shares the API's port (the config refuses that) and is kept private.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler

from kvtornado.auth import Authenticator
from kvtornado.errors import ConfigError, KVError, MethodNotAllowed, NotFound, for_status

log = logging.getLogger("kvtornado.metrics")

PATH = "/metrics"
# The route label of every request to a path that is no route, so a scan of random paths cannot make the
# label's values (and Prometheus's series) grow without bound.
OTHER_ROUTE = "other"
# From a cached /get (well under a millisecond) to a flush or a durable write waiting on a busy disk.
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class FlushingCache(Protocol):
    """What the metrics read from a cache: ``WriteBehindCache`` and ``RedisCache`` both have it."""

    on_flush: Callable[[float], None] | None

    def stats(self) -> dict[str, Any]: ...


class HasConnections(Protocol):
    """The API's ``KVHTTPServer``, for its open connection count."""

    open_connections: int


# Figures of a cache's stats() exported at scrape time: (metric name, kind, section, field, help). Every cache
# has these fields; with Redis, entries, evictions and dirty are Redis's figures for every server on it.
_STATS = (
    ("kvtornado_cache_hits", "counter", "cache", "hits", "Reads answered from the cache."),
    ("kvtornado_cache_misses", "counter", "cache", "misses", "Reads the cache had to send to the store."),
    ("kvtornado_cache_evictions", "counter", "cache", "evictions", "Clean entries evicted (Redis: its evicted keys)."),
    ("kvtornado_cache_entries", "gauge", "cache", "entries", "Entries held (Redis: every key in its database)."),
    ("kvtornado_cache_dirty_keys", "gauge", "cache", "dirty", "Acknowledged writes not yet in the store."),
    ("kvtornado_cache_dirty_bytes", "gauge", "cache", "dirty_bytes", "Key+value bytes of those writes."),
    ("kvtornado_flushes", "counter", "flush", "count", "Flushes that committed."),
    ("kvtornado_flush_rows", "counter", "flush", "rows", "Rows committed by flushes."),
    ("kvtornado_flush_errors", "counter", "flush", "errors", "Flush attempts that failed (their writes are kept)."),
)


class _StatsCollector:
    """The cache's figures, read from ``stats()`` at each scrape (no copy to keep in step)."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        stats = self._stats()
        for name, kind, section, key, doc in _STATS:
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name, doc, value=stats[section][key])


class Metrics:
    """The metrics of one application, in a registry of its own: several apps in one process never clash.

    With a ``cache``, its ``on_flush`` hook is set to the flush duration histogram."""

    def __init__(self, *, cache: FlushingCache | None = None, authenticator: Authenticator | None = None) -> None:
        self.registry = r = CollectorRegistry()
        self._requests = Counter("kvtornado_requests", "Requests answered, by route and status.",
                                 ["route", "status"], registry=r)
        self._latency = Histogram("kvtornado_request_duration_seconds",
                                  "Time from a request's arrival to its answer, by route.", ["route"],
                                  buckets=SECONDS_BUCKETS, registry=r)
        self._refusals = Counter("kvtornado_auth_refusals", "Requests refused with 401, by error code.", ["code"],
                                 registry=r)
        self.api: HasConnections | None = None  # set by ``listen``
        Gauge("kvtornado_open_connections", "Connections open to the API port.",
              registry=r).set_function(lambda: 0 if self.api is None else self.api.open_connections)
        # With the Redis cache the nonces are claimed in Redis (SPEC §10): the local store is unused, not empty.
        if authenticator is not None and authenticator.shared_nonces is None:
            nonces = authenticator.nonces
            Gauge("kvtornado_nonces", "Nonces remembered for replay protection.",
                  registry=r).set_function(lambda: len(nonces))
        if cache is not None:
            flush_seconds = Histogram("kvtornado_flush_duration_seconds", "Time each flush attempt took.",
                                      buckets=SECONDS_BUCKETS, registry=r)
            cache.on_flush = flush_seconds.observe
            r.register(_StatsCollector(cache.stats))

    def request(self, route: str | None, status: int, seconds: float) -> None:
        """One answered request; ``route`` is the route's path, None for a path that is no route."""
        label = OTHER_ROUTE if route is None else route
        self._requests.labels(label, str(status)).inc()
        self._latency.labels(label).observe(seconds)

    def auth_refused(self, code: str) -> None:
        self._refusals.labels(code).inc()

    def scrape(self) -> bytes:
        """The Prometheus text format of every metric, as of now."""
        return generate_latest(self.registry)

    def listen(self, host: str, port: int, *, api: HasConnections) -> MetricsServer:
        """Serve ``/metrics`` on ``host:port``, counting ``api``'s open connections; a port that cannot be bound
        stops start-up with one line naming ``metrics.port``."""
        self.api = api
        server = MetricsServer(self)
        try:
            sockets = bind_sockets(port, host)
        except OSError as exc:
            raise ConfigError(f"metrics.port: cannot listen on {host}:{port} ({exc.strerror})") from None
        server.http.add_sockets(sockets)
        server.sockets = sockets
        return server


class _JSONErrors(RequestHandler):
    """Errors on the metrics port as on the API's (SPEC §5: every error is JSON): 404 off ``/metrics``, 405 for
    anything but GET on it."""

    def prepare(self) -> None:
        if self.request.path != PATH:
            raise NotFound(f"Nothing here but {PATH}.")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        raised = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(raised, KVError):
            error = raised
        elif status_code == 405:
            error = MethodNotAllowed(f"{self.request.method} is not allowed on {PATH}.", allow=["GET"])
        else:
            error = for_status(status_code)
        self.set_status(error.status)
        for name, value in error.headers.items():
            self.set_header(name, value)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(json.dumps({"error": error.code, "message": error.message}, separators=(",", ":")))

    def log_exception(self, *args: Any) -> None:
        pass  # a client's mistake on an unauthenticated port: the access line (DEBUG) is enough


class _MetricsHandler(_JSONErrors):
    def initialize(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(self.metrics.scrape())

    def compute_etag(self) -> None:
        return None  # a scrape is never answered 304


def _log_scrape(handler: RequestHandler) -> None:
    # A scrape every few seconds is no news: DEBUG, as the API logs its successful requests.
    log.debug("%d %s %s (%s)", handler.get_status(), handler.request.method, handler.request.path,
              handler.request.remote_ip)


class MetricsServer:
    """The ``/metrics`` listener (built by ``Metrics.listen``); ``stop()`` closes it and its connections."""

    def __init__(self, metrics: Metrics) -> None:
        app = Application([(PATH, _MetricsHandler, {"metrics": metrics})], log_function=_log_scrape,
                          default_handler_class=_JSONErrors)
        # A scrape has no body: nobody may make this unauthenticated port buffer one.
        self.http = HTTPServer(app, max_body_size=0)
        self.sockets: list[socket.socket] = []

    @property
    def port(self) -> int:
        return int(self.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        self.http.stop()
        await self.http.close_all_connections()
