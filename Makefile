# One command per workflow. CI runs `make check` through .ci/run on a fresh machine, so every tool the
# targets need is installed here: the virtual environments from the requirements files (.venv-infra too),
# Azurite from package-lock.json.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
INFRA_VENV := .venv-infra

.PHONY: run test test-fast lint check bench wrk deps clean

$(VENV)/.installed: requirements.txt requirements-dev.txt client/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(INFRA_VENV)/.installed: requirements-infra.txt
	test -x $(INFRA_VENV)/bin/python || $(PYTHON) -m venv $(INFRA_VENV)
	$(INFRA_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(INFRA_VENV)/bin/python -m pip install --quiet -r requirements-infra.txt
	touch $@

deps: $(VENV)/.installed node_modules/.installed

## Run the broker on 127.0.0.1:7071 (with Azurite and the sandbox unless real Azure is configured).
run: deps
	$(PY) -m devrun $(ARGS)

## The whole test suite: unit, end-to-end through the sandbox and Azurite, Functions indexing.
test: deps
	$(PY) -m pytest

## The edit loop: the suite without the tests marked slow (pytest -m slow lists what it leaves out).
test-fast: deps
	$(PY) -m pytest -m "not slow"

## Style, formatting, types (mypy --strict over the files [tool.mypy] lists in pyproject.toml), and offline
## validation of the Bicep templates.
lint: deps $(INFRA_VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(INFRA_VENV)/bin/python infra/validate.py

## What CI runs (.ci/run), and what to run before a push: lint, then the whole suite.
check: lint
	$(PY) -m pytest

## wrk, the HTTP load generator bench.token drives the broker with (Debian package), when missing.
wrk:
	@command -v wrk >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends wrk \
		|| { $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q \
		&& $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends wrk; }; }

## Benchmarks; each prints its figures against a baseline measured in the same run.
bench: deps wrk
	$(PY) -m bench.token
	$(PY) -m bench.sync
	$(PY) -m bench.auth

clean:
	rm -rf $(VENV) $(INFRA_VENV) node_modules .pytest_cache .mypy_cache .ruff_cache
