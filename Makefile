# `make demo` and `make test` create and reuse a local virtualenv (.venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints-cpu.txt -e '.[runtime,parquet,dev,serve,gpu,tune,ray]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pipetwin sweep experiments/gllm_vs_sarathi.yaml

test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

bench: $(STAMP)
	$(PY) benchmarks/scheduler_cost.py

clean:
	rm -rf $(VENV) results .pytest_cache
