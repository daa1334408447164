"""Memory and acknowledgements while sqlite fails (G5 by bytes, G9): ``python bench/outage_memory.py [MODE]``.

Starts ``exercise4.py`` (default config, ``cache.writes_while_failing: MODE``, refuse by default) in a fresh
temp dir, holds sqlite's write lock from a second connection, sends 1 500 saves of 1 MiB values on one
keep-alive connection, prints the server's RSS and how many saves were acknowledged, then kills it with
SIGKILL and counts what reached sqlite. Bounded: 1 500 requests, then it stops.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kvtornado.client import KVClient, Signer  # noqa: E402

SAVES = 1500
SECRET = os.urandom(32).hex()


def rss_mb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
    m = re.search(r"VmRSS:\s+(\d+)", status)
    return int(m.group(1)) // 1024 if m else -1


def main(mode: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "keys").write_text(f"bench {SECRET}\n", encoding="ascii")
        os.chmod(d / "keys", 0o600)
        (d / "c.yaml").write_text(
            f"server: {{port: 0}}\nauth: {{secret_file: keys}}\ncache: {{writes_while_failing: {mode}}}\n",
            encoding="utf-8")
        with (d / "log").open("w") as log:
            proc = subprocess.Popen([sys.executable, str(ROOT / "exercise4.py"), "--config", str(d / "c.yaml")],
                                    stderr=log)
        try:
            deadline = time.monotonic() + 15
            port = None
            while port is None:
                if time.monotonic() > deadline:
                    raise SystemExit("the server did not start")
                time.sleep(0.05)
                m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", (d / "log").read_text(encoding="utf-8"))
                port = int(m.group(1)) if m else None
            c = KVClient(f"http://127.0.0.1:{port}", Signer("bench", SECRET.encode()))
            c.save("warm", 1, durable=True)
            print(f"RSS at start: {rss_mb(proc.pid)} MB")
            lock = sqlite3.connect(str(d / "data" / "kv.sqlite3"), isolation_level=None)
            lock.execute("BEGIN IMMEDIATE")
            body_value = "x" * (1024 * 1024 - 2)
            acked = 0
            started = time.monotonic()
            for i in range(SAVES):
                r = c.request("POST", "/save", body=json.dumps({"key": f"k{i}", "value": body_value}).encode())
                acked += r.status == 200
            dirty = c.stats()["cache"]["dirty_bytes"]
            print(f"{mode}: {SAVES} saves of 1 MiB in {time.monotonic() - started:.1f} s: acknowledged {acked}, "
                  f"refused {SAVES - acked}; RSS {rss_mb(proc.pid)} MB; dirty_bytes {dirty}")
            c.close()
        finally:
            proc.kill()
            proc.wait()
        lock.close()
        rows = sqlite3.connect(str(d / "data" / "kv.sqlite3")).execute("SELECT count(*) FROM kv").fetchone()[0]
        print(f"after kill -9: {rows - 1} of the {acked} acknowledged saves are in sqlite")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "refuse")
