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
    (bin_dir / "tmc").write_text(f"#!/bin/sh\nexec {py} -m app.cli \"$@\"\n")
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
    push = subprocess.run([sys.executable, "-m", "app.cli", "push", str(path), "--id", "smoke-1",
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
    rep = dc.Report()
    env = dc.container_env(server, configmaps, "smoke", rep, vs.external)
    uid = spec["securityContext"]["runAsUser"]
    gid = spec["securityContext"].get("runAsGroup", uid)
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
    redis_proc = None
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
            # The chart's URL, host swapped for the local server, $(REDIS_PASSWORD) expanded
            # from the Secret-provided variable the way the kubelet does it.
            raw = re.sub(r"^rediss?://([^@/]*@)?[^/]+/", rf"redis://\g<1>127.0.0.1:{rport}/",
                         raw)  # the local server speaks plain TCP
            env["REDIS_PASSWORD"] = password
            env["TMC_REDIS_URL"] = raw.replace("$(REDIS_PASSWORD)", password)
        # Volumes: every mount is a tmpfs owned by the pod user, except a PVC-backed base,
        # which is prepared here (as root, like an operator would) and bind-mounted read-only.
        mounts = server.get("volumeMounts") or []
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        init = next((c for c in spec.get("initContainers") or [] if c["name"] == "base-init"),
                    None)
        host_base = work / "base"
        if init is None:
            base_dir = env["TMC_BASE_DIR"]
            rel = Path(base_dir).relative_to(next(m["mountPath"] for m in mounts
                                                  if m["name"] == "base"))
            subprocess.run([sys.executable, "-m", "app.cli", "base", "init", "--preset",
                            "minilm", "--out", str(host_base / rel)], check=True, cwd=dc.ROOT,
                           env={**os.environ, "PYTHONPATH": str(dc.ROOT)},
                           stdout=subprocess.DEVNULL)
            # `tmc base init` writes theta0.safetensors with mode 0600: a base prepared by
            # another user must be made readable for the pod user (see helm/tmc/README.md).
            subprocess.run(["chmod", "-R", "a+rX", str(host_base)], check=True)
        script = ["set -e", "mount --bind / /", "mount -o remount,bind,ro /",
                  f"mount -t tmpfs -o uid={uid},gid={gid},mode=0755 tmpfs /mnt"]
        for m in sorted(mounts, key=lambda m: m["mountPath"]):
            target = m["mountPath"] if m["mountPath"] == "/tmp" else PREFIX + m["mountPath"]
            if target == "/tmp":
                continue
            script.append(f"mkdir -p {shlex.quote(target)}")
            if m["name"] == "base" and init is None:
                script.append(f"mount --bind {shlex.quote(str(host_base))} {shlex.quote(target)}")
                script.append(f"mount -o remount,bind,ro {shlex.quote(target)}")
            else:
                kind = next(iter(k for k in volumes.get(m["name"], {}) if k != "name"), "vct")
                script.append(f"mount -t tmpfs -o uid={uid},gid={gid},mode=0755 tmpfs "
                              f"{shlex.quote(target)}  # {m['name']}: {kind}")
        # This dev machine's Python lives under /root (mode 0700), which the pod user cannot
        # traverse: expose just that tree (an artefact of the host; the image has /usr/local).
        real_python = os.path.realpath(sys.executable)
        if real_python.startswith("/root/"):
            tree = "/root/" + real_python.split("/")[2]
            script += ["mkdir -p /mnt/.pytree", f"mount --bind {tree} /mnt/.pytree",
                       "mount -t tmpfs -o mode=0755 tmpfs /root", f"mkdir -p {tree}",
                       f"mount --bind /mnt/.pytree {tree}"]
        # /tmp last: the prepared base directory lives under the host's /tmp.
        script.append(f"mount -t tmpfs -o uid={uid},gid={gid},mode=1777 tmpfs /tmp")
        for k in ("TMC_BASE_DIR", "TMC_HOME", "TMC_REGISTRY_DIR", "TMC_BLOB_CACHE_DIR"):
            if k in env:
                env[k] = PREFIX + env[k]
        if init is not None:
            # The init container: its own env and command, as the pod user, then the base
            # volume becomes read-only for the server (its mount is readOnly in the pod).
            ienv = {e["name"]: str(e["value"]) for e in init.get("env") or []}
            ienv["BASE_OUT"] = PREFIX + ienv["BASE_OUT"]
            cmd = [str(a) for a in init["command"] + init["args"]]
            py_bin = shlex.quote(str(Path(sys.executable).parent))
            script.append("env " + " ".join(shlex.quote(f"{k}={v}") for k, v in ienv.items())
                          + f" PATH={py_bin}:$PATH setpriv --reuid={uid} "
                          f"--regid={gid} --clear-groups "
                          + " ".join(shlex.quote(a.replace("exec tmc ", "exec python -m app.cli "))
                                     for a in cmd))
            base_mount = PREFIX + next(m["mountPath"] for m in mounts if m["name"] == "base")
            script.append(f"mount -o remount,ro {shlex.quote(base_mount)}")
        serve = [sys.executable, "-m", "app.cli", *[str(a) for a in server["args"]]]
        serve[serve.index("--port") + 1] = str(port)
        serve[serve.index("--host") + 1] = "127.0.0.1"  # the smoke test stays on loopback
        env["TMC_HOST"] = "127.0.0.1"
        script.append(f"cd /tmp && exec setpriv --reuid={uid} --regid={gid} --clear-groups "
                      + " ".join(shlex.quote(a) for a in serve))
        child_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(dc.ROOT),
                     "PYTHONDONTWRITEBYTECODE": "1", **env}
        print("smoke: pod env:", " ".join(f"{k}={v}" for k, v in sorted(env.items())
                                          if "TOKEN" not in k and "REDIS" not in k))
        t0 = time.monotonic()
        with open(work / "pod.log", "w") as log_file:
            pod = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                                    "\n".join(script)], env=child_env, cwd="/",
                                   stdout=log_file, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        status = 0
        while time.monotonic() - t0 < args.startup_timeout:
            if pod.poll() is not None:
                print((work / "pod.log").read_text()[-4000:])
                sys.exit(f"smoke: server exited with {pod.returncode} during startup")
            try:
                status, _ = get(url + "/healthz", 2)
                if status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        print(f"smoke: /healthz {status} after {time.monotonic() - t0:.1f}s")
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
        cli_env = {**os.environ, "PYTHONPATH": str(dc.ROOT),
                   "TMC_INFERENCE_TOKEN": env.get("TMC_INFERENCE_TOKEN", "")}
        if not cli_env["TMC_INFERENCE_TOKEN"]:
            cli_env.pop("TMC_INFERENCE_TOKEN")
        cli_env["TMC_ADMIN_TOKEN"] = admin_token
        failures += push_component(url, work, cli_env)

        def tmc(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "app.cli", *argv], cwd=dc.ROOT,
                                  env=cli_env, capture_output=True, text=True)

        # The chart's own `helm test` script: readyz, then one `tmc predict --all`.
        pred = run_helm_test(docs, url, work, cli_env)
        print(f"smoke: helm test script -> exit {pred.returncode}: "
              f"{(pred.stdout + pred.stderr).strip()[-600:]}")
        failures += pred.returncode != 0 or "smoke-1@" not in pred.stdout
        forget = tmc("forget", "--server", url, "smoke-1")
        print(f"smoke: tmc forget smoke-1 -> exit {forget.returncode}: "
              f"{(forget.stdout or forget.stderr).strip()[:200]}")
        failures += forget.returncode != 0
        t1 = time.monotonic()
        os.kill(pod.pid, signal.SIGTERM)  # sh exec'd into unshare's child chain: forward
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
        log = (work / "pod.log").read_text()
        for bad in ("Read-only file system", "Permission denied", "Traceback"):
            if bad in log:
                print(f"smoke: pod log mentions {bad!r}:\n{log[-3000:]}")
                failures += 1
        print(f"smoke {'passed' if not failures else 'FAILED'} ({vs.name})")
        return 1 if failures else 0
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
