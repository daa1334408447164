"""The load generator: one process, asyncio protocols on raw keep-alive sockets, every request freshly signed.

``python -m bench.loadgen`` reads a JSON spec on stdin and writes one JSON result on stdout; bench/run.py
starts it pinned to the core the server does not use. A closed loop: each of N connections sends one request,
waits for its answer, sends the next, until the time is up. The first ``warmup_s`` seconds are not recorded
(they fill exercise 4's cache with the hot keys and warm both servers up); errors count in every phase.

Tornado's ``AsyncHTTPClient`` costs more CPU per request than the server under test, so it would measure
itself: this speaks just enough HTTP/1.1 (``Content-Length`` framing, which is what Tornado sends for a
finished response) and signs with an HMAC state precomputed over the constant prefix of the string to sign.

It also counts every 2xx answer of every phase (``ok_total``: what /incr's exactness check compares with),
and how busy other processes kept its own core. The server's CPU and RSS are summed over ``server_pids``
when the spec has them (a server with forked workers, and the Redis it uses), else ``server_pid``'s; the
CPU of the processes ``cpu_parts`` names is also given apart (``part_cpu_pct``).

Two workloads look at the answers, not just the status: ``keys`` pages through ``/keys?limit=100`` by
following each answer's cursor (so a connection's next request depends on its last answer) and checks every
page; ``etcd_range`` and ``etcd_put`` drive etcd's v3 JSON gateway, unsigned, and check each answer is the
one asked for. A spec with ``count`` ends the measured phase after that many answers (``duration_s`` stays the
bound in time).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import random
import re
import secrets
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import KEY_ID, core_busy_s, hot_keys, key_name, percentile, proc_cpu_s, rss_bytes, value_pool
from kvtornado.auth import EMPTY_BODY_SHA256, SCHEME, load_keys, sign_request
from kvtornado.codec import encode_cursor

WORKLOADS = ("ping", "get", "save", "mix", "save_durable", "batch_get", "batch_save", "incr", "keys",
             "etcd_range", "etcd_put")
# etcd's workloads are not signed: its gateway has no notion of our keys.
UNSIGNED = frozenset({"etcd_range", "etcd_put"})
MIX_GET_SHARE = 0.9
# Longest wait for one answer before it counts as an error (a hang) instead of blocking the bench.
RESPONSE_TIMEOUT_S = 10.0
MAX_ERROR_SAMPLES = 5
# The keys workload: pages of this many keys; a walk through one prefix follows at most KEYS_WALK_PAGES cursors
# before it starts again at a random place, so the pages read are spread over the whole key set.
KEYS_LIMIT = 100
KEYS_WALK_PAGES = 5
# Keys a /keys bench writes that sqlite has never stored: key_name(i) + this suffix (sorts right after key i).
PENDING_SUFFIX = "p"

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]+)", re.IGNORECASE)
_CONNECTION_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)

perf_counter = time.perf_counter


class FastSigner:
    """``KV-HMAC-SHA256`` with the HMAC state after ``scheme\\nkey_id\\n`` computed once and copied per request."""

    def __init__(self, key_id: str, secret: bytes, host: str) -> None:
        self._base = hmac.new(secret, f"{SCHEME}\n{key_id}\n".encode("ascii"), hashlib.sha256)
        self._head = f"{SCHEME} keyid={key_id}, ts="
        self._host = host.lower()
        # Nonces must be unique for the server's whole life, across every load generator process.
        self._tag = secrets.token_hex(8)
        self._count = 0

    def sign(self, method: str, path: str, query: str, body_hash: str, ts: int, nonce: str) -> str:
        h = self._base.copy()
        h.update(f"{ts}\n{nonce}\n{method}\n{self._host}\n{path}\n{query}\n{body_hash}".encode())
        return f"{self._head}{ts}, nonce={nonce}, sig={h.hexdigest()}"

    def authorization(self, method: str, path: str, query: str, body_hash: str) -> str:
        self._count += 1
        return self.sign(method, path, query, body_hash, int(time.time()), f"{self._tag}{self._count:012x}")


def check_signer(key_id: str, secret: bytes, host: str) -> None:
    """Refuse to run when the fast signer disagrees with ``kvtornado.auth.sign_request``."""
    fast = FastSigner(key_id, secret, host)
    body = b'{"key":"k","value":"v"}'
    ts, nonce = 1_700_000_000, "00112233445566778899aabbccddeeff"
    want = sign_request(secret, key_id=key_id, method="POST", host=host, path="/save", query="durable=1",
                        body=body, ts=ts, nonce=nonce)
    got = fast.sign("POST", "/save", "durable=1", hashlib.sha256(body).hexdigest(), ts, nonce)
    if got != want:
        raise SystemExit("bench.loadgen: the fast signer disagrees with kvtornado.auth.sign_request")


def _post(host: str, target: str, auth: str, body: bytes) -> bytes:
    return (f"POST {target} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {auth}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode("ascii") + body


Check = Callable[[bytes], str | None]  # an answer's body -> None when it is right, else what is wrong


@dataclass
class Traffic:
    """What one connection sends: ``build(rng)`` makes the next request; ``check(body)`` looks at each 2xx
    answer (None: it is right, else the error to count) and may keep state for the next ``build``."""

    build: Callable[[random.Random], bytes]
    check: Check | None = None
    counts: Counter[str] = field(default_factory=Counter)  # what the checks saw, summed into the result


def request_builder(spec: dict[str, Any], signer: FastSigner | None, host: str) -> Callable[[], Traffic]:
    """A factory of each connection's ``Traffic``: most workloads are a function of the connection's RNG only."""
    workload = spec["workload"]
    if workload == "keys":
        assert signer is not None
        return lambda: keys_traffic(spec, signer, host)
    if workload.startswith("etcd_"):
        return lambda: etcd_traffic(spec, host)
    assert signer is not None
    seed = int(spec["seed"])
    hot = hot_keys(seed, int(spec["preloaded"]), int(spec["hot"]))
    key_space = int(spec["key_space"])
    batch_ops = int(spec.get("batch_ops", 100))
    pool = value_pool(seed)
    ping = f"GET /ping HTTP/1.1\r\nHost: {host}\r\n\r\n".encode("ascii")
    authorization = signer.authorization

    def get(rng: random.Random) -> bytes:
        query = "key=" + rng.choice(hot)
        auth = authorization("GET", "/get", query, EMPTY_BODY_SHA256)
        return f"GET /get?{query} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {auth}\r\n\r\n".encode("ascii")

    def signed_post(path: str, query: str, body: bytes) -> bytes:
        auth = authorization("POST", path, query, hashlib.sha256(body).hexdigest())
        return _post(host, f"{path}?{query}" if query else path, auth, body)

    def save(rng: random.Random) -> bytes:
        body = f'{{"key":"{key_name(rng.randrange(key_space))}","value":"{rng.choice(pool)}"}}'.encode("ascii")
        return signed_post("/save", "", body)

    def save_durable(rng: random.Random) -> bytes:
        body = f'{{"key":"{key_name(rng.randrange(key_space))}","value":"{rng.choice(pool)}"}}'.encode("ascii")
        return signed_post("/save", "durable=1", body)

    def mix(rng: random.Random) -> bytes:
        return get(rng) if rng.random() < MIX_GET_SHARE else save(rng)

    def batch_get(rng: random.Random) -> bytes:
        ops = ",".join(f'{{"op":"get","key":"{rng.choice(hot)}"}}' for _ in range(batch_ops))
        return signed_post("/batch", "", f'{{"ops":[{ops}]}}'.encode("ascii"))

    def batch_save(rng: random.Random) -> bytes:
        ops = ",".join(f'{{"op":"save","key":"{key_name(rng.randrange(key_space))}","value":"{rng.choice(pool)}"}}'
                       for _ in range(batch_ops))
        return signed_post("/batch", "", f'{{"ops":[{ops}]}}'.encode("ascii"))

    incr_body = json.dumps({"key": spec.get("incr_key", "counter")}, separators=(",", ":")).encode("utf-8")

    def incr(rng: random.Random) -> bytes:
        return signed_post("/incr", "", incr_body)

    builders: dict[str, Callable[[random.Random], bytes]] = {
        "ping": lambda rng: ping, "get": get, "save": save, "mix": mix, "save_durable": save_durable,
        "batch_get": batch_get, "batch_save": batch_save, "incr": incr,
    }
    build = builders[workload]
    return lambda: Traffic(build)


def keys_traffic(spec: dict[str, Any], signer: FastSigner, host: str) -> Traffic:
    """``GET /keys?prefix=P&limit=100[&cursor=C]``: a walk starts at a random place of the 1 000 000 keys
    (a random prefix of 4, 5 or 6 characters, or no prefix and a cursor at a random key) and follows the
    answers' cursors for up to ``KEYS_WALK_PAGES`` pages. Every page is checked: in order, under its prefix,
    full unless it is the last. ``pending_only_keys`` counts the keys seen that only pending writes made."""
    stored = int(spec["stored"])
    state: dict[str, Any] = {"prefix": "", "cursor": None, "pages": 0}
    counts: Counter[str] = Counter()
    authorization = signer.authorization

    def build(rng: random.Random) -> bytes:
        if state["cursor"] is None or state["pages"] >= KEYS_WALK_PAGES:
            start = key_name(rng.randrange(stored))
            if rng.random() < 0.25:  # the whole key set, from a position a cursor names
                state["prefix"], state["cursor"] = "", encode_cursor("", start)
            else:
                state["prefix"], state["cursor"] = start[: rng.choice((4, 5, 6))], None
            state["pages"] = 0
        query = f"prefix={state['prefix']}&limit={KEYS_LIMIT}"
        if state["cursor"] is not None:
            query += f"&cursor={state['cursor']}"  # base64url: nothing to percent-encode
        auth = authorization("GET", "/keys", query, EMPTY_BODY_SHA256)
        return f"GET /keys?{query} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {auth}\r\n\r\n".encode("ascii")

    def check(body: bytes) -> str | None:
        page = json.loads(body)
        keys = [item["key"] for item in page["keys"]]
        prefix = state["prefix"]
        state["cursor"], state["pages"] = page["cursor"], state["pages"] + 1
        counts["pages"] += 1
        counts["keys"] += len(keys)
        counts["pending_only_keys"] += sum(k.endswith(PENDING_SUFFIX) for k in keys)
        if keys != sorted(keys) or not all(k.startswith(prefix) for k in keys):
            return f"a page out of order or outside prefix {prefix!r}: {keys[:3]}..."
        if page["cursor"] is not None and len(keys) != KEYS_LIMIT:
            return f"a page of {len(keys)} keys with a next cursor (prefix {prefix!r})"
        return None

    return Traffic(build, check, counts)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def etcd_traffic(spec: dict[str, Any], host: str) -> Traffic:
    """etcd's v3 JSON gateway (``/v3/kv/range``, ``/v3/kv/put``), keys and values base64 as it wants them:
    a range of one of the hot keys (the answer must hold it), or a put of a random key of the key space (the
    answer must carry a header). The same keys and 100-byte values as our /get and /save."""
    seed = int(spec["seed"])
    hot = [_b64(k) for k in hot_keys(seed, int(spec["preloaded"]), int(spec["hot"]))]
    key_space = int(spec["key_space"])
    pool = [_b64(v) for v in value_pool(seed)]
    head = f"POST {{}} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: "

    def post(path: str, body: bytes) -> bytes:
        return f"{head.format(path)}{len(body)}\r\n\r\n".encode("ascii") + body

    if spec["workload"] == "etcd_range":
        def build(rng: random.Random) -> bytes:
            return post("/v3/kv/range", f'{{"key":"{rng.choice(hot)}"}}'.encode("ascii"))

        def check(body: bytes) -> str | None:
            return None if b'"kvs":[' in body else "range found no key: " + body[:200].decode("utf-8", "replace")
    else:
        def build(rng: random.Random) -> bytes:
            key = _b64(key_name(rng.randrange(key_space)))
            return post("/v3/kv/put", f'{{"key":"{key}","value":"{rng.choice(pool)}"}}'.encode("ascii"))

        def check(body: bytes) -> str | None:
            return None if body.startswith(b'{"header":') else "put answered: " + body[:200].decode("utf-8", "replace")

    return Traffic(build, check)


class Run:
    """Counters shared by the connections of one run; the phase flags are flipped by timers."""

    def __init__(self, count: int | None = None) -> None:
        self.measuring = False
        self.stopping = False
        self.count = count  # answers to measure; None: until the time is up
        self.on_count: Callable[[], None] = lambda: None  # called once the measured answers reach ``count``
        self.latencies: list[float] = []
        self.warmup_requests = 0
        self.ok_total = 0  # 2xx answers in every phase (warm-up and drain included): what the server applied
        self.errors: Counter[str] = Counter()
        self.samples: list[str] = []

    def error(self, what: str, detail: str = "") -> None:
        self.errors[what] += 1
        if len(self.samples) < MAX_ERROR_SAMPLES:
            self.samples.append(f"{what}: {detail}"[:300])


class Connection(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    def __init__(self, run: Run, traffic: Traffic, rng: random.Random) -> None:
        self.run = run
        self.traffic = traffic
        self.build = traffic.build
        self.check = traffic.check
        self.rng = rng
        self.buf = b""
        self.sent_at = 0.0
        self.waiting = False
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send_next(self) -> None:
        if self.run.stopping:
            self.finish()
            return
        data = self.build(self.rng)
        assert self.transport is not None
        self.waiting = True
        self.sent_at = perf_counter()
        self.transport.write(data)

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.buf = self.buf + data if self.buf else data
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        m = _CONTENT_LENGTH.search(buf, 0, end)
        if m is None:
            self.run.error("framing", "a response without Content-Length: " + repr(buf[:200]))
            self.waiting = False
            self.finish()
            return
        total = end + 4 + int(m.group(1))
        if len(buf) < total:
            return
        now = perf_counter()
        self.buf = buf[total:]
        self.waiting = False
        run = self.run
        status = buf[9:12]
        if run.measuring:
            run.latencies.append(now - self.sent_at)
            if run.count is not None and len(run.latencies) >= run.count:
                run.on_count()
        elif not run.stopping:
            run.warmup_requests += 1
        if status[0:1] == b"2":
            run.ok_total += 1
            if self.check is not None:
                wrong = self.check(buf[end + 4 : total])
                if wrong is not None:
                    run.error("wrong_answer", wrong)
        else:
            run.error(status.decode("ascii", "replace"), buf[end + 4 : total].decode("utf-8", "replace"))
        if self.buf:
            run.error("framing", "bytes after the response: " + repr(self.buf[:100]))
            self.finish()
        elif _CONNECTION_CLOSE.search(buf, 0, end):
            run.error("closed", "the server closed the keep-alive connection")
            self.finish()
        else:
            self.send_next()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiting:
            self.run.error("connection_lost", repr(exc))
            self.waiting = False
        elif not self.run.stopping:
            self.run.error("connection_lost", "closed between requests")
        if not self.done.done():
            self.done.set_result(None)


async def drive(spec: dict[str, Any]) -> dict[str, Any]:
    host_ip, port = spec["host"], int(spec["port"])
    host = f"{host_ip}:{port}"
    signer = None
    if spec["workload"] not in UNSIGNED:
        secret = load_keys(Path(spec["keys_file"]), create=False).secrets[KEY_ID]
        check_signer(KEY_ID, secret, host)
        signer = FastSigner(KEY_ID, secret, host)
    traffic_for = request_builder(spec, signer, host)
    server_pid = spec.get("server_pid")
    # Every process that serves (forked workers, the Redis the server keeps its cache in): their CPU and memory
    # count as the server's, and ``cpu_parts`` names some of them to show their share apart.
    server_pids = [int(p) for p in spec.get("server_pids") or ([server_pid] if server_pid else [])]
    parts = {name: [int(p) for p in pids] for name, pids in spec.get("cpu_parts", {}).items()}
    server_core = spec.get("server_core")  # None when not pinned: then nobody else's load can be told apart
    client_core = spec.get("client_core")
    n = int(spec["connections"])
    loop = asyncio.get_running_loop()
    run = Run(int(spec["count"]) if spec.get("count") else None)
    conns: list[Connection] = []
    for i in range(n):
        # One RNG per connection, seeded by name: the same seed gives every connection the same keys.
        rng = random.Random(f"{spec['seed']}:{spec['workload']}:{n}:{i}")
        _, proto = await loop.create_connection(lambda rng=rng: Connection(run, traffic_for(), rng), host_ip, port)
        conns.append(proto)

    marks: dict[str, float] = {}
    parts0: dict[str, float] = {}
    parts1: dict[str, float] = {}
    stopped = asyncio.Event()

    def start_measuring() -> None:
        marks["wall0"], marks["cpu0"] = perf_counter(), time.process_time()
        if server_pids:
            marks["srv0"] = cpu_s(server_pids)
            parts0.update((name, cpu_s(pids)) for name, pids in parts.items())
        if server_core is not None:
            marks["core0"] = core_busy_s(server_core)
        if client_core is not None:
            marks["ccore0"] = core_busy_s(client_core)
        run.measuring = True

    def stop_measuring() -> None:
        if run.stopping:  # the count was reached before the time was up
            return
        marks["wall1"], marks["cpu1"] = perf_counter(), time.process_time()
        if server_pids:
            marks["srv1"] = cpu_s(server_pids)
            parts1.update((name, cpu_s(pids)) for name, pids in parts.items())
        if server_core is not None:
            marks["core1"] = core_busy_s(server_core)
        if client_core is not None:
            marks["ccore1"] = core_busy_s(client_core)
        run.measuring = False
        run.stopping = True
        stopped.set()

    warmup_s, duration_s = float(spec["warmup_s"]), float(spec["duration_s"])
    run.on_count = stop_measuring
    loop.call_later(warmup_s, start_measuring)
    loop.call_later(warmup_s + duration_s, stop_measuring)
    for c in conns:
        c.send_next()
    await stopped.wait()  # the time is up (a timer) or the count was reached (an answer)
    await asyncio.wait([c.done for c in conns], timeout=RESPONSE_TIMEOUT_S)
    for c in conns:
        if not c.done.done():
            run.error("timeout", f"no answer within {RESPONSE_TIMEOUT_S:.0f} s after the run ended")
            c.finish()

    wall = marks["wall1"] - marks["wall0"]
    lat = sorted(run.latencies)
    count = len(lat)
    client_cpu = marks["cpu1"] - marks["cpu0"]
    server_cpu = marks.get("srv1", 0.0) - marks.get("srv0", 0.0)
    # Other processes on the server's core (the machine is shared): its busy time minus the server's own.
    other = max(0.0, marks["core1"] - marks["core0"] - server_cpu) if server_core is not None else None
    # ... and on the load generator's core: its busy time minus this process's own.
    other_client = max(0.0, marks["ccore1"] - marks["ccore0"] - client_cpu) if client_core is not None else None
    return {
        "workload": spec["workload"],
        "connections": n,
        "seconds": round(wall, 3),
        "requests": count,
        "warmup_requests": run.warmup_requests,
        "ok_total": run.ok_total,
        "rps": round(count / wall, 1) if wall > 0 else 0.0,
        "latency_ms": {
            "p50": round(percentile(lat, 50) * 1000, 3),
            "p90": round(percentile(lat, 90) * 1000, 3),
            "p99": round(percentile(lat, 99) * 1000, 3),
            "max": round(lat[-1] * 1000, 3) if lat else 0.0,
            "mean": round(sum(lat) / count * 1000, 3) if count else 0.0,
        },
        "errors": sum(run.errors.values()),
        "errors_by_kind": dict(run.errors),
        "error_samples": run.samples,
        "client_cpu_pct": round(100 * client_cpu / wall, 1) if wall > 0 else 0.0,
        "server_cpu_pct": round(100 * server_cpu / wall, 1) if wall > 0 and server_pids else None,
        "part_cpu_pct": {name: round(100 * (parts1[name] - parts0[name]) / wall, 1) for name in parts1 if wall > 0},
        "server_core_other_pct": round(100 * other / wall, 1) if other is not None and wall > 0 else None,
        "client_core_other_pct": round(100 * other_client / wall, 1) if other_client is not None and wall > 0 else None,
        # The nonce store grows with every signed request (up to auth.max_nonces): watch the server's memory.
        "server_rss_mb": round(sum(map(rss_bytes, server_pids)) / 2**20, 1) if server_pids else None,
        "client_cpu_us_per_req": round(1e6 * client_cpu / count, 1) if count else None,
        "server_cpu_us_per_req": round(1e6 * server_cpu / count, 1) if count and server_pids else None,
        # What the workload's answer checks counted (the keys workload: pages, keys, pending-only keys seen).
        "seen": dict(sum((c.traffic.counts for c in conns), Counter())),
    }


def cpu_s(pids: list[int]) -> float:
    return sum(map(proc_cpu_s, pids))


def main() -> int:
    spec = json.load(sys.stdin)
    if spec.get("workload") not in WORKLOADS:
        print(f"bench.loadgen: workload must be one of {', '.join(WORKLOADS)}", file=sys.stderr)
        return 2
    result = asyncio.run(drive(spec))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
