# Two commands do everything on a fresh machine:
#   make sweep   creates .venv, installs the pinned versions, runs the embedded digits sweep
#   make test    the same set-up, then the whole test suite
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
SPEC ?= sweeps/specs/digits.yaml

.PHONY: install sweep smoke test lint clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

install: $(BIN)/.installed

sweep: install
	$(BIN)/python -m sweeps run $(SPEC)

smoke: install
	$(BIN)/python -m sweeps run $(SPEC) --smoke-test

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff format --check . && $(BIN)/ruff check .

clean:
	rm -rf $(VENV) ray_results mlflow.db mlartifacts mlruns
