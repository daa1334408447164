"""The application factory: the route table and nothing else (no I/O, no timers, no sockets)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from tornado.web import Application, RequestHandler, url

from kvtornado import codec
from kvtornado import handlers as h
from kvtornado.auth import Authenticator
from kvtornado.config import Config

if TYPE_CHECKING:
    from kvtornado.metrics import Metrics  # prometheus-client is imported only with metrics.port

access_log = logging.getLogger("kvtornado.access")


def _log_request(handler: RequestHandler) -> None:
    """Tornado's ``log_function``: called once for every answered request (counted in the metrics, logged)."""
    status = handler.get_status()
    metrics = handler.svc.metrics if isinstance(handler, h.BaseHandler) else None
    if metrics is not None:
        # Every route is one exact path, so a routed request's path is its route; None: no route at all.
        route = None if isinstance(handler, h.NotFoundHandler) else handler.request.path
        metrics.request(route, status, handler.request.request_time())
    # Successful requests are logged at DEBUG: at INFO a line per request costs more than the request.
    level = logging.DEBUG if status < 400 else logging.INFO if status < 500 else logging.WARNING
    if access_log.isEnabledFor(level):
        req = handler.request
        # The path only: query strings carry keys, and no header (Authorization) is ever logged.
        access_log.log(level, "%d %s %s (%s) %.2fms", status, req.method, req.path, req.remote_ip,
                       1000.0 * req.request_time(), extra={"request_id": getattr(handler, "request_id", None)})


def make_app(
    config: Config,
    *,
    authenticator: Authenticator | None = None,
    kv: h.KeyValue | None = None,
    admin: bool = False,
    admission: h.Admission | None = None,
    metrics: Metrics | None = None,
    **settings: Any,
) -> Application:
    """Routes for one exercise: ``/ping`` always; ``/authorize`` with an authenticator; the data routes
    with a key/value store; ``/flush`` and ``/stats`` with ``admin`` (exercise 4). A server that stops
    gracefully passes its ``admission`` to refuse new requests and wait for those being served; with
    ``metrics``, every answered request and auth refusal is counted there.

    The JSON decoder recurses once per nesting level, so the process's recursion limit is raised here (never
    lowered) to give it room for ``codec.MAX_JSON_DEPTH`` levels."""
    if kv is not None and authenticator is None:
        raise ValueError("the data routes need an authenticator")
    codec.allow_json_depth()
    svc = h.Service(config=config, authenticator=authenticator, kv=kv, admission=admission or h.Admission(),
                    metrics=metrics)
    args = {"svc": svc}
    routes = [url(r"/ping", h.PingHandler, args), url(r"/healthz", h.HealthHandler, args),
              url(r"/readyz", h.ReadyHandler, args)]
    if authenticator is not None:
        routes.append(url(r"/authorize", h.AuthorizeHandler, args))
    if kv is not None:
        routes += [
            url(r"/save", h.SaveHandler, args),
            url(r"/get", h.GetHandler, args),
            url(r"/delete", h.DeleteHandler, args),
            url(r"/keys", h.KeysHandler, args),
            url(r"/incr", h.IncrHandler, args),
            url(r"/batch", h.BatchHandler, args),
        ]
        if admin:
            routes += [url(r"/flush", h.FlushHandler, args), url(r"/stats", h.StatsHandler, args)]
    app = Application(
        routes,
        default_handler_class=h.NotFoundHandler,
        default_handler_args=args,
        log_function=_log_request,
        serve_traceback=False,
        **settings,
    )
    return app
