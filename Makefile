# One entry point for setting up, testing and serving.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv browser test lint serve bench clean

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build; a looser spec would pull gigabytes of CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]' --config-settings editable_mode=compat
	touch $(BIN)/activate

venv: $(BIN)/activate

# The browser test (tests/test_web.py) drives Debian's chromium, installed here when missing and root;
# without it that test is skipped.
browser:
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1 || \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) || \
	  echo "could not install chromium: the browser test will be skipped"

test: lint browser
	$(BIN)/python -m pytest -q tests

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

serve: venv
	$(BIN)/iwae serve

bench: venv
	$(BIN)/python bench/bench_loglik.py

clean:
	rm -rf $(VENV) build *.egg-info
