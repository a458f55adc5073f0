# A fresh machine needs only `make demo` and `make test`: both create the environment first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo demo-archnet demo-quant test test-slow lint bench bench-quant clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/archnet demo

demo-archnet: $(STAMP)
	$(VENV)/bin/archnet demo --target archnet-5op

demo-quant: $(STAMP)
	$(VENV)/bin/archnet demo --bits w4a4
	$(VENV)/bin/archnet demo --bits w2a4

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

bench: $(STAMP)
	$(PY) bench/bench_search.py
	$(PY) bench/bench_timm.py

bench-quant: $(STAMP)
	$(PY) bench/bench_quant.py

clean:
	rm -rf $(VENV) runs .pytest_cache
