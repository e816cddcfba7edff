# The two commands a new user runs first. Each does all set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## demo: set up, then run the main job on the embedded synthetic dataset with tiny models
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/tune-clipfh demo

## test: set up, then run the whole test suite (slow tests included)
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "slow or not slow" --durations=25

## test-fast: the suite without the tests marked slow
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

## bench: the performance benchmark's quick run (under 5 minutes on 2 cores)
bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/tune-clipfh bench --quick --json runs/bench.json

lint: $(STAMP)
	$(BIN)/ruff check tune_clipfh tests

clean:
	rm -rf $(VENV) runs .pytest_cache
