"""SPEC §11 TLS: with ``server.tls_cert`` and ``server.tls_key`` a real ``exercise4.py`` serves HTTPS only; the
client and its command line reach it with ``https://`` and a ``--cafile`` (a throwaway CA made by trustme)."""

from __future__ import annotations

import http.client
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from kvtornado.client import AsyncKVClient, KVClient, KVConnectionError, Signer
from tests.conftest import TEST_KEY_ID, TEST_SECRET, write_config, write_keys
from tests.e2e.helpers import ROOT, ServerProcess


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {"ca": folder / "ca.pem", "cert": folder / "cert.pem", "key": folder / "key.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    for i, blob in enumerate(cert.cert_chain_pems):
        blob.write_to_path(str(paths["cert"]), append=i > 0)
    return paths


@pytest.fixture(scope="module")
def https(pki: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    folder = tmp_path_factory.mktemp("tls")
    write_keys(folder / "keys" / "kv.keys", [f"{TEST_KEY_ID} {TEST_SECRET.decode()}"])
    config = write_config(folder, {"server": {"tls_cert": str(pki["cert"]), "tls_key": str(pki["key"])}})
    with ServerProcess.start(4, config) as srv:
        port = int(srv.wait_for(r"listening on https://127\.0\.0\.1:(\d+)").group(1))
        yield srv, f"https://127.0.0.1:{port}"
        assert srv.stop() == 0, srv.lines


def test_the_client_speaks_https_with_the_private_ca(https: Any, pki: dict[str, Path]) -> None:
    _, url = https
    with KVClient(url, Signer(TEST_KEY_ID, TEST_SECRET), cafile=str(pki["ca"])) as kv:
        version = kv.save("k", {"over": "tls"})["version"]
        assert kv.get_record("k")["version"] == version and kv.get("k") == {"over": "tls"}


def test_a_server_it_cannot_verify_is_a_connection_error_naming_the_url(https: Any) -> None:
    _, url = https
    with KVClient(url, Signer(TEST_KEY_ID, TEST_SECRET)) as kv, pytest.raises(KVConnectionError) as err:
        kv.ping()  # the system's CAs do not know the throwaway one
    assert url in str(err.value)


def test_plain_http_gets_no_answer_from_the_https_port(https: Any) -> None:
    _, url = https
    conn = http.client.HTTPConnection(url.removeprefix("https://"), timeout=10)
    try:
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            conn.request("GET", "/ping")
            conn.getresponse()
    finally:
        conn.close()


def test_the_command_line_takes_an_https_url_and_a_cafile(https: Any, pki: dict[str, Path]) -> None:
    srv, url = https
    config = Path(srv.proc.args[3])  # type: ignore[index]  # exercise4.py --config PATH
    done = subprocess.run([sys.executable, "-m", "kvtornado.client", "--config", str(config), "--url", url,
                           "--cafile", str(pki["ca"]), "save", "cli", "hello"],
                          cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-m", "kvtornado.client", "--config", str(config), "--url", url,
                           "--cafile", str(pki["ca"]), "get", "cli"],
                          cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0 and "hello" in done.stdout, done.stderr
    done = subprocess.run([sys.executable, "-m", "kvtornado.client", "--config", str(config), "--url", url,
                           "get", "cli"], cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode != 0 and url in done.stderr and "Traceback" not in done.stderr  # no --cafile


def test_an_unreadable_certificate_stops_start_up_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "bad.pem").write_text("not a certificate\n")
    write_keys(tmp_path / "keys" / "kv.keys", [f"{TEST_KEY_ID} {TEST_SECRET.decode()}"])
    config = write_config(tmp_path, {"server": {"tls_cert": "bad.pem", "tls_key": "bad.pem"}})
    srv = ServerProcess.start(4, config)
    with srv:
        assert srv.proc.wait(timeout=20) == 2
        srv.stop()
    lines = [line for line in srv.lines if line.strip()]
    assert len(lines) == 1 and "server.tls_cert/server.tls_key: cannot load" in lines[0], lines


@pytest.mark.parametrize("content", [None, "not a certificate\n"], ids=["missing", "not-pem"])
def test_a_cafile_that_cannot_be_loaded_is_one_line_naming_it(https: Any, tmp_path: Path,
                                                               content: str | None) -> None:
    srv, url = https
    cafile = tmp_path / "ca.pem"
    if content is not None:
        cafile.write_text(content)
    for make in (KVClient, AsyncKVClient):
        with pytest.raises(ValueError, match=f"CA file {cafile}: cannot load it"):
            make(url, None, cafile=str(cafile))
    config = Path(srv.proc.args[3])  # type: ignore[index]  # exercise4.py --config PATH
    done = subprocess.run([sys.executable, "-m", "kvtornado.client", "--config", str(config), "--url", url,
                           "--cafile", str(cafile), "get", "k"],
                          cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr.count("\n") == 1 and f"CA file {cafile}: cannot load it" in done.stderr, done.stderr
