"""kvtornado/cli.py: ``kvtornado keys add``, ``backup`` and ``restore`` in this process — what each writes and
prints, and each refusal (one line on stderr, exit status 2, nothing changed). The installed command end to end
(serve, client, a backup while serving) is tests/e2e/test_install.py."""

from __future__ import annotations

import os
import re
import sqlite3
import stat
from pathlib import Path

import pytest

from kvtornado.auth import load_keys
from kvtornado.cli import main
from kvtornado.locks import take_lock
from kvtornado.policy import Grant
from tests.conftest import TEST_KEY_ID, TEST_SECRET, write_config, write_keys
from tests.unit.test_backup import fill, rows_of

SECRET_RE = re.compile(r"[0-9a-f]{64}\n")


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working directory: the command's default config.yaml is looked for here."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def refusal(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run ``kvtornado ARGS``: it must refuse with exit 2, one line on stderr, nothing on stdout."""
    assert main(list(args)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# --- keys add ---------------------------------------------------------------------------------------------


def test_keys_add_creates_the_file_and_prints_only_the_secret(here: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "add", "app", "--role", "read", "--prefix", "app/"]) == 0
    out, err = capsys.readouterr()
    assert SECRET_RE.fullmatch(out)  # the secret, once, and nothing else on stdout
    assert out.strip() not in err
    assert err == (f"created {here / '.secrets' / 'kv.keys'}: key id 'app' (role read, prefix 'app/'); "
                   "restart the server to use it\n")
    # No config.yaml here: the built-in defaults, rooted in the working directory.
    path = here / ".secrets" / "kv.keys"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_text() == f"app {out.strip()} role=read prefix=app/\n"
    keys = load_keys(path, create=False)  # what the server reads at start-up
    assert keys.secrets == {"app": out.strip().encode()}
    assert keys.grants == {"app": Grant("read", "app/")}


def test_keys_add_appends_keeps_0600_and_defaults_to_admin(here: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (here / "etc").mkdir()
    cfg = write_config(here / "etc")  # auth.secret_file: keys/kv.keys beside the config
    path = write_keys(here / "etc" / "keys" / "kv.keys", [f"{TEST_KEY_ID} {TEST_SECRET.decode()}"])
    path.write_text(path.read_text().rstrip("\n"))  # a last line without its newline
    os.chmod(path, 0o600)

    assert main(["keys", "add", "ops", "--config", str(cfg)]) == 0
    secret = capsys.readouterr().out.strip()

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == f"{TEST_KEY_ID} {TEST_SECRET.decode()}\nops {secret} role=admin\n"
    assert load_keys(path, create=False).grants["ops"] == Grant("admin", None)


def test_keys_add_reads_config_yaml_in_the_working_directory(here: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_config(here, {"auth": {"secret_file": "elsewhere/app.keys"}})
    assert main(["keys", "add", "app"]) == 0
    secret = capsys.readouterr().out.strip()
    assert load_keys(here / "elsewhere" / "app.keys", create=False).secrets == {"app": secret.encode()}


@pytest.mark.parametrize(
    ("prefix", "written"),
    [
        pytest.param("app/", "app/", id="plain"),
        pytest.param("team a/", "team%20a/", id="space"),
        pytest.param("100%/", "100%25/", id="percent"),
        pytest.param("a+b#c", "a%2Bb%23c", id="plus-and-hash"),
        pytest.param("tab\there", "tab%09here", id="tab"),
        pytest.param("ключ/", "%D0%BA%D0%BB%D1%8E%D1%87/", id="non-ascii"),
        pytest.param("x=y", "x%3Dy", id="equals"),
    ],
)
def test_keys_add_writes_the_prefix_percent_encoded(here: Path, capsys: pytest.CaptureFixture[str], prefix: str,
                                                    written: str) -> None:
    assert main(["keys", "add", "k", "--role", "write", "--prefix", prefix]) == 0
    secret = capsys.readouterr().out.strip()
    path = here / ".secrets" / "kv.keys"
    assert path.read_text() == f"k {secret} role=write prefix={written}\n"
    assert load_keys(path, create=False).grants["k"] == Grant("write", prefix)  # read back as typed


@pytest.fixture
def existing(here: Path) -> Path:
    return write_keys(here / ".secrets" / "kv.keys", [f"app {'s' * 40} role=read"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["app"], r"kv.keys: key id 'app' is already there; choose another id", id="existing-id"),
        pytest.param(["bad id"], r"key id must match \[A-Za-z0-9._-\]\{1,64\}, got 'bad id'", id="bad-id"),
        pytest.param(["x" * 65], r"key id must match", id="long-id"),
        pytest.param(["new", "--prefix", ""], r"--prefix must not be empty", id="empty-prefix"),
        pytest.param(["new", "--prefix", "\udcff"], r"--prefix is not valid UTF-8 text", id="undecodable-prefix"),
        pytest.param(["new", "--config", "missing.yaml"], r"missing.yaml: config file not found", id="no-config"),
    ],
)
def test_keys_add_refusals_change_nothing(existing: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                          message: str) -> None:
    before = existing.read_bytes()
    err = refusal(capsys, "keys", "add", *args)
    assert err.startswith("kvtornado keys: ")
    assert re.search(message, err), err
    assert existing.read_bytes() == before


def test_keys_add_refuses_a_bad_role(existing: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["keys", "add", "new", "--role", "root"])
    assert exc.value.code == 2
    assert "argument --role: invalid choice: 'root' (choose from 'read', 'write', 'admin')" in capsys.readouterr().err


def test_keys_add_refuses_a_file_others_can_read(existing: Path, capsys: pytest.CaptureFixture[str]) -> None:
    os.chmod(existing, 0o640)
    before = existing.read_bytes()
    err = refusal(capsys, "keys", "add", "new")
    assert f"accessible by group or others (mode 0640); run: chmod 600 {existing}" in err
    assert existing.read_bytes() == before and stat.S_IMODE(existing.stat().st_mode) == 0o640


def test_keys_add_refuses_a_malformed_file_without_showing_secrets(existing: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    existing.write_text(existing.read_text() + f"lonely{'z' * 40}\n")
    err = refusal(capsys, "keys", "add", "new")
    assert "kv.keys line 2: expected '<key_id> <secret>" in err
    assert "zzzz" not in err and "ssss" not in err


# --- backup and restore -----------------------------------------------------------------------------------


@pytest.fixture
def served(here: Path) -> Path:
    """A config.yaml here whose database has two rows."""
    cfg = write_config(here)
    write_keys(here / "keys" / "kv.keys", [f"reader {'r' * 40} role=read", f"{TEST_KEY_ID} {TEST_SECRET.decode()}"])
    fill(here / "data" / "kv.sqlite3", {"a": 1, "b": 2})
    return cfg


def test_backup_then_restore_with_the_default_config(served: Path, here: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backup", "saved.sqlite3"]) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"backed up {here / 'data' / 'kv.sqlite3'} to saved.sqlite3: 2 rows\n"
    fill(here / "data" / "kv.sqlite3", {"c": 3})

    assert main(["restore", "saved.sqlite3"]) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert re.fullmatch(rf"restored saved.sqlite3 to {re.escape(str(here / 'data' / 'kv.sqlite3'))}: 2 rows; "
                        r"new versions start above \d+\n", err), err
    assert set(rows_of(here / "data" / "kv.sqlite3")) == {"a", "b"}


def test_restore_with_the_redis_cache_says_to_empty_redis(served: Path, here: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backup", "saved.sqlite3"]) == 0
    write_config(here, {"cache": {"backend": "redis", "redis_url": "redis://127.0.0.1:1/0"}})
    assert main(["restore", "saved.sqlite3"]) == 0
    assert "cache.backend is redis: empty its database (FLUSHDB)" in capsys.readouterr().err


POSTGRES = {"storage": {"backend": "postgresql", "url": "postgresql://kv@127.0.0.1:1/kv"}}


@pytest.mark.parametrize(
    ("args", "config", "message"),
    [
        pytest.param(["backup", "out.sqlite3"], POSTGRES,
                     "kvtornado backup: storage.backend is postgresql: kvtornado backup copies sqlite databases "
                     "only; use pg_dump", id="backup-postgresql"),
        pytest.param(["restore", "in.sqlite3"], POSTGRES,
                     "kvtornado restore: storage.backend is postgresql: kvtornado restore copies sqlite databases "
                     "only; use pg_restore or psql", id="restore-postgresql"),
        pytest.param(["backup", "out.sqlite3", "--key-id", TEST_KEY_ID], None,
                     "--key-id and --cafile go with --url", id="key-id-without-url"),
        pytest.param(["backup", "out.sqlite3", "--url", "http://127.0.0.1:1", "--key-id", "nobody"], None,
                     "key id 'nobody' is not in", id="unknown-key-id"),
        pytest.param(["backup", "data/kv.sqlite3"], None, "that is the database itself", id="backup-onto-itself"),
        *(pytest.param(["backup", name], None, f"that is one of the server's own files ({Path(name).name})",
                       id=f"backup-onto-{Path(name).name}")
          for name in ("data/kv.sqlite3-wal", "data/kv.sqlite3-shm", "data/kv.sqlite3-journal",
                       "data/kv.sqlite3.lock", "data/kv.sqlite3.nonces", "data/kv.sqlite3.nonces.lock",
                       "keys/kv.keys", "keys/kv.keys.nonces")),
        pytest.param(["backup", ""], None, ": that is a folder; name the backup file", id="backup-empty-name"),
        pytest.param(["backup", "data"], None, "data: that is a folder; name the backup file", id="backup-folder"),
        # Refused before the flush is asked for (nothing listens on port 1: a flush would fail, status 1).
        pytest.param(["backup", "nowhere/out.sqlite3", "--url", "http://127.0.0.1:1"], None,
                     "nowhere: no such folder", id="backup-missing-folder-before-flush"),
        pytest.param(["backup", "out.sqlite3", "--url", "https://127.0.0.1:1", "--cafile", "none.pem"], None,
                     "CA file none.pem: cannot load it", id="backup-missing-cafile"),
        pytest.param(["restore", "nothing.sqlite3"], None, "nothing.sqlite3: no such file", id="restore-missing"),
        pytest.param(["restore", "config.yaml"], None, "not a readable sqlite database", id="restore-not-sqlite"),
        pytest.param(["backup", "out.sqlite3", "--config", "none.yaml"], None, "none.yaml: config file not found",
                     id="missing-config"),
    ],
)
def test_backup_and_restore_refusals(served: Path, here: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                     config: dict[str, dict[str, str]] | None, message: str) -> None:
    if config is not None:
        write_config(here, config)
    before = (here / "data" / "kv.sqlite3").read_bytes()
    assert message in refusal(capsys, *args)
    assert (here / "data" / "kv.sqlite3").read_bytes() == before
    assert not (here / "out.sqlite3").exists()


def test_backup_url_needs_an_admin_key(here: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_config(here)
    write_keys(here / "keys" / "kv.keys", [f"reader {'r' * 40} role=read"])
    fill(here / "data" / "kv.sqlite3", {"a": 1})
    err = refusal(capsys, "backup", "out.sqlite3", "--url", "http://127.0.0.1:1")
    assert "no admin key to sign /flush with; name one with --key-id" in err


def test_backup_url_that_cannot_be_reached_fails_with_status_1(served: Path, here: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["backup", "out.sqlite3", "--url", f"http://127.0.0.1:{port}"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"kvtornado backup: cannot connect to http://127.0.0.1:{port}: Connection refused\n"
    assert not (here / "out.sqlite3").exists()  # no copy without the flush asked for


def test_restore_while_a_server_holds_the_database(served: Path, here: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backup", "saved.sqlite3"]) == 0
    capsys.readouterr()
    database = here / "data" / "kv.sqlite3"
    fd = take_lock(database)  # what a running server holds
    try:
        err = refusal(capsys, "restore", "saved.sqlite3")
    finally:
        os.close(fd)
    assert err == (f"kvtornado restore: {database}: a server is using this database (it holds kv.sqlite3.lock); "
                   "stop it first\n")


def test_help_names_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("serve", "client", "keys", "backup", "restore"):
        assert re.search(rf"^\s+{command}\s", out, re.MULTILINE), out


@pytest.mark.parametrize("command", ["serve", "client"])
def test_serve_and_client_take_their_own_options_under_their_name(command: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: kvtornado {command} [-h] [--config")
    assert "(default: config.yaml)" in " ".join(out.split())  # in the working directory


def test_serve_refuses_a_missing_default_config(here: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve"]) == 2
    assert capsys.readouterr().err == "config.yaml: config file not found\n"


def test_a_backup_is_readable_by_plain_sqlite(served: Path, here: Path) -> None:
    assert main(["backup", "saved.sqlite3"]) == 0
    conn = sqlite3.connect(here / "saved.sqlite3")
    try:
        assert conn.execute("SELECT count(*) FROM kv").fetchone()[0] == 2
    finally:
        conn.close()
