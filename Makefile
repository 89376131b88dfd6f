# One obvious entry point. `make test` and `make demo` set everything up on a fresh machine (a .venv here).
VENV ?= .venv
PYTHON ?= python3
# The CPU build of torch; override (e.g. TORCH_SPEC="torch>=2.4") to use another build.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.softalign-installed

.PHONY: setup test test-all lint format bench demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,trl]"
	touch $(STAMP)

test: setup
	$(PY) -m ruff check softalign tests benchmarks scripts recipes
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow"

lint: setup
	$(PY) -m ruff check softalign tests benchmarks scripts recipes
	$(PY) -m ruff format --check softalign tests benchmarks scripts recipes

format: setup
	$(PY) -m ruff format softalign tests benchmarks scripts recipes
	$(PY) -m ruff check --fix softalign tests benchmarks scripts recipes

bench: setup
	$(PY) benchmarks/bench_inference.py
	$(PY) benchmarks/bench_softalign_step.py
	$(PY) benchmarks/bench_ddpo.py
	$(PY) benchmarks/bench_diffusion_dpo.py

demo: setup
	$(PY) recipes/softalign_then_ddpo.py

clean:
	rm -rf $(VENV) build *.egg-info
