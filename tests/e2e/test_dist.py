"""``make dist``: ``kvtornado-<version>.zip`` holds the project and nothing local, and runs once unpacked."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

import kvtornado
from tests.e2e.helpers import ROOT

MAKE_DIST = ROOT / "tools" / "make_dist.py"
PREFIX = f"kvtornado-{kvtornado.__version__}/"
TIMEOUT_S = 20.0
# Never in the archive, whatever the working tree holds.
FORBIDDEN_PARTS = {".venv", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis",
                   ".secrets", "data", "dist", ".git"}
FORBIDDEN_SUFFIXES = (".pyc", ".keys", ".sqlite3", ".sqlite3-wal", ".sqlite3-shm")


def _env() -> dict[str, str]:
    """The current environment without anything that would point Python or pytest back at this checkout,
    and with warnings as errors, as in this suite: the unpacked pytest adds the unpacked pyproject.toml's
    filters on top (the same file as here), and the unpacked exercise fails on a warning instead of printing it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("PYTEST_")}
    env["PYTHONWARNINGS"] = "error"
    return env


def make_dist(out: Path, *args: str, cwd: Path = ROOT) -> Path:
    proc = subprocess.run([sys.executable, str(MAKE_DIST), "--out", str(out), *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip())


def members(archive: Path) -> set[str]:
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
    assert all(n.startswith(PREFIX) for n in names), names
    return {n[len(PREFIX):] for n in names}


def unpack(archive: Path, dest: Path) -> Path:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            path = Path(zf.extract(info, dest))
            mode = (info.external_attr >> 16) & 0o777
            if mode:  # extract() drops the mode bits; .ci/run must stay executable
                path.chmod(mode)
    return dest / PREFIX.rstrip("/")


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    path = make_dist(out)
    assert path == out / f"kvtornado-{kvtornado.__version__}.zip"
    return path


@pytest.fixture(scope="module")
def unpacked(archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return unpack(archive, tmp_path_factory.mktemp("unpacked"))


def test_the_zip_holds_the_exercises_package_tests_docs_and_config(archive: Path) -> None:
    names = members(archive)
    exercises = {p.name for p in ROOT.glob("exercise*.py")}
    assert {"exercise1.py", "exercise2.py", "exercise3.py", "exercise4.py"} <= exercises <= names
    package = {f"kvtornado/{p.name}" for p in (ROOT / "kvtornado").glob("*.py")}
    assert {"kvtornado/__init__.py", "kvtornado/handlers.py"} <= package <= names
    assert {
        "tests/__init__.py", "tests/conftest.py", "tests/unit/__init__.py", "tests/e2e/test_dist.py",
        "config.yaml", "requirements.txt", "Makefile", "pyproject.toml", "README.md", ".ci/run",
        "docs/openapi.yaml", "tools/make_dist.py", "deploy/kvtornado.service", "deploy/config.yaml",
    } <= names
    if (ROOT / "bench").is_dir():
        assert any(n.startswith("bench/") and n.endswith(".py") for n in names), names


def test_the_zip_holds_nothing_local(archive: Path) -> None:
    for name in members(archive):
        parts = set(name.split("/"))
        assert not parts & FORBIDDEN_PARTS, name
        assert not name.endswith(FORBIDDEN_SUFFIXES), name
        assert not name.startswith("bench/results/"), name


def test_outside_git_only_the_project_files_are_taken(tmp_path: Path) -> None:
    """The tree walk (an unpacked copy has no git) drops every local-only file a working tree collects."""
    root = tmp_path / "project"
    shipped = ["exercise1.py", "config.yaml", "README.md", "Makefile", ".ci/run", "kvtornado/__init__.py",
               "tests/conftest.py", "docs/openapi.yaml", "bench/run.py", "tools/make_dist.py"]
    local = [".venv/lib/site.py", "data/kv.sqlite3", "data/kv.sqlite3-wal", ".secrets/kv.keys", "kv.keys",
             "kvtornado/__pycache__/app.cpython-311.pyc", "kvtornado/stray.keys", ".pytest_cache/v/x",
             ".mypy_cache/x.json", "tests/.hypothesis/examples/x", "bench/results/table.json", "dist/old.zip",
             "notes.txt", "scratch.py", ".git/config"]
    for rel in shipped + local:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('__version__ = "9.8.7"\n' if rel == "kvtornado/__init__.py" else "x\n", encoding="utf-8")
    built = make_dist(tmp_path / "out", "--root", str(root), "--no-git")
    assert built.name == "kvtornado-9.8.7.zip"
    with zipfile.ZipFile(built) as zf:
        assert sorted(zf.namelist()) == sorted(f"kvtornado-9.8.7/{rel}" for rel in shipped)


def test_rebuilding_from_the_unpacked_copy_gives_the_same_files(archive: Path, unpacked: Path,
                                                                tmp_path: Path) -> None:
    again = make_dist(tmp_path, "--root", str(unpacked), cwd=unpacked)
    assert members(again) == members(archive)
    assert os.access(unpacked / ".ci" / "run", os.X_OK)


def _stderr_lines(proc: subprocess.Popen[str]) -> queue.Queue[str | None]:
    """Every stderr line, read on a thread so the pipe never fills; None at the end."""
    lines: queue.Queue[str | None] = queue.Queue()

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, daemon=True).start()
    return lines


def _wait_for(lines: queue.Queue[str | None], pattern: str) -> re.Match[str]:
    deadline = time.monotonic() + TIMEOUT_S
    seen: list[str] = []
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if m := re.search(pattern, line):
            return m
    raise AssertionError(f"no line matching {pattern!r}: {seen}")


def test_the_unpacked_exercise1_serves_and_stops_on_sigterm(unpacked: Path) -> None:
    proc = subprocess.Popen([sys.executable, "exercise1.py", "--port", "0"], cwd=unpacked, env=_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lines = _stderr_lines(proc)
        port = int(_wait_for(lines, r"listening on http://127\.0\.0\.1:(\d+)").group(1))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=TIMEOUT_S) as resp:
            assert resp.status == 200
            assert json.loads(resp.read()) == {"ping": "pong"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=TIMEOUT_S)
        assert proc.stderr is not None
        proc.stderr.close()
    # exercise 1 needs no keys and no database: nothing was created beside it
    assert not (unpacked / ".secrets").exists() and not (unpacked / "data").exists()


def test_the_unpacked_unit_tests_pass_against_the_unpacked_package(unpacked: Path) -> None:
    where = subprocess.run([sys.executable, "-c", "import kvtornado; print(kvtornado.__file__)"], cwd=unpacked,
                           env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert Path(where.stdout.strip()).resolve() == (unpacked / "kvtornado" / "__init__.py").resolve(), where
    subset = ["tests/unit/test_auth.py", "tests/unit/test_codec.py", "tests/unit/test_config.py"]
    run = subprocess.run([sys.executable, "-m", "pytest", *subset, "-q", "-x", "-p", "no:cacheprovider"],
                         cwd=unpacked, env=_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert re.search(r"\d+ passed", run.stdout), run.stdout[-2000:]
