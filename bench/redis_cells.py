"""The redis cells (SPEC §9, §10; issue 12): exercise 4 on ``cache.backend: redis``, with 1 and ``nproc`` processes.

Run by ``python -m bench --cells redis``. Each run starts its own throwaway ``redis-server`` (a fresh dir in the
run's temp dir, so no run sees another's cache, versions or nonces; no persistence, since nothing outlives the
run; ``noeviction``, one of the policies the server accepts) and then exercise 4 from the grid's files: the same
``CONFIG_TEMPLATE`` and preloaded sqlite, plus ``cache.backend: redis`` and ``server.processes``. It measures the
grid's cached /get (hot keys) and /save at every ``--connections`` count; bench/run.py compares each cell with
exercise 4's memory cache of the same run (the grid's cells, or measured for this group when the grid does not
run).

- ``server.processes: 1``: the server and its Redis are pinned to the server's core and the load generator to
  the other, as for every other cell; the server's CPU is both processes' (Redis's share is shown apart), so a
  busy Redis does not count as another process's noise.
- ``server.processes: nproc``: nothing is pinned (workers pinned to one core would only queue behind each
  other), so the workers, Redis and the load generator share every core: an aggregate of the machine, not of
  N cores given to the server. Each worker logs its own "listening" line; the port is read from the parent's
  socket, which it binds before forking and keeps.

The server is stopped with SIGTERM and must exit 0 (every process flushed the Redis log into sqlite), and Redis's
log and pending set must then be empty: both are checked before Redis itself is stopped.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import child_pids, free_port
from bench.run import (
    CONFIG_TEMPLATE,
    PRELOADED_KEYS,
    SERVER_START_TIMEOUT_S,
    Server,
    client,
    log,
    measure,
    prepare,
    redis_plan,
    terminate,
)
from kvtornado.rediscache import K_LOG, K_PENDING

REDIS_SERVER = "/usr/bin/redis-server"


def version(binary: str) -> str | None:
    """``7.0.15`` from ``redis-server --version``, or None when it does not run."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"\bv=(\S+)", out)
    return found.group(1) if out.startswith("Redis server") and found else None


def binary(args: argparse.Namespace) -> tuple[str | None, str]:
    """The redis-server to run and its version, or None and why the redis cells are skipped."""
    path = args.redis_server or shutil.which("redis-server") or REDIS_SERVER
    if not Path(path).is_file():
        return None, f"no redis-server binary ({path} is absent; Debian: apt-get install redis-server)"
    release = version(path)
    if release is None:
        return None, f"{path} --version did not print a Redis version"
    return path, release


def process_counts() -> tuple[int, ...]:
    """1, and one per core when there is more than one core."""
    n = os.cpu_count() or 1
    return (1, n) if n > 1 else (1,)


def config_text(url: str, processes: int) -> str:
    """The grid's config with the Redis cache and ``processes`` workers."""
    text = (CONFIG_TEMPLATE.replace("identical for exercise 3 and exercise 4", "the grid's, on the Redis cache")
            .replace("  port: 0\n", f"  port: 0\n  processes: {processes}\n")
            + f"  backend: redis\n  redis_url: {url}\n")  # the template ends in its cache section
    parsed = yaml.safe_load(text)
    assert parsed["server"]["processes"] == processes and parsed["cache"]["redis_url"] == url
    return text


class Redis:
    """One throwaway ``redis-server`` on a free 127.0.0.1 port, its dir ``folder``, pinned like the server."""

    def __init__(self, binary: str, release: str, folder: Path, pin: list[str]) -> None:
        self.name = f"redis-server {release}"
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        folder.mkdir(mode=0o700)
        self.log_path = folder / "redis.log"
        cmd = [*pin, binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--maxmemory-policy", "noeviction", "--dir", str(folder)]
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=folder, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not self._pong():
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode} at start-up:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer PING within {SERVER_START_TIMEOUT_S:.0f} s")
            time.sleep(0.02)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def command(self, *words: str) -> str:
        """One inline command (words without spaces) and its one-line reply (``+PONG``, ``:0``, ``-ERR ...``)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(" ".join(words).encode("ascii") + b"\r\n")
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = s.recv(256)
                if not chunk:
                    break
                reply += chunk
        return reply.decode("utf-8", "replace").strip()

    def _pong(self) -> bool:
        try:
            return self.command("PING") == "+PONG"
        except OSError:
            return False

    def _count(self, *words: str) -> int:
        reply = self.command(*words)
        if not reply.startswith(":"):
            raise RuntimeError(f"redis-server answered {' '.join(words)} with {reply!r}")
        return int(reply[1:])

    def left_pending(self) -> dict[str, int] | None:
        """What the servers left unflushed: entries of the write log and pending keys (both 0 after a clean stop);
        None when Redis no longer answers."""
        try:
            return {"log_entries": self._count("XLEN", K_LOG.decode()),
                    "pending_keys": self._count("ZCARD", K_PENDING.decode())}
        except OSError:
            return None

    def stop(self) -> int:
        """SIGTERM and wait; its exit status (0 on a clean stop; -9: killed past the timeout)."""
        return terminate(self.proc)


def wait_workers(server: Server, processes: int) -> list[int]:
    """The pids of the server's ``processes`` forked workers, once they are all running (none for 1: it serves
    itself)."""
    if processes == 1:
        return []
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while len(workers := child_pids(server.proc.pid)) < processes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.name}: {len(workers)} of {processes} workers running after "
                               f"{SERVER_START_TIMEOUT_S:.0f} s:\n{server.stderr_tail()}")
        time.sleep(0.05)
    return workers


def bench_redis(path: str, release: str, processes: int, work: Path, secret: str, args: argparse.Namespace,
                pins: tuple[list[str], list[str]]) -> dict[str, Any]:
    pinned = processes == 1
    run_pins: tuple[list[str], list[str]] = pins if pinned else ([], [])
    key = f"redis-{processes}"
    redis = Redis(path, release, work / f"{key}-data", run_pins[0])
    cells: list[dict[str, Any]] = []
    stats: Any = None
    failures: list[str] = []
    try:
        folder = work / key
        config = prepare(folder, secret, args.seed, config_text(redis.url, processes))
        plural = "process" if processes == 1 else "processes"
        server = Server(4, config, folder, run_pins[0],
                        name=f"exercise 4, Redis, {processes} {plural}" + ("" if pinned else " (unpinned)"))
        try:
            workers = wait_workers(server, processes)
            log(f"  {server.name}: port {server.port}"
                + (f" (the parent's socket), workers {', '.join(map(str, workers))}" if workers else "")
                + f", {PRELOADED_KEYS} preloaded keys, {redis.name} on {redis.url}")

            def spec_for(attempt: int) -> dict[str, Any]:
                # Read per attempt: a worker that died was replaced under another pid.
                workers = child_pids(server.proc.pid)
                return {"server_pids": [server.proc.pid, *workers, redis.proc.pid],
                        "cpu_parts": {"redis": [redis.proc.pid],
                                      **{f"worker {i + 1}": [pid] for i, pid in enumerate(workers)}}}

            for workload, n in redis_plan(args):
                cell = measure(server, folder, workload, n, args, run_pins, spec_for=spec_for)
                cell["exercise"] = key
                if not pinned:
                    cell["shared_cores"] = os.cpu_count()
                cells.append(cell)
            with client(server, secret) as c:
                stats = c.stats()
        finally:
            status = server.stop()
        left = redis.left_pending()
        if left is None:
            failures.append(f"{redis.name} did not answer after the server stopped")
        elif any(left.values()):
            failures.append(f"the server exited with {status} but left {left['log_entries']} log entries and "
                            f"{left['pending_keys']} pending keys in Redis, not flushed into sqlite")
    finally:
        redis_status = redis.stop()
    if redis_status != 0:
        failures.append(f"{redis.name} exited with status {redis_status} on SIGTERM:\n{redis.log_tail()}")
    return {"exercise": key, "name": server.name, "cells": cells, "exit_status": status, "stats": stats,
            "stderr_tail": server.stderr_tail() if status != 0 else "", "processes": processes, "pinned": pinned,
            "redis": {"name": redis.name, "exit_status": redis_status, "left": left}, "failures": failures}
