# Two commands on a fresh clone: `make run` and `make test`. Both create .venv when needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.requirements-installed

.PHONY: run test lint typecheck venv clean dist bench

$(STAMP): requirements.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	@touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/python exercise4.py --config config.yaml

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest

# The cache's speed-up, measured: exercise 3 vs exercise 4 as real processes (--quick: about a minute).
bench: $(STAMP)
	$(BIN)/python -m bench --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

# The ZIP to hand in: dist/kvtornado-<version>.zip (sources only; stdlib, no venv needed)
dist:
	$(PYTHON) tools/make_dist.py --out dist
