# One-command set-up: `make demo` and `make test` create .venv and install everything first.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
# make test runs on this many pytest-xdist workers (each torch on one thread: tests/conftest.py); 0: one process.
# --dist loadfile: a file's tests run on one worker, in order (test_fuzz's case count sums the tests before it).
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

.PHONY: setup data demo test test-all lint chaos bench profile sim sim-suite clean

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
	$(PY) -m lab.demo

test: setup data
	$(PYTEST) -q -m "not slow"

# ruff (rules in pyproject.toml), mypy (--strict on shared/ and device_app/, plain on the rest) and the import rules.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -p no:cacheprovider tests/test_import_rules.py

test-all: setup data
	$(PY) -m pytest -q

chaos: setup
	$(PY) bench/chaos.py

bench: setup
	$(PY) bench/bench_relay.py

# The scheduler's profile, measured on the demo family (about 25 minutes on 2 cores): rise-eval at
# N = 10, 20, 30 (device half on ONNX Runtime, CPU-time clock, one thread each, two at a time; N = 20
# on all 225 prompts, with plots, N = 10 and 30 on the first PROFILE_PROMPTS, which interleave the
# item counts), the edge's batched step, then shared.bandit.profile. `make sim` replays it in rise-sim.
FAMILY  ?= models/demo/family
PROFILE ?= bench_out/profile
PROFILE_PROMPTS ?= 135
BIN     := $(VENV)/bin
profile: setup data
	mkdir -p $(PROFILE)
	$(BIN)/rise-export --family $(FAMILY) --out $(PROFILE)/bundle --force
	$(BIN)/rise-eval --family $(FAMILY) --bundle $(PROFILE)/bundle --threads 1 --steps 30 --limit $(PROFILE_PROMPTS) \
		--splits 0,3,6,9,12,15,20,25 --json $(PROFILE)/eval_n30.json > $(PROFILE)/eval_n30.log & \
	$(BIN)/rise-eval --family $(FAMILY) --bundle $(PROFILE)/bundle --threads 1 --steps 10 --limit $(PROFILE_PROMPTS) \
		--splits 0,1,2,3,4,5,6,8 --json $(PROFILE)/eval_n10.json > $(PROFILE)/eval_n10.log && \
	$(BIN)/rise-eval --family $(FAMILY) --bundle $(PROFILE)/bundle --threads 1 --steps 20 \
		--splits 0,2,4,5,6,8,10,12,16 --json $(PROFILE)/eval_n20.json --plots $(PROFILE)/eval_n20 > $(PROFILE)/eval_n20.log; \
	wait
	$(PY) bench/bench_edge_batch.py --family $(FAMILY) --threads 1 --json $(PROFILE)/edge_batch.json
	$(PY) -m shared.bandit.profile --eval $(PROFILE)/eval_n10.json $(PROFILE)/eval_n20.json $(PROFILE)/eval_n30.json \
		--bench $(PROFILE)/edge_batch.json --out $(PROFILE)/profile.json

# The re-measured profile of make profile if there is one, else the one the demo family ships.
SIM_PROFILE = $(if $(wildcard $(PROFILE)/profile.json),$(PROFILE)/profile.json,$(FAMILY)/profile.json)

sim: setup
	mkdir -p $(PROFILE)
	for s in mixed network-drop load-spike; do \
		$(BIN)/rise-sim --profile $(SIM_PROFILE) --requests 20000 --devices 500 --scenario $$s \
			--json $(PROFILE)/sim_$$s.json --plots $(PROFILE)/plots || exit 1; done

# The scheduler's standard scenarios over 5 seeds (about 10 minutes on 2 cores): bench/results/sim_suite.{json,md}
# and the plots in docs/sim/.
sim-suite: setup
	$(PY) bench/sim_suite.py

clean:
	rm -rf $(VENV) demo_out bench_out
