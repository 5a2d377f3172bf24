# Everything a fresh machine needs, from two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint unit integration bench consul prometheus chromium clean fuzz

$(STAMP): setup.cfg pyproject.toml setup.py $(wildcard zrouter/_native/*.pyx zrouter/_native/*.pxd)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

# The README's test command; .ci/run calls exactly this.
test: $(STAMP) consul prometheus chromium lint
	CONSUL_BIN="$$(scripts/get-consul)" PROMETHEUS_BIN="$$(scripts/get-prometheus)" \
	CHROMIUM_BIN="$$(scripts/get-chromium)" $(PY) -m pytest -q
	ZROUTER_PURE=1 CONSUL_BIN="$$(scripts/get-consul)" $(PY) -m pytest -q $(PURE_TESTS)

# The suites run a second time on the pure-Python path (ZROUTER_PURE=1; the first run is on
# the compiled one), so the two cannot drift: every decoder, limit and conversation on both.
PURE_TESTS := tests/unit tests/protocol tests/fuzz tests/native tests/integration/test_system.py \
	tests/integration/test_worker_peer.py tests/integration/test_client_peer.py tests/integration/test_worker_inline.py \
	tests/integration/test_curve.py tests/integration/test_hostile_broker.py tests/integration/test_hostile_loop.py \
	tests/integration/test_memory_floods.py

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

# The real Prometheus server that scrapes a broker in tests/integration/test_observe_prometheus.py
# (Debian's package, unpacked into .cache/), and the real Chromium that Playwright drives in
# test_observe_browser.py (Debian's package, installed with apt-get as root; never `playwright
# install`).
prometheus:
	scripts/get-prometheus >/dev/null

chromium:
	scripts/get-chromium >/dev/null

# NATS and RabbitMQ servers come from Debian (bench/mq.py starts its own on free loopback ports).
bench: $(STAMP)
	@if command -v nats-server >/dev/null && [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nats-server rabbitmq-server; \
	else echo "bench: not root, so NATS and RabbitMQ are left out (apt-get install nats-server rabbitmq-server)"; fi
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m bench

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache *.egg-info
