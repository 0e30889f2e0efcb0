# One-command set-up: `make demo` and `make test` create .venv and install everything first.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python

.PHONY: setup data demo test test-all chaos bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Pinned: this machine holds the CPU build of torch 2.13.0; an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# Fashion-MNIST (Debian's dataset-fashion-mnist) for the demo family's data and scorer.
# Needs root; without it the tests that need the data skip and say how to install it.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null \
		|| echo "note: could not install dataset-fashion-mnist; the tests that need it will skip"; \
	else echo "note: run 'apt-get install dataset-fashion-mnist' as root for the demo-family data"; fi

demo: setup data
	$(PY) -m edge_server.demo

test: setup data
	$(PY) -m pytest -q -m "not slow"

test-all: setup data
	$(PY) -m pytest -q

chaos: setup
	$(PY) bench/chaos.py

bench: setup
	$(PY) bench/bench_relay.py

clean:
	rm -rf $(VENV) demo_out bench_out
