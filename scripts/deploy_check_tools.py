"""The established tools the deploy checks run, each wrapped to report into one Report.

helm (its own cache under .tools/helm-home), kubernetes-validate (strict, Kubernetes 1.30
schemas; the Prometheus operator's kinds against our schemas in tests/deploy/schemas/),
hadolint (warning level) and checkov (one run over a directory of renders and the Dockerfile,
configured by .checkov.yaml). scripts/deploy_check.py decides what they run on; this module
only knows how to run them and read their answers.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from deploy_check_dockerfile import DOCKERFILE
from deploy_check_rules import Doc, Report

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / ".tools"
SCHEMA_DIR = ROOT / "tests" / "deploy" / "schemas"
CHECKOV_CONFIG = ROOT / ".checkov.yaml"
K8S_VERSION = "1.30.0"


# ------------------------------------------------------------------------------------ helm
def helm_cmd(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    cache = TOOLS / "helm-home"
    env.update(HELM_CACHE_HOME=str(cache / "cache"), HELM_CONFIG_HOME=str(cache / "config"),
               HELM_DATA_HOME=str(cache / "data"))
    return subprocess.run([helm, *args], capture_output=True, text=True, env=env, check=False)


def values_args(files: Iterable[Path]) -> list[str]:
    return [a for f in files for a in ("-f", str(f))]


def load_documents(text: str) -> list[Doc]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [d for d in yaml.load_all(text, Loader=loader) if d]  # noqa: S506 (safe loader)


# ----------------------------------------------------------------------------- k8s schemas
# Prometheus operator kinds (CRDs, not in the Kubernetes schemas) -> our schema of the subset
# the chart renders, in SCHEMA_DIR.
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.schema.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule.schema.json",
}


@functools.cache
def crd_schema(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((SCHEMA_DIR / name).read_text())
    return schema


def cache_k8s_schemas() -> None:
    """kubernetes-validate re-reads and re-parses its JSON schemas (incl. the large
    _definitions.json) on every call; cache them (read-only use, pinned 1.37.0)."""
    import kubernetes_validate.utils as kvu  # noqa: PLC0415 (a tool, imported when used)

    if not hasattr(kvu.schema_contents, "cache_info"):
        kvu.schema_contents = functools.cache(kvu.schema_contents)


def validate_crd(doc: Doc, schema_name: str, ident: str, rep: Report) -> None:
    import jsonschema  # noqa: PLC0415

    validator = jsonschema.Draft202012Validator(crd_schema(schema_name))
    for e in sorted(validator.iter_errors(doc), key=str):
        rep.error(ident, f"{doc['kind']} schema: {e.message} at "
                         f"{'/'.join(map(str, e.absolute_path))}")


def validate_documents(docs: list[Doc], where: str, rep: Report) -> None:
    import kubernetes_validate  # noqa: PLC0415

    cache_k8s_schemas()
    for doc in docs:
        ident = f"{where}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        schema_name = CRD_SCHEMAS.get((str(doc.get("apiVersion")), str(doc.get("kind"))))
        if schema_name:
            validate_crd(doc, schema_name, ident, rep)
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


# ---------------------------------------------------------------------------- linter tools
def run_hadolint(hadolint: str, dockerfile: Path, rep: Report) -> None:
    proc = subprocess.run([hadolint, "--no-color", "--failure-threshold", "warning",
                           str(dockerfile)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        rep.error("hadolint", (proc.stdout + proc.stderr).strip() or f"exit {proc.returncode}")
    else:
        infos = len([ln for ln in proc.stdout.splitlines() if ln.strip()])
        rep.ok(f"hadolint: clean at warning level ({infos} info/style notes)")


def checkov_failures(checkov: str, directory: Path) -> dict[str, list[str]]:
    """One checkov run over a directory: file (relative, "/x.yaml") -> ["CHECK_ID name:
    resource", ...] of its failed checks. Raises RuntimeError when checkov itself fails."""
    proc = subprocess.run([checkov, "--config-file", str(CHECKOV_CONFIG), "-d", str(directory),
                           "-o", "json"], capture_output=True, text=True, check=False)
    try:
        reports = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"checkov exit {proc.returncode}: "
                           f"{proc.stderr.strip()[-2000:]}") from exc
    failed: dict[str, list[str]] = {}
    for report in reports if isinstance(reports, list) else [reports]:
        results = report.get("results", {})
        for err in results.get("parsing_errors", []):
            failed.setdefault(str(err), []).append("parsing error")
        for f in results.get("failed_checks", []):
            failed.setdefault(f["file_path"], []).append(
                f"{f['check_id']} {f['check_name']}: {f['resource']}")
    return failed


def run_checkov(checkov: str, rendered: dict[str, str], rep: Report) -> None:
    """checkov once over every rendered value set (<name>.yaml) and the Dockerfile."""
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tmc-checkov-") as tmp:
        for name, text in rendered.items():
            (Path(tmp) / f"{name}.yaml").write_text(text)
        shutil.copy(DOCKERFILE, Path(tmp) / "Dockerfile")
        try:
            failed = checkov_failures(checkov, Path(tmp))
        except RuntimeError as exc:
            rep.error("checkov", str(exc))
            return
    for path, checks in sorted(failed.items()):
        for check in checks:
            rep.error(f"checkov {path.lstrip('/')}", check)
    if not failed:
        rep.ok(f"checkov: {len(rendered)} value sets and the Dockerfile pass "
               f"({time.monotonic() - t0:.1f}s)")


def find_tool(explicit: str | None, candidates: list[Path], name: str) -> str | None:
    if explicit:
        return explicit
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return shutil.which(name)


