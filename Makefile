# Every target sets up what it needs in .venv itself, so a fresh clone runs
#   make demo   (the main job)      and      make test   (the test suite).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# Extra arguments for the demo, e.g.  make demo ARGS="--steps 3000 --width 256"
ARGS   ?=
# Extra arguments for pytest, e.g.  make test PYTEST_ARGS="-k multicrop"
PYTEST_ARGS ?=
# Test files run in this many processes (pytest-xdist; one file stays in one process, so its
# compile-once module fixtures compile once). Compilation is single-threaded: two workers keep
# both cores of a 2-core machine busy. TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2

.PHONY: demo test bench clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# One stamp per set of extras: re-installs only when setup.py changes.
$(VENV)/.core: setup.py | $(VENV)/bin/activate
	$(PIP) install -q -e .
	touch $@

$(VENV)/.test: setup.py | $(VENV)/bin/activate
	$(PIP) install -q -e ".[test,torch,tfds,tpu,serve,video,lora]"
	touch $@ $(VENV)/.core

demo: $(VENV)/.core
	$(PY) -m molmo_jax.demo $(ARGS)

test: $(VENV)/.test
	JAX_PLATFORMS=cpu $(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: $(VENV)/.test
	for b in benchmarks/*.py; do JAX_PLATFORMS=cpu $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
