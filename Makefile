# The README's two commands: `make run` (install, then stylize the bundled sample on the embedded default)
# and `make test` (install with test extras, then the whole test suite). Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUTPUT ?= stylid-output
PYTEST_ARGS ?=

.PHONY: setup run test bench lint lock clean

$(VENV)/.installed: pyproject.toml constraints.txt scripts/setup.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup.sh
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/stylid run --output $(OUTPUT)

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests -q --durations=25 $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/bench_identity.py
	$(PY) benchmarks/bench_pipeline.py

lock:  # refresh constraints.txt from pyproject.toml's ranges and run the suite on it (scripts/lock.sh)
	PYTHON=$(PYTHON) bash scripts/lock.sh

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .venv-lock $(OUTPUT) .pytest_cache
