"""The honest comparison for docs/DESIGN.md: the same /ping on our Tornado server and on Starlette/uvicorn.

    python -m bench asgi --python /path/to/python-with-starlette-and-uvicorn [--duration S]

Both servers run pinned to the same core and are driven by the same load generator (bench/loadgen.py,
``ping`` workload) from the other core. Starlette and uvicorn are not project dependencies: the ASGI side
runs under the interpreter given by ``--python`` (a scratch venv with ``pip install starlette
'uvicorn[standard]'``); without it the command says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT
from bench.run import SERVER_START_TIMEOUT_S, listening_port, pinning, write_keys_file

ASGI_APP = '''
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route


async def ping(request):
    return JSONResponse({"ping": "pong"}, headers={"Cache-Control": "no-store"})

app = Starlette(routes=[Route("/ping", ping)])
'''


def _start(cmd: list[str], cwd: Path) -> tuple[subprocess.Popen[bytes], int]:
    err = open(cwd / f"server-{len(list(cwd.glob('server-*')))}.stderr", "wb")  # noqa: SIM115 - child owns it
    proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[-1]} exited with {proc.returncode}")
        port = listening_port(proc.pid)
        if port:
            return proc, port
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{cmd} did not listen within {SERVER_START_TIMEOUT_S} s")


def _drive(port: int, pid: int, folder: Path, seconds: float, pin: list[str]) -> dict[str, Any]:
    spec = {
        "host": "127.0.0.1", "port": port, "server_pid": pid, "server_core": 0 if pin else None,
        "keys_file": str(folder / "bench.keys"), "workload": "ping", "connections": 32,
        "warmup_s": 1.0, "duration_s": seconds, "seed": 1, "preloaded": 10, "hot": 1, "key_space": 10,
    }
    proc = subprocess.run([*pin, sys.executable, "-m", "bench.loadgen"], cwd=ROOT, input=json.dumps(spec),
                          capture_output=True, text=True, timeout=seconds + 60, check=True)
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench asgi", description=__doc__.split("\n\n")[0])
    p.add_argument("--python", required=True, help="an interpreter with starlette and uvicorn installed")
    p.add_argument("--duration", type=float, default=10.0)
    args = p.parse_args(argv)
    check = subprocess.run([args.python, "-c", "import starlette, uvicorn"], capture_output=True, check=False)
    if check.returncode != 0:
        print(f"bench asgi: {args.python} cannot import starlette and uvicorn", file=sys.stderr)
        return 2
    server_pin, client_pin = pinning()
    rows = []
    with tempfile.TemporaryDirectory(prefix="kv-asgi-") as tmp:
        folder = Path(tmp)
        write_keys_file(folder / "bench.keys", secrets.token_hex(32))
        (folder / "asgi_app.py").write_text(ASGI_APP)
        (folder / "config.yaml").write_text("server: {port: 0}\nauth: {secret_file: bench.keys}\n")
        servers = {
            "Tornado, exercise1.py (our BaseHandler)": [
                *server_pin, sys.executable, str(ROOT / "exercise1.py"), "--config", "config.yaml",
                "--log-level", "WARNING"],
            "Starlette on uvicorn (httptools, uvloop)": [
                *server_pin, args.python, "-m", "uvicorn", "asgi_app:app", "--port", "0",
                "--log-level", "warning", "--no-access-log"],
        }
        for name, cmd in servers.items():
            proc, port = _start(cmd, folder)
            try:
                r = _drive(port, proc.pid, folder, args.duration, client_pin)
            finally:
                proc.terminate()
                proc.wait(30)
            rows.append((name, r))
    base = rows[0][1]["rps"]
    print(f"GET /ping, 32 connections, {args.duration:g} s, server on one core, same load generator:\n")
    print("| server | req/s | p50 ms | p99 ms | errors | server CPU % | client CPU % | vs Tornado |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows:
        lat = r["latency_ms"]
        print(f"| {name} | {r['rps']:,.0f} | {lat['p50']:.2f} | {lat['p99']:.2f} | {r['errors']} | "
              f"{r['server_cpu_pct']:.0f} | {r['client_cpu_pct']:.0f} | {r['rps'] / base:.2f} |")
    return 1 if any(r["errors"] for _, r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
