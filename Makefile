# Two commands on a fresh machine:  `make run`  (install + default scenario)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_DISABLE_UPDATE_CHECK=1

.PHONY: install run test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch/torchvision first, pinned: these lie on local disk here (see DEVELOPERS notes in README)
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e ".[dev,plot]"
	# test-only oracle for the robust aggregators; its declared deps would pull another torch
	$(PY) -m pip install --no-deps byzfl==0.0.11
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/psfed-robust run

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: install
	$(PY) benchmarks/wire.py
	$(PY) benchmarks/aggregators.py
	$(PY) benchmarks/engine.py
	$(PY) benchmarks/flower_round.py
	$(PY) benchmarks/nn_engine.py
	$(PY) benchmarks/executor.py
	$(PY) benchmarks/theory_grid.py

clean:
	rm -rf $(VENV) build *.egg-info
