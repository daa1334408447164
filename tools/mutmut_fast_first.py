"""A pytest plugin for `make mutate` only ([tool.mutmut] pytest_add_cli_args): the tests of a mutant run fastest first.

mutmut runs a mutant's tests with ``-x``, so it stops at the first test that fails: run cheapest first, a mutant
pays for a slow test (the stateful Hypothesis run, the many-request e2e ones) only when no quicker test caught it.
The verdicts are the same in any order; only the time changes. The times are the ones mutmut measured in its stats
run, ``mutmut-stats.json`` in the current directory (mutants/, where mutmut runs pytest); without it (the stats run
itself) the order is left as collected.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

STATS = Path("mutmut-stats.json")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    try:
        durations: dict[str, float] = json.loads(STATS.read_text(encoding="utf-8"))["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return
    items.sort(key=lambda item: durations.get(item.nodeid, 0.0))  # stable: ties keep the collected order
