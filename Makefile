# The two commands a newcomer needs:  `make demo`  and  `make test`  (each installs what it needs).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: install demo test lint bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/gateway demo

lint: install
	$(VENV)/bin/ruff check gateway tests bench
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest

bench: install
	$(PY) bench/bench_translate.py
	$(PY) bench/bench_validate.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache .mypy_cache .ruff_cache
