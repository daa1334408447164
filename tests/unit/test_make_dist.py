"""tools/make_dist.py: the ZIP's README says how to set up, run and test without ``make``."""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

import kvtornado
from tests.conftest import ROOT

WITHOUT_MAKE = [
    "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt",
    "python exerciseN.py --config config.yaml",
    "python exercise4.py --config config.yaml",
    "python -m pytest",
]


@pytest.fixture(scope="module")
def make_dist() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_dist", ROOT / "tools" / "make_dist.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shipped_readme(archive: Path, version: str) -> str:
    with zipfile.ZipFile(archive) as zf:
        return zf.read(f"kvtornado-{version}/README.md").decode("utf-8")


def test_the_zip_readme_has_the_commands_without_make(make_dist: ModuleType, tmp_path: Path) -> None:
    archive = make_dist.build(tmp_path / "out", ROOT)

    text = shipped_readme(archive, kvtornado.__version__)
    original = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.startswith(original.rstrip("\n"))  # the README itself, unchanged, and then the section
    for command in WITHOUT_MAKE:
        assert command in text, command


def test_the_section_is_added_once(make_dist: ModuleType, tmp_path: Path) -> None:
    """A ZIP built from an unpacked ZIP (or from a README that already says it) carries the section once."""
    root = tmp_path / "project"
    (root / "kvtornado").mkdir(parents=True)
    (root / "kvtornado" / "__init__.py").write_text('__version__ = "9.8.7"\n', encoding="utf-8")
    (root / "README.md").write_text("# kvtornado\n\nAbout it.\n", encoding="utf-8")

    first = shipped_readme(make_dist.build(tmp_path / "one", root, use_git=False), "9.8.7")
    (root / "README.md").write_text(first, encoding="utf-8")
    second = shipped_readme(make_dist.build(tmp_path / "two", root, use_git=False), "9.8.7")

    assert first.startswith("# kvtornado\n\nAbout it.\n\n## Without make\n")
    assert second == first
    assert first.count(WITHOUT_MAKE[0]) == 1
