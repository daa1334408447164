# Two commands on a fresh clone: `make run` and `make test`. Both create .venv when needed.
# One venv per Python: `make test PYTHON=python3.12 VENV=.venv-3.12` (what .ci/run does for each).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.requirements-installed
MUTATE_STAMP := $(VENV)/.requirements-mutate-installed

.PHONY: run test lint typecheck venv clean dist bench coverage mutate mutate-score

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
	$(BIN)/python -m pytest -n auto --maxprocesses 4

# Line+branch coverage of kvtornado/ over the whole suite, the exercise processes it starts included.
coverage: $(STAMP)
	$(BIN)/python -m pytest -q --cov --cov-report=term

# The cache's speed-up, measured: exercise 3 vs exercise 4 as real processes (--quick: about a minute).
bench: $(STAMP)
	$(BIN)/python -m bench --quick

# Mutation testing with mutmut 3 ([tool.mutmut] in pyproject.toml, requirements-mutate.txt; `make test` needs neither).
# Always a fresh mutants/: mutmut keeps the verdict of every function whose source did not change, even when the
# tests did. By default only the mutants of MUTATE_MODULES (the four the score gates: over 20 min on 2 cores);
# `make mutate MUTATE_MODULES=all` runs every module of kvtornado/ (far longer). Then the score per module; it
# fails if cache, auth, handlers or store is under MUTATE_MIN %. `make mutate-score` prints it again from mutants/;
# `.venv/bin/mutmut show NAME` shows one mutant, `.venv/bin/mutmut browse` all of them.
MUTATE_MODULES ?= cache auth handlers store
MUTATE_MIN     ?= 90
MUTATE_JOBS    ?= 3
MUTATE_NAMES   := $(if $(filter all,$(MUTATE_MODULES)),,$(foreach m,$(MUTATE_MODULES),'kvtornado.$(m).*'))

$(MUTATE_STAMP): $(STAMP) requirements-mutate.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-mutate.txt
	@touch $(MUTATE_STAMP)

mutate: $(MUTATE_STAMP)
	rm -rf mutants
	HYPOTHESIS_PROFILE=mutate $(BIN)/mutmut run --max-children $(MUTATE_JOBS) $(MUTATE_NAMES)
	$(BIN)/python tools/mutation_score.py --min $(MUTATE_MIN)

mutate-score: $(MUTATE_STAMP)
	$(BIN)/python tools/mutation_score.py --min $(MUTATE_MIN)

clean:
	rm -rf $(VENV) .venv-3.* .pytest_cache .mypy_cache .ruff_cache .hypothesis .coverage .coverage.* htmlcov mutants

# The ZIP to hand in: dist/kvtornado-<version>.zip (sources only; stdlib, no venv needed)
dist:
	$(PYTHON) tools/make_dist.py --out dist
