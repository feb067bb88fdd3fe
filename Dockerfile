# syntax=docker/dockerfile:1
#
# tmc — Tangent Model Composition server.
#
#   CPU (default):  docker build -t tmc:0.1.0 .
#   CUDA (GPU nodes):
#     docker build -t tmc:0.1.0-cuda \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
#   Training image (adds the Fashion-MNIST Debian package and the data extras):
#     docker build --target train -t tmc:0.1.0-train .
#
# The torch build is chosen by TORCH_VERSION (pinned, default 2.13.0) and TORCH_INDEX_URL (the
# index it comes from). The default is the CPU wheel index, because plain PyPI serves a multi-GB
# CUDA build of torch on Linux x86_64. TORCH_INDEX_URL="" installs torch==TORCH_VERSION from the
# default index (PyPI or a pip.conf mirror). Every other package comes from a lock file with
# sha256 hashes (requirements/serve.lock, requirements/train.lock; `make lock`): see the builder.
# No secret is baked in: TMC_ADMIN_TOKEN and friends come from the environment at run time.
#
# Plain Docker (state, base model and embedded registry in one volume at TMC_HOME):
#   docker run --rm -v tmc-state:/var/lib/tmc tmc:0.1.0 base init --preset minilm
#   docker run -p 8000:8000 -v tmc-state:/var/lib/tmc -e TMC_ADMIN_TOKEN=<16+ chars> tmc:0.1.0
# Kubernetes: helm/tmc (see helm/tmc/README.md).

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"
# (bytecode is compiled at install time here: the runtime root filesystem may be read-only)
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Reproducible installs, in three layers:
#  1. torch==TORCH_VERSION from TORCH_INDEX_URL, with the dependencies that index gives it (large,
#     changes rarely). NOT hash-verified: torch itself, pinned by exact version only, and for a
#     CUDA build its CUDA runtime (nvidia-*, cuda-*, triton), at the exact versions torch's own
#     metadata pins. (PyPI-only hashes cannot cover download.pytorch.org's wheels.)
#  2. requirements/serve.lock with --require-hashes --no-deps --force-reinstall: every other
#     package, including torch's pure-Python dependencies (filelock, sympy, networkx, jinja2, ...,
#     setuptools), is the locked version and pip checks each downloaded file's sha256; the forced
#     reinstall replaces the copies layer 1 brought from the torch index.
#  3. the project itself, --no-deps --no-build-isolation (built by the locked setuptools, nothing
#     downloaded), then `pip check`: the environment is complete and consistent.
RUN if [ -n "${TORCH_INDEX_URL}" ]; then \
      pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"; \
    else \
      pip install --no-cache-dir "torch==${TORCH_VERSION}"; \
    fi
WORKDIR /src
COPY requirements/serve.lock requirements/
RUN pip install --no-cache-dir --require-hashes --no-deps --force-reinstall \
      -r requirements/serve.lock
COPY pyproject.toml README.md ./
COPY tangent/ tangent/
COPY bases/ bases/
COPY registry/ registry/
COPY training/ training/
COPY app/ app/
COPY cli/ cli/
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && pip check \
    && python -c "import torch, app.settings; print('torch', torch.__version__)"

# Training extras (the `data` extra: text corpus, scikit-learn) on top of the serving environment,
# from requirements/train.lock (serve.lock's versions plus the extra's packages), hash-checked.
FROM builder AS builder-train
COPY requirements/train.lock requirements/
RUN pip install --no-cache-dir --require-hashes --no-deps -r requirements/train.lock \
    && pip check

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/tmc \
    TMC_HOME=/var/lib/tmc \
    TMC_HOST=0.0.0.0 \
    TMC_PORT=8000 \
    TMC_LOG_FORMAT=json \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
RUN groupadd --system --gid 10001 tmc \
    && useradd --system --uid 10001 --gid tmc --home-dir /home/tmc --create-home \
       --shell /usr/sbin/nologin tmc \
    && mkdir -p /var/lib/tmc /models \
    && chown tmc:tmc /var/lib/tmc /models
WORKDIR /var/lib/tmc
EXPOSE 8000

# ---------------------------------------------------------------------------------------------
# `docker build --target train`: runs `tmc train ... && tmc push ...` (see helm/tmc training Job).
FROM runtime AS train
RUN apt-get update \
    && apt-get install -y --no-install-recommends dataset-fashion-mnist=0.0~git20200523.55506a9-1 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder-train /opt/venv /opt/venv
USER 10001:10001
ENTRYPOINT ["tmc"]
CMD ["--help"]

# ---------------------------------------------------------------------------------------------
# Default target: the server. One process, one uvicorn worker per container (scale with replicas,
# one per GPU); graceful drain on SIGTERM within TMC_DRAIN_TIMEOUT_S.
FROM runtime AS serve
COPY --from=builder /opt/venv /opt/venv
USER 10001:10001
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TMC_PORT', '8000'), timeout=2).status == 200 else 1)"]
ENTRYPOINT ["tmc"]
# Host and port come from TMC_HOST/TMC_PORT (0.0.0.0:8000 above), so `-e TMC_PORT=...` moves the
# server and the HEALTHCHECK together (explicit --host/--port flags would override the env).
CMD ["serve"]
