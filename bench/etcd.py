"""The etcd cells: etcd (Debian's ``etcd-server`` 3.4) driven by the same load generator, for comparison.

Run by ``python -m bench --cells etcd`` (with ``grid,extra`` for the ratios against exercise 4). The bench starts
``etcd`` itself: a fresh data dir in the run's temp dir, client and peer URLs on free 127.0.0.1 ports, pinned to
the server's core like our servers (Go sizes GOMAXPROCS from that affinity: one core). The same 10 000 keys with
100-byte values are put in first (transactions of ``PRELOAD_TXN_OPS`` puts). The load generator then drives the
v3 JSON gateway (``/v3/kv/range`` on the 1 000 hot keys, ``/v3/kv/put`` on the 100 000-key space) over raw
keep-alive sockets, unsigned, checking each answer. An etcd put is durable: it is acknowledged once its raft
entry is fsynced to the WAL (concurrent puts share a sync), so ``put`` is compared both with our ``/save`` and,
at 16 connections, with our ``/save?durable=1``.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.common import free_port, key_name, preload_value, value_pool
from bench.run import CONCURRENT, PRELOADED_KEYS, SERVER_START_TIMEOUT_S, SERVER_STOP_TIMEOUT_S, log, measure

ETCD = "/usr/bin/etcd"
PRELOAD_TXN_OPS = 1_000  # puts per preload transaction (etcd's --max-txn-ops is raised to allow it)


def version(binary: str) -> str | None:
    """``3.4.23`` from ``etcd --version``, or None when it does not run."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.splitlines()[0] if out else ""
    return first.split(":", 1)[1].strip() if first.startswith("etcd Version:") else None


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


class Etcd:
    """One etcd member in ``folder``; the attributes ``bench.run.measure`` reads of a server."""

    def __init__(self, binary: str, release: str, folder: Path, pin: list[str]) -> None:
        self.exercise = "etcd"
        self.name = f"etcd {release}"
        self.port, peer = free_port(), free_port()
        client_url, peer_url = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{peer}"
        self.stderr_path = folder / "etcd.stderr"
        cmd = [*pin, binary, "--name", "bench", "--data-dir", str(folder / "etcd.data"),
               "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
               "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
               "--initial-cluster", f"bench={peer_url}", "--initial-cluster-state", "new",
               "--max-txn-ops", str(PRELOAD_TXN_OPS), "--logger", "zap", "--log-level", "error"]
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, cwd=folder, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        self._wait_healthy()

    def stderr_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            if body is None:
                conn.request("GET", path)
            else:
                conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            raise RuntimeError(f"etcd {path} answered {resp.status}: {data[:300]!r}")
        answer: dict[str, Any] = json.loads(data)
        return answer

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode} at start-up:\n{self.stderr_tail()}")
            try:
                if self.call("/health").get("health") == "true":
                    return
            except (OSError, RuntimeError, ValueError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"etcd did not answer /health within {SERVER_START_TIMEOUT_S:.0f} s")

    def preload(self, seed: int, count: int) -> None:
        """``key_name(i)`` -> the same 100-byte value our preload stores (as bytes, not as JSON text)."""
        pool = value_pool(seed)
        for start in range(0, count, PRELOAD_TXN_OPS):
            puts = [{"requestPut": {"key": _b64(key_name(i)), "value": _b64(preload_value(pool, i))}}
                    for i in range(start, min(count, start + PRELOAD_TXN_OPS))]
            if not self.call("/v3/kv/txn", {"success": puts}).get("succeeded"):
                raise RuntimeError("etcd refused a preload transaction")
        got = self.call("/v3/kv/range", {"key": _b64(key_name(0)), "range_end": _b64(key_name(count)),
                                         "count_only": True})
        if int(got.get("count", 0)) != count:
            raise RuntimeError(f"etcd holds {got.get('count')} of the {count} preloaded keys")

    def stop(self) -> int:
        """SIGTERM and wait: 0 when etcd stopped on it, else its status (-9: killed past the timeout)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                status = self.proc.wait(SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return -9
            # etcd cleans up on SIGTERM and then raises the signal again on itself: that is its clean exit.
            return 0 if status == -signal.SIGTERM else status
        return self.proc.returncode


def binary(args: argparse.Namespace) -> tuple[str | None, str]:
    """The etcd to run and its version, or None and why the etcd cells are skipped."""
    path = args.etcd or shutil.which("etcd") or ETCD
    if not Path(path).is_file():
        return None, f"no etcd binary ({path} is absent; Debian: apt-get install etcd-server)"
    release = version(path)
    if release is None:
        return None, f"{path} --version did not print an etcd version"
    if not release.startswith("3."):
        return None, f"{path} is etcd {release}: the cells need the v3 JSON gateway of etcd 3.4+ (/v3/)"
    return path, release


def cells(args: argparse.Namespace) -> list[tuple[str, int]]:
    """range and put at every --connections count, and put at CONCURRENT (against durable /save)."""
    plan = [(w, n) for w in ("etcd_range", "etcd_put") for n in args.connections]
    return plan + ([] if CONCURRENT in args.connections else [("etcd_put", CONCURRENT)])


def bench_etcd(path: str, release: str, work: Path, args: argparse.Namespace,
               pins: tuple[list[str], list[str]]) -> dict[str, Any]:
    folder = work / "etcd"
    folder.mkdir(mode=0o700)
    server = Etcd(path, release, folder, pins[0])
    measured: list[dict[str, Any]] = []
    try:
        t0 = time.perf_counter()
        server.preload(args.seed, PRELOADED_KEYS)
        log(f"  {server.name}: preloaded {PRELOADED_KEYS:,} keys in {time.perf_counter() - t0:.1f} s")
        for workload, n in cells(args):
            measured.append(measure(server, folder, workload, n, args, pins))  # type: ignore[arg-type]
    finally:
        status = server.stop()
    return {"exercise": "etcd", "name": server.name, "cells": measured, "exit_status": status, "stats": None,
            "stderr_tail": server.stderr_tail() if status != 0 else ""}
