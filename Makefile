# Two entry points do all set-up: `make demo` and `make test`. Both create or reuse .venv.
# torch is pinned so pip never resolves the multi-GB CUDA build on a CPU machine.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
# idle OpenMP threads sleep instead of spinning: data-loader workers and the trainer share 2 cores without
# stalling each other's parallel regions
export OMP_WAIT_POLICY ?= PASSIVE

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

.PHONY: demo test bench
demo: $(VENV)/.installed
	$(VENV)/bin/cascadevision demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -rs tests

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_ops.py
