# Setup is reproducible: a local .venv, the package with its test extras, torch pinned by constraints.txt.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast demo demo-quick lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

# two workers, a test file each at a time (module fixtures stay shared): most tests run one thread
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# the suite without the tests that train, import or run a detector end to end (marked slow): about a minute
test-fast: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow"

demo: setup
	$(BIN)/simcal demo --budget full

demo-quick: setup
	$(BIN)/simcal demo --budget quick

lint: setup
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
