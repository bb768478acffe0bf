# Two commands matter: `make demo` and `make test`. Both set everything up first
# (a virtualenv with the pinned Python packages, Azurite from npm) and need only
# Python 3.11 and Node 20 on the machine.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup browser demo serve test screenshots bench bench-scale chaos lint i18n clean

setup: $(VENV)/.installed node_modules/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The browser tests drive Debian's Chromium (Playwright's own browser download is not reachable).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || { echo "Installing Debian's chromium for the browser tests…"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

demo: setup
	$(BIN)/python -m sandbox.demo

# The operator pages on http://127.0.0.1:7071 with the sandbox seeded like the demo; Ctrl-C stops it.
serve: setup
	$(BIN)/python -m sandbox.serve

test: setup browser
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest

# Refresh the README's screenshots of the pages (taken by the browser tests).
screenshots: setup browser
	UPDATE_SCREENSHOTS=1 $(BIN)/python -m pytest tests/test_pages_browser.py -q

bench: setup
	$(BIN)/python -m bench.run

# Sync at scale: peak RSS vs calendar size (up to 100,000 appointments in one business) and speed-up
# with 1, 2 and 4 host processes on one Azurite (up to ~20 min; `python -m bench.scale --quick`: 2-3 min).
bench-scale: setup
	$(BIN)/python -m bench.scale

chaos: setup
	$(BIN)/python -m pytest tests/test_chaos.py --chaos-runs=200 -q

lint: setup
	$(BIN)/python -m ruff check .

# After changing a page's text: merge new messages into every language's catalog, then translate them.
i18n: setup
	$(BIN)/python -m sandbox.i18n

clean:
	rm -rf $(VENV) node_modules .pytest_cache .ruff_cache
