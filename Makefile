# Everything runs from a virtual environment inside the repository, created on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help venv test unit integration lint typecheck demo bench e2e audit clean

help:
	@echo "make demo   - run the operator against an embedded Kubernetes API and a local token endpoint"
	@echo "make test   - lint, type-check and run every test that needs no Docker (unit, CRD, token client, integration)"
	@echo "make e2e    - end-to-end tests on a kind cluster (needs Docker and kind)"
	@echo "make bench  - benchmarks (BENCH_ARGS=--quick for a short run)"
	@echo "make audit  - audit the pinned dependencies for known vulnerabilities (needs network)"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check --no-cache operator tests bench
	$(BIN)/ruff format --no-cache --check operator/autotek_operator

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit tests/crd tests/token_client tests/emulator

integration: $(STAMP)
	$(BIN)/pytest -q -n 3 --dist loadfile tests/integration

# Files run in parallel (each worker has its own API emulator, token endpoint and operator):
# the integration tests mostly wait on timers, so three workers fit two cores.
test: lint typecheck $(STAMP)
	$(BIN)/pytest -q -n 3 --dist loadfile tests

demo: $(STAMP)
	$(BIN)/autotek-operator demo

e2e: $(STAMP)
	$(BIN)/pytest -q tests/e2e --with-e2e

bench: $(STAMP)
	$(BIN)/python bench/bench.py $(BENCH_ARGS)

# Needs network access to the vulnerability database, so it is not part of `make test`.
audit: $(STAMP)
	$(BIN)/python -m pip install --quiet pip-audit
	$(BIN)/pip-audit --strict --require-hashes --disable-pip -r requirements.lock

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
