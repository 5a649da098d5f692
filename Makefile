# syncplane — `make run` and `make test` each set up everything they need.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Reinstall when the dependency list or the lock changes.
VENV_STAMP := $(VENV)/.installed-$(shell cat pyproject.toml sandbox/pyproject.toml requirements.lock | sha1sum | cut -c1-12)
# The benchmarks' own dependencies (dlt, the read path's baseline), never the runtime's or the image's.
BENCH_STAMP := $(VENV)/.bench-$(shell cat requirements-bench.lock | sha1sum | cut -c1-12)
# Debian packages the tests use: openssl makes TLS test certificates and the
# test cluster's PKI; git and ca-certificates fetch Go modules for the cluster build; buildah builds and runs
# the container image without a daemon, on a Debian base that debootstrap makes.
APT_PACKAGES := openssl git ca-certificates buildah debootstrap
BROWSER_PACKAGES := chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST := $(BIN)/pytest -p no:cacheprovider

.PHONY: help setup apt browser venv lock k8s-binaries image run test test-unit test-integration test-security test-e2e \
        test-image test-k8s check-leftovers chart proto proto-check lint bench fuzz clean

help:
	@echo "make run     start the embedded control plane, its web console, the sandbox emulators and the default workflows"
	@echo "make test    set up and run every test tier (unit, integration, e2e, image, k8s) plus the checks"
	@echo "make image   build the container image with buildah, and its SBOM, into build/image/"
	@echo "make bench   benchmarks, reported as ratios against an in-process baseline"
	@echo "make fuzz    the API fuzzer for FUZZ_SECONDS (600) against a live embedded server; prints what it tried"
	@echo "make proto   regenerate the committed protobuf/gRPC stubs"
	@echo "make lock    re-resolve requirements.lock (runtime dependencies with hashes) from pyproject.toml"
	@echo "make lint    ruff, mypy, the import-layer contracts (lint-imports), buf lint and the generated-code check"
	@echo "make chart   helm lint --strict every ci/ scenario; security and RBAC checks of the rendered chart"

# Installs the Debian packages named in $(1) that are missing (one apt-get for all of them).
define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "apt-get install$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	    -o DPkg::Lock::Timeout=600 $$missing; \
	fi
endef

apt:
	$(call apt_install,$(APT_PACKAGES))

# Debian's chromium, which Playwright drives through executable_path (its own browser download cannot
# reach its host from here): the e2e tier and the k8s tier's console scenario need it.
browser:
	$(call apt_install,$(BROWSER_PACKAGES))

# The runtime dependencies exactly as locked, every file checked against its hash (the image installs the
# same lock), then the project itself and the development tools, then the sandbox package (sandbox/: the
# emulators `make run` and the tests use, never in the image; its dependencies are the product's, locked).
$(VENV_STAMP): pyproject.toml sandbox/pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --require-hashes -r requirements.lock
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps -e ./sandbox
	rm -f $(VENV)/.installed-* && touch $@

venv: $(VENV_STAMP)

# Re-resolve requirements.lock (the runtime dependencies of pyproject.toml, pinned, with every file's hash)
# and requirements-bench.lock (`make bench`'s own, constrained to the runtime's pins).
lock:
	$(PYTHON) -m venv build/lock-venv && build/lock-venv/bin/pip install -q pip-tools
	build/lock-venv/bin/pip-compile -q --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url \
	  --no-emit-find-links -o requirements.lock pyproject.toml
	build/lock-venv/bin/pip-compile -q --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url \
	  --no-emit-find-links -o requirements-bench.lock requirements-bench.in

setup: apt venv

# Real kube-apiserver, controller-manager, scheduler, etcd, KWOK, kubectl and
# helm, built from the Go module proxy into ~/.cache/syncplane/ (once per version).
k8s-binaries:
	scripts/build-k8s.sh

# The container image (Dockerfile) built by buildah on a debootstrapped Debian base, its OCI layout and SBOM
# in build/image/; rebuilt only when its inputs change (scripts/build-image.sh says what is cached).
image: apt
	scripts/build-image.sh

run: setup
	$(BIN)/syncplane-sandbox-up --data-dir .syncplane

# The protobuf stubs and the CRD, from proto/ (one script; CI fails on a diff).
proto: venv
	$(BIN)/python scripts/generate.py

proto-check: venv
	$(BIN)/python scripts/generate.py --check

lint: venv proto-check
	$(BIN)/ruff check server operator sandbox tests scripts benchmarks
	$(BIN)/mypy server/syncplane operator/syncplane_operator sandbox/syncplane_sandbox tests benchmarks
	$(BIN)/lint-imports --no-cache
	cd proto && ../$(BIN)/buf lint

test-unit: venv
	$(PYTEST) tests/unit

test-integration: venv
	$(PYTEST) tests/integration

# The web console in Debian's chromium (fails, never skips, without it); prints its screenshots' folder.
test-e2e: setup browser
	$(PYTEST) tests/e2e

test-image: venv image
	$(PYTEST) tests/image

# Credentials, limits, file modes, exposure: a hostile endpoint records what reaches it (the k8s
# tier's test_security_* files carry the cluster half, marked `security` too).
test-security: venv
	$(PYTEST) tests/security

test-k8s: venv browser k8s-binaries image
	$(PYTEST) tests/k8s

# The Helm chart: helm lint --strict on every ci/ scenario, security and RBAC checks over helm template
# (the k8s tier also installs every scenario and dry-runs it against the test cluster).
chart: venv k8s-binaries
	$(BIN)/python scripts/chart-check.py

check-leftovers: venv
	$(BIN)/python scripts/check_leftovers.py

test: setup k8s-binaries lint chart test-unit test-integration test-security test-e2e test-image test-k8s check-leftovers

$(BENCH_STAMP): requirements-bench.lock $(VENV_STAMP)
	$(BIN)/pip install -q --require-hashes -r requirements-bench.lock
	rm -f $(VENV)/.bench-* && touch $@

bench: venv $(BENCH_STAMP)
	$(BIN)/python -m benchmarks

# The API fuzzer (tests/fuzz_api.py), long: `make test` runs a bounded number of its examples.
FUZZ_SECONDS ?= 600
fuzz: venv
	SYNCPLANE_FUZZ_SECONDS=$(FUZZ_SECONDS) SYNCPLANE_FUZZ_EXAMPLES=200 \
	  $(PYTEST) -s tests/integration/test_api_fuzz.py

clean:
	rm -rf $(VENV) .syncplane .mypy_cache .ruff_cache build/image
