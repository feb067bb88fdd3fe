"""The pods of one rendered value set: each workload's containers through the rules of
deploy_check_rules.py, then what THIS project's pods need (no tool knows the app):

- every app container's env parses with ``app.settings.Settings`` (catches 5.36870912e+08);
- rendered tokens meet the app's 16-character minimum; no credential is a ConfigMap key;
- the server runs ``tmc serve`` on TMC_PORT with one worker on 0.0.0.0, has the required
  settings, probes on the app's GET routes (/healthz startup + liveness, /readyz readiness)
  with >= 300 s for the model load, a grace period above preStop + the app's drain, the
  registry mode of the value set (embedded: one replica, Recreate; Redis: a byte cache), a GPU
  limit and toleration iff GPU, the admin token from a Secret;
- object storage: TMC_BLOB_URL parses as registry.s3_blobs parses it, keys from a Secret, a
  region, an endpoint without credentials, the CA bundle a projected item on a read-only mount;
- Redis: AOF, noeviction, data on a PVC template, --maxmemory below the memory limit;
- the helm test Pod is a test hook that calls /readyz and runs one ``tmc predict``.
"""

from __future__ import annotations

import base64
import json
import re

import deploy_check_app as app_facts
from deploy_check_rules import (
    CREDENTIAL_ENV,
    Container,
    Doc,
    Rendered,
    Report,
    ValueSet,
    check_container_references,
    check_credentials_from_secrets,
    check_env_names,
    check_init_container_user,
    check_scripts,
    check_writable_paths,
    container_env,
    containers,
    covering_mount,
    pod_spec,
)

# Redis --maxmemory units (1k = 1000, 1kb = 1024) and Kubernetes memory quantities.
REDIS_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 2**10, "m": 10**6, "mb": 2**20, "g": 10**9,
               "gb": 2**30}
K8S_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20,
             "Gi": 2**30, "Ti": 2**40}
PROBE_PATHS = {"startupProbe": "/healthz", "livenessProbe": "/healthz",
               "readinessProbe": "/readyz"}
MIN_STARTUP_BUDGET_S = 300
REQUIRED_SERVER_ENV = ("TMC_HOST", "TMC_PORT", "TMC_BASE_DIR", "TMC_ADMIN_TOKEN", "TMC_HOME",
                       "TMC_DEVICE", "TMC_DRAIN_TIMEOUT_S")
S3_KEY_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


# ------------------------------------------------------------------------------ containers
def check_container(ct: Container, rx: Rendered, volumes: set[str], rep: Report) -> None:
    ct.env = container_env(ct.c, rx.configmaps, ct.where, rep, rx.vs.external)
    if ct.kind == "initContainers":
        check_init_container_user(ct, rep)
    check_container_references(ct, rx, volumes, rep)
    if not ct.is_redis:
        check_env_names(ct.env, ct.where, rep)
    check_credentials_from_secrets(ct, rep)
    check_scripts(ct.c, ct.where, rep)
    check_writable_paths(ct, rep)
    is_server = ct.workload in rx.servers
    if ct.kind == "containers" and (is_server or ct.workload["kind"] in ("Job", "Pod")):
        err = app_facts.settings_error(ct.env)
        if err:
            rep.error(ct.where, f"rendered settings do not parse with app.settings.Settings: "
                                f"{err}")
    if is_server and ct.kind == "containers":
        check_server_container(ct, rx.vs, rep)


# ---------------------------------------------------------------------------- per workload
def check_volume_sources(spec: Doc, wname: str, rx: Rendered, rep: Report) -> None:
    """ConfigMap, Secret and PVC volumes name objects that are rendered or declared external."""
    configmaps = set(rx.configmaps) | rx.vs.external
    for v in spec.get("volumes") or []:
        if "configMap" in v and v["configMap"]["name"] not in configmaps \
                and not v["configMap"].get("optional"):
            rep.error(wname, f"volume {v['name']}: ConfigMap {v['configMap']['name']!r} is not "
                             "rendered nor declared external")
        if "secret" in v and v["secret"]["secretName"] not in rx.secrets \
                and not v["secret"].get("optional"):
            rep.error(wname, f"volume {v['name']}: Secret {v['secret']['secretName']!r} is not "
                             "rendered nor declared external")
        claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
        if claim is not None and claim not in rx.pvcs:
            rep.error(wname, f"volume {v['name']}: PVC {claim!r} is not rendered nor declared "
                             "external")


def check_workload(w: Doc, rx: Rendered, rep: Report) -> None:
    wname = f"{rx.vs.name}: {w['kind']}/{w['metadata']['name']}"
    spec = pod_spec(w) or {}
    vol_names = {v["name"] for v in spec.get("volumes") or []}
    vct = {t["metadata"]["name"] for t in (w.get("spec") or {}).get("volumeClaimTemplates") or []}
    check_volume_sources(spec, wname, rx, rep)
    used: set[str] = set()
    for ckind, c in containers(spec):
        ct = Container(w, spec, ckind, c, f"{wname} {ckind[:-1]} {c['name']}")
        used |= {m["name"] for m in ct.mounts}
        check_container(ct, rx, vol_names | vct, rep)
    for v in sorted(vol_names - used):
        rep.error(wname, f"volume {v!r} is not mounted by any container")
    if w["kind"] == "StatefulSet" and any("redis" in str(c.get("image"))
                                          for c in spec.get("containers") or []):
        check_redis(spec, vct, wname, rx.vs, rep)
    if w["kind"] == "Pod":
        check_helm_test_pod(w, spec, wname, rep)


def check_secrets_and_configmaps(rx: Rendered, rep: Report) -> None:
    """Rendered tokens meet the app's 16-character minimum; no credential in a ConfigMap."""
    for d in rx.by_kind.get("Secret", []):
        for k, v in (d.get("data") or {}).items():
            if k.endswith("token") and len(base64.b64decode(v)) < 16:
                rep.error(rx.vs.name, f"Secret/{d['metadata']['name']} {k} shorter than 16 "
                                      "chars")
    for cm in rx.by_kind.get("ConfigMap", []):
        for key in cm.get("data") or {}:
            if key in CREDENTIAL_ENV:
                rep.error(f"{rx.vs.name}: ConfigMap/{cm['metadata']['name']}",
                          f"{key} is a credential in a ConfigMap (use a Secret)")


def check_workloads(rx: Rendered, rep: Report) -> None:
    check_secrets_and_configmaps(rx, rep)
    if len(rx.servers) != 1:
        rep.error(rx.vs.name, f"expected exactly one server Deployment, got {len(rx.servers)}")
    for w in rx.workloads:
        check_workload(w, rx, rep)


# ---------------------------------------------------------------------------------- server
def check_server_container(ct: Container, vs: ValueSet, rep: Report) -> None:
    check_server_settings(ct, vs, rep)
    check_server_process(ct, rep)
    check_probes(ct, rep)
    check_drain(ct, rep)
    check_gpu(ct, vs, rep)
    if "TMC_ADMIN_TOKEN" in ct.env and not any(
            e["name"] == "TMC_ADMIN_TOKEN" and "secretKeyRef" in (e.get("valueFrom") or {})
            for e in ct.c.get("env") or []):
        rep.error(ct.where, "TMC_ADMIN_TOKEN does not come from a Secret")
    check_object_storage(ct, vs, rep)


def check_server_settings(ct: Container, vs: ValueSet, rep: Report) -> None:
    """The required settings, and the registry mode the value set asks for."""
    env, cw = ct.env, ct.where
    for name in REQUIRED_SERVER_ENV:
        if name not in env:
            rep.error(cw, f"required setting {name} is not set")
    redis_mode = "TMC_REDIS_URL" in env
    if redis_mode != (vs.registry == "redis"):
        rep.error(cw, f"registry mode {'redis' if redis_mode else 'embedded'} but value set "
                      f"expects {vs.registry}")
    if redis_mode:
        if "TMC_REGISTRY_DIR" in env:
            rep.error(cw, "TMC_REGISTRY_DIR is set in Redis mode, where the app ignores it")
        if "TMC_BLOB_CACHE_DIR" not in env:
            rep.error(cw, "Redis mode without TMC_BLOB_CACHE_DIR (local byte cache)")
        return
    if "TMC_REGISTRY_DIR" not in env:
        rep.error(cw, "embedded registry without TMC_REGISTRY_DIR")
    if "TMC_BLOB_CACHE_DIR" in env and not vs.object_storage:
        rep.error(cw, "TMC_BLOB_CACHE_DIR is set without Redis or object storage, where the app "
                      "ignores it")
    replicas = ct.workload["spec"].get("replicas")
    if replicas is None or replicas > 1:
        rep.error(cw, f"embedded (per-pod) registry with replicas={replicas}: replicas would "
                      "not share components")
    if (ct.workload["spec"].get("strategy") or {}).get("type") != "Recreate":
        rep.error(cw, "embedded registry on a single-writer volume needs strategy Recreate")


def check_server_process(ct: Container, rep: Report) -> None:
    """`tmc serve` on TMC_PORT, reachable from other pods, one uvicorn worker."""
    env, cw = ct.env, ct.where
    if env.get("TMC_HOST") != "0.0.0.0":
        rep.error(cw, f"TMC_HOST={env.get('TMC_HOST')} is not reachable from other pods")
    ports = {p.get("name"): p.get("containerPort") for p in ct.c.get("ports") or []}
    if str(ports.get("http")) != env.get("TMC_PORT"):
        rep.error(cw, f"containerPort http={ports.get('http')} but TMC_PORT={env.get('TMC_PORT')}")
    args = [str(a) for a in (ct.c.get("args") or [])]
    port_arg = args[args.index("--port") + 1] if "--port" in args else env.get("TMC_PORT")
    if args[:1] != ["serve"] or port_arg != env.get("TMC_PORT"):
        rep.error(cw, f"args {args} do not run `tmc serve` on TMC_PORT")
    if "--workers" in args:
        rep.error(cw, "one uvicorn worker per container")


def check_probes(ct: Container, rep: Report) -> None:
    """Probes on the app's GET routes, on a named port, with time for the model load (that a
    probe exists at all is checkov's CKV_K8S_8 / CKV_K8S_9)."""
    routes, _admin = app_facts.http_routes()
    ports = {p.get("name") for p in ct.c.get("ports") or []}
    for probe, path in PROBE_PATHS.items():
        hg = (ct.c.get(probe) or {}).get("httpGet") or {}
        got = hg.get("path")
        if "GET" not in routes.get(str(got), frozenset()):
            rep.error(ct.where, f"{probe} on {got}, which is not a GET route of the app")
        if got != path:
            rep.error(ct.where, f"{probe} on {got}, expected {path}")
        if isinstance(hg.get("port"), str) and hg["port"] not in ports:
            rep.error(ct.where, f"{probe} port {hg['port']!r} is not a named container port")
    sp = ct.c.get("startupProbe") or {}
    budget = sp.get("periodSeconds", 10) * sp.get("failureThreshold", 3)
    if budget < MIN_STARTUP_BUDGET_S:
        rep.error(ct.where, f"startup probe allows only {budget}s for the model load "
                            f"(< {MIN_STARTUP_BUDGET_S} s)")


def check_drain(ct: Container, rep: Report) -> None:
    """`tmc serve` gives uvicorn int(TMC_DRAIN_TIMEOUT_S) + 1 s of graceful shutdown; the pod's
    grace period must cover the preStop sleep plus that, or the kubelet SIGKILLs mid-drain."""
    drain = int(float(ct.env.get("TMC_DRAIN_TIMEOUT_S", "20"))) + 1
    grace = ct.spec.get("terminationGracePeriodSeconds", 30)
    pre = ct.c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command") or []
    pre_s = float(pre[-1]) if pre[:1] == ["sleep"] else 0.0
    if not grace > drain + pre_s:
        rep.error(ct.where, f"terminationGracePeriodSeconds={grace} must exceed preStop "
                            f"{pre_s:g}s + drain {drain}s (int(TMC_DRAIN_TIMEOUT_S) + 1)")


def check_gpu(ct: Container, vs: ValueSet, rep: Report) -> None:
    limits = (ct.c.get("resources") or {}).get("limits") or {}
    if not vs.gpu:
        if "nvidia.com/gpu" in limits:
            rep.error(ct.where, "nvidia.com/gpu requested although GPU is off")
        return
    if not limits.get("nvidia.com/gpu"):
        rep.error(ct.where, "GPU value set without an nvidia.com/gpu limit")
    if ct.env.get("TMC_DEVICE") != "cuda":
        rep.error(ct.where, f"GPU value set with TMC_DEVICE={ct.env.get('TMC_DEVICE')}")
    if not any(t.get("key") == "nvidia.com/gpu" for t in ct.spec.get("tolerations") or []):
        rep.error(ct.where, "GPU value set without a toleration for nvidia.com/gpu")


# -------------------------------------------------------------------------- object storage
def check_object_storage(ct: Container, vs: ValueSet, rep: Report) -> None:
    """Bytes in object storage: TMC_BLOB_URL parses as the app parses it, the key pair comes
    from a Secret, a region is set, the endpoint carries no credentials, the CA bundle is a
    read-only projected file, a local byte cache exists. Without object storage: no AWS_*."""
    env, cw = ct.env, ct.where
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
        app_facts.s3_url_parser()(blob_url)
    except ValueError as exc:
        rep.error(cw, f"TMC_BLOB_URL does not parse as registry.s3_blobs parses it: {exc}")
    if "TMC_BLOB_CACHE_DIR" not in env:
        rep.error(cw, "object storage without TMC_BLOB_CACHE_DIR (local byte cache)")
    entries = {e["name"]: e for e in ct.c.get("env") or []}
    for name in S3_KEY_ENV:
        if not ((entries.get(name) or {}).get("valueFrom") or {}).get("secretKeyRef"):
            rep.error(cw, f"{name} does not come from a Secret (valueFrom.secretKeyRef)")
    if not env.get("AWS_DEFAULT_REGION"):
        rep.error(cw, "object storage without AWS_DEFAULT_REGION")
    endpoint = env.get("AWS_ENDPOINT_URL")
    if endpoint is not None and not re.fullmatch(r"https?://[^/@\s?#]+/?", endpoint):
        rep.error(cw, f"AWS_ENDPOINT_URL={endpoint!r} is not http(s)://host[:port] (no user, "
                      "path or query)")
    check_ca_bundle(ct, env.get("AWS_CA_BUNDLE"), rep)


def check_ca_bundle(ct: Container, path: str | None, rep: Report) -> None:
    """AWS_CA_BUNDLE names a file projected from a ConfigMap/Secret key on a read-only mount."""
    if path is None:
        return
    mount = covering_mount(path, ct.mounts)
    if mount is None:
        rep.error(ct.where, f"AWS_CA_BUNDLE={path} is not on a mounted volume")
        return
    if mount.get("readOnly") is not True:
        rep.error(ct.where, f"the CA bundle volume {mount['name']!r} must be mounted read-only")
    volume: Doc = next((v for v in ct.spec.get("volumes") or [] if v["name"] == mount["name"]), {})
    source = volume.get("configMap") or volume.get("secret")
    if not source:
        rep.error(ct.where, f"AWS_CA_BUNDLE: volume {mount['name']!r} is not a ConfigMap or "
                            "Secret")
        return
    relative = path[len(mount["mountPath"].rstrip("/")) + 1:]
    if relative not in {item["path"] for item in source.get("items") or []}:
        rep.error(ct.where, f"AWS_CA_BUNDLE={path}: {relative!r} is not a projected item of "
                            f"volume {mount['name']!r}")


# ----------------------------------------------------------------------------------- Redis
def parse_size(text: str, units: dict[str, int]) -> int | None:
    """Bytes of "<number><unit>" (Kubernetes allows 1.5Gi; the schema keeps Redis integral)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(text).strip())
    if not m or m.group(2) not in units:
        return None
    return int(float(m.group(1)) * units[m.group(2)])


def check_redis(spec: Doc, claim_templates: set[str], wname: str, vs: ValueSet,
                rep: Report) -> None:
    """The registry's Redis: AOF on, never evicts, data on a claim, bounded below its limit."""
    args = " ".join(str(a) for c in spec["containers"] for a in (c.get("args") or []))
    if "--appendonly yes" not in args:
        rep.error(wname, "Redis without AOF persistence (--appendonly yes)")
    if "--maxmemory-policy noeviction" not in args:
        rep.error(wname, "Redis may evict registry keys (need noeviction)")
    if vs.redis_persistent and "data" not in claim_templates:
        rep.error(wname, "Redis data is not on a PersistentVolumeClaim template")
    check_redis_memory(spec["containers"][0], wname, vs, rep)


def check_redis_memory(c: Doc, wname: str, vs: ValueSet, rep: Report) -> None:
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


def check_helm_test_pod(w: Doc, spec: Doc, wname: str, rep: Report) -> None:
    ann = w["metadata"].get("annotations") or {}
    if ann.get("helm.sh/hook") != "test":
        rep.error(wname, "a bare Pod that is not a helm test hook")
    script = json.dumps(spec.get("containers"))
    if "/readyz" not in script or "tmc predict" not in script:
        rep.error(wname, "helm test must call /readyz and run one tmc predict")
