#!/usr/bin/env python3
"""Build ``dist/kvtornado-<version>.zip``: the sources to hand in, nothing local (venv, data, keys, caches).

    python tools/make_dist.py [--out DIR] [--root DIR]

In a git checkout the files are what git would commit (``git ls-files --cached --others --exclude-standard``);
elsewhere (an unpacked archive) the tree is walked. Either way only the paths below are taken and the
local-only ones are dropped, so a stray key or database can never be shipped.

The ZIP's ``README.md`` also says how to set up, run and test without ``make`` (``WITHOUT_MAKE``, appended
unless the README already gives those commands), for a reader whose machine has Python but no ``make``.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parent.parent
INCLUDE_DIRS = ("kvtornado", "tests", "bench", "docs", "tools", "deploy", ".ci")
INCLUDE_FILES = ("config.yaml", "requirements.txt", "Makefile", "pyproject.toml", "README.md", ".gitignore")
EXCLUDE_PARTS = frozenset({
    ".venv", "venv", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis",
    ".secrets", "data", "dist", ".git",
})
EXCLUDE_PREFIXES = ("bench/results/",)  # the bench's own output
EXCLUDE_SUFFIXES = (".pyc", ".pyo", ".keys", ".sqlite3", ".sqlite3-wal", ".sqlite3-shm", ".zip")
README = "README.md"
WITHOUT_MAKE_MARK = "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt"
WITHOUT_MAKE = f"""
## Without make

`make run` and `make test` are only these commands, for a machine with Python 3.11+ and no `make` (on Windows:
`py -m venv .venv`, `.venv\\Scripts\\pip install -r requirements.txt`, `.venv\\Scripts\\activate`):

```sh
{WITHOUT_MAKE_MARK}   # once: the venv
. .venv/bin/activate                       # in each new shell, so that `python` is the venv's
python exercise4.py --config config.yaml   # make run; python exerciseN.py --config config.yaml runs exercise N
ruff check . && mypy && python -m pytest   # make test: lint, types (strict on kvtornado/), then the suite
```
"""


def version(root: Path) -> str:
    text = (root / "kvtornado" / "__init__.py").read_text(encoding="utf-8")
    m = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', text, re.MULTILINE)
    if m is None:
        raise SystemExit(f"error: no __version__ in {root / 'kvtornado' / '__init__.py'}")
    return m.group(1)


def wanted(rel: PurePosixPath) -> bool:
    top = rel.parts[0]
    if len(rel.parts) == 1:
        if not (rel.name in INCLUDE_FILES or re.fullmatch(r"exercise\d+\.py", rel.name)):
            return False
    elif top not in INCLUDE_DIRS:
        return False
    return not (
        EXCLUDE_PARTS.intersection(rel.parts)
        or rel.name.endswith(EXCLUDE_SUFFIXES)
        or str(rel).startswith(EXCLUDE_PREFIXES)
    )


def _git_files(root: Path) -> list[str] | None:
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        if Path(top).resolve() != root.resolve():
            return None  # root is inside some other repository: walk it instead
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return [name for name in out.decode("utf-8").split("\0") if name]


def _walked_files(root: Path) -> Iterable[str]:
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            yield path.relative_to(root).as_posix()


def list_files(root: Path, *, use_git: bool = True) -> list[str]:
    """Relative POSIX paths to ship, sorted; files git still lists but that are deleted are skipped."""
    names = (_git_files(root) if use_git else None) or _walked_files(root)
    return sorted({n for n in names if wanted(PurePosixPath(n)) and (root / n).is_file()})


def readme_text(text: str) -> str:
    """The README as shipped: with the set-up without ``make``, unless it already has it (so a ZIP built
    from an unpacked ZIP carries it once)."""
    return text if WITHOUT_MAKE_MARK in text else text.rstrip("\n") + "\n" + WITHOUT_MAKE


def build(out_dir: Path, root: Path = ROOT, *, use_git: bool = True) -> Path:
    """Write ``<out_dir>/kvtornado-<version>.zip`` (every entry under ``kvtornado-<version>/``)."""
    name = f"kvtornado-{version(root)}"
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{name}.zip"
    tmp = target.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, strict_timestamps=False) as zf:
        for rel in list_files(root, use_git=use_git):
            if rel == README:
                info = zipfile.ZipInfo.from_file(root / rel, f"{name}/{rel}", strict_timestamps=False)
                zf.writestr(info, readme_text((root / rel).read_text(encoding="utf-8")).encode("utf-8"),
                            compress_type=zipfile.ZIP_DEFLATED)
            else:
                zf.write(root / rel, f"{name}/{rel}")  # keeps the mode bits: .ci/run stays executable
    tmp.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "dist", help="output folder (default: %(default)s)")
    p.add_argument("--root", type=Path, default=ROOT, help="project folder (default: %(default)s)")
    p.add_argument("--no-git", action="store_true", help="walk the tree even in a git checkout")
    args = p.parse_args(argv)
    print(build(args.out, args.root.resolve(), use_git=not args.no_git))
    return 0


if __name__ == "__main__":
    sys.exit(main())
