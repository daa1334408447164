"""Where a server's CPU goes per request: py-spy samples an exercise under one bench workload.

    python -m bench profile [--exercise 4] [--workload get] [--connections 32] [--seconds 8]

py-spy is not a dependency (``.venv/bin/pip install py-spy``). The server and the load generator run exactly
as in the bench (pinned, same config, same preload); py-spy samples the server's Python stacks (pausing it for
each sample, so the profiled run is somewhat slower than the bench). Each sample of the event-loop thread is
put in the category of the frame nearest its leaf that names one, and the shares are turned into µs per
request with the server CPU per request measured during the same run.
"""

from __future__ import annotations

import argparse
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as ``python bench/profile_server.py``: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import run as bench_run

# (category, frame-name fragments), checked from the leaf frame towards the root: the nearest match wins.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("socket I/O: recv/send syscalls and iostream buffering",
     ("read_from_fd", "write_to_fd", "_read_to_buffer", "_find_read_pos", "_handle_write", "_handle_read",
      "BaseIOStream._handle_events", "_consume", "_read_from_buffer")),
    ("event loop and timers: epoll registration, call_later/with_timeout per read, callbacks",
     ("with_timeout", "call_later", "call_at", "add_timeout", "remove_timeout", "selectors.py", "add_reader",
      "remove_reader", "update_handler", "_add_io_state", "IOLoop.current", "TimerHandle", "cancel")),
    ("auth: KV-HMAC-SHA256 verify (parse header, sha256 body, HMAC, nonce store)",
     ("Authenticator.verify", "BaseHandler._authenticate")),
    ("response: set headers, finish, write headers + body to the socket",
     ("BaseHandler.send_json", "RequestHandler.finish", "RequestHandler.flush", "write_headers",
      "BaseIOStream.write", "RequestHandler.set_header", "RequestHandler.clear",
      "RequestHandler.set_status")),
    ("handler body: query parse, cache/store call, JSON",
     ("GetHandler.do_get", "SaveHandler.do_post", "PingHandler.do_get", "WriteBehindCache.", "SqliteStore.",
      "codec.py")),
    ("tornado dispatch: routing, RequestHandler set-up, prepare/on_finish",
     ("find_handler", "RequestHandler.__init__", "_HandlerDelegate", "RequestHandler._execute",
      "BaseHandler._dispatch", "BaseHandler.prepare", "BaseHandler.on_finish", "BaseHandler.initialize",
      "_RoutingDelegate", "RequestHandler.on_finish", "_log_request", "Application.log_request")),
    ("request parsing: request line, headers, HTTPServerRequest",
     ("_parse_headers", "HTTPHeaders.parse", "HTTPServerRequest.__init__", "parse_request_start_line",
      "read_until_regex", "_read_body", "HTTP1Connection._read_message")),
    ("event loop and coroutine plumbing: futures, task steps, the rest", ("",)),
]
_FRAME = re.compile(r"(.*) \((.*?):\d+\)$")


def frame_name(frame: str) -> str:
    m = _FRAME.match(frame)
    return f"{m.group(1)} ({m.group(2)})" if m else frame


def categorise(stack: list[str]) -> str:
    for frame in reversed(stack):
        for name, fragments in CATEGORIES[:-1]:
            if any(f in frame for f in fragments):
                return name
    return CATEGORIES[-1][0]


def summarise(raw: str, us_per_request: float) -> dict[str, Any]:
    """Category shares and top self-time functions of the event-loop thread's samples."""
    cats: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    main = other = 0
    for line in raw.splitlines():
        stack_text, _, count = line.rpartition(" ")
        if not stack_text:
            continue
        n = int(count)
        stack = [frame_name(f) for f in stack_text.split(";")]
        # The event-loop thread's stacks start at the exercise's module; sqlite worker threads do not.
        if not stack[0].startswith("<module> (exercise"):
            other += n
            continue
        main += n
        cats[categorise(stack)] += n
        leaves[stack[-1]] += n

    def us(n: int) -> float:
        return round(us_per_request * n / main, 1) if main else 0.0

    return {
        "main_samples": main, "other_thread_samples": other,
        "categories": [{"category": c, "share_pct": round(100 * n / main, 1), "us_per_request": us(n)}
                       for c, n in cats.most_common()],
        "top_self": [{"function": f, "share_pct": round(100 * n / main, 1), "us_per_request": us(n)}
                     for f, n in leaves.most_common(15)],
    }


def markdown(args: argparse.Namespace, cell: dict[str, Any], summary: dict[str, Any]) -> str:
    out = [
        f"exercise {args.exercise}, {bench_run.WORKLOAD_TITLES[args.workload]} x{args.connections}, under py-spy: "
        f"{cell['rps']:,.0f} req/s, server CPU {cell['server_cpu_pct']}%, {cell['server_cpu_us_per_req']} µs CPU "
        f"per request, {cell['errors']} errors; {summary['main_samples']} event-loop samples "
        f"({summary['other_thread_samples']} in sqlite/other threads, mostly idle waits, left out).",
        "",
        "| where the event-loop thread's time goes | share | µs/request |",
        "| --- | ---: | ---: |",
    ]
    out += [f"| {c['category']} | {c['share_pct']:.1f}% | {c['us_per_request']:.1f} |" for c in summary["categories"]]
    out += ["", "µs/request = share times the process's CPU per request (for /save that includes the sqlite writer "
            "thread's CPU, so the event-loop rows are slightly overstated)."]
    out += ["", "| top functions by self time | share | µs/request |", "| --- | ---: | ---: |"]
    out += [f"| `{t['function']}` | {t['share_pct']:.1f}% | {t['us_per_request']:.1f} |" for t in summary["top_self"]]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--exercise", type=int, choices=bench_run.EXERCISES, default=4)
    # The grid's workloads and the cells beside it that need no set-up of their own (/incr and /keys do).
    p.add_argument("--workload", choices=(*bench_run.WORKLOADS, "save_durable", "batch_get", "batch_save"),
                   default="get")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--seconds", type=float, default=8.0, help="sampled seconds (default: %(default)s)")
    p.add_argument("--rate", type=int, default=250, help="samples per second (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=bench_run.ROOT / "bench" / "results")
    args = p.parse_args(argv)
    venv_spy = Path(sys.executable).with_name("py-spy")
    spy = str(venv_spy) if venv_spy.exists() else shutil.which("py-spy")
    if spy is None:
        print("py-spy is not installed: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    pins = bench_run.pinning()
    warmup_s = 1.0
    load = argparse.Namespace(warmup=warmup_s, duration=args.seconds + 1.0, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    raw_path = args.out / f"profile-ex{args.exercise}-{args.workload}.txt"
    with tempfile.TemporaryDirectory(prefix="kvbench-profile-") as tmp:
        folder = Path(tmp) / f"exercise{args.exercise}"
        config = bench_run.prepare(folder, secrets.token_hex(32), args.seed)
        server = bench_run.Server(args.exercise, config, folder, pins[0])
        cell: dict[str, Any] = {}
        try:
            driver = threading.Thread(target=lambda: cell.update(
                bench_run.run_cell(server, folder, args.workload, args.connections, load, pins[1])))
            driver.start()
            time.sleep(warmup_s + 0.5)  # sample only the measured part
            spy_run = subprocess.run(
                [spy, "record", "-p", str(server.proc.pid), "-d", str(max(1, int(args.seconds))),
                 "-r", str(args.rate), "-f", "raw", "-o", str(raw_path)],
                capture_output=True, text=True, check=False,
            )
            driver.join()
        finally:
            server.stop()
    if spy_run.returncode != 0 or not raw_path.exists():
        print(f"py-spy failed ({spy_run.returncode}): {spy_run.stderr.strip()[-500:]}", file=sys.stderr)
        return 1
    summary = summarise(raw_path.read_text(encoding="utf-8"), cell.get("server_cpu_us_per_req") or 0.0)
    text = markdown(args, cell, summary)
    print(text)
    (args.out / f"profile-ex{args.exercise}-{args.workload}.md").write_text(text, encoding="utf-8")
    return 1 if cell.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
