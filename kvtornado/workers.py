"""``server.processes`` (SPEC §10): one listening socket, N forked workers sharing it, one supervisor.

The parent binds the port, takes the store's one-server lock (sqlite's flock, inherited by the workers) and
opens the store and Redis once (so a bad URL, a wrong eviction policy or a schema migration happens once,
before any worker, and a refusal is still one line and exit 2). Then it forks the workers, each serving with
the shared Redis cache (``_serve`` with the inherited sockets), and waits:

- SIGINT/SIGTERM is passed on to every worker, each stops gracefully (G7), and the parent exits with the
  worst status among them (0 when all flushed);
- a worker that dies otherwise (a crash, ``kill -9``) is replaced, at most ``MAX_RESTARTS`` times: nothing it
  acknowledged is lost (it is in Redis; its log entries are taken over after ``cache.reclaim_idle_ms``).

Tornado's ``fork_processes`` does the forking part, but it restarts a worker whatever its status (also the
G7 "could not flush" exit of a stop) and passes no signal on, so a stop would leave the workers running.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from tornado.netutil import bind_sockets

from kvtornado import logs
from kvtornado.config import Config
from kvtornado.locks import LockHeld, lock_path, take_lock

log = logging.getLogger("kvtornado.workers")

MAX_RESTARTS = 100

Serve = Callable[[list[socket.socket]], Coroutine[Any, Any, int]]


def worker_count(cfg: Config) -> int:
    return cfg.server.processes or (os.cpu_count() or 1)


async def preflight(cfg: Config) -> None:
    """Open the store and the Redis cache once and close them: every refusal happens here, in the parent."""
    from kvtornado.rediscache import RedisCache
    from kvtornado.store import open_store

    assert cfg.cache.redis_url is not None  # the config refuses processes without redis
    store = open_store(cfg.storage, shared=True, lock=False)
    await store.open()
    try:
        cache = RedisCache(store, cfg.cache, url=cfg.cache.redis_url)
        try:
            await cache.open()
        finally:
            await cache.redis.aclose()
    finally:
        await store.close()


def supervise(cfg: Config, serve: Serve) -> int:
    """Bind, lock, check, fork ``worker_count`` workers running ``serve(sockets)``; their worst exit status."""
    from kvtornado.errors import StorageError

    n = worker_count(cfg)
    lock_fd: int | None = None
    if cfg.storage.backend == "sqlite":
        try:
            lock_fd = take_lock(cfg.storage.path)
        except LockHeld:
            raise StorageError(f"{cfg.storage.path}: another server is using this database (it holds "
                               f"{lock_path(cfg.storage.path).name}); stop it first") from None
        except FileNotFoundError:
            cfg.storage.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            lock_fd = take_lock(cfg.storage.path)
    try:
        asyncio.run(preflight(cfg))
        sockets = bind_sockets(cfg.server.port, cfg.server.host)
        return _run_workers(n, sockets, serve)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


def _run_workers(n: int, sockets: list[socket.socket], serve: Serve) -> int:
    children: dict[int, int] = {}  # pid -> worker number
    stopping = False

    def forward(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}

    def fork(number: int) -> None:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the worker's own run is measured by its own process
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            status = 2
            try:
                status = asyncio.run(serve(sockets))
            except BaseException as exc:  # a worker reports and ends; the parent decides what follows
                logs.refuse(f"worker {number}: {exc}")
            finally:
                logging.shutdown()
                sys.stderr.flush()
                os._exit(status)
        children[pid] = number

    for number in range(n):
        fork(number)
    log.info("%d workers started (pids %s)", n, ", ".join(map(str, children)))
    worst = 0
    restarts = 0
    while children:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries os.wait itself
            continue
        if pid not in children:
            continue
        number = children.pop(pid)
        code = os.waitstatus_to_exitcode(wait_status)
        if stopping:
            worst = max(worst, code if code >= 0 else 1)
            continue
        if restarts >= MAX_RESTARTS:
            log.error("worker %d (pid %d) exited with %d; %d restarts already: stopping", number, pid, code,
                      restarts)
            forward(signal.SIGTERM, None)
            worst = max(worst, 1)
            continue
        restarts += 1
        log.warning("worker %d (pid %d) exited with %d; starting another", number, pid, code)
        fork(number)
    for sock in sockets:
        sock.close()
    return worst
