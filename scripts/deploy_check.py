#!/usr/bin/env python3
"""Offline checks of the deployment artifacts (Dockerfile, helm/tmc) -- no cluster, no Docker.

Run by ``scripts/deploy-check.sh`` (which installs the tools first) as part of ``make test``.
Established tools carry the generic rules; only what is about THIS project is hand-written:

1. hadolint (warning level) on the Dockerfile;
2. ``helm lint --strict`` and ``helm template`` on every value set; every rendered document
   validated strictly against the Kubernetes 1.30 schemas by kubernetes-validate (unknown kinds
   fail, except the Prometheus operator's ServiceMonitor and PrometheusRule, checked against our
   schemas in tests/deploy/schemas/);
3. checkov's Kubernetes and Dockerfile checks, ONE run over all rendered value sets and the
   Dockerfile (config: .checkov.yaml, each skipped check with its reason; skips for one object
   are ``checkov.io/skipN`` annotations on it in the chart); the runners of 1–3 are in
   scripts/deploy_check_tools.py;
4. the project's own rules: scripts/deploy_check_pods.py and deploy_check_rules.py (containers,
   server, Redis, object storage, helm test), deploy_check_refs.py (references between objects),
   deploy_check_dockerfile.py (the image runs ``tmc serve``, .dockerignore), reading the app
   through deploy_check_app.py (settings, routes, the S3 URL parser); each module's docstring
   says why each rule is hand-written. The chart's ``config`` keys are generated from the
   settings (scripts/values_schema.py, run by deploy-check.sh);
5. value sets that must FAIL to render (schema violations, replicas without Redis, ...) fail
   with the expected message.

Hand-written rules the tools now carry (the rule before -> the check that replaces it):

  runAsNonRoot true (containers)            checkov CKV_K8S_23
  non-zero runAsUser (containers)           checkov CKV_K8S_40 (>= 10000, stricter)
  allowPrivilegeEscalation false            checkov CKV_K8S_20
  not privileged                            checkov CKV_K8S_16
  readOnlyRootFilesystem true               checkov CKV_K8S_22
  capabilities drop ALL                     checkov CKV_K8S_37
  RuntimeDefault seccomp profile            checkov CKV_K8S_31
  image has a pinned tag, not latest        checkov CKV_K8S_14
  memory request and limit                  checkov CKV_K8S_12, CKV_K8S_13
  automountServiceAccountToken false        checkov CKV_K8S_38
  server has liveness / readiness probes    checkov CKV_K8S_8, CKV_K8S_9
  Dockerfile final USER not root            hadolint DL3002, checkov CKV_DOCKER_3, CKV_DOCKER_8
  Dockerfile has a HEALTHCHECK              checkov CKV_DOCKER_2
  literal FROM tagged, not latest           hadolint DL3006, DL3007
  chart config keys are settings; enums and bounds agree with app/settings.py; every setting
  exposed (check_settings_coverage)         generated: scripts/values_schema.py --check

Usage: deploy_check.py [--helm PATH] [--hadolint PATH] [--checkov PATH] [-k SUBSTRING]
Exit status 0 when everything passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import deploy_check_app as app_facts
from deploy_check_dockerfile import DOCKERFILE, check_dockerfile
from deploy_check_pods import check_workloads
from deploy_check_refs import NAMESPACE, check_references
from deploy_check_rules import Doc, Rendered, Report, ValueSet
from deploy_check_tools import (
    K8S_VERSION,
    TOOLS,
    find_tool,
    helm_cmd,
    load_documents,
    run_checkov,
    run_hadolint,
    validate_documents,
    values_args,
)

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "tmc"
VALUES_DIR = ROOT / "tests" / "deploy" / "values"
INVALID_DIR = ROOT / "tests" / "deploy" / "values-invalid"
RELEASE = "ci"
INSTALL_HINT = "run `bash scripts/deploy-check.sh`, which installs it into .tools/"


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


# ------------------------------------------------------------------------------------ helm
def helm_lint(helm: str, vs: ValueSet) -> tuple[ValueSet, subprocess.CompletedProcess[str]]:
    return vs, helm_cmd(helm, "lint", "--strict", str(CHART), *values_args(vs.files))


def helm_template(helm: str, files: list[Path], *extra: str) -> subprocess.CompletedProcess[str]:
    return helm_cmd(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                    "--kube-version", K8S_VERSION, "--include-crds", *values_args(files), *extra)


# ------------------------------------------------------------------------------- value sets
def check_documents(docs: list[Doc], vs: ValueSet, rep: Report) -> None:
    """Schemas, then the project's own rules, on one value set's rendered documents."""
    validate_documents(docs, vs.name, rep)
    rendered = Rendered(vs, docs)
    check_workloads(rendered, rep)
    check_references(rendered, rep)


def check_value_set(helm: str, vs: ValueSet) -> tuple[Report, str]:
    """(the report, the rendered text for checkov) of one value set."""
    rep = Report()
    proc = helm_template(helm, vs.files)
    if proc.returncode != 0:
        rep.error(vs.name, f"helm template failed: {proc.stderr.strip()}")
        return rep, ""
    try:
        docs = load_documents(proc.stdout)
        check_documents(docs, vs, rep)
    except Exception as exc:  # a checker bug or unparsable YAML must fail loudly, not pass
        rep.error(vs.name, f"checker crashed: {type(exc).__name__}: {exc}")
        return rep, proc.stdout
    kinds: dict[str, int] = {}
    for d in docs:
        kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
    rep.ok(f"{vs.name}: {len(docs)} documents valid for Kubernetes {K8S_VERSION} ("
           + ", ".join(f"{k}×{n}" if n > 1 else k for k, n in sorted(kinds.items())) + ")")
    return rep, proc.stdout


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


# ------------------------------------------------------------------------------- main flow
def check_chart(helm: str, only: str | None, rep: Report) -> dict[str, str]:
    """helm lint + template + the per-set checks (threads), the invalid sets; the renders."""
    sets = [v for v in VALUE_SETS if not only or only in v.name]
    invalid = [v for v in INVALID_SETS if not only or only in v.name]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        lints = list(pool.map(lambda v: helm_lint(helm, v), sets))
        renders = list(pool.map(lambda v: check_value_set(helm, v), sets))
        fails = list(pool.map(lambda v: check_invalid_set(helm, v), invalid))
    for vs, proc in lints:
        out = proc.stdout + proc.stderr
        if proc.returncode != 0 or "[WARNING]" in out or "[ERROR]" in out:
            rep.error(f"helm lint --strict ({vs.name})", out.strip())
    if lints and not any(e.startswith("helm lint") for e in rep.errors):
        rep.ok(f"helm lint --strict: {len(lints)} value sets clean")
    for sub in [r for r, _ in renders] + fails:
        rep.merge(sub)
    return {vs.name: text for vs, (_, text) in zip(sets, renders, strict=True) if text}


def tools(args: argparse.Namespace) -> dict[str, str | None]:
    bindir = Path(sys.executable).parent
    return {
        "helm": find_tool(args.helm or os.environ.get("HELM"), [TOOLS / "helm" / "helm"], "helm"),
        "hadolint": find_tool(args.hadolint, [bindir / "hadolint",
                                              ROOT / ".venv" / "bin" / "hadolint"], "hadolint"),
        "checkov": find_tool(args.checkov or os.environ.get("CHECKOV"),
                             [TOOLS / "checkov" / "bin" / "checkov"], "checkov"),
    }


def print_report(rep: Report, t0: float) -> None:
    for line in rep.lines:
        print(f"  ok    {line}")
    for w in rep.warnings:
        print(f"  WARN  {w}")
    for e in rep.errors:
        print(f"  FAIL  {e}")
    verdict = "FAILED" if rep.errors else "passed"
    print(f"deploy-check {verdict}: {len(rep.errors)} errors, {len(rep.warnings)} warnings, "
          f"{time.monotonic() - t0:.1f}s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--helm")
    ap.add_argument("--hadolint")
    ap.add_argument("--checkov")
    ap.add_argument("-k", dest="only", help="run only value sets whose name contains this")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    rep = Report()
    found = tools(args)
    for name, path in found.items():
        if path is None:
            rep.error(name, f"not found: {INSTALL_HINT}")
    for line in app_facts.unlisted_env_names():
        rep.error("settings", line)
    if found["hadolint"]:
        run_hadolint(found["hadolint"], DOCKERFILE, rep)
    check_dockerfile(rep)
    if found["helm"]:
        rendered = check_chart(found["helm"], args.only, rep)
        if found["checkov"]:
            run_checkov(found["checkov"], rendered, rep)
    print_report(rep, t0)
    return 1 if rep.errors else 0


if __name__ == "__main__":
    sys.exit(main())
