"""``python -m bench counter [--clients 50] [--rounds 200] [--exercise 3|4] [--backoff-ms 1]``: lost updates.

N clients each do ROUNDS read-modify-writes of one counter: `get_record`, +1, `save(..., if_version=v)`,
reading again on 412 after a jittered exponential backoff (``--backoff-ms``, what a compare-and-set client
does under contention: without it, 50 clients retrying at once make every success cost ~50 refused pairs).
Then `/incr` from 10 threads, ROUNDS each. Prints the end values against what they must be and exits 1 on a
mismatch. It starts exercise 3 and exercise 4 in a temp dir, one after the other, and checks both. Bounded:
every request has the client's timeout and the work is a fixed count.
"""

from __future__ import annotations

import argparse
import functools
import random
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench.run import listening_port
from kvtornado.client import KVClient, KVClientError, Signer

ROOT = Path(__file__).resolve().parent.parent


def run_threads(n: int, work: Callable[[KVClient], int], make: Callable[[], KVClient]) -> tuple[int, list[str]]:
    done: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()

    def one() -> None:
        try:
            with make() as c:
                k = work(c)
            with lock:
                done.append(k)
        except Exception as exc:  # counted and printed: a bench reports, it does not hide
            with lock:
                errors.append(repr(exc))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done), errors


def check(make: Callable[[], KVClient], clients: int, rounds: int, label: str, backoff_ms: float = 0.0) -> bool:
    key = f"counter-{secrets.token_hex(4)}"

    def cas(c: KVClient) -> int:
        retries = 0
        rng = random.Random()
        for _ in range(rounds):
            refused = 0
            while True:
                try:
                    rec = c.get_record(key)
                    value, version = rec["value"], rec["version"]
                except KVClientError as exc:
                    if exc.status != 404:
                        raise
                    value, version = 0, 0
                try:
                    c.save(key, value + 1, if_version=version)
                    break
                except KVClientError as exc:
                    if exc.status != 412:
                        raise
                    retries += 1
                    refused += 1
                    if backoff_ms > 0:  # full jitter, doubling per refusal, capped at 64x the base
                        time.sleep(rng.uniform(0, backoff_ms * 2 ** min(refused, 6)) / 1000)
        return retries

    start = time.monotonic()
    retries, errors = run_threads(clients, cas, make)
    with make() as c:
        end = c.get(key)
    ok = end == clients * rounds and not errors
    print(f"{label}: {clients} clients x {rounds} if_version read-modify-writes (backoff {backoff_ms} ms): counter "
          f"{end} of {clients * rounds}, {retries} retries on 412, {time.monotonic() - start:.1f} s"
          + ("" if ok else f"  MISMATCH {errors[:3]}"), flush=True)

    ikey = key + "-incr"
    start = time.monotonic()
    def incr(c: KVClient) -> int:
        for _ in range(rounds):
            c.incr(ikey)
        return 0

    _, ierrors = run_threads(10, incr, make)
    with make() as c:
        iend = c.get(ikey)
    iok = iend == 10 * rounds and not ierrors
    print(f"{label}: 10 threads x {rounds} /incr: {iend} of {10 * rounds}, {time.monotonic() - start:.1f} s"
          + ("" if iok else f"  MISMATCH {ierrors[:3]}"), flush=True)
    return ok and iok


def serve(exercise: int, folder: Path) -> tuple[subprocess.Popen[bytes], str, Signer]:
    key_id, secret = "bench", secrets.token_urlsafe(32)
    keys = folder / "kv.keys"
    keys.write_text(f"{key_id} {secret}\n")
    keys.chmod(0o600)
    (folder / "config.yaml").write_text(
        f"server:\n  port: 0\nauth:\n  secret_file: {keys}\nstorage:\n  path: {folder / 'kv.sqlite3'}\n")
    # WARNING: at INFO every 412 is a log line, and the server would spend its time writing them. So the
    # address is not logged: the port is read from /proc, as the HTTP bench does.
    proc = subprocess.Popen([sys.executable, str(ROOT / f"exercise{exercise}.py"), "--config",
                             str(folder / "config.yaml"), "--log-level", "WARNING"], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        port = listening_port(proc.pid)
        if port:
            return proc, f"http://127.0.0.1:{port}", Signer(key_id, secret.encode())
        time.sleep(0.05)  # polling for the listening socket, with the deadline above
    proc.kill()
    raise SystemExit(f"exercise{exercise}.py did not start")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench counter", description=__doc__)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--backoff-ms", type=float, default=1.0,
                        help="base of the jittered backoff after a 412 (0: retry at once; default: %(default)s)")
    parser.add_argument("--exercise", type=int, choices=(3, 4), action="append",
                        help="only this exercise (repeatable; default: 3 and 4)")
    args = parser.parse_args(argv)
    ok = True
    for exercise in args.exercise or (3, 4):
        with tempfile.TemporaryDirectory() as tmp:
            proc, url, signer = serve(exercise, Path(tmp))
            try:
                ok &= check(functools.partial(KVClient, url, signer), args.clients, args.rounds, f"exercise{exercise}",
                            args.backoff_ms)
            finally:
                proc.terminate()
                proc.wait(30)
    return 0 if ok else 1
