"""Container-level rules of the deploy checks, and the types they share.

Generic hygiene (security contexts, probes present, resources, image tags, token automount,
seccomp) is checkov's (scripts/deploy_check.py has the table of what it replaced). Kept here,
each with why it is hand-written:

- env names are settings the app reads (``app.settings.ENV_NAMES``) or helpers in NON_TMC_ENV:
  only the app knows its settings (the parse with ``Settings`` is in deploy_check_pods.py);
- $(VAR) references in env, command and args resolve: the kubelet silently leaves them as text;
- the paths the app writes (TMC_HOME, registry, byte cache, HOME) sit on a writable mount and
  TMC_BASE_DIR on a mount: the app's own paths under a read-only root;
- credentials never as a plain value: the app's credential names (checkov's CKV_K8S_35 is
  skipped because the app reads them from env, so which env is a credential is ours to say);
- shell scripts in command/args parse (sh -n) and embedded Python compiles: no tool reads them;
- init containers run as non-root with a non-zero UID: CKV_K8S_23 / CKV_K8S_40 read
  spec.containers only;
- mounts, secretKeyRefs and volumes name objects that exist: no offline tool follows them.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import deploy_check_app as app_facts

Doc = dict[str, Any]

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
# Env names that carry credentials: only ever from a Secret (valueFrom.secretKeyRef).
CREDENTIAL_ENV = ("TMC_ADMIN_TOKEN", "TMC_INFERENCE_TOKEN", "REDIS_PASSWORD",
                  "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
WRITABLE_PATH_ENV = ("TMC_HOME", "TMC_REGISTRY_DIR", "TMC_BLOB_CACHE_DIR", "HOME")
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job", "Pod", "DaemonSet"}
SECRET_PLACEHOLDER = "x" * 32
VAR_REF = re.compile(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


class Report:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.lines: list[str] = []

    def error(self, where: str, msg: str) -> None:
        self.errors.append(f"{where}: {msg}")

    def warn(self, where: str, msg: str) -> None:
        self.warnings.append(f"{where}: {msg}")

    def ok(self, line: str) -> None:
        self.lines.append(line)

    def merge(self, other: Report) -> None:
        self.errors += other.errors
        self.warnings += other.warnings
        self.lines += other.lines


@dataclass
class ValueSet:
    name: str
    files: list[Path]
    expect_kinds: set[str] = field(default_factory=set)
    forbid_kinds: set[str] = field(default_factory=set)
    # Names of Secrets / PVCs / ConfigMaps the value set says exist outside the chart.
    external: set[str] = field(default_factory=set)
    gpu: bool = False
    registry: str = "embedded"  # embedded | redis
    redis_persistent: bool = True
    object_storage: bool = False  # component bytes in S3 (TMC_BLOB_URL=s3://...)


@dataclass
class Rendered:
    """One value set's documents, indexed for the rules."""

    vs: ValueSet
    docs: list[Doc]
    by_kind: dict[str, list[Doc]] = field(default_factory=dict)
    configmaps: dict[str, dict[str, str]] = field(default_factory=dict)
    secrets: set[str] = field(default_factory=set)
    pvcs: set[str] = field(default_factory=set)
    servers: list[Doc] = field(default_factory=list)
    workloads: list[Doc] = field(default_factory=list)

    def __post_init__(self) -> None:
        for d in self.docs:
            self.by_kind.setdefault(d.get("kind", "?"), []).append(d)
        names = {k: {d["metadata"]["name"] for d in v} for k, v in self.by_kind.items()}
        self.configmaps = {d["metadata"]["name"]: (d.get("data") or {})
                           for d in self.by_kind.get("ConfigMap", [])}
        self.secrets = names.get("Secret", set()) | self.vs.external
        self.pvcs = names.get("PersistentVolumeClaim", set()) | self.vs.external
        self.servers = [d for d in self.by_kind.get("Deployment", [])
                        if pod_labels(d).get("app.kubernetes.io/component") == "server"]
        self.workloads = [d for d in self.docs if d.get("kind") in WORKLOAD_KINDS]


@dataclass
class Container:
    """One container in its workload, with its env as the kubelet would build it."""

    workload: Doc
    spec: Doc
    kind: str  # containers | initContainers
    c: Doc
    where: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def mounts(self) -> list[Doc]:
        mounts: list[Doc] = self.c.get("volumeMounts") or []
        return mounts

    @property
    def is_redis(self) -> bool:
        return "redis" in str(self.c.get("image", ""))


# ------------------------------------------------------------------------------ small helpers
def pod_spec(doc: Doc) -> Doc | None:
    kind = doc.get("kind")
    if kind == "Pod":
        return doc.get("spec") or {}
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        spec: Doc = (doc.get("spec") or {}).get("template", {}).get("spec") or {}
        return spec
    return None


def pod_labels(doc: Doc) -> dict[str, str]:
    if doc.get("kind") == "Pod":
        labels: dict[str, str] = doc.get("metadata", {}).get("labels") or {}
        return labels
    template = (doc.get("spec") or {}).get("template", {})
    found: dict[str, str] = template.get("metadata", {}).get("labels") or {}
    return found


def containers(spec: Doc) -> Iterator[tuple[str, Doc]]:
    for kind in ("initContainers", "containers"):
        for c in spec.get(kind) or []:
            yield kind, c


def under(path: str, mount: str) -> bool:
    return path == mount or path.startswith(mount.rstrip("/") + "/")


def covering_mount(path: str, mounts: list[Doc]) -> Doc | None:
    best = None
    for m in mounts:
        if under(path, m["mountPath"]) and (best is None
                                            or len(m["mountPath"]) > len(best["mountPath"])):
            best = m
    return best


def effective(pod_sc: Doc, c_sc: Doc, key: str) -> Any:
    return c_sc.get(key, pod_sc.get(key))


# ----------------------------------------------------------------------------------- env
def env_from_sources(c: Doc, configmaps: dict[str, dict[str, str]], where: str, rep: Report,
                     external: set[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for src in c.get("envFrom") or []:
        ref = src.get("configMapRef")
        if ref:
            name = ref.get("name")
            if name in configmaps:
                env.update({k: str(v) for k, v in configmaps[name].items()})
            elif name not in external and not ref.get("optional"):
                rep.error(where, f"envFrom configMapRef {name!r} is not rendered")
        if src.get("secretRef"):
            rep.error(where, "envFrom secretRef: env names from a Secret cannot be checked")
    return env


def container_env(c: Doc, configmaps: dict[str, dict[str, str]], where: str, rep: Report,
                  external: set[str]) -> dict[str, str]:
    """Resolved env as the kubelet would build it (secrets -> placeholder)."""
    env = env_from_sources(c, configmaps, where, rep, external)
    for e in c.get("env") or []:
        name = e["name"]
        if "value" in e:
            value = str(e["value"])
            for ref in VAR_REF.findall(value):
                if ref not in env:
                    rep.error(where, f"env {name} refers to $({ref}) which is not defined "
                                     "before it (Kubernetes would leave the text unexpanded)")
            env[name] = VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), value)
        elif "configMapKeyRef" in (e.get("valueFrom") or {}):
            ref = e["valueFrom"]["configMapKeyRef"]
            env[name] = str(configmaps.get(ref["name"], {}).get(ref["key"], ""))
        elif "valueFrom" in e:
            env[name] = SECRET_PLACEHOLDER
        else:
            env[name] = ""
    return env


def check_env_names(env: dict[str, str], where: str, rep: Report) -> None:
    env_names = app_facts.settings_module().ENV_NAMES
    for name in env:
        if name.startswith("TMC_"):
            if name not in env_names:
                rep.error(where, f"env {name} is not a setting the app reads "
                                 "(app.settings.ENV_NAMES)")
        elif name not in NON_TMC_ENV:
            rep.error(where, f"env {name} is neither a TMC_* setting nor an allowed helper "
                             f"variable ({', '.join(sorted(NON_TMC_ENV))})")


def check_credentials_from_secrets(ct: Container, rep: Report) -> None:
    for e in ct.c.get("env") or []:
        if e["name"] in CREDENTIAL_ENV and "value" in e:
            rep.error(ct.where, f"{e['name']} given as a plain value (use a Secret)")


def check_scripts(c: Doc, cw: str, rep: Report) -> None:
    """Shell scripts in command/args must parse (sh -n), and so must embedded Python heredocs."""
    cmd = [str(x) for x in (c.get("command") or []) + (c.get("args") or [])]
    if len(cmd) < 3 or PurePosixPath(cmd[0]).name not in ("sh", "bash") \
            or not cmd[1].startswith("-") or "c" not in cmd[1]:
        return
    script = cmd[2]
    proc = subprocess.run([cmd[0].rsplit("/", 1)[-1], "-n", "-c", script], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        rep.error(cw, f"shell script does not parse: {proc.stderr.strip()}")
    for m in re.finditer(r"python3? - <<'(\w+)'\n(.*?)\n\1\n", script, re.S):
        try:
            compile(m.group(2), f"{cw} heredoc", "exec")
        except SyntaxError as e:
            rep.error(cw, f"embedded Python does not compile: {e}")


# --------------------------------------------------------------------------- per container
def check_init_container_user(ct: Container, rep: Report) -> None:
    """checkov's CKV_K8S_23 / CKV_K8S_40 look at spec.containers only."""
    psc = ct.spec.get("securityContext") or {}
    csc = ct.c.get("securityContext") or {}
    if effective(psc, csc, "runAsNonRoot") is not True:
        rep.error(ct.where, "runAsNonRoot is not true")
    uid = effective(psc, csc, "runAsUser")
    if uid is None or uid == 0:
        rep.error(ct.where, "no non-zero runAsUser (the image user cannot be assumed)")


def check_container_references(ct: Container, rx: Rendered, volumes: set[str], rep: Report) -> None:
    for m in ct.mounts:
        if m["name"] not in volumes:
            rep.error(ct.where, f"volumeMount {m['name']!r} has no volume")
    for e in ct.c.get("env") or []:
        ref = (e.get("valueFrom") or {}).get("secretKeyRef")
        if ref and ref["name"] not in rx.secrets and not ref.get("optional"):
            rep.error(ct.where, f"env {e['name']}: Secret {ref['name']!r} is not rendered nor "
                                "declared external")
    for arg in (ct.c.get("command") or []) + (ct.c.get("args") or []):
        for ref in VAR_REF.findall(str(arg)):
            if ref not in ct.env:
                rep.error(ct.where, f"$({ref}) in command/args is not a container env var")


def check_writable_paths(ct: Container, rep: Report) -> None:
    """Paths the app writes sit on a writable volume; TMC_BASE_DIR on a mount."""
    if ct.is_redis:
        return
    for name in WRITABLE_PATH_ENV:
        if name in ct.env:
            m = covering_mount(ct.env[name], ct.mounts)
            if m is None or m.get("readOnly"):
                rep.error(ct.where, f"{name}={ct.env[name]} is not on a writable volume "
                                    "(the root filesystem is read-only)")
    base = ct.env.get("TMC_BASE_DIR")
    if base is not None and covering_mount(base, ct.mounts) is None:
        rep.error(ct.where, f"TMC_BASE_DIR={base} is not on a mounted volume")
