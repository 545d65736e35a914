# Two commands: `make demo` (the main job) and `make test`. Each creates .venv and installs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"   # pinned first: a CPU build on this kind of machine
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/longmem demo --out runs/demo

test: $(VENV)/.installed
	$(PY) -m pytest tests

bench: $(VENV)/.installed
	$(VENV)/bin/longmem bench --out BENCHMARKS.md

clean:
	rm -rf $(VENV) runs .pytest_cache
