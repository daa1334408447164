"""What the orchestrator, the load generator and the flush bench share: the key set, /proc readers, percentiles.

The key set is a pure function of the seed, so the server preload and the load generator agree on it without
passing 10 000 keys around, and the same seed gives the same key sequence run after run.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import socket
import string
from collections.abc import Callable, Sequence
from pathlib import Path

from kvtornado.ops import Record
from kvtornado.store import SqliteStore

ROOT = Path(__file__).resolve().parent.parent
KEY_ID = "bench"
VALUE_BYTES = 100
VALUE_POOL = 1024  # distinct values; a save picks one, so building a body costs no random text
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def key_name(i: int) -> str:
    """Key ``i`` of the key space; plain ASCII, so it needs no percent-encoding in a query string."""
    return f"k{i:07d}"


def value_pool(seed: int) -> list[str]:
    """``VALUE_POOL`` strings of ``VALUE_BYTES`` ASCII letters and digits (JSON-safe as they are)."""
    rng = random.Random(f"{seed}:values")
    alphabet = string.ascii_letters + string.digits
    return ["".join(rng.choices(alphabet, k=VALUE_BYTES)) for _ in range(VALUE_POOL)]


def preload_value(pool: Sequence[str], i: int) -> str:
    return pool[i % len(pool)]


PRELOAD_BATCH = 10_000


async def preload_rows(store: SqliteStore, seed: int, count: int, *, name: Callable[[int], str] = key_name,
                       expires_at: float | None = None) -> None:
    """Rows ``name(0)`` .. ``name(count - 1)`` with 100-byte values, committed through the store's batched path.

    Schema 2 rows carry a version each: they are reserved from the store first (``reserve_versions`` moves
    its high-water mark, one commit for them all), so a server opened on the file never hands one of them out
    again. The next batch is built while the writer thread commits the last one: for 1 000 000 rows, building
    them in Python costs about as much as sqlite's inserts.
    """
    if count <= 0:
        return
    encoded = [json.dumps(v) for v in value_pool(seed)]  # JSON text once per distinct value, not per row
    first, _ = await store.reserve_versions(count)
    writing: asyncio.Task[None] | None = None
    for start in range(0, count, PRELOAD_BATCH):
        rows = [(name(i), Record(encoded[i % len(encoded)], first + i, expires_at))
                for i in range(start, min(count, start + PRELOAD_BATCH))]
        if writing is not None:
            await writing
        writing = asyncio.create_task(store.write_rows(rows))
    assert writing is not None
    await writing


def free_port() -> int:
    """A port nothing listens on now (the kernel's choice; the server started on it binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def hot_keys(seed: int, preloaded: int, hot: int) -> list[str]:
    """``hot`` keys drawn from the preloaded ones, the same for a given seed."""
    rng = random.Random(f"{seed}:hot")
    return [key_name(i) for i in sorted(rng.sample(range(preloaded), min(hot, preloaded)))]


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a whole process (every thread) from ``/proc/PID/stat``."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        text = f.read()
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / CLK_TCK


def child_pids(pid: int) -> list[int]:
    """The live children of a process (every thread's), from ``/proc/PID/task/*/children``."""
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as f:
                found += [int(x) for x in f.read().split()]
    except OSError:  # the process (or a thread of it) is gone
        pass
    return sorted(found)


def core_busy_s(core: int) -> float:
    """Seconds one CPU core spent on anything but idle and iowait, from ``/proc/stat``."""
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            if line.startswith(f"cpu{core} "):
                ticks = [int(x) for x in line.split()[1:]]
                return (sum(ticks[:8]) - ticks[3] - ticks[4]) / CLK_TCK  # user..steal minus idle, iowait
    raise ValueError(f"no cpu{core} in /proc/stat")


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * PAGE_BYTES


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]
