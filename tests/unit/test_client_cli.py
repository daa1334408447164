"""``python -m kvtornado.client``: ``cli([...])`` against a real exercise 4, and the process itself for a closed
stdout pipe. VALUE from stdin (``-``) or a file (``@path``), errors that name the URL, ``ping`` with no keys
file, a 413 reported as the server's JSON, and ``--help`` that describes every command. The commands of SPEC
§5's data model (versions, ``--if-version``, ``--ttl``, ``incr``, ``keys``, ``batch``) run against the recording
HTTP server of test_client.py: what each sends, signed, and how each answer and error is printed."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtornado.auth import Authenticator
from kvtornado.client import KVClient, Signer, cli
from tests.conftest import TEST_KEY_ID, TEST_SECRET, write_config, write_keys
from tests.e2e.helpers import PROCESS_TIMEOUT_S, ROOT, ServerProcess
from tests.unit.test_client import Answer, Recorder, access_log_of, requests_in, running_recorder, verify_seen

MAX_BODY = 1 << 20
ARGV_ARG_LIMIT = 128 * 1024  # Linux's MAX_ARG_STRLEN: no single argument can be longer


@pytest.fixture(scope="module")
def server_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    write_keys(folder / "keys" / "kv.keys", [f"{TEST_KEY_ID} {TEST_SECRET.decode()}",
                                             f"dash {'d' * 40} role=read prefix=app%20one/"])
    return folder


@pytest.fixture(scope="module")
def exercise4(server_dir: Path) -> Iterator[ServerProcess]:
    cfg = write_config(server_dir, {"server": {"max_body_bytes": MAX_BODY}}, name="server.yaml")
    with ServerProcess.start(4, cfg) as server:
        server.wait_listening()
        yield server
        assert server.stop() == 0, server.lines


@pytest.fixture(scope="module")
def config(server_dir: Path, exercise4: ServerProcess) -> Path:
    """The client's config: the server's keys file, and its address (so most calls need no --url)."""
    return write_config(server_dir, {"server": {"port": exercise4.port}}, name="client.yaml")


def run(config: Path, *args: str) -> int:
    return cli(["--config", str(config), *args])


def out_json(capsys: pytest.CaptureFixture[str]) -> object:
    out, err = capsys.readouterr()
    assert err == ""
    return json.loads(out)


def test_save_get_delete_and_the_admin_commands(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(config, "save", "greeting", "hello wörld") == 0
    assert out_json(capsys)["saved"] is True  # type: ignore[index]
    assert run(config, "save", "cfg", '{"n": [1, 2.5, null]}', "--json", "--durable") == 0
    capsys.readouterr()
    assert run(config, "get", "greeting") == 0
    assert out_json(capsys) == "hello wörld"
    assert run(config, "get", "cfg") == 0
    assert out_json(capsys) == {"n": [1, 2.5, None]}
    assert run(config, "delete", "cfg", "--durable") == 0
    assert out_json(capsys)["deleted"] is True  # type: ignore[index]
    assert run(config, "authorize") == 0
    assert out_json(capsys)["key_id"] == TEST_KEY_ID  # type: ignore[index]
    assert run(config, "flush") == 0
    assert isinstance(out_json(capsys)["flushed"], int)  # type: ignore[index]
    assert run(config, "stats") == 0
    assert "cache" in out_json(capsys)  # type: ignore[operator]


def test_authorize_prints_the_role_and_prefix_and_a_refusal_is_the_403(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(config, "--key-id", "dash", "authorize") == 0
    assert out_json(capsys) == {"authorized": True, "key_id": "dash", "role": "read", "prefix": "app one/"}
    assert run(config, "authorize") == 0
    assert out_json(capsys) == {"authorized": True, "key_id": TEST_KEY_ID, "role": "admin", "prefix": None}
    assert run(config, "--key-id", "dash", "save", "app one/x", "1") == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: 403 {")
    assert json.loads(err.removeprefix("error: 403 "))["error"] == "forbidden"


def test_an_error_answer_is_the_servers_json_on_stderr(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(config, "get", "never-saved") == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: 404 {") and err.endswith("}\n")
    assert json.loads(err.removeprefix("error: 404 "))["error"] == "not_found"


@pytest.mark.parametrize(
    ("stdin", "args", "expected"),
    [
        pytest.param("two\nlines, é and trailing\n", [], "two\nlines, é and trailing\n", id="text-exactly"),
        pytest.param('{"n": [1, "☕"]}\n', ["--json"], {"n": [1, "☕"]}, id="json"),
        pytest.param("", [], "", id="empty"),
    ],
)
def test_value_dash_reads_stdin(config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                stdin: str, args: list[str], expected: object) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))
    assert run(config, "save", "from-stdin", "-", *args) == 0
    capsys.readouterr()
    assert run(config, "get", "from-stdin") == 0
    assert out_json(capsys) == expected


def test_value_at_path_reads_a_file_longer_than_any_argument(config: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    value = ("é☕ line\n" * 40_000)[: ARGV_ARG_LIMIT + 10]
    path = tmp_path / "value.txt"
    path.write_text(value, encoding="utf-8")
    assert len(value.encode()) > ARGV_ARG_LIMIT

    assert run(config, "save", "from-file", f"@{path}") == 0
    capsys.readouterr()
    assert run(config, "get", "from-file") == 0
    assert out_json(capsys) == value


def test_a_value_over_the_body_limit_is_the_servers_413_uploaded_once(
    config: Path, exercise4: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "big.txt"
    path.write_bytes(b"x" * 3_000_000)
    statuses: list[int] = []

    lines = access_log_of(exercise4, lambda: statuses.append(run(config, "save", "big", f"@{path}")))

    assert statuses == [1]
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: 413 {"), err
    doc = json.loads(err.removeprefix("error: 413 "))
    assert doc["error"] == "too_large" and f"the limit is {MAX_BODY}" in doc["message"]
    assert requests_in(lines) == ["413 POST /save"]


@pytest.mark.parametrize(
    ("make_value", "message"),
    [
        pytest.param(lambda d: "@" + str(d / "missing.txt"), "cannot read {d}/missing.txt: No such file or directory",
                     id="missing-file"),
        pytest.param(lambda d: "@", "'@' needs a file name: @path", id="at-alone"),
        pytest.param(lambda d: (d / "latin1.txt").write_bytes(b"caf\xe9") and "@" + str(d / "latin1.txt"),
                     "VALUE from {d}/latin1.txt is not UTF-8 text", id="not-utf8"),
    ],
)
def test_an_unreadable_value_is_a_usage_error(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              make_value: object, message: str) -> None:
    assert callable(make_value)
    assert run(config, "save", "k", make_value(tmp_path)) == 2
    assert capsys.readouterr() == ("", f"error: {message.format(d=tmp_path)}\n")


def test_json_that_does_not_parse_is_a_usage_error(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(config, "save", "k", "{nope", "--json") == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: VALUE is not JSON (")


def test_ping_needs_no_keys_file(tmp_path: Path, exercise4: ServerProcess,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    no_keys = write_config(tmp_path, {"server": {"port": exercise4.port},
                                      "auth": {"secret_file": "nowhere/kv.keys"}})
    assert cli(["--config", str(no_keys), "ping"]) == 0  # the address from the config
    assert out_json(capsys) == {"ping": "pong"}
    assert cli(["--config", str(tmp_path / "no-config.yaml"), "--url", exercise4.base_url, "ping"]) == 0
    assert out_json(capsys) == {"ping": "pong"}
    assert not (tmp_path / "nowhere").exists()  # nothing was created for it

    assert cli(["--config", str(no_keys), "authorize"]) == 2  # a signed command does need the keys
    out, err = capsys.readouterr()
    assert out == "" and "kv.keys: keys file not found" in err


@pytest.mark.parametrize("args", [["ping"], ["get", "k"], ["save", "k", "v"]], ids=lambda a: a[0])
def test_a_server_that_cannot_be_reached_is_named(config: Path, capsys: pytest.CaptureFixture[str],
                                                  args: list[str]) -> None:
    with socket.socket() as taken:  # bound, never listening: a connection to it is refused
        taken.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{taken.getsockname()[1]}"
        assert run(config, "--url", url, *args) == 1
    assert capsys.readouterr() == ("", f"error: cannot connect to {url}: Connection refused\n")


def indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def undocumented(help_text: str) -> list[str]:
    """The entries of an argparse help's argument sections that have no description."""
    missing: list[str] = []
    lines = help_text.splitlines()
    section = False
    for i, line in enumerate(lines):
        if line in ("positional arguments:", "options:", "optional arguments:"):
            section = True
        elif not line.strip():
            section = False
        elif section and indent(line) <= 4:  # an entry (a command or an argument), not a wrapped description
            has_text = "  " in line.strip()
            next_is_text = i + 1 < len(lines) and indent(lines[i + 1]) > 4
            if not (has_text or next_is_text):
                missing.append(line.strip())
    return missing


COMMANDS = ["ping", "authorize", "save", "get", "delete", "incr", "keys", "batch", "flush", "stats"]


def test_help_describes_every_command_and_argument(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli(["--help"])
    assert done.value.code == 0
    top = capsys.readouterr().out
    assert undocumented(top) == []
    for name in COMMANDS:
        assert any(line.split()[:1] == [name] and len(line.split()) > 1 for line in top.splitlines()), name
    assert "'-' reads it from stdin" in top and "'@path' from a file" in top

    for name in COMMANDS:
        with pytest.raises(SystemExit) as done:
            cli([name, "--help"])
        assert done.value.code == 0
        text = capsys.readouterr().out
        assert undocumented(text) == [], (name, text)
        assert text.split("\n\n")[1].strip(), text  # the command's own description


def test_a_closed_stdout_pipe_ends_quietly(config: Path, exercise4: ServerProcess) -> None:
    """``... get k | head -c1``: the reader is gone before anything is written (made certain here by closing
    the pipe's read end first); the client stops with status 1 and writes nothing to stderr."""
    with KVClient(exercise4.base_url, Signer(TEST_KEY_ID, TEST_SECRET)) as c:
        c.save("piped", "x" * 100_000)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "kvtornado.client", "--config", str(config), "get", "piped"],
                              cwd=ROOT, stdin=subprocess.DEVNULL, stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=PROCESS_TIMEOUT_S)
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (1, "")


# --- the data model's commands, against the recording server -------------------------------------


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    yield from running_recorder()


@pytest.fixture
def fake_config(tmp_path: Path, recorder: Recorder) -> Path:
    """A client config whose server is the recorder, with the test key."""
    write_keys(tmp_path / "keys" / "kv.keys", [f"{TEST_KEY_ID} {TEST_SECRET.decode()}"])
    return write_config(tmp_path, {"server": {"port": recorder.server_address[1]}}, name="fake.yaml")


def sent(recorder: Recorder) -> list[tuple[str, str, object]]:
    """``(method, target, decoded JSON body or None)`` of each request, each checked to be signed by the key."""
    auth = Authenticator({TEST_KEY_ID: TEST_SECRET})
    assert [verify_seen(auth, seen) for seen in recorder.seen] == [TEST_KEY_ID] * len(recorder.seen)
    return [(seen.method, seen.target, json.loads(seen.body) if seen.body else None) for seen in recorder.seen]


def lines(*docs: object) -> str:
    return "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs)


SAVED = {"key": "k", "saved": True, "version": 4}
DELETED = {"key": "k", "deleted": True, "version": 5}
COUNTED = {"key": "n", "value": 7, "version": 9}
PAGE_1 = {"keys": [{"key": "p1", "version": 1, "expires_at": None}, {"key": "p2", "version": 2,
                                                                     "expires_at": 1700000000}], "cursor": "c 1"}
PAGE_2 = {"keys": [{"key": "p3", "version": 3, "expires_at": None}], "cursor": None}
OPS = [{"op": "save", "key": "a", "value": "é", "ttl": 5}, {"op": "incr", "key": "n", "by": -2},
       {"op": "delete", "key": "b", "if_version": 3}, {"op": "get", "key": "a"}]
RESULTS = [{"key": "a", "version": 10}, {"key": "n", "value": 5, "version": 11}, {"key": "b", "deleted": False},
           {"key": "a", "found": True, "value": "é", "version": 10, "expires_at": 1700000005}]


@pytest.mark.parametrize(
    ("args", "answers", "requests", "printed"),
    [
        pytest.param(["save", "k", "v", "--ttl", "60", "--if-version", "0"], [SAVED],
                     [("POST", "/save?ttl=60&if_version=0", {"key": "k", "value": "v"})], [SAVED],
                     id="save-ttl-create-only"),
        pytest.param(["save", "k", "[1]", "--json", "--durable", "--if-version", "9"], [SAVED],
                     [("POST", "/save?if_version=9&durable=1", {"key": "k", "value": [1]})], [SAVED],
                     id="save-json-durable-if-version"),
        pytest.param(["save", "k", "v"], [SAVED], [("POST", "/save", {"key": "k", "value": "v"})], [SAVED],
                     id="save-nothing-else-sent"),
        pytest.param(["delete", "k", "--if-version", "3", "--durable"], [DELETED],
                     [("DELETE", "/delete?key=k&if_version=3&durable=1", None)], [DELETED], id="delete-if-version"),
        pytest.param(["incr", "n"], [COUNTED], [("POST", "/incr", {"key": "n", "by": 1})], [COUNTED],
                     id="incr-by-1"),
        pytest.param(["incr", "n", "--by", "-3", "--if-version", "4", "--durable"], [COUNTED],
                     [("POST", "/incr?if_version=4&durable=1", {"key": "n", "by": -3})], [COUNTED],
                     id="incr-negative-if-version-durable"),
        pytest.param(["keys"], [PAGE_1], [("GET", "/keys", None)], [PAGE_1], id="keys-one-page-only"),
        pytest.param(["keys", "--prefix", "a b/", "--limit", "5", "--values"], [PAGE_2],
                     [("GET", "/keys?prefix=a%20b%2F&limit=5&values=1", None)], [PAGE_2], id="keys-everything"),
        pytest.param(["keys", "--all", "--prefix", "p", "--limit", "2"], [PAGE_1, PAGE_2],
                     [("GET", "/keys?prefix=p&limit=2", None), ("GET", "/keys?prefix=p&limit=2&cursor=c%201", None)],
                     [PAGE_1, PAGE_2], id="keys-all-a-line-a-page"),
        pytest.param(["keys", "--all"], [PAGE_2], [("GET", "/keys", None)], [PAGE_2], id="keys-all-one-page"),
    ],
)
def test_each_command_sends_its_request_signed_and_prints_the_answer(
    fake_config: Path, recorder: Recorder, capsys: pytest.CaptureFixture[str], args: list[str],
    answers: list[object], requests: list[tuple[str, str, object]], printed: list[object],
) -> None:
    recorder.answers += [Answer(200, doc) for doc in answers]

    assert run(fake_config, *args) == 0

    assert capsys.readouterr() == (lines(*printed), "")
    assert sent(recorder) == requests


@pytest.mark.parametrize(
    "content",
    [pytest.param({"ops": OPS}, id="ops-object"), pytest.param(OPS, id="bare-list")],
)
@pytest.mark.parametrize("source", ["file", "stdin"])
def test_batch_sends_the_ops_of_file_or_stdin_and_prints_the_results(
    fake_config: Path, recorder: Recorder, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, content: object, source: str,
) -> None:
    text = json.dumps(content, ensure_ascii=False)
    if source == "stdin":
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
        arg = "-"
    else:
        (tmp_path / "ops.json").write_text(text, encoding="utf-8")
        arg = str(tmp_path / "ops.json")
    recorder.answers.append(Answer(200, {"results": RESULTS}))

    assert run(fake_config, "batch", arg) == 0

    assert capsys.readouterr() == (lines(RESULTS), "")
    assert sent(recorder) == [("POST", "/batch", {"ops": OPS})]


@pytest.mark.parametrize(
    ("args", "status", "doc"),
    [
        pytest.param(["save", "k", "v", "--if-version", "2"], 412,
                     {"error": "version_mismatch", "message": "The key is at version 5.", "current_version": 5},
                     id="save-412"),
        pytest.param(["delete", "k", "--if-version", "1"], 412,
                     {"error": "version_mismatch", "message": "The key does not exist.", "current_version": 0},
                     id="delete-412-absent"),
        pytest.param(["incr", "k"], 409, {"error": "not_an_integer", "message": "The value is not an integer."},
                     id="incr-409"),
        pytest.param(["keys", "--limit", "0"], 400, {"error": "bad_request", "message": "limit is 1 to 1000."},
                     id="keys-400"),
    ],
)
def test_a_refusal_prints_the_whole_error_body_and_exits_1(
    fake_config: Path, recorder: Recorder, capsys: pytest.CaptureFixture[str], args: list[str], status: int,
    doc: dict[str, object],
) -> None:
    recorder.answers.append(Answer(status, doc))

    assert run(fake_config, *args) == 1

    assert capsys.readouterr() == ("", f"error: {status} {json.dumps(doc)}\n")
    assert len(sent(recorder)) == 1


def test_a_failed_batch_prints_the_index_of_its_op(fake_config: Path, recorder: Recorder, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ops.json").write_text(json.dumps(OPS), encoding="utf-8")
    doc = {"error": "version_mismatch", "message": "Op 2 failed.", "current_version": 4, "index": 2}
    recorder.answers.append(Answer(412, doc))

    assert run(fake_config, "batch", str(tmp_path / "ops.json")) == 1

    out, err = capsys.readouterr()
    assert out == ""
    assert json.loads(err.removeprefix("error: 412 ")) == doc


def test_keys_all_prints_the_pages_before_an_error_then_exits_1(
    fake_config: Path, recorder: Recorder, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = {"error": "bad_request", "message": "The cursor is not one."}
    recorder.answers += [Answer(200, PAGE_1), Answer(400, doc), Answer(200, PAGE_2)]

    assert run(fake_config, "keys", "--all") == 1

    assert capsys.readouterr() == (lines(PAGE_1), f"error: 400 {json.dumps(doc)}\n")
    assert len(sent(recorder)) == 2


def test_keys_all_stops_at_a_cursor_that_does_not_advance(
    fake_config: Path, recorder: Recorder, capsys: pytest.CaptureFixture[str]
) -> None:
    recorder.answers += [Answer(200, PAGE_1), Answer(200, PAGE_1), Answer(200, PAGE_2)]

    assert run(fake_config, "keys", "--all") == 1

    assert capsys.readouterr() == (
        lines(PAGE_1, PAGE_1),
        "error: /keys answered with the cursor it was asked for ('c 1'): it does not advance\n")
    assert len(sent(recorder)) == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(None, "cannot read {path}: No such file or directory", id="missing"),
        pytest.param(b"[{nope", "FILE {path} is not JSON (", id="not-json"),
        pytest.param(b"\xff[]", "FILE from {path} is not UTF-8 text", id="not-utf8"),
        pytest.param(b'{"ops": [], "durable": true}', 'FILE {path} must hold {{"ops": [...]}} or a list of ops',
                     id="more-than-ops"),
        pytest.param(b'{"ops": {"op": "get"}}', 'FILE {path} must hold {{"ops": [...]}} or a list of ops',
                     id="ops-not-a-list"),
        pytest.param(b'"get"', 'FILE {path} must hold {{"ops": [...]}} or a list of ops', id="a-string"),
    ],
)
def test_a_batch_file_that_is_not_ops_is_a_usage_error(
    fake_config: Path, recorder: Recorder, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    content: bytes | None, message: str,
) -> None:
    path = tmp_path / "ops.json"
    if content is not None:
        path.write_bytes(content)

    assert run(fake_config, "batch", str(path)) == 2

    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: " + message.format(path=path)), err
    assert recorder.seen == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["save", "k", "v", "--if-version", "-1"], "argument --if-version: not a decimal integer >= 0",
                     id="negative-version"),
        pytest.param(["delete", "k", "--if-version", "1_0"], "argument --if-version: not a decimal integer >= 0",
                     id="underscore"),
        pytest.param(["save", "k", "v", "--ttl", "1.5"], "argument --ttl: not a decimal integer >= 0",
                     id="fraction-ttl"),
        pytest.param(["keys", "--limit", " 5"], "argument --limit: not a decimal integer >= 0", id="space"),
        pytest.param(["keys", "--limit", "٣"], "argument --limit: not a decimal integer >= 0", id="arabic-digit"),
        pytest.param(["incr", "k", "--by", "+2"], "argument --by: not a decimal integer: '+2'", id="plus-by"),
        pytest.param(["incr", "k", "--by", "٣"], "argument --by: not a decimal integer", id="arabic-digit-by"),
    ],
)
def test_a_number_not_spelled_in_decimal_digits_is_a_usage_error(
    fake_config: Path, recorder: Recorder, capsys: pytest.CaptureFixture[str], args: list[str], message: str,
) -> None:
    with pytest.raises(SystemExit) as done:
        run(fake_config, *args)
    assert done.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and message in err, err
    assert recorder.seen == []
