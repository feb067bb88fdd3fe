#!/usr/bin/env python3
"""Run the server the way the chart's pod would, without a cluster (optional, not in `make test`).

Renders a value set with helm, takes the server container's environment (ConfigMap + env, the
admin token generated here), then starts `tmc serve` in a private mount namespace where
- the root filesystem is read-only (readOnlyRootFilesystem),
- only the pod's volumes are writable: /tmp and every emptyDir / PVC mount are tmpfs owned by
  the pod's runAsUser; the base model volume is mounted read-only,
- the process runs as the pod's runAsUser/runAsGroup (setpriv), not root.
Pod paths are kept except for a /mnt/pod prefix (the read-only root cannot grow mount points).
Then: /healthz, /readyz, /metrics, one `tmc predict --all` like `helm test`, and a SIGTERM whose
shutdown must finish within the pod's terminationGracePeriodSeconds.

Needs root (unshare, mount, setpriv), the project installed in .venv, and for Redis value sets a
`redis-server` binary (started here on a loopback port and stopped afterwards).

Usage: .venv/bin/python scripts/deploy_smoke.py [--values defaults|all] [--helm PATH]
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deploy_check as dc  # noqa: E402

sys.path.insert(0, str(dc.ROOT))

PREFIX = "/mnt/pod"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def run_helm_test(docs: list[dict[str, Any]], url: str, work: Path,
                  cli_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    pod = next(d for d in docs if d["kind"] == "Pod")
    c = pod["spec"]["containers"][0]
    env = {e["name"]: str(e.get("value", "")) for e in c.get("env") or []}
    env["SERVER_URL"] = url
    if cli_env.get("TMC_INFERENCE_TOKEN"):
        env["TMC_INFERENCE_TOKEN"] = cli_env["TMC_INFERENCE_TOKEN"]
    bin_dir = work / "bin"
    bin_dir.mkdir(exist_ok=True)
    py = shlex.quote(sys.executable)
    (bin_dir / "tmc").write_text(f"#!/bin/sh\nexec {py} -m cli \"$@\"\n")
    (bin_dir / "tmc").chmod(0o755)
    (bin_dir / "python").write_text(f"#!/bin/sh\nexec {py} \"$@\"\n")
    (bin_dir / "python").chmod(0o755)
    env.update(PATH=f"/mnt:{os.environ.get('PATH', '/usr/bin:/bin')}", PYTHONPATH=str(dc.ROOT))
    script = c["args"][0]
    # Its /tmp is an emptyDir: give it a private one (the wrappers move to /mnt first).
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                           f"mount --bind {shlex.quote(str(bin_dir))} /mnt && "
                           'mount -t tmpfs tmpfs /tmp && exec "$@"', "sh",
                           *c["command"], script], env=env, cwd="/", capture_output=True,
                          text=True, timeout=400)


def push_component(url: str, work: Path, cli_env: dict[str, str]) -> int:
    """Register a small random component (registry + byte store writes on the pod's volumes)."""
    import json

    import torch

    from tangent.component import encode_component

    req = urllib.request.Request(url + "/v1/base")
    if cli_env.get("TMC_INFERENCE_TOKEN"):
        req.add_header("Authorization", f"Bearer {cli_env['TMC_INFERENCE_TOKEN']}")
    with urllib.request.urlopen(req, timeout=10) as r:
        base = json.load(r)
    gen = torch.Generator().manual_seed(0)
    tensors = {p["name"]: 1e-3 * torch.randn(p["shape"], generator=gen)
               for p in base["tangent_region"]}
    path = work / "smoke-1.safetensors"
    path.write_bytes(encode_component(tensors, base["fingerprint"],
                                      {"data": "deploy smoke test", "samples": 0}))
    push = subprocess.run([sys.executable, "-m", "cli", "push", str(path), "--id", "smoke-1",
                           "--server", url], cwd=dc.ROOT, env=cli_env, capture_output=True,
                          text=True)
    print(f"smoke: tmc push ({path.stat().st_size} bytes) -> exit {push.returncode}: "
          f"{(push.stdout or push.stderr).strip()[:200]}")
    return int(push.returncode != 0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--values", default="defaults",
                    help="a value set name of deploy_check, or 'all'")
    ap.add_argument("--helm", default=str(dc.ROOT / ".tools" / "helm" / "helm"))
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    args = ap.parse_args()
    names = [v.name for v in dc.VALUE_SETS] if args.values == "all" else [args.values]
    results = {}
    for name in names:
        print(f"== smoke: {name}")
        results[name] = smoke(args, next(v for v in dc.VALUE_SETS if v.name == name))
    if len(names) > 1:
        print("smoke summary: " + ", ".join(f"{n} {'ok' if rc == 0 else 'FAILED'}"
                                             for n, rc in results.items()))
    return 1 if any(results.values()) else 0


def sandbox_lines(spec: dict[str, Any], container: dict[str, Any], env: dict[str, str],
                  host_base: Path | None) -> list[str]:
    """Shell lines (run by root inside `unshare -m`) that build the pod's filesystem view:
    read-only root, tmpfs volumes owned by the pod user under PREFIX (+ /tmp), the base volume
    filled by the pod's own base-init container (then read-only) or bind-mounted read-only from
    host_base. Rewrites env paths that lie on a volume to their PREFIX location."""
    sc = spec["securityContext"]
    uid, gid = sc["runAsUser"], sc.get("runAsGroup", sc["runAsUser"])
    py = shlex.quote(sys.executable)
    mounts = container.get("volumeMounts") or []
    init = next((c for c in spec.get("initContainers") or [] if c["name"] == "base-init"), None)
    lines = ["set -e", "mount --bind / /", "mount -o remount,bind,ro /",
             f"mount -t tmpfs -o uid={uid},gid={gid},mode=0755 tmpfs /mnt",
             # `tmc` and `python` as the image has them on PATH
             "mkdir -p /mnt/bin",
             f"printf '#!/bin/sh\\nexec %s -m cli \"$@\"\\n' {py} > /mnt/bin/tmc",
             f"printf '#!/bin/sh\\nexec %s \"$@\"\\n' {py} > /mnt/bin/python",
             "chmod 755 /mnt/bin/tmc /mnt/bin/python"]
    for m in sorted(mounts, key=lambda m: m["mountPath"]):
        if m["mountPath"] == "/tmp":
            continue
        target = shlex.quote(PREFIX + m["mountPath"])
        lines.append(f"mkdir -p {target}")
        if m["name"] == "base" and init is None:
            assert host_base is not None
            lines += [f"mount --bind {shlex.quote(str(host_base))} {target}",
                      f"mount -o remount,bind,ro {target}"]
        else:
            lines.append(f"mount -t tmpfs -o uid={uid},gid={gid},mode=0755 tmpfs {target}")
    # This dev machine's Python lives under /root (mode 0700), which the pod user cannot
    # traverse: expose just that tree (an artefact of the host; the image has /usr/local).
    real_python = os.path.realpath(sys.executable)
    if real_python.startswith("/root/"):
        tree = "/root/" + real_python.split("/")[2]
        lines += ["mkdir -p /mnt/.pytree", f"mount --bind {tree} /mnt/.pytree",
                  "mount -t tmpfs -o mode=0755 tmpfs /root", f"mkdir -p {tree}",
                  f"mount --bind /mnt/.pytree {tree}"]
    # /tmp last: prepared host files (the base) live under the host's /tmp.
    lines.append(f"mount -t tmpfs -o uid={uid},gid={gid},mode=1777 tmpfs /tmp")
    roots = [m["mountPath"] for m in mounts if m["mountPath"] != "/tmp"]
    for k, v in list(env.items()):
        if any(dc.under(v, r) for r in roots):
            env[k] = PREFIX + v
    if init is not None:
        ienv = {e["name"]: str(e["value"]) for e in init.get("env") or []}
        ienv["BASE_OUT"] = PREFIX + ienv["BASE_OUT"]
        lines.append("env " + " ".join(shlex.quote(f"{k}={v}") for k, v in ienv.items())
                     + f" PATH=/mnt/bin:$PATH setpriv --reuid={uid} --regid={gid} "
                     "--clear-groups " + " ".join(shlex.quote(str(a)) for a in
                                                  init["command"] + init["args"]))
        base = PREFIX + next(m["mountPath"] for m in mounts if m["name"] == "base")
        lines.append(f"mount -o remount,ro {shlex.quote(base)}")
    lines.append("export PATH=/mnt/bin:$PATH")
    lines.append(f"cd /tmp && exec setpriv --reuid={uid} --regid={gid} --clear-groups \"$@\"")
    return lines


def run_in_pod(lines: list[str], argv: list[str], env: dict[str, str],
               **popen: Any) -> subprocess.Popen[Any]:
    child_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(dc.ROOT),
                 "PYTHONDONTWRITEBYTECODE": "1", **env}
    return subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                             "\n".join(lines), "pod", *argv], env=child_env, cwd="/", **popen)


def kubelet_env(c: dict[str, Any], secret_value: str, index: str = "0") -> dict[str, str]:
    """The container env as the kubelet builds it: Secrets -> secret_value, the completion-index
    fieldRef -> index, $(VAR) expanded from earlier entries."""
    env: dict[str, str] = {}
    for e in c.get("env") or []:
        if "value" in e:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)),
                                    str(e["value"]))
        elif "secretKeyRef" in e.get("valueFrom", {}):
            env[e["name"]] = secret_value
        elif "fieldRef" in e.get("valueFrom", {}):
            env[e["name"]] = index
    return env


def run_training_job(job: dict[str, Any], url: str, admin_token: str, log: Path,
                     extra: list[str]) -> tuple[int, str]:
    """Run a training Job's pod (index 0) against the smoke server; smoke-sized extra args."""
    spec = job["spec"]["template"]["spec"]
    c = spec["containers"][0]
    env = kubelet_env(c, admin_token)
    env["TRAIN_SERVER_URL"] = url
    args = [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), str(a))
            for a in c["command"] + c["args"]]
    lines = sandbox_lines(spec, c, env, None)
    with open(log, "w") as f:
        proc = run_in_pod(lines, args + extra, env, stdout=f, stderr=subprocess.STDOUT)
        rc = proc.wait(timeout=900)
    return rc, env["COMPONENT_ID"]


def smoke(args: argparse.Namespace, vs: Any) -> int:
    proc = dc.helm_template(args.helm, vs.files)
    if proc.returncode:
        sys.exit(proc.stderr)
    docs = dc.load_documents(proc.stdout)
    dep = next(d for d in docs if d["kind"] == "Deployment")
    spec = dep["spec"]["template"]["spec"]
    server = spec["containers"][0]
    configmaps = {d["metadata"]["name"]: d.get("data") or {} for d in docs
                  if d["kind"] == "ConfigMap"}
    env = dc.container_env(server, configmaps, "smoke", dc.Report(), vs.external)
    grace = spec["terminationGracePeriodSeconds"]
    admin_token = secrets.token_hex(20)
    env["TMC_ADMIN_TOKEN"] = admin_token
    if "TMC_INFERENCE_TOKEN" in env:
        env["TMC_INFERENCE_TOKEN"] = secrets.token_hex(20)
    if env.get("TMC_DEVICE") == "cuda" and not _cuda_available():
        print("smoke: no CUDA device here: TMC_DEVICE=cuda replaced by cpu")
        env["TMC_DEVICE"] = "cpu"
    port = args.port or free_port()
    env["TMC_PORT"] = str(port)
    env["TMC_HOST"] = "127.0.0.1"  # the smoke test stays on loopback
    redis_proc = None
    pod = None
    work = Path(tempfile.mkdtemp(prefix="tmc-smoke-"))
    try:
        if "TMC_REDIS_URL" in env:
            redis_bin = shutil.which("redis-server")
            if not redis_bin:
                sys.exit("redis-server not installed (apt-get install -y redis-server)")
            rport, password = free_port(), secrets.token_hex(16)
            (work / "redis").mkdir()
            raw = next(e["value"] for e in server["env"] if e["name"] == "TMC_REDIS_URL")
            auth = ["--requirepass", password] if "$(REDIS_PASSWORD)" in raw else []
            redis_proc = subprocess.Popen(
                [redis_bin, "--bind", "127.0.0.1", "--port", str(rport), "--save", "",
                 "--appendonly", "yes", "--dir", str(work / "redis"), *auth],
                stdout=subprocess.DEVNULL)
            # The chart's URL, host swapped for the local server (plain TCP), $(REDIS_PASSWORD)
            # expanded from the Secret-provided variable the way the kubelet does it.
            raw = re.sub(r"^rediss?://([^@/]*@)?[^/]+/", rf"redis://\g<1>127.0.0.1:{rport}/",
                         raw)
            env["REDIS_PASSWORD"] = password
            env["TMC_REDIS_URL"] = raw.replace("$(REDIS_PASSWORD)", password)
        host_base = None
        if not any(c["name"] == "base-init" for c in spec.get("initContainers") or []):
            # A PVC-backed base: prepared here as root, like an operator would.
            host_base = work / "base"
            mount = next(m["mountPath"] for m in server["volumeMounts"] if m["name"] == "base")
            rel = Path(env["TMC_BASE_DIR"]).relative_to(mount)
            subprocess.run([sys.executable, "-m", "cli", "base", "init", "--preset",
                            "minilm", "--out", str(host_base / rel)], check=True, cwd=dc.ROOT,
                           env={**os.environ, "PYTHONPATH": str(dc.ROOT)},
                           stdout=subprocess.DEVNULL)
            # `tmc base init` writes theta0.safetensors with mode 0600: a base prepared by
            # another user must be made readable for the pod user (see helm/tmc/README.md).
            subprocess.run(["chmod", "-R", "a+rX", str(host_base)], check=True)
        lines = sandbox_lines(spec, server, env, host_base)
        serve = ["tmc", *[str(a) for a in server["args"]]]
        serve[serve.index("--port") + 1] = str(port)
        serve[serve.index("--host") + 1] = "127.0.0.1"
        print("smoke: pod env:", " ".join(f"{k}={v}" for k, v in sorted(env.items())
                                          if "TOKEN" not in k and "REDIS" not in k))
        t0 = time.monotonic()
        with open(work / "pod.log", "w") as log_file:
            pod = run_in_pod(lines, serve, env, stdout=log_file, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        status = 0
        while time.monotonic() - t0 < args.startup_timeout:
            if pod.poll() is not None:
                print((work / "pod.log").read_text()[-4000:])
                print(f"smoke: server exited with {pod.returncode} during startup")
                return 1
            try:
                status, _ = get(url + "/healthz", 2)
                if status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        print(f"smoke: /healthz {status} after {time.monotonic() - t0:.1f}s")
        body = b""
        while time.monotonic() - t0 < args.startup_timeout:
            status, body = get(url + "/readyz")
            if status == 200:
                break
            time.sleep(0.5)
        print(f"smoke: /readyz {status} after {time.monotonic() - t0:.1f}s: {body[:200]!r}")
        failures = 0 if status == 200 else 1
        mstatus, metrics = get(url + "/metrics")
        names = sorted({ln.split("{")[0].split(" ")[0] for ln in metrics.decode().splitlines()
                        if ln.startswith("tmc_")})
        print(f"smoke: /metrics {mstatus}, {len(names)} tmc_ series, e.g. {names[:4]}")
        failures += mstatus != 200
        cli_env = {**os.environ, "PYTHONPATH": str(dc.ROOT), "TMC_ADMIN_TOKEN": admin_token}
        if env.get("TMC_INFERENCE_TOKEN"):
            cli_env["TMC_INFERENCE_TOKEN"] = env["TMC_INFERENCE_TOKEN"]
        failures += push_component(url, work, cli_env)

        def tmc(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "cli", *argv], cwd=dc.ROOT,
                                  env=cli_env, capture_output=True, text=True)

        trained = []
        for job in (d for d in docs if d["kind"] == "Job"):
            t1 = time.monotonic()
            rc, cid = run_training_job(job, url, admin_token, work / "job.log",
                                       ["--limit", "256", "--val-limit", "128", "--epochs", "1"])
            tail = (work / "job.log").read_text().strip().splitlines()[-2:]
            print(f"smoke: Job {job['metadata']['name']} (index 0, smoke-sized) -> exit {rc} "
                  f"in {time.monotonic() - t1:.1f}s: {' | '.join(tail)[:300]}")
            failures += rc != 0
            trained.append(cid)
        # The chart's own `helm test` script: readyz, then one `tmc predict --all`.
        pred = run_helm_test(docs, url, work, cli_env)
        print(f"smoke: helm test script -> exit {pred.returncode}: "
              f"{(pred.stdout + pred.stderr).strip()[-600:]}")
        failures += pred.returncode != 0
        for cid in ["smoke-1", *trained]:
            if f"{cid}@" not in pred.stdout:
                print(f"smoke: {cid} missing from the prediction's provenance")
                failures += 1
            forget = tmc("forget", "--server", url, cid)
            print(f"smoke: tmc forget {cid} -> exit {forget.returncode}: "
                  f"{(forget.stdout or forget.stderr).strip()[:200]}")
            failures += forget.returncode != 0
        t1 = time.monotonic()
        os.kill(pod.pid, signal.SIGTERM)  # unshare -> sh -> setpriv -> python: one exec chain
        try:
            rc = pod.wait(timeout=grace + 5)
        except subprocess.TimeoutExpired:
            pod.kill()
            rc = pod.wait()
        took = time.monotonic() - t1
        ok = took < grace
        print(f"smoke: SIGTERM -> exit {rc} in {took:.1f}s (grace period {grace}s) "
              f"{'ok' if ok else 'TOO SLOW'}")
        failures += not ok
        for log_path in (work / "pod.log", work / "job.log"):
            log = log_path.read_text() if log_path.exists() else ""
            for bad in ("Read-only file system", "Permission denied", "Traceback"):
                if bad in log:
                    print(f"smoke: {log_path.name} mentions {bad!r}:\n{log[-3000:]}")
                    failures += 1
        print(f"smoke {'passed' if not failures else 'FAILED'} ({vs.name})")
        return 1 if failures else 0
    finally:
        if pod is not None and pod.poll() is None:
            pod.kill()
            pod.wait()
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
