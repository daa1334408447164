# Two commands on a fresh clone: `make run` and `make test`. Both create .venv when needed.
# One venv per Python: `make test PYTHON=python3.12 VENV=.venv-3.12` (what .ci/run does for each).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.requirements-installed

.PHONY: run test lint typecheck venv clean dist bench coverage

$(STAMP): requirements.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# git (so make dist and ruff) never sees a venv, whatever its name (.venv-3.12 ...)
	@test -f $(VENV)/.gitignore || echo '*' > $(VENV)/.gitignore
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

# Line+branch coverage of kvtornado/ over the whole suite, the exercise processes it starts included.
coverage: $(STAMP)
	$(BIN)/python -m pytest -q --cov --cov-report=term

# The cache's speed-up, measured: exercise 3 vs exercise 4 as real processes (--quick: about a minute).
bench: $(STAMP)
	$(BIN)/python -m bench --quick

clean:
	rm -rf $(VENV) .venv-3.* .pytest_cache .mypy_cache .ruff_cache .hypothesis .coverage .coverage.* htmlcov mutants

# The ZIP to hand in: dist/kvtornado-<version>.zip (sources only; stdlib, no venv needed)
dist:
	$(PYTHON) tools/make_dist.py --out dist
