# Two commands matter: `make demo` and `make test`. Both set everything up first
# (a virtualenv with the pinned Python packages, Azurite from npm) and need only
# Python 3.11 and Node 20 on the machine.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench chaos lint clean

setup: $(VENV)/.installed node_modules/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

demo: setup
	$(BIN)/python -m sandbox.demo

test: setup
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python -m bench.run

chaos: setup
	$(BIN)/python -m pytest tests/test_chaos.py --chaos-runs=200 -q

lint: setup
	$(BIN)/python -m ruff check .

clean:
	rm -rf $(VENV) node_modules .pytest_cache .ruff_cache
