# Quickstart: `make demo` and `make test`; each sets up .venv first if needed.
VENV ?= .venv
PY := $(VENV)/bin/python
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test bench clean

setup:
	@bash scripts/setup_env.sh

demo: setup
	$(VENV)/bin/csr demo

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/sampler.py

clean:
	rm -rf runs .cache .pytest_cache
