"""Throwaway service processes for the SPEC §10 tests (§8): a PostgreSQL server started from the installed
binaries, one per test session, on an ephemeral port, trust auth on 127.0.0.1, stopped and removed at the end.

Its folder is under ``/var/tmp`` (``kvt-pg-*``), not ``tmp_path``: PostgreSQL refuses to run as root, so it runs
as the ``postgres`` user when the tests run as root, and pytest's temporary folders are private to their owner.
Without the binaries the tests that need it are skipped, saying what to install; under
``KV_REQUIRE_SERVICES=1`` (CI) they fail instead.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

REQUIRE_ENV = "KV_REQUIRE_SERVICES"
PG_INSTALL = "apt-get install -y postgresql"
START_TIMEOUT_S = 30


def require_services() -> bool:
    return os.environ.get(REQUIRE_ENV) == "1"


def missing(what: str, install: str) -> None:
    """Skip the test (fail it under ``KV_REQUIRE_SERVICES=1``): ``what`` is not installed."""
    message = f"{what} not found; install it with `{install}`"
    if require_services():
        pytest.fail(f"{message} ({REQUIRE_ENV}=1 requires it)", pytrace=False)
    pytest.skip(message)


def pg_bindir() -> Path | None:
    """Where ``initdb`` and ``pg_ctl`` are: on PATH, else Debian's newest /usr/lib/postgresql/<N>/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    return Path(candidates[-1]).parent if candidates else None


def as_postgres() -> list[str]:
    """The command prefix that runs a program as the ``postgres`` user (PostgreSQL refuses to run as root).

    ``runuser`` lives in /usr/sbin, which a CI's minimal PATH may leave out; util-linux's ``setpriv`` in
    /usr/bin does the same."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    runuser = shutil.which("runuser", path=search)
    if runuser:
        return [runuser, "-u", "postgres", "--"]
    setpriv = shutil.which("setpriv", path=search)
    if setpriv:
        return [setpriv, "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]
    raise RuntimeError("running as root, and neither runuser nor setpriv is installed to start PostgreSQL as "
                       "the postgres user (apt-get install -y util-linux)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One PostgreSQL cluster in its own folder; ``url(db)`` for a database of it, ``create_db`` for a new one."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.folder = Path(tempfile.mkdtemp(prefix="kvt-pg-", dir="/var/tmp"))
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        self.port = free_port()
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
            self._as_user = as_postgres()
        self._dbs = 0

    def _run(self, *args: str) -> None:
        done = subprocess.run([*self._as_user, *args], capture_output=True, text=True, timeout=START_TIMEOUT_S,
                              check=False, cwd=self.folder)
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr.strip()} {log}")

    def init(self) -> None:
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "-E", "UTF8", "--locale=C", "--no-sync")

    def start(self) -> None:
        # Durability is not what these tests check: no fsync keeps CREATE DATABASE and commits fast.
        options = (f"-k {self.folder} -p {self.port} -h 127.0.0.1 -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
                  "-t", str(START_TIMEOUT_S), "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def url(self, dbname: str = "postgres", **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in {"connect_timeout": "1", **params}.items())
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}?{query}"

    def create_db(self, stem: str = "t") -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        self._dbs += 1
        name = f"{stem}_{self._dbs}_{int(time.time() * 1000) % 100000}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0 ENCODING UTF8')
        return self.url(name)

    def remove(self) -> None:
        if self.running():
            try:
                self.stop("immediate")
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(self.folder, ignore_errors=True)


def start_postgres() -> PostgresServer:
    """A running throwaway server, or skip/fail as ``missing`` says."""
    bindir = pg_bindir()
    if bindir is None:
        missing("PostgreSQL (initdb, pg_ctl)", PG_INSTALL)
    assert bindir is not None
    server = PostgresServer(bindir)
    try:
        server.init()
        server.start()
    except BaseException:
        server.remove()
        raise
    return server


REDIS_INSTALL = "apt-get install -y redis-server"


class RedisServer:
    """One ``redis-server`` on an ephemeral port in its own folder, many databases (one per test: ``url()``);
    ``appendfsync`` set: an append-only file, so a stop and start keeps what it acknowledged."""

    def __init__(self, binary: str, folder: Path, *, appendfsync: str | None = None,
                 policy: str = "noeviction") -> None:
        self.binary = binary
        self.folder = folder
        self.port = free_port()
        self.appendfsync = appendfsync
        self.policy = policy
        self._proc: subprocess.Popen[bytes] | None = None
        self._dbs = 0

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
                "--save", "", "--databases", "4096", "--maxmemory-policy", self.policy, "--protected-mode", "no"]
        if self.appendfsync is not None:
            args += ["--appendonly", "yes", "--appendfsync", self.appendfsync]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      cwd=self.folder)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ping():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start (exit {self._proc.poll()})")
            time.sleep(0.02)  # polling for the port, with the deadline above

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server (SIGTERM: what it acknowledged is in its append-only file when it has one)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(timeout=START_TIMEOUT_S)
        self._proc = None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def url(self, db: int | None = None) -> str:
        if db is None:
            self._dbs += 1
            db = self._dbs
        return f"redis://127.0.0.1:{self.port}/{db}"


def start_redis(folder: Path, **options: str | None) -> RedisServer:
    """A running throwaway ``redis-server``, or skip/fail as ``missing`` says."""
    binary = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin:/usr/bin:/bin")
    if binary is None:
        missing("Redis (redis-server)", REDIS_INSTALL)
    assert binary is not None
    server = RedisServer(binary, folder, **options)  # type: ignore[arg-type]
    server.start()
    return server
