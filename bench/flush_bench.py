"""Flush-path micro-benchmark: ``WriteBehindCache`` over a real ``SqliteStore`` in a temp dir, no HTTP.

    python -m bench flush [--quick] [--seed N] [--out DIR]
    python bench/flush_bench.py ...    the same

For synchronous NORMAL and FULL, on a 100 000-row table: make 10 000 and 100 000 keys dirty (random updates of
existing rows, or new keys), then time ``flush()`` (rows/s) while a 1 ms ticker on the same event loop measures
how late it wakes up (event-loop lag: what every request waits on while the flush runs). Then the memory cost
of the read cache: RSS growth per clean entry for 100 000 entries with 100-byte values, each with its version
and an expiry (issue 10's "≤ 400 bytes an entry" is about such entries; ``bench/run.py --cells memory`` runs
the same measure and puts it in its targets table).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import sys
import tempfile
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as ``python bench/flush_bench.py``: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, key_name, percentile, preload_rows, preload_value, rss_bytes, value_pool
from kvtornado.cache import WriteBehindCache
from kvtornado.config import CacheConfig
from kvtornado.server import GIL_SWITCH_INTERVAL_S
from kvtornado.store import SqliteStore

TABLE_ROWS = 100_000
TICK_S = 0.001
# The server's default transaction size (cache.flush_batch_size): a flush commits in chunks of this many rows.
FLUSH_BATCH = CacheConfig().flush_batch_size
# While dirtying, no flush may start (no timer, no size trigger): the flush measured is one flush of everything.
FILL_CONFIG = CacheConfig(max_entries=2 * TABLE_ROWS, flush_interval_ms=3_600_000, flush_batch_size=10**9,
                          max_dirty=10**9, durable_timeout_ms=600_000)
READ_BATCH = 1000
# The memory measure's rows expire a day after the preload: far beyond the run, but every entry carries an
# expires_at (a float object of its own) as a key saved with ?ttl= does.
MEMORY_TTL_S = 86_400
WARM_STRIDE = 20  # fewer rows than fit a 4 KiB leaf page (about 30 rows of 140 bytes)


async def build_table(path: Path, synchronous: str, seed: int, rows: int = TABLE_ROWS,
                      expires_at: float | None = None) -> SqliteStore:
    store = SqliteStore(path, synchronous=synchronous)
    await store.open()
    await preload_rows(store, seed, rows, expires_at=expires_at)
    return store


async def lag_ticker(stop: asyncio.Event, lags: list[float]) -> None:
    """Sleep 1 ms again and again; record how much later than asked each wake-up came."""
    last = time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(TICK_S)
        now = time.perf_counter()
        lags.append(max(0.0, now - last - TICK_S))
        last = now


def lag_summary(lags: list[float]) -> dict[str, float]:
    s = sorted(lags)
    return {"ticks": len(s), "p50_ms": round(percentile(s, 50) * 1000, 3),
            "p99_ms": round(percentile(s, 99) * 1000, 3), "max_ms": round((s[-1] if s else 0.0) * 1000, 3)}


async def idle_lag(seconds: float) -> dict[str, float]:
    lags: list[float] = []
    stop = asyncio.Event()
    task = asyncio.create_task(lag_ticker(stop, lags))
    await asyncio.sleep(seconds)
    stop.set()
    await task
    return lag_summary(lags)


async def flush_case(folder: Path, synchronous: str, dirty: int, kind: str, seed: int) -> dict[str, Any]:
    pool = value_pool(seed)
    store = await build_table(folder / f"{synchronous}-{kind}-{dirty}.sqlite3", synchronous, seed)
    cache = WriteBehindCache(store, FILL_CONFIG)  # not start()ed: no periodic flush
    rng = random.Random(f"{seed}:{synchronous}:{kind}:{dirty}")
    keys = rng.sample(range(TABLE_ROWS), dirty) if kind == "update" else range(TABLE_ROWS, TABLE_ROWS + dirty)
    t0 = time.perf_counter()
    for i in keys:
        await cache.put(key_name(i), json.dumps(rng.choice(pool)))
    fill_s = time.perf_counter() - t0
    # The flush itself commits in the server's transaction size, like a flush of the real server.
    cache.config = replace(FILL_CONFIG, flush_batch_size=FLUSH_BATCH)

    lags: list[float] = []
    stop = asyncio.Event()
    ticker = asyncio.create_task(lag_ticker(stop, lags))
    await asyncio.sleep(0.02)  # the ticker is running before the flush starts
    lags.clear()
    t0 = time.perf_counter()
    flushed = await cache.flush()
    flush_s = time.perf_counter() - t0
    stop.set()
    await ticker
    stats = cache.stats()
    left = await cache.stop(30)
    await store.close()
    if flushed != dirty or left or stats["flush"]["errors"] or stats["cache"]["dirty"]:
        raise RuntimeError(f"flush of {dirty} {kind} keys ({synchronous}) went wrong: flushed {flushed}, "
                           f"left {left}, stats {stats}")
    return {
        "synchronous": synchronous, "dirty": dirty, "kind": kind, "transactions": -(-dirty // FLUSH_BATCH),
        "fill_us_per_key": round(fill_s / dirty * 1e6, 2), "flush_s": round(flush_s, 3),
        "rows_per_s": round(dirty / flush_s), "lag": lag_summary(lags),
    }


async def fill_cache(cache: WriteBehindCache, entries: int) -> float:
    """``get()`` every preloaded key (each a miss, then a clean entry); returns the seconds it took."""
    t0 = time.perf_counter()
    for start in range(0, entries, READ_BATCH):
        # Key strings are made here and kept only by the cache, as they would be in the server.
        await asyncio.gather(*(cache.get(key_name(i)) for i in range(start, min(entries, start + READ_BATCH))))
    return time.perf_counter() - t0


async def memory_child(db: Path, entries: int, trace: bool) -> dict[str, Any]:
    """Runs in a fresh process, so memory freed by earlier work cannot be reused and hide the growth."""
    store = SqliteStore(db, synchronous="NORMAL")
    await store.open()
    cache = WriteBehindCache(store, replace(FILL_CONFIG, max_entries=entries))
    # sqlite's page cache (2 MB a connection by default) fills up during the first reads: fill it before the
    # measure, so its growth does not count as the cache's (a read of every WARM_STRIDE-th key walks every leaf).
    for i in range(0, entries, WARM_STRIDE):
        await store.read(key_name(i))
    gc.collect()
    before = rss_bytes()
    fill_s = await fill_cache(cache, entries)
    gc.collect()
    after = rss_bytes()
    cached = cache.stats()["cache"]["clean"]
    # What each entry holds: a version and an expiry beside the value (read after the measure: a hit).
    sample = await cache.get_record(key_name(entries - 1))
    shape = {"version": sample.version if sample else None, "expires_at": sample.expires_at if sample else None}
    await cache.stop(5)
    if not trace:
        await store.close()
        return {"entries": cached, "before": before, "after": after, "fill_s": fill_s, "traced": None,
                "sample": shape}
    # The same fill again, traced: bytes Python allocated, without the allocator's slack or sqlite's page cache.
    cache = WriteBehindCache(store, replace(FILL_CONFIG, max_entries=TABLE_ROWS))
    gc.collect()
    tracemalloc.start()
    traced0 = tracemalloc.get_traced_memory()[0]
    await fill_cache(cache, entries)
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] - traced0
    tracemalloc.stop()
    await cache.stop(5)
    await store.close()
    return {"entries": cached, "before": before, "after": after, "fill_s": fill_s, "traced": traced,
            "sample": shape}


async def memory_case(folder: Path, seed: int, *, entries: int = TABLE_ROWS, traced: bool = True) -> dict[str, Any]:
    """RSS growth per clean cache entry: ``entries`` ``get()`` misses of preloaded keys, each then cached with
    its value, version and expiry. ``traced``: the same fill again under tracemalloc (slow: about 2x the fill)."""
    pool = value_pool(seed)
    db = folder / f"memory-{entries}.sqlite3"
    store = await build_table(db, "NORMAL", seed, entries, expires_at=time.time() + MEMORY_TTL_S)
    await store.close()
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.flush_bench", "--memory-child", str(db), "--memory-entries", str(entries),
        *([] if traced else ["--memory-untraced"]), cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"the memory measurement failed (exit status {child.returncode})")
    m = json.loads(out)
    if m["entries"] != entries:
        raise RuntimeError(f"expected {entries} clean entries, the cache holds {m['entries']}")
    if not m["sample"]["version"] or m["sample"]["expires_at"] is None:
        raise RuntimeError(f"a cached entry lacks its version or expiry: {m['sample']}")
    sample_key, sample_value = key_name(0), json.dumps(preload_value(pool, 0))
    return {
        "entries": m["entries"], "value_bytes": len(sample_value), "rss_before_mb": round(m["before"] / 2**20, 1),
        "rss_after_mb": round(m["after"] / 2**20, 1), "bytes_per_entry": round((m["after"] - m["before"]) / entries),
        "traced_bytes_per_entry": round(m["traced"] / entries) if m["traced"] is not None else None,
        "with_version_and_expiry": True,
        "key_and_value_objects_bytes": sys.getsizeof(sample_key) + sys.getsizeof(sample_value),
        "miss_fill_us_per_key": round(m["fill_s"] / TABLE_ROWS * 1e6, 1),
    }


def markdown(results: dict[str, Any]) -> str:
    idle = results["idle_lag"]
    out = [
        f"Flush bench: {TABLE_ROWS:,} existing rows, flush in transactions of {FLUSH_BATCH:,} rows, "
        f"1 ms ticker on the event loop (idle loop: lag p50 {idle['p50_ms']:.3f} / p99 {idle['p99_ms']:.3f} / "
        f"max {idle['max_ms']:.3f} ms).",
        "",
        "| synchronous | dirty keys | kind | put µs/key | flush s | rows/s | lag p50 ms | lag p99 ms | lag max ms |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in results["flush"]:
        lag = c["lag"]
        kind = "random updates" if c["kind"] == "update" else "new keys"
        out.append(f"| {c['synchronous']} | {c['dirty']:,} | {kind} "
                   f"| {c['fill_us_per_key']:.2f} | {c['flush_s']:.3f} | {c['rows_per_s']:,} | {lag['p50_ms']:.3f} "
                   f"| {lag['p99_ms']:.3f} | {lag['max_ms']:.3f} |")
    m = results["memory"]
    out += [
        "",
        "Read cache memory, each entry with its version and an expires_at:",
        "",
        "| clean entries | value bytes (JSON) | RSS before MB | RSS after MB | RSS bytes/entry "
        "| traced bytes/entry | key+value objects bytes | miss-and-fill µs/key |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {m['entries']:,} | {m['value_bytes']} | {m['rss_before_mb']} | {m['rss_after_mb']} "
        f"| {m['bytes_per_entry']} | {m['traced_bytes_per_entry']} | {m['key_and_value_objects_bytes']} "
        f"| {m['miss_fill_us_per_key']} |",
    ]
    load = results["loadavg_before"]
    out.append(f"\nLoad average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs "
               "(other work on the machine slows the flush and adds lag).")
    return "\n".join(out) + "\n"


async def run_all(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    sizes = (10_000,) if args.quick else (10_000, 100_000)
    results: dict[str, Any] = {"loadavg_before": list(os.getloadavg()), "idle_lag": await idle_lag(0.5), "flush": []}
    for synchronous in ("NORMAL", "FULL"):
        for dirty in sizes:
            for kind in ("update", "new"):
                case = await flush_case(folder, synchronous, dirty, kind, args.seed)
                print(f"  {synchronous:<6} {dirty:>7} {kind:<6} {case['rows_per_s']:>9,} rows/s  "
                      f"lag p99 {case['lag']['p99_ms']:.2f} ms  max {case['lag']['max_ms']:.2f} ms",
                      file=sys.stderr, flush=True)
                results["flush"].append(case)
    results["memory"] = await memory_case(folder, args.seed)
    results["loadavg_after"] = list(os.getloadavg())
    return results


def main(argv: list[str] | None = None) -> int:
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # as the exercise servers run
    p = argparse.ArgumentParser(prog="python -m bench flush", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="10 000 dirty keys only")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="results folder (default: %(default)s)")
    p.add_argument("--memory-child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--memory-entries", type=int, default=TABLE_ROWS, help=argparse.SUPPRESS)
    p.add_argument("--memory-untraced", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child is not None:
        print(json.dumps(asyncio.run(memory_child(args.memory_child, args.memory_entries,
                                                  not args.memory_untraced))))
        return 0
    with tempfile.TemporaryDirectory(prefix="kvbench-flush-") as tmp:
        results = asyncio.run(run_all(args, Path(tmp)))
    text = markdown(results)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "flush.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (args.out / "flush.md").write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
