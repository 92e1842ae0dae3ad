# One entry point for setting up, testing and serving.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv test lint serve bench clean

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build; a looser spec would pull gigabytes of CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]' --config-settings editable_mode=compat
	touch $(BIN)/activate

venv: $(BIN)/activate

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

lint: venv
	$(BIN)/ruff check .

serve: venv
	$(BIN)/iwae serve

bench: venv
	$(BIN)/python bench/bench_loglik.py

clean:
	rm -rf $(VENV) build *.egg-info
