# Two entry points for a fresh machine: `make demo` (set up, run the main job) and `make test` (set up, run the suite).
# Set-up is idempotent: it creates .venv when missing and reinstalls only when pyproject.toml changes.
# torch comes from PyTorch's CPU wheel index when reachable (scripts/install_torch.py says which index it used and
# why; SSMKIT_TORCH_INDEX=<url> or =default overrides); a torch 2.13.x already in .venv is kept.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ssmkit-installed

.PHONY: setup demo test bench lint

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install_torch.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) scripts/install_torch.py
	$(PY) -m pip install -q -e '.[dev,data]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ssmkit demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_ops.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts
