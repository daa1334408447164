"""SPEC §11 on a real ``exercise4.py``: ``/healthz`` and ``/readyz`` (no auth), ``X-Request-Id`` on every
answer, and ``--log-format json`` (one object a line, the access line carrying the answer's request id)."""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.conftest import TEST_KEY_ID, TEST_SECRET, write_config, write_keys
from tests.e2e.helpers import ServerProcess


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.netloc, timeout=10)
    try:
        conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""), headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), json.loads(resp.read())
    finally:
        conn.close()


def start(folder: Path, *extra: str, sections: dict[str, Any] | None = None) -> ServerProcess:
    write_keys(folder / "keys" / "kv.keys", [f"{TEST_KEY_ID} {TEST_SECRET.decode()}"])
    srv = ServerProcess.start(4, write_config(folder, sections), *extra)
    return srv


def test_health_and_readiness_need_no_key_and_readiness_follows_the_store(tmp_path: Path) -> None:
    with start(tmp_path) as srv:
        srv.wait_listening()
        assert get(srv.base_url + "/healthz")[::2] == (200, {"status": "ok"})
        assert get(srv.base_url + "/readyz")[::2] == (200, {"status": "ready"})
        assert srv.stop() == 0


def test_every_answer_carries_a_request_id_the_clients_when_it_is_sane(tmp_path: Path) -> None:
    with start(tmp_path) as srv:
        srv.wait_listening()
        ids = set()
        for path, expected in (("/ping", 200), ("/healthz", 200), ("/nowhere", 404), ("/get?key=k", 401)):
            status, headers, _ = get(srv.base_url + path)
            assert status == expected
            ids.add(headers["X-Request-Id"])
        assert len(ids) == 4 and all(len(i) >= 8 for i in ids)
        assert get(srv.base_url + "/get?key=k", {"X-Request-Id": "trace-1.a_B"})[1]["X-Request-Id"] == "trace-1.a_B"
        given = get(srv.base_url + "/ping", {"X-Request-Id": "bad id!"})[1]["X-Request-Id"]
        assert given != "bad id!" and given.isalnum()
        assert get(srv.base_url + "/ping", {"X-Request-Id": "x" * 129})[1]["X-Request-Id"] != "x" * 129
        assert srv.stop() == 0


def test_json_logs_are_one_object_a_line_with_the_request_id(tmp_path: Path) -> None:
    with start(tmp_path, "--log-format", "json", "--log-level", "DEBUG") as srv:
        srv.wait_listening()
        status, headers, _ = get(srv.base_url + "/nowhere", {"X-Request-Id": "find-me"})
        assert (status, headers["X-Request-Id"]) == (404, "find-me")
        assert srv.stop() == 0
    docs = [json.loads(line) for line in srv.lines if line.strip()]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(d) for d in docs)
    assert all(d["time"].endswith("+00:00") for d in docs)
    access = [d for d in docs if d["logger"] == "kvtornado.access"]
    assert any(d.get("request_id") == "find-me" and "404 GET /nowhere" in d["message"] for d in access), access


def test_a_refusal_at_start_up_is_one_json_object_in_json_mode(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"cache": {"flush_interval_ms": "fast"}})
    srv = ServerProcess.start(4, config, "--log-format", "json")
    with srv:
        assert srv.proc.wait(timeout=20) == 2
        srv.stop()
    lines = [line for line in srv.lines if line.strip()]
    assert len(lines) == 1, lines
    doc = json.loads(lines[0])
    assert doc["level"] == "ERROR" and "cache.flush_interval_ms must be an integer" in doc["message"]
