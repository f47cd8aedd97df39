# livemig — `make demo` and `make test` do all set-up themselves, idempotently.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The lab (network namespaces, taps) needs root.
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo -E)
PYTEST_ARGS ?=

.PHONY: all setup system venv guest demo test lint typecheck unit integration lab-clean clean

all: setup

setup: system venv guest

system:
	@scripts/setup-system.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "venv: installing livemig (editable) and dev tools into $(VENV) (log: $(VENV)/pip.log)"
	@{ $(PY) -m pip install --upgrade pip && $(PY) -m pip install -e '.[dev]'; } > $(VENV)/pip.log 2>&1 \
		|| { tail -n 30 $(VENV)/pip.log; exit 1; }
	@touch $@

guest: system venv
	@$(SUDO) $(PY) -m lab.guest build

demo: setup
	$(SUDO) $(VENV)/bin/livemig demo --workload openssl

lint: venv
	$(VENV)/bin/ruff check migrate dirtytrack cpumodel bench lab tests
	$(VENV)/bin/ruff format --check migrate dirtytrack cpumodel bench lab tests

typecheck: venv
	$(VENV)/bin/mypy

# Unit tests run on both cores (pytest-xdist): they are independent and mostly
# start Python subprocesses. Integration tests run one at a time: they time real
# QEMUs on the same two cores.
UNIT_WORKERS ?= 2

unit: venv
	$(VENV)/bin/pytest tests/unit -n $(UNIT_WORKERS) $(PYTEST_ARGS)

integration: setup
	$(SUDO) $(VENV)/bin/pytest tests/integration $(PYTEST_ARGS)

test: setup lint typecheck
	$(SUDO) $(VENV)/bin/pytest tests/integration $(PYTEST_ARGS)
	$(SUDO) $(VENV)/bin/pytest tests/unit -n $(UNIT_WORKERS) $(PYTEST_ARGS)

# Removes labs left behind by a process that was killed (SIGKILL skips cleanup).
lab-clean: venv
	$(SUDO) $(PY) -m lab.net sweep

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
