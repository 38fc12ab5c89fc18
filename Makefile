# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= workdir/demo
CONFIG ?= configs/demo.py
PYTEST_ARGS ?=
# The suite runs on this many processes (pytest-xdist), each test file's tests together on one of them.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadfile

.PHONY: setup demo test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# `make demo CONFIG=configs/demo.py:smoke WORKDIR=workdir/smoke`: the same command on the smoke recipe (CI runs it).
demo: $(STAMP)
	$(VENV)/bin/cm3jax pipeline --config=$(CONFIG) --workdir=$(WORKDIR)

test: lint
	$(PYTEST) $(PYTEST_ARGS)

# The tests that need no end-to-end training and no extra processes: a few minutes, for use while working.
test-fast: $(STAMP)
	$(PYTEST) -m "not slow and not multiprocess" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e ".[bench]"
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/pipeline.py
	$(PY) benchmarks/vqgan.py
	$(PY) benchmarks/retrieval.py
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/export.py

clean:
	rm -rf $(VENV) workdir
