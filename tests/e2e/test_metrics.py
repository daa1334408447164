"""SPEC §11 metrics, end to end: a real ``exercise4.py`` with ``metrics.port`` set, scraped over HTTP and read with
prometheus-client's own parser; the API port never serves them; a metrics port that is taken is refused."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path

import pytest

from kvtornado.client import KVClient, KVClientError, Signer
from tests.conftest import TEST_KEY_ID, TEST_SECRET, write_config
from tests.e2e.helpers import PROCESS_TIMEOUT_S, ServerProcess
from tests.services import free_port
from tests.unit.test_metrics import samples

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> tuple[str, Samples]:
    """``GET /metrics`` on the metrics port: its content type and every sample."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=PROCESS_TIMEOUT_S)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read().decode("utf-8")
        assert resp.status == 200, (resp.status, body[:300])
        assert TEST_SECRET.decode() not in body  # no secret ever reaches a metric
        return resp.getheader("Content-Type") or "", samples(body)
    finally:
        conn.close()


def get(s: Samples, name: str, **labels: str) -> float | None:
    return s.get((name, frozenset(labels.items())))


def test_exercise4_serves_its_metrics_on_their_own_port(tmp_path: Path, keys_file: Path) -> None:
    metrics_port = free_port()
    config = write_config(tmp_path, {"metrics": {"port": metrics_port},
                                     "cache": {"flush_interval_ms": 60_000}})  # flushed only by /flush here
    with ServerProcess.start(4, config) as srv:
        srv.wait_listening()
        assert any(f"metrics on http://127.0.0.1:{metrics_port}/metrics" in line for line in srv.lines), srv.lines
        with KVClient(srv.base_url, Signer(TEST_KEY_ID, TEST_SECRET)) as c:
            c.save("a", 1)
            c.save("b", {"x": [2]})
            assert c.get("a") == 1
            content_type, pending = scrape(metrics_port)
            assert content_type.startswith("text/plain")
            assert get(pending, "kvtornado_cache_dirty_keys") == 2
            assert (get(pending, "kvtornado_cache_dirty_bytes") or 0) > 0
            assert get(pending, "kvtornado_flushes_total") == 0

            assert c.flush() == {"flushed": 2}
            assert c.request("GET", "/get", params={"key": "a"}, sign=False).status == 401  # missing_auth
            with KVClient(srv.base_url, Signer(TEST_KEY_ID, b"b" * 64)) as wrong:
                with pytest.raises(KVClientError) as refused:
                    wrong.authorize()
                assert refused.value.code == "bad_signature"
            assert c.request("GET", "/no/such/route").status == 404
            api = c.request("GET", "/metrics")  # the API port never serves the metrics
            assert api.status == 404 and api.json()["error"] == "not_found"

            _, s = scrape(metrics_port)  # c's connection is still open
        assert get(s, "kvtornado_requests_total", route="/save", status="200") == 2
        assert get(s, "kvtornado_requests_total", route="/get", status="200") == 1
        assert get(s, "kvtornado_requests_total", route="/get", status="401") == 1
        assert get(s, "kvtornado_requests_total", route="/authorize", status="401") == 1
        assert get(s, "kvtornado_requests_total", route="/flush", status="200") == 1
        assert get(s, "kvtornado_requests_total", route="other", status="404") == 2  # the unknown path, /metrics
        assert get(s, "kvtornado_request_duration_seconds_count", route="/save") == 2
        assert get(s, "kvtornado_auth_refusals_total", code="missing_auth") == 1
        assert get(s, "kvtornado_auth_refusals_total", code="bad_signature") == 1
        assert (get(s, "kvtornado_cache_dirty_keys"), get(s, "kvtornado_cache_dirty_bytes")) == (0, 0)
        assert get(s, "kvtornado_cache_entries") == 2
        assert (get(s, "kvtornado_cache_hits_total") or 0) >= 1
        assert get(s, "kvtornado_flushes_total") == 1
        assert get(s, "kvtornado_flush_rows_total") == 2
        assert get(s, "kvtornado_flush_errors_total") == 0
        assert get(s, "kvtornado_flush_duration_seconds_count") == 1
        assert get(s, "kvtornado_nonces") == 4  # the signed requests accepted: two saves, a get, the flush
        assert (get(s, "kvtornado_open_connections") or 0) >= 1
        # Only the route label's bounded values: no key, query or key id in any label.
        labels = {v for _, ls in s for k, v in ls if k == "route"}
        assert labels <= {"/save", "/get", "/authorize", "/flush", "other"}, labels

        assert srv.stop() == 0, srv.lines
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", metrics_port), timeout=1):
        pass  # stopped with the server


@pytest.mark.parametrize("exercise", [2, 3])
def test_exercises_2_and_3_count_requests_and_refusals_without_cache_figures(
    tmp_path: Path, keys_file: Path, exercise: int
) -> None:
    metrics_port = free_port()
    with ServerProcess.start(exercise, write_config(tmp_path, {"metrics": {"port": metrics_port}})) as srv:
        srv.wait_listening()
        with KVClient(srv.base_url, Signer(TEST_KEY_ID, TEST_SECRET)) as c:
            c.authorize()
            assert c.request("GET", "/authorize", sign=False).status == 401
        _, s = scrape(metrics_port)
        assert get(s, "kvtornado_requests_total", route="/authorize", status="200") == 1
        assert get(s, "kvtornado_auth_refusals_total", code="missing_auth") == 1
        assert get(s, "kvtornado_nonces") == 1
        assert not [name for name, _ in s if name.startswith(("kvtornado_cache", "kvtornado_flush"))]
        # Anything but GET /metrics is a JSON error there too, as on the API port (SPEC §5), and logs nothing.
        for method, path, status, code in [("GET", "/", 404, "not_found"), ("GET", "/metrics/", 404, "not_found"),
                                           ("POST", "/metrics", 405, "method_not_allowed"),
                                           ("PROPFIND", "/metrics", 405, "method_not_allowed"),
                                           ("DELETE", "/nowhere", 404, "not_found")]:
            conn = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=PROCESS_TIMEOUT_S)
            try:
                conn.request(method, path)
                resp = conn.getresponse()
                assert resp.status == status, (method, path, resp.status)
                assert (resp.getheader("Content-Type") or "").startswith("application/json"), (method, path)
                assert json.loads(resp.read())["error"] == code, (method, path)
            finally:
                conn.close()
        assert srv.stop() == 0, srv.lines
    assert not any("Traceback" in line or "ERROR" in line or "WARNING" in line for line in srv.lines), srv.lines


def test_a_port_option_equal_to_metrics_port_is_refused_naming_both(tmp_path: Path, keys_file: Path) -> None:
    port = free_port()
    with ServerProcess.start(4, write_config(tmp_path, {"metrics": {"port": port}}), "--port", str(port)) as srv:
        assert srv.proc.wait(timeout=PROCESS_TIMEOUT_S) == 2
    assert srv.lines == [f"--port must differ from metrics.port (the metrics have no auth and never share the "
                         f"API's port), got {port}"], srv.lines


def test_a_metrics_port_that_is_taken_is_refused_naming_metrics_port(tmp_path: Path, keys_file: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with ServerProcess.start(4, write_config(tmp_path, {"metrics": {"port": port}})) as srv:
            assert srv.proc.wait(timeout=PROCESS_TIMEOUT_S) == 2
    # As for a taken API port: the cache, already started, logs its (empty) stop first; the refusal is the last line.
    assert srv.lines[-1] == f"metrics.port: cannot listen on 127.0.0.1:{port} (Address already in use)", srv.lines
    assert not any("Traceback" in line for line in srv.lines), srv.lines
