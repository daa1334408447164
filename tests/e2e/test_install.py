"""``pip install .`` (SPEC §11) into a fresh venv, and the installed ``kvtornado`` command end to end: keys add,
serve, a scoped key over HTTP, the client command, a backup while serving, a restore refused while serving and
then done, and the versions after it.

The install is real: a venv with nothing in it (no system site-packages), the project built by its own build
backend in pip's isolated build environment, every runtime dependency resolved and installed from the
configured package index. Only pip itself comes from the test venv (``pip --python``), which saves the few
seconds ``ensurepip`` takes to put a copy of pip into the new venv and changes nothing about what is installed.
About 12 s here; the rest of the file about 5 s.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

import kvtornado
from kvtornado.client import KVClient, KVClientError, Signer
from tests.conftest import write_config
from tests.e2e.helpers import ROOT, ServerProcess

PIP_TIMEOUT_S = 300.0
RUN_TIMEOUT_S = 30.0


def _env() -> dict[str, str]:
    """This environment without what would point Python back at the checkout or at the test venv."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV") and not k.startswith(("PYTEST_", "COV_"))}


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with ``pip install <copy of the project>`` done in it."""
    # The copy: only what the build needs (pyproject.toml names the rest out), so the build cannot lean on
    # anything else in the checkout, and writes its build/ and egg-info there, not here.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "kvtornado", src / "kvtornado", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=RUN_TIMEOUT_S)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
         "--disable-pip-version-check", "--no-input", str(src)],
        capture_output=True, text=True, timeout=PIP_TIMEOUT_S, env=_env(), cwd=src,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return venv


def test_the_dependencies_are_the_runtime_part_of_requirements_txt() -> None:
    """pyproject.toml's dependencies and requirements.txt's runtime part (above "# Tests and checks") are one
    list, same bounds: a dependency added to one and not the other fails here, not in a deployment."""
    runtime = ROOT.joinpath("requirements.txt").read_text(encoding="utf-8").split("# Tests and checks")[0]
    required = [line.strip() for line in runtime.splitlines() if line.strip() and not line.startswith("#")]
    project = tomllib.loads(ROOT.joinpath("pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["dependencies"] == required


def site_packages(venv: Path) -> Path:
    (found,) = venv.glob("lib/python3.*/site-packages")
    return found


def test_the_install_is_the_package_and_the_command_only(venv: Path, tmp_path: Path) -> None:
    dist_info = site_packages(venv) / f"kvtornado-{kvtornado.__version__}.dist-info"
    record = [line.split(",")[0] for line in (dist_info / "RECORD").read_text().splitlines()]
    tops = {entry.split("/")[0] for entry in record if not entry.startswith("../")}
    assert tops == {"kvtornado", dist_info.name}  # no tests/, bench/, tools/ or exercise files
    assert {f"kvtornado/{p.name}" for p in (ROOT / "kvtornado").glob("*.py")} <= set(record)
    assert [entry for entry in record if entry.startswith("../")] == ["../../../bin/kvtornado"]
    # It runs from the venv, not the checkout: imported from its site-packages, with its dependencies.
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import kvtornado, tornado, yaml, sortedcontainers, psycopg, psycopg_pool, redis, hiredis, prometheus_client; "
         "print(kvtornado.__file__, kvtornado.__version__)"],
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=_env(), cwd=tmp_path, check=True,
    )
    path, version = proc.stdout.split()
    assert Path(path).is_relative_to(site_packages(venv)) and version == kvtornado.__version__


def run(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv / "bin" / "kvtornado"), *args], capture_output=True, text=True, cwd=cwd,
                          env=_env(), timeout=RUN_TIMEOUT_S, stdin=subprocess.DEVNULL)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """The working directory: config.yaml (port 0; keys/ and data/ beside it), no keys file yet."""
    write_config(tmp_path)
    return tmp_path


def serve(venv: Path, work: Path) -> ServerProcess:
    server = ServerProcess.spawn([str(venv / "bin" / "kvtornado"), "serve"], cwd=work)  # config.yaml: the default
    server.wait_listening()
    return server


@contextlib.contextmanager
def served(venv: Path, work: Path) -> Iterator[ServerProcess]:
    """``kvtornado serve`` for the ``with`` block, then SIGTERM: it must exit 0."""
    with serve(venv, work) as server:
        yield server
        assert server.stop() == 0, server.lines


def test_the_installed_command_end_to_end(venv: Path, work: Path) -> None:
    # keys add: a read key fenced to app/, and an admin key (no --role); each prints its secret, only that.
    added = run(venv, work, "keys", "add", "app", "--role", "read", "--prefix", "app/")
    assert added.returncode == 0, added.stderr
    reader = Signer("app", added.stdout.strip().encode())
    added = run(venv, work, "keys", "add", "ops")
    assert added.returncode == 0, added.stderr
    admin = Signer("ops", added.stdout.strip().encode())
    assert (work / "keys" / "kv.keys").stat().st_mode & 0o777 == 0o600

    with served(venv, work) as server, KVClient(server.base_url, admin) as ops, \
            KVClient(server.base_url, reader) as app:
        ops.save("app/x", {"n": 1})  # not durable: in the cache until a flush
        ops.save("other/y", "not for app")
        assert app.get("app/x") == {"n": 1}
        with pytest.raises(KVClientError) as outside:
            app.get("other/y")
        assert (outside.value.status, outside.value.code) == (403, "forbidden")
        with pytest.raises(KVClientError) as role:
            app.save("app/z", 1)
        assert (role.value.status, role.value.code) == (403, "forbidden")
        got = run(venv, work, "client", "--url", server.base_url, "--key-id", "app", "get", "app/x")
        assert (got.returncode, got.stdout) == (0, '{"n": 1}\n'), got.stderr

        # backup while serving, after asking this server to flush (signed as ops, the first admin key).
        backed = run(venv, work, "backup", "saved.sqlite3", "--url", server.base_url)
        assert backed.returncode == 0 and backed.stdout == "", backed.stderr
        denied = run(venv, work, "backup", "denied.sqlite3", "--url", server.base_url, "--key-id", "app")
        assert denied.returncode == 1 and not (work / "denied.sqlite3").exists()  # no flush, no copy
        assert denied.stderr.startswith(f"kvtornado backup: {server.base_url}: POST /flush answered 403 forbidden")
        refused = run(venv, work, "restore", "saved.sqlite3")
        assert refused.returncode == 2 and refused.stdout == ""
        assert refused.stderr.count("\n") == 1
        assert "a server is using this database (it holds kv.sqlite3.lock); stop it first" in refused.stderr
        after = ops.save("app/after", True)["version"]

    conn = sqlite3.connect(work / "saved.sqlite3")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert dict(conn.execute("SELECT key, value FROM kv")) == {"app/x": '{"n":1}', "other/y": '"not for app"'}
    finally:
        conn.close()

    restored = run(venv, work, "restore", "saved.sqlite3")
    assert restored.returncode == 0 and restored.stdout == "", restored.stderr

    with served(venv, work) as server, KVClient(server.base_url, admin) as ops:
        assert ops.get("app/x") == {"n": 1}
        with pytest.raises(KVClientError) as gone:
            ops.get("app/after")  # written after the backup: not in it
        assert gone.value.status == 404
        assert ops.save("app/new", 2)["version"] > after  # never back (the mark itself: tests/unit/test_backup.py)
