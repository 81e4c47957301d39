# Two entry points for a fresh machine: `make demo` (set up, run the main job) and `make test` (set up, run the suite).
# Set-up is idempotent: it creates .venv when missing and reinstalls only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ssmkit-installed

.PHONY: setup demo test bench lint

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,data]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ssmkit demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_ops.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
