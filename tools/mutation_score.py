"""The mutation score of each module after `mutmut run`, and a gate on four of them (stdlib only).

    python tools/mutation_score.py [--min 90] [--results FILE]

It reads what `mutmut results --all true` prints, one mutant a line (``kvtornado.cache.xǁWriteBehindCacheǁget__mutmut_3:
survived``), by running the mutmut next to this Python or from FILE ("-" for stdin). It prints, for each module of
kvtornado/ that the run tested and for all of them together, killed / total and the percentage (a module none of whose
mutants was tested, as when `make mutate` runs only some modules, is listed as not run). It exits 1 if a module in
GATED scores under --min, 2 if one of them was not tested to the end (mutants "not checked") or there are no results.

The score: a mutant counts as killed when a test failed on it ("killed"), it ran past its time limit ("timeout"), or
the type checker refused it; every other mutant (survived, no tests, suspicious, segfault) counts against it.
Skipped mutants are left out of the total.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections import Counter
from pathlib import Path

PACKAGE = "kvtornado"
GATED = ("cache", "auth", "handlers", "store")  # modules whose score fails the run when under --min
DEFAULT_MIN_PERCENT = 90.0

KILLED = {"killed", "timeout", "caught by type check"}
LEFT_OUT = {"skipped"}
INCOMPLETE = {"not checked", "check was interrupted by user"}


def mutmut_results() -> str:
    """What `mutmut results --all true` prints, run from the current directory (the one holding mutants/)."""
    mutmut = Path(sys.executable).with_name("mutmut")
    done = subprocess.run([str(mutmut), "results", "--all", "true"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"mutation_score: {mutmut} results failed ({done.returncode}):\n{done.stderr}")
    return done.stdout


def parse(text: str) -> dict[str, str]:
    """Mutant name -> status, from lines ``    NAME: STATUS`` (mutant names never hold ": ")."""
    statuses: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and name.startswith(PACKAGE + ".") and "__mutmut_" in name:
            statuses[name] = status
    return statuses


def module_of(mutant: str) -> str:
    """``kvtornado.cache.xǁWriteBehindCacheǁget__mutmut_3`` -> ``cache``: the dotted module path before the mangled
    function name (which has no dot), less the package."""
    module = mutant.rpartition(".")[0]
    return module.removeprefix(PACKAGE + ".")


def score(counts: Counter[str]) -> tuple[int, int, float]:
    """(killed, total, percent) for one module's status counts."""
    total = sum(n for status, n in counts.items() if status not in LEFT_OUT)
    killed = sum(counts[status] for status in KILLED)
    return killed, total, (100.0 * killed / total if total else 100.0)


def row(name: str, counts: Counter[str]) -> str:
    killed, total, percent = score(counts)
    other = total - killed - counts["survived"] - counts["no tests"]
    return (f"{name:<22} {killed:>6} / {total:<6} {percent:>6.1f}%  "
            f"{counts['survived']:>8} {counts['no tests']:>8} {other:>5}")


def table(by_module: dict[str, Counter[str]], minimum: float) -> tuple[list[str], list[str]]:
    """The printed lines, and the gated modules under ``minimum``."""
    header = f"{'module':<22} {'killed':>6} / {'total':<6} {'score':>7}  {'survived':>8} {'no tests':>8} {'other':>5}"
    lines = [header, "-" * len(header)]
    failing = []
    not_run = []
    everything: Counter[str] = Counter()
    for module in sorted(by_module):
        counts = by_module[module]
        if counts["not checked"] == sum(counts.values()):
            not_run.append(module)
            continue
        everything.update(counts)
        gate = ""
        if module in GATED:
            passed = score(counts)[2] >= minimum
            gate = "  ok" if passed else f"  UNDER {minimum:g} %"
            if not passed:
                failing.append(module)
        lines.append(row(f"{PACKAGE}.{module}", counts) + gate)
    lines.append("-" * len(header))
    lines.append(row(f"{PACKAGE} (all {'run' if not_run else 'modules'})", everything))
    if not_run:
        lines.append(f"not run: {', '.join(not_run)}")
    return lines, failing


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min", type=float, default=DEFAULT_MIN_PERCENT, metavar="PERCENT",
                        help=f"lowest passing score of {', '.join(GATED)} (default {DEFAULT_MIN_PERCENT:g})")
    parser.add_argument("--results", metavar="FILE",
                        help="read `mutmut results --all true` output from FILE ('-': stdin) instead of running it")
    args = parser.parse_args(argv)

    if args.results == "-":
        text = sys.stdin.read()
    elif args.results:
        text = Path(args.results).read_text(encoding="utf-8")
    else:
        text = mutmut_results()
    statuses = parse(text)
    if not statuses:
        print("mutation_score: no mutants in mutmut's results; run `make mutate` (mutmut run) first", file=sys.stderr)
        return 2

    by_module: dict[str, Counter[str]] = {}
    for mutant, status in statuses.items():
        by_module.setdefault(module_of(mutant), Counter())[status] += 1

    lines, failing = table(by_module, args.min)
    print("\n".join(lines))

    unfinished = [m for m in GATED if by_module.get(m, Counter())["not checked"]]
    if unfinished:
        print(f"mutation_score: mutants of {', '.join(unfinished)} were not checked: the run did not finish",
              file=sys.stderr)
        return 2
    missing = [m for m in GATED if m not in by_module]
    if missing:
        print(f"mutation_score: no mutants of {', '.join(missing)}", file=sys.stderr)
        return 2
    if failing:
        print(f"mutation_score: under {args.min:g} %: {', '.join(failing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
