"""Shared fixtures: every keys file, config and sqlite file lives under ``tmp_path``; ports are ephemeral."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import Phase, settings
from tornado.ioloop import IOLoop

from kvtornado import codec
from kvtornado.auth import Authenticator
from kvtornado.client import Signer
from kvtornado.config import Config, load_config
from kvtornado.server import build_http_server

# What make_app does for a server, done once for the test process, whose own code builds and decodes
# JSON 1000 levels deep (the depth limit's test data) before any app exists.
codec.allow_json_depth()

# Hypothesis: a fixed seed per test (derandomize), so every run of `make test` is the same run and a failure
# replays exactly as CI found it; no example database. `HYPOTHESIS_PROFILE=deep` explores far more (random
# seeds), for a long local run.
settings.register_profile("ci", derandomize=True, database=None, deadline=None, max_examples=300, print_blob=True)
settings.register_profile("deep", database=None, deadline=None, max_examples=3000, print_blob=True)
# `make mutate`: the ci run with 100 examples and no shrink phase (shrinking only runs once a test has failed,
# so it changes no verdict; fewer examples may, which docs/TESTING.md says).
settings.register_profile("mutate", settings.get_profile("ci"), max_examples=100,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ROOT = Path(__file__).resolve().parent.parent
# The SPEC §4 test vector's key: 64 x "a", key id k1. Tests only; never a real secret.
TEST_KEY_ID = "k1"
TEST_SECRET = b"a" * 64


def write_keys(path: Path, lines: list[str], mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="ascii")
    os.chmod(path, mode)
    return path


def write_config(folder: Path, sections: dict[str, Any] | None = None, name: str = "config.yaml") -> Path:
    """A config file under ``folder`` with the test key file and a sqlite path under it too."""
    doc: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "auth": {"secret_file": "keys/kv.keys"},
        "storage": {"path": "data/kv.sqlite3", "synchronous": "NORMAL"},
    }
    for section, values in (sections or {}).items():
        doc.setdefault(section, {}).update(values)
    path = folder / name
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


@pytest.fixture
def io_loop() -> Iterator[IOLoop]:
    """Replaces pytest-tornado 0.8.1's ``io_loop`` (which every ``gen_test`` and ``http_server`` takes).

    Its fixture calls ``IOLoop.make_current()``, which on 3.12+ asks asyncio for a current loop that no
    one set ("There is no current event loop"). This one does what tornado's own ``AsyncTestCase`` does:
    an IOLoop on a fresh asyncio loop, set as the current loop for the test, and closed after it.
    """
    loop = IOLoop(make_current=False)
    asyncio_loop: asyncio.AbstractEventLoop = loop.asyncio_loop  # type: ignore[attr-defined]
    asyncio.set_event_loop(asyncio_loop)
    try:
        yield loop
    finally:
        # Tasks a failed test left pending are cancelled and run to their end, as AsyncTestCase does,
        # so none is destroyed pending when the loop closes.
        pending = [t for t in asyncio.all_tasks(asyncio_loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_sync(lambda: asyncio.wait(pending))
        asyncio.set_event_loop(None)
        loop.close(all_fds=True)


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    return write_keys(tmp_path / "keys" / "kv.keys", [f"{TEST_KEY_ID} {TEST_SECRET.decode()}"])


@pytest.fixture
def make_config(tmp_path: Path, keys_file: Path) -> Callable[..., Config]:
    """``make_config(cache={"max_dirty": 3})`` -> a validated ``Config`` rooted in ``tmp_path``."""

    def make(**sections: Any) -> Config:
        return load_config(write_config(tmp_path, sections))

    return make


@pytest.fixture
def config(make_config: Callable[..., Config]) -> Config:
    return make_config()


@pytest.fixture
def signer() -> Signer:
    return Signer(TEST_KEY_ID, TEST_SECRET)


@pytest.fixture
def authenticator(config: Config) -> Authenticator:
    return Authenticator({TEST_KEY_ID: TEST_SECRET}, max_skew_s=config.auth.max_skew_s,
                         max_nonces=config.auth.max_nonces)


@pytest.fixture
def http_server(request: pytest.FixtureRequest, io_loop: Any, _unused_port: Any) -> Iterator[Any]:
    """pytest-tornado's server fixture, but built exactly as the exercises build theirs."""
    server = build_http_server(request.getfixturevalue("app"))
    server.add_socket(_unused_port[0])
    yield server
    server.stop()
    io_loop.run_sync(server.close_all_connections, timeout=10)


# --- SPEC §10 services (tests/services.py) --------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """One throwaway PostgreSQL for the session (skipped, or failed under KV_REQUIRE_SERVICES=1, without it)."""
    from tests.services import start_postgres

    server = start_postgres()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One throwaway redis-server for the session (skipped, or failed under KV_REQUIRE_SERVICES=1, without it)."""
    from tests.services import start_redis

    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: Any) -> str:
    """A database of the session's Redis no other test uses; started again if a test left it stopped."""
    if not redis_server.running():
        redis_server.start()
    return str(redis_server.url())


@pytest.fixture
def pg_url(postgres: Any) -> str:
    """A fresh database of the session's PostgreSQL, for one test; started again if a test left it stopped."""
    if not postgres.running():
        postgres.start()
    return str(postgres.create_db())
