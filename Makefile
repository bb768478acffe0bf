# Two commands matter: `make demo` and `make test`. Both set everything up first
# (a virtualenv with the pinned Python packages, Azurite from npm) and need only
# Python 3.11 and Node 20 on the machine.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

# pytest-xdist processes for the suite: most of a test's time is spent waiting (on Azurite, the
# simulators, deferred messages), so more processes than cores still pay: on this 2-core machine
# the suite took 4 min 13 s in 2 processes, 3 min 0 s in 3 and 2 min 30 s in 4 (one quiet run each).
WORKERS ?= 4
CHAOS_WORKERS ?= 6

.PHONY: setup chromium browser demo serve test test-long screenshots bench bench-scale chaos lint i18n clean

# The virtualenv and node_modules are made side by side (make -j): pip and npm both wait on the network.
setup:
	@$(MAKE) --no-print-directory -j2 $(VENV)/.installed node_modules/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The browser tests drive Debian's Chromium (Playwright's own browser download is not reachable).
# Installing it needs root or password-less sudo; `make test` goes on without it (the browser tests
# are then skipped with one line saying so), `make browser` does not.
CHROMIUM_OPTIONAL ?=
chromium:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then echo "Installing Debian's chromium for the browser tests…"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then echo "Installing Debian's chromium for the browser tests…"; \
	  sudo apt-get update -qq && sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	elif [ -z "$(CHROMIUM_OPTIONAL)" ]; then echo "Installing Debian's chromium needs root: run 'sudo make browser'" >&2; exit 1; fi

# The browser tests of the pages alone (installs chromium first when it is missing).
browser: setup chromium
	$(BIN)/python -m pytest tests/test_pages_browser.py

demo: setup
	$(BIN)/python -m sandbox.demo

# The operator pages on http://127.0.0.1:7071 with the sandbox seeded like the demo; Ctrl-C stops it.
serve: setup
	$(BIN)/python -m sandbox.serve

# The gate to run before every commit (about 3 minutes here after setup).
test: setup
	@$(MAKE) --no-print-directory chromium CHROMIUM_OPTIONAL=$(if $(CI),,1)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -n $(WORKERS)

# What is too long for the gate: 30 chaos runs and 10 times the property inputs (--long).
test-long: setup
	$(BIN)/python -m pytest -n $(WORKERS) --long tests/test_chaos.py tests/test_properties.py

# Refresh the README's screenshots of the pages (taken by the browser tests).
screenshots: setup chromium
	UPDATE_SCREENSHOTS=1 $(BIN)/python -m pytest tests/test_pages_browser.py -q

bench: setup
	$(BIN)/python -m bench.run

# Sync at scale: peak RSS vs calendar size (up to 100,000 appointments in one business) and speed-up
# with 1, 2 and 4 host processes on one Azurite (up to ~20 min; `python -m bench.scale --quick`: 2-3 min).
bench-scale: setup
	$(BIN)/python -m bench.scale

# 200 seeded chaos runs of the whole pipeline, two app instances each, in $(CHAOS_WORKERS) processes.
chaos: setup
	$(BIN)/python -m pytest -n $(CHAOS_WORKERS) tests/test_chaos.py --chaos-runs=200

lint: setup
	$(BIN)/python -m ruff check .

# After changing a page's text: merge new messages into every language's catalog, then translate them.
i18n: setup
	$(BIN)/python -m sandbox.i18n

clean:
	rm -rf $(VENV) node_modules .pytest_cache .ruff_cache
