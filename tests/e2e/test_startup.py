"""Start-up of the real ``exercise2.py``/``exercise3.py`` processes: refusals are one clear line with no
traceback and no secret; a missing keys file is created (mode 0600) and its path logged, never its secret."""

from __future__ import annotations

import re
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kvtornado.client import KVClient, Signer
from tests.conftest import write_config, write_keys
from tests.e2e.helpers import PROCESS_TIMEOUT_S, ROOT, ServerProcess

GOOD = "G" * 40  # a valid secret
OTHER = "S3cr3t-" + "x" * 33  # another valid secret, distinctive enough to look for


@dataclass(frozen=True)
class Refusal:
    """A config/keys set-up that must stop start-up; ``culprit``: regexes the one line must match."""

    culprit: tuple[str, ...]
    config: dict[str, Any] = field(default_factory=dict)
    keys: tuple[str, ...] | None = (f"k1 {GOOD}",)
    keys_mode: int = 0o600
    raw_config: str | None = None
    files: dict[str, str] = field(default_factory=dict)  # more files under tmp_path: name -> text
    args: tuple[str, ...] = ()
    exercises: tuple[int, ...] = (2, 3)


REFUSALS: dict[str, Refusal] = {
    "bad config value": Refusal(
        (r'config\.yaml: cache\.flush_interval_ms must be an integer >= 1, got "fast"',),
        config={"cache": {"flush_interval_ms": "fast"}}),
    "negative config value": Refusal((r"auth\.max_skew_s", r"-5"), config={"auth": {"max_skew_s": -5}}),
    "boolean for an integer": Refusal((r"server\.max_body_bytes", r"true"),
                                      config={"server": {"max_body_bytes": True}}),
    "bad synchronous mode": Refusal((r"storage\.synchronous", r"FASTEST", r"OFF \| NORMAL \| FULL"),
                                    config={"storage": {"synchronous": "FASTEST"}}),
    "unknown config key": Refusal((r"unknown key", r"server\.hots"), config={"server": {"hots": "x"}}),
    "unknown config section": Refusal((r"unknown key", r"caches"), config={"caches": {"max_entries": 1}}),
    "config not YAML": Refusal((r"config\.yaml", r"not valid YAML", r"line \d"), raw_config="server: [1,\n"),
    "keys file mode 0644": Refusal((r"kv\.keys", r"0644", r"chmod 600 \S+kv\.keys"), keys_mode=0o644),
    "keys file mode 0640": Refusal((r"chmod 600",), keys_mode=0o640),
    "short secret": Refusal((r"kv\.keys line 1", r"'k1'", r"too short"), keys=("k1 shortButSecretValue",)),
    "malformed line": Refusal((r"kv\.keys line 3", r"field 3 is not an option"),
                              keys=("# a comment", f"k1 {GOOD}", f"k2 {OTHER} trailing-field")),
    "malformed line after a blank": Refusal((r"kv\.keys line 3",), keys=(f"k1 {GOOD}", "", f"k2={OTHER}")),
    "bad role": Refusal((r"kv\.keys line 2", r"role must be read, write or admin"),
                        keys=(f"k1 {GOOD}", f"k2 {OTHER} role=owner"), exercises=(2,)),
    "prefix given twice": Refusal((r"kv\.keys line 1", r"prefix is given more than once"),
                                  keys=(f"k1 {GOOD} prefix=a/ prefix=b/",), exercises=(3,)),
    "bad key id": Refusal((r"kv\.keys line 1", r"key id"), keys=(f"k/1 {OTHER}",)),
    "duplicate key id": Refusal((r"kv\.keys line 2", r"duplicate key id 'k1'"), keys=(f"k1 {GOOD}", f"k1 {OTHER}")),
    "no keys at all": Refusal((r"kv\.keys", r"no keys"), keys=("# only a comment",)),
    "port out of range": Refusal((r"--port", r"70000"), args=("--port", "70000")),
    "storage folder is a file": Refusal((r"blocker", r"data folder"), files={"blocker": "x"},
                                        config={"storage": {"path": "blocker/kv.sqlite3"}}, exercises=(3,)),
    "storage file is not sqlite": Refusal((r"junk\.sqlite3", r"not a database"), files={"junk.sqlite3": "x" * 4096},
                                          config={"storage": {"path": "junk.sqlite3"}}, exercises=(3,)),
}


def _run(exercise: int, config: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # --port 0: should a refusal ever fail to happen, the server must not take a real port.
    return subprocess.run(
        [sys.executable, str(ROOT / f"exercise{exercise}.py"), "--config", str(config), "--port", "0", *args],
        cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S, check=False,
    )


@pytest.mark.parametrize(
    ("exercise", "case"),
    [pytest.param(n, case, id=f"{name}-{n}") for name, case in REFUSALS.items() for n in case.exercises],
)
def test_start_up_refusal_is_one_clear_line(tmp_path: Path, exercise: int, case: Refusal) -> None:
    for name, text in case.files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    if case.keys is not None:
        write_keys(tmp_path / "keys" / "kv.keys", list(case.keys), mode=case.keys_mode)
    config = write_config(tmp_path, case.config)
    if case.raw_config is not None:
        config.write_text(case.raw_config, encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    done = _run(exercise, config, elsewhere, *case.args)

    assert done.returncode != 0
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    line = lines[0]
    for pattern in case.culprit:
        assert re.search(pattern, line), (pattern, line)
    assert "Traceback" not in done.stderr
    for secret in (GOOD, OTHER, "shortButSecretValue", "trailing-field"):
        assert secret not in done.stderr
    assert done.stdout == ""
    # Nothing was created by a refused start (the sqlite folder in particular), and nowhere else.
    assert not (tmp_path / "data").exists()
    assert list(elsewhere.iterdir()) == []


def test_the_spec_example_refusal_is_exactly_its_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"cache": {"flush_interval_ms": "fast"}})
    done = _run(4, config, tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == ['config.yaml: cache.flush_interval_ms must be an integer >= 1, got "fast"']


@pytest.mark.parametrize("exercise", [2, 3])
def test_a_missing_keys_file_is_created_with_one_fresh_key(tmp_path: Path, exercise: int) -> None:
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    config = write_config(conf_dir, {"auth": {"secret_file": "secrets/nested/kv.keys"}})
    keys = conf_dir / "secrets" / "nested" / "kv.keys"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    with ServerProcess.start(exercise, config, cwd=elsewhere) as proc:
        proc.wait_listening()
        # Relative to the config file's folder, not the working directory.
        assert keys.is_file()
        assert not (elsewhere / "secrets").exists()
        assert stat.S_IMODE(keys.stat().st_mode) == 0o600
        assert stat.S_IMODE(keys.parent.stat().st_mode) == 0o700
        text = keys.read_text(encoding="ascii")
        m = re.fullmatch(r"default ([0-9a-f]{64})\n", text)
        assert m, text
        secret = m.group(1)
        with KVClient(proc.base_url, Signer("default", secret.encode())) as c:
            assert c.authorize() == {"authorized": True, "key_id": "default", "role": "admin", "prefix": None}
        assert proc.stop() == 0, proc.lines
    log = "\n".join(proc.lines)
    assert str(keys) in log
    assert secret not in log
    assert "Traceback" not in log


def test_an_existing_keys_file_is_left_as_it_is(tmp_path: Path) -> None:
    keys = write_keys(tmp_path / "keys" / "kv.keys", [f"k1 {GOOD}", f"k2 {OTHER}"])
    before = keys.read_bytes()
    config = write_config(tmp_path)
    with ServerProcess.start(2, config) as proc:
        proc.wait_listening()
        with KVClient(proc.base_url, Signer("k2", OTHER.encode())) as c:
            assert c.authorize() == {"authorized": True, "key_id": "k2", "role": "admin", "prefix": None}
        assert proc.stop() == 0, proc.lines
    assert keys.read_bytes() == before
    assert not any("created keys file" in line for line in proc.lines)
    assert not any(GOOD in line or OTHER in line for line in proc.lines)


@pytest.mark.parametrize("exercise", [2, 3])
def test_an_uncreatable_keys_file_is_refused_in_one_line(tmp_path: Path, exercise: int) -> None:
    (tmp_path / "blocker").write_text("a file where a folder should be", encoding="utf-8")
    config = write_config(tmp_path, {"auth": {"secret_file": "blocker/kv.keys"}})
    done = _run(exercise, config, tmp_path)
    assert done.returncode != 0
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    # The line names the file; auth.load_keys words it "cannot read keys file (Not a directory)" here.
    assert str(tmp_path / "blocker" / "kv.keys") in lines[0] and "keys file" in lines[0], lines[0]
    assert "Traceback" not in done.stderr


def test_a_missing_config_file_is_refused_in_one_line(tmp_path: Path) -> None:
    done = _run(3, tmp_path / "nope.yaml", tmp_path)
    assert done.returncode != 0
    assert done.stderr.splitlines() == [f"{tmp_path / 'nope.yaml'}: config file not found"]


@pytest.mark.parametrize("exercise", [3, 4])
def test_a_second_server_on_one_database_refuses_to_start_and_kill_9_leaves_no_lock(
    tmp_path: Path, exercise: int
) -> None:
    write_keys(tmp_path / "keys" / "kv.keys", [f"k1 {GOOD}"])
    config = write_config(tmp_path)
    db = tmp_path / "data" / "kv.sqlite3"
    with ServerProcess.start(exercise, config) as first:
        first.wait_listening()
        with KVClient(first.base_url, Signer("k1", GOOD.encode())) as c:
            c.save("k", "first", durable=True)
        second = _run(exercise, config, tmp_path)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.splitlines()
        assert len(lines) == 1 and str(db) in lines[0] and "another server" in lines[0], second.stderr
        with KVClient(first.base_url, Signer("k1", GOOD.encode())) as c:
            assert c.get("k") == "first"  # the first one is unaffected
        first.proc.kill()
        first.proc.wait(timeout=PROCESS_TIMEOUT_S)
    # The kernel dropped the lock with the process: a new server starts on the same file at once.
    with ServerProcess.start(exercise, config) as again:
        again.wait_listening()
        with KVClient(again.base_url, Signer("k1", GOOD.encode())) as c:
            assert c.get("k") == "first"
        assert again.stop() == 0, again.lines


def test_the_data_folder_and_file_are_private(tmp_path: Path) -> None:
    write_keys(tmp_path / "keys" / "kv.keys", [f"k1 {GOOD}"])
    config = write_config(tmp_path)
    with ServerProcess.start(4, config) as proc:
        proc.wait_listening()
        with KVClient(proc.base_url, Signer("k1", GOOD.encode())) as c:
            c.save("k", "v", durable=True)  # the WAL and shared-memory files exist now
        data = tmp_path / "data"
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        for name in ("kv.sqlite3", "kv.sqlite3-wal", "kv.sqlite3-shm", "kv.sqlite3.lock"):
            assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
        assert proc.stop() == 0, proc.lines
