"""deploy/: the systemd unit (SPEC §11) and the config it is written for. ``systemd-analyze verify`` (and its
offline security score) where the command exists; the unit's promises checked against the config either way."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvtornado.config import load_config
from tests.conftest import ROOT

UNIT = ROOT / "deploy" / "kvtornado.service"
CONFIG = ROOT / "deploy" / "config.yaml"
INSTALLED = "/opt/kvtornado/bin/kvtornado"
HARDENING = {
    "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
    "PrivateDevices": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes", "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "KillSignal": "SIGTERM", "User": "kvtornado",
}


def service() -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None, strict=False)  # SystemCallFilter= appears twice
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read(UNIT, encoding="utf-8")
    return dict(parser["Service"])


def test_the_unit_runs_the_installed_command_with_the_hardening() -> None:
    svc = service()
    assert svc["ExecStart"] == f"{INSTALLED} serve --config /etc/kvtornado/config.yaml"
    for key, value in HARDENING.items():
        assert svc.get(key) == value, key


def test_the_unit_fits_its_config() -> None:
    """The config it names keeps keys and data where the unit lets it write, and stops before systemd kills."""
    svc = service()
    cfg = load_config(CONFIG)
    writable = [Path(p) for p in svc["ReadWritePaths"].split()]
    for path in (cfg.auth.secret_file, cfg.storage.path):
        assert any(path.is_relative_to(w) for w in writable), path
    assert int(svc["TimeoutStopSec"]) > cfg.cache.shutdown_timeout_s


@pytest.fixture
def verifiable(tmp_path: Path) -> Path:
    """The unit with ExecStart pointed at a program that exists here. ``verify`` fails a unit whose binary is
    missing, and /opt/kvtornado is where a deployment installs it, not this machine; every other line is the
    shipped one, so what verify checks is the file as shipped."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here (Debian: apt-get install systemd)")
    text, n = re.subn(rf"^ExecStart={re.escape(INSTALLED)} ", f"ExecStart={sys.executable} ",
                      UNIT.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert n == 1
    copy = tmp_path / "kvtornado.service"
    copy.write_text(text, encoding="utf-8")
    return copy


def test_systemd_analyze_verify_accepts_the_unit(verifiable: Path) -> None:
    proc = subprocess.run(["systemd-analyze", "verify", str(verifiable)], capture_output=True, text=True,
                          timeout=30, cwd=verifiable.parent)
    # verify exits 0 on an unknown key or a bad value too, with a warning that names the file: none allowed.
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if verifiable.name in line]
    assert proc.returncode == 0 and not said, proc.stdout + proc.stderr


def test_systemd_analyze_security_rates_the_unit_ok(verifiable: Path) -> None:
    """``systemd-analyze security --offline`` (systemd 250+): the exposure score, 0 (locked down) to 10."""
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(verifiable)],
                          capture_output=True, text=True, timeout=30, cwd=verifiable.parent)
    if "--offline" in proc.stderr and proc.returncode != 0:
        pytest.skip(f"this systemd-analyze has no offline security check: {proc.stderr.strip()}")
    m = re.search(r"Overall exposure level for kvtornado\.service: (\d+\.\d+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    assert float(m.group(1)) <= 2.0, proc.stdout
