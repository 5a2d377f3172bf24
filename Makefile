# Everything a fresh machine needs, from two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint unit integration bench consul clean fuzz

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

# The README's test command; .ci/run calls exactly this.
test: $(STAMP) consul lint
	CONSUL_BIN="$$(scripts/get-consul)" $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check zrouter broker worker client tests bench scripts
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

consul:
	scripts/get-consul >/dev/null

# A million or more hostile inputs (sockets and in-process decoders), new seed; prints the counts.
fuzz: $(STAMP)
	$(PY) -m bench.fuzz

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m bench

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache *.egg-info
