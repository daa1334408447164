"""The /keys cell (SPEC §9): ``/keys?limit=100`` latency with 100 000 pending writes over 1 000 000 stored keys.

Run by ``python -m bench --cells keys``. One sqlite file gets 1 000 000 rows (``k0000000`` .. ``k0999999``, 100-byte
values, schema 2 with reserved versions) through the bench's preload path, and each exercise starts on its own
copy with a config under which exercise 4 never flushes before SIGTERM (a flush every hour, a flush batch and
``max_dirty`` above 100 000). Then 100 000 saves in ``/batch`` requests of 1 000: half update stored keys, half
write new keys ``k0000123p`` that sort between the stored ones, so nearly every page has pending keys to merge.
On exercise 4 they stay pending (``/stats`` dirty, checked before and after the measure); on exercise 3 they are
simply 100 000 more rows, for comparison. One connection then pages through ``/keys?limit=100`` (random prefixes
and cursors, see ``bench.loadgen.keys_traffic``) for a fixed count of requests, each page checked, and the run
fails unless exercise 4's pages showed keys that exist only as pending writes.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import time
from pathlib import Path
from typing import Any

from bench.common import key_name, preload_rows, value_pool
from bench.loadgen import PENDING_SUFFIX
from bench.run import CONFIG_TEMPLATE, Server, client, log, measure, write_keys_file
from kvtornado.store import SqliteStore

STORED = 1_000_000
PENDING = 100_000
BATCH_OPS = 1_000  # save ops per /batch: limits.max_batch_ops
# The cell is a fixed count of requests; this bounds it in time whatever the count (the brief: bounded loads).
MAX_SECONDS = 120.0
# Exercise 4 must hold the 100 000 writes pending: no timer flush within the run, no size trigger.
CONFIG = (CONFIG_TEMPLATE.replace("flush_interval_ms: 100", "flush_interval_ms: 3600000")
          .replace("flush_batch_size: 5000", f"flush_batch_size: {2 * PENDING}")
          .replace("max_dirty: 100000", f"max_dirty: {2 * PENDING}"))
assert CONFIG != CONFIG_TEMPLATE and CONFIG.count(str(2 * PENDING)) == 2


async def _preload(db: Path, seed: int) -> None:
    store = SqliteStore(db, synchronous="FULL")
    await store.open()
    try:
        await preload_rows(store, seed, STORED)
    finally:
        await store.close()


def preload_base(work: Path, seed: int) -> tuple[Path, float]:
    """The 1 000 000-row file both exercises start from (each on a copy); returns it and the seconds it took."""
    db = work / "keys-base" / "kv.sqlite3"
    db.parent.mkdir(mode=0o700)
    t0 = time.perf_counter()
    asyncio.run(_preload(db, seed))
    return db, time.perf_counter() - t0


def pending_ops(seed: int) -> list[list[dict[str, Any]]]:
    """The 100 000 saves, in batches: distinct keys, half of them stored already, half new (``PENDING_SUFFIX``)."""
    rng = random.Random(f"{seed}:pending")
    pool = value_pool(seed)
    picked = rng.sample(range(STORED), PENDING)
    keys = [key_name(i) if n % 2 == 0 else key_name(i) + PENDING_SUFFIX for n, i in enumerate(picked)]
    ops = [{"op": "save", "key": k, "value": rng.choice(pool)} for k in keys]
    return [ops[i:i + BATCH_OPS] for i in range(0, len(ops), BATCH_OPS)]


def dirty(server: Server, secret: str) -> int | None:
    if server.exercise < 4:
        return None
    with client(server, secret) as c:
        return int(c.stats()["cache"]["dirty"])


def bench_listing(exercise: int, work: Path, base_db: Path, secret: str, args: argparse.Namespace,
                  pins: tuple[list[str], list[str]]) -> dict[str, Any]:
    folder = work / f"keys-exercise{exercise}"
    folder.mkdir(mode=0o700)
    write_keys_file(folder / "bench.keys", secret)
    config = folder / "config.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    t0 = time.perf_counter()
    shutil.copyfile(base_db, folder / "kv.sqlite3")  # the store closed cleanly: no WAL left beside it
    copy_s = time.perf_counter() - t0
    server = Server(exercise, config, folder, pins[0])
    cells: list[dict[str, Any]] = []
    try:
        t0 = time.perf_counter()
        with client(server, secret) as c:
            for ops in pending_ops(args.seed):
                c.batch(ops)
        write_s = time.perf_counter() - t0
        before = dirty(server, secret)
        log(f"  {server.name}: {PENDING:,} saves in /batch of {BATCH_OPS} took {write_s:.1f} s"
            + (f"; {before:,} keys pending" if before is not None else ""))
        cell = measure(server, folder, "keys", 1, args, pins, spec_for=lambda attempt: {
            "count": args.keys_requests, "duration_s": MAX_SECONDS, "stored": STORED})
        after = dirty(server, secret)
        seen = cell.get("seen", {})
        shown = seen.get("pending_only_keys", 0)
        cell["listing"] = {
            "stored": STORED, "pending_writes": PENDING, "copy_s": round(copy_s, 2), "write_s": round(write_s, 2),
            "dirty_before": before, "dirty_after": after, "pages": seen.get("pages", 0), "keys": seen.get("keys", 0),
            "pending_only_keys_seen": shown,
            # Exercise 4 only: every write still pending through the measure, and pages that showed some.
            "pending_ok": None if exercise < 4 else (before == after == PENDING and shown > 0),
        }
        log(f"    pages {cell['listing']['pages']:,}, keys {cell['listing']['keys']:,}, of which "
            f"{cell['listing']['pending_only_keys_seen']:,} only written, never stored before"
            + (f"; pending before/after the measure: {before:,} / {after:,}" if before is not None else ""))
        cells.append(cell)
    finally:
        status = server.stop()
    held = "pending" if exercise >= 4 else "more saved"
    return {"exercise": exercise, "name": f"{server.name}, 1M stored + 100k {held}", "cells": cells,
            "exit_status": status, "stats": None, "stderr_tail": server.stderr_tail() if status != 0 else ""}
