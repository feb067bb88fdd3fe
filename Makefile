# Every target is self-sufficient on a fresh Debian machine with Python 3.11:
# it creates .venv, installs torch (TORCH_VERSION, the CPU wheel) first, then the project,
# and the Debian packages it needs. Re-running is fast and idempotent.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tmc-installed
# The torch of the venv and of `make lock`; the Dockerfile's ARG TORCH_VERSION default is the
# same (tests/test_lock.py checks the locks' header against it).
TORCH_VERSION := 2.13.0
APT_PACKAGES := dataset-fashion-mnist redis-server prometheus
TMC_HOST ?= 127.0.0.1
TMC_PORT ?= 8000

.PHONY: run test bench bench-quick gpu-check setup apt lint deploy-check soak lock clean

setup: $(STAMP) apt

apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; \
	fi

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[data,dev,bench]'
	touch $(STAMP)

run: setup
	TMC_HOST=$(TMC_HOST) TMC_PORT=$(TMC_PORT) $(VENV)/bin/tmc demo

# deploy-check fetches helm and runs the chart checks and their self-tests (tests/deploy);
# pytest then runs everything else.
test: setup
	bash scripts/deploy-check.sh
	$(PY) -m pytest -q --ignore=tests/deploy

deploy-check: setup
	bash scripts/deploy-check.sh

# lint: ruff over the tree; mypy --strict for the product packages and loopback/ (pyproject's
# override lists them) and plain mypy for bench/ and scripts/. .ci/run runs it before the tests.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy tangent bases registry app training cli loopback bench scripts

bench: setup
	$(PY) -m bench.run_all

bench-quick: setup
	$(PY) -m bench.run_all --quick

# The GPU check (bench/gpu_check.py): on a CUDA machine, torch==2.13.0 from PyPI is a CUDA
# build; writes bench/results/gpu.json and the GPU section of SUMMARY.md. `make test` runs
# its --smoke mode on the CPU.
gpu-check: setup
	$(PY) -m bench.gpu_check

# soak (scripts/soak.py; not part of `make test`): MINUTES (default 5) of mixed traffic with
# lifecycle churn on one server, then on two replicas over one redis-server, all on loopback.
# Fails on any forget violation, explain-sum mismatch or 5xx. `make soak MINUTES=1`
soak: setup
	$(PY) scripts/soak.py $(or $(MINUTES),5)

# lock: requirements/serve.lock (pyproject's dependencies) and requirements/train.lock (+ the
# data extra, held to serve.lock's versions), every file sha256-hashed, for Linux x86_64 and
# Python 3.11, resolved by uv from PyPI as it stood at LOCK_DATE, so re-running gives the same
# files (bump LOCK_DATE to take newer releases). torch is resolved at TORCH_VERSION but not
# written (the Dockerfile installs it first from TORCH_INDEX_URL); its CUDA runtime is left out
# (requirements/torch-cuda.exclude). The Dockerfile installs the locks with --require-hashes.
UV := .tools/uv/bin/uv
UV_VERSION := 0.13.8
LOCK_DATE := 2026-11-28T00:00:00Z
LOCK_FLAGS = --quiet --upgrade --generate-hashes --python-version 3.11 \
  --python-platform x86_64-manylinux_2_28 \
  --exclude-newer $(LOCK_DATE) --excludes requirements/torch-cuda.exclude \
  --no-emit-package torch --custom-compile-command "make lock TORCH_VERSION=$(TORCH_VERSION)"

$(UV):
	$(PYTHON) -m venv .tools/uv
	.tools/uv/bin/pip install -q uv==$(UV_VERSION)

lock: $(UV)
	echo "torch==$(TORCH_VERSION)" | $(UV) pip compile pyproject.toml - $(LOCK_FLAGS) \
	  -o requirements/serve.lock
	echo "torch==$(TORCH_VERSION)" | $(UV) pip compile pyproject.toml - --extra data \
	  -c requirements/serve.lock $(LOCK_FLAGS) -o requirements/train.lock

clean:
	rm -rf $(VENV) .tools .tmc
