# nestlearn — set-up and entry points. Two commands matter: `make demo` and `make test`.
# Both create .venv when missing, install the pinned CPU torch when no torch is present
# (an open `torch` requirement would pull a multi-GB CUDA build), then the package itself.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.nestlearn-installed
# idle OpenMP threads sleep instead of spinning: on a 2-core machine shared with another process, spinning threads
# made a tiny HOPE training step take 47 s instead of 2.4 s (nestlearn/demo.py, choose_threads)
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install demo test lint bench golden clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[dev,hf,plot,train]"
	touch $(STAMP)

demo: install
	$(PY) -m nestlearn.demo

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check nestlearn tests benchmarks examples scripts
	$(VENV)/bin/ruff format --check nestlearn tests benchmarks examples scripts

bench: install
	$(PY) -m benchmarks.memory_op

# rewrite tests/golden/losses.json (only when a change of training numerics is intended; say why in the commit)
golden: install
	$(PY) -m tests.golden.regenerate

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
