"""The Dockerfile facts about THIS project (the generic ones are hadolint's and checkov's).

Hand-written, each because no tool knows it:
- the base image, with the global ARG defaults expanded, is pinned by tag: checkov's
  CKV_DOCKER_7 and hadolint's DL3006/DL3007 do not expand ``FROM ${PYTHON_IMAGE}``;
- builder + runtime stages (the runtime gets the venv, not the compilers);
- the final stage runs ``tmc serve`` (ENTRYPOINT tmc, CMD serve, no --workers: one uvicorn
  worker per container), as the chart's numeric podSecurityContext.runAsUser, EXPOSEs the
  chart's server.port, and its HEALTHCHECK calls /healthz, a GET route of the app;
- ENV/ARG ``TMC_*`` names are settings the app reads; no TOKEN/PASSWORD/SECRET/API_KEY name is
  baked into the image; an ARG selects the torch build;
- ``.dockerignore`` admits exactly what the COPY lines use: every COPY source is admitted, no
  tracked file is sent that no COPY uses, and state, secrets and tests stay out.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import deploy_check_app as app_facts
import yaml
from deploy_check_rules import Report

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
VALUES = ROOT / "helm" / "tmc" / "values.yaml"
MUST_STAY_OUT = (".git/HEAD", ".venv/bin/python", ".tools/helm/helm", ".tmc/registry/db",
                 "app/__pycache__/x.pyc", "tests/test_x.py", ".env", "secrets/admin.key")


@dataclass
class Stage:
    base: str
    name: str | None
    ops: list[tuple[str, str]] = field(default_factory=list)


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.lstrip().startswith("#") or (not buf and not line.strip()):
            continue
        buf += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            op, _, rest = buf.strip().partition(" ")
            out.append((op.upper(), rest.strip()))
            buf = ""
    return out


def parse_stages(ins: list[tuple[str, str]]) -> tuple[list[Stage], dict[str, str]]:
    stages: list[Stage] = []
    global_args: dict[str, str] = {}
    for op, rest in ins:
        if op == "FROM":
            m = re.match(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            assert m, rest
            stages.append(Stage(m.group(1), m.group(2)))
        elif stages:
            stages[-1].ops.append((op, rest))
        elif op == "ARG":
            k, _, v = rest.partition("=")
            global_args[k] = v.strip('"')
    return stages, global_args


def final_stage_ops(stages: list[Stage]) -> list[tuple[str, str]]:
    """The effective instructions of the last stage, following its FROM chain."""
    chain: list[Stage] = []
    cur: Stage | None = stages[-1]
    while cur is not None:
        chain.insert(0, cur)
        cur = next((p for p in stages if p.name == cur.base), None)
    return [o for st in chain for o in st.ops]


def check_bases(stages: list[Stage], global_args: dict[str, str], rep: Report) -> None:
    names = {s.name for s in stages if s.name}
    for s in stages:
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)),
                       s.base)
        if image in names:
            continue
        if "@sha256:" not in image and (":" not in image or image.endswith(":latest")):
            rep.error("Dockerfile", f"base image {image!r} is not pinned by tag")
    if len([s for s in stages if s.base not in names]) < 2:
        rep.error("Dockerfile", "not multi-stage (builder + slim runtime expected)")


def check_serve_stage(ops: list[tuple[str, str]], text: str, rep: Report) -> None:
    """The final stage runs `tmc serve` as the chart's user, on the chart's port."""
    values = yaml.safe_load(VALUES.read_text())
    uid = values["podSecurityContext"]["runAsUser"]
    users = [r for o, r in ops if o == "USER"]
    if not users or users[-1].split(":")[0] != str(uid):
        rep.error("Dockerfile", f"final stage USER {users[-1:]} is not the chart's numeric "
                                f"podSecurityContext.runAsUser {uid}")
    routes, _admin = app_facts.http_routes()
    checks = [r for o, r in ops if o == "HEALTHCHECK"]
    paths = re.findall(r"https?://[^/\s\"']+(/[^\s\"')]*)", checks[-1]) if checks else []
    if not paths or "GET" not in routes.get(paths[0], frozenset()) or paths[0] != "/healthz":
        rep.error("Dockerfile", f"final stage HEALTHCHECK on {paths[:1]}: expected the app's "
                                "GET /healthz")
    entry = [r for o, r in ops if o == "ENTRYPOINT"]
    cmd = [r for o, r in ops if o == "CMD"]
    if not entry or json.loads(entry[-1])[:1] != ["tmc"]:
        rep.error("Dockerfile", f"ENTRYPOINT must be tmc (got {entry[-1:]})")
    if not cmd or json.loads(cmd[-1])[:1] != ["serve"]:
        rep.error("Dockerfile", f"CMD must be serve ... (got {cmd[-1:]})")
    if "--workers" in text:
        rep.error("Dockerfile", "one uvicorn worker per container: no --workers")
    exposed = " ".join(r for o, r in ops if o == "EXPOSE").split()
    if str(values["server"]["port"]) not in exposed:
        rep.error("Dockerfile", f"EXPOSE {exposed} does not include the chart's server.port "
                                f"{values['server']['port']}")


def check_image_env(ins: list[tuple[str, str]], rep: Report) -> None:
    env_names = app_facts.settings_module().ENV_NAMES
    names: set[str] = set()
    for op, rest in ins:
        if op in ("ENV", "ARG"):
            names |= set(re.findall(r"(?:^|\s)([A-Za-z_]\w*)(?:=|\s|$)", rest))
    for name in sorted(names):
        if re.search(r"TOKEN|PASSWORD|SECRET|API_KEY", name):
            rep.error("Dockerfile", f"{name} is set in the image: secrets must come at run time")
        if name.startswith("TMC_") and name not in env_names:
            rep.error("Dockerfile", f"ENV {name} is not a setting the app reads")
    if not any(o == "ARG" and r.startswith("TORCH_") for o, r in ins):
        rep.error("Dockerfile", "no build argument selects the torch build")


def check_dockerfile(rep: Report, text: str | None = None) -> None:
    """The repository's Dockerfile, or ``text`` in its place (the self-tests' mutations)."""
    text = DOCKERFILE.read_text() if text is None else text
    ins = dockerfile_instructions(text)
    stages, global_args = parse_stages(ins)
    check_bases(stages, global_args, rep)
    check_serve_stage(final_stage_ops(stages), text, rep)
    check_image_env(ins, rep)
    sources = copy_sources(ins)
    check_build_context(sources, rep)
    rep.ok(f"Dockerfile: {len(stages)} stages, runs `tmc serve`, context = {len(sources)} COPY "
           "sources")


# ---------------------------------------------------------------------------- .dockerignore
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
        tokens = re.split(r"(\*\*/|\*\*|\*|\?)", pat)
        table = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
        return "^" + "".join(table.get(t, re.escape(t)) for t in tokens) + "(?:/.*)?$"

    def excluded(self, path: str) -> bool:
        result = False
        for neg, rx in self.rules:
            if rx.match(path):
                result = not neg
        return result


def copy_sources(ins: list[tuple[str, str]]) -> list[str]:
    sources: list[str] = []
    for op, rest in ins:
        if op in ("COPY", "ADD") and "--from=" not in rest:
            parts = [p for p in rest.split() if not p.startswith("--")]
            sources += [p.rstrip("/") or "." for p in parts[:-1]]
    return sources


def git_files() -> list[str]:
    proc = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:  # not a git checkout: walk the tree
        return [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]
    return [f for f in proc.stdout.splitlines() if (ROOT / f).exists()]


def check_build_context(sources: list[str], rep: Report) -> None:
    """COPY sources get in, nothing else does."""
    if not DOCKERIGNORE.exists():
        rep.error("Dockerfile", ".dockerignore is missing")
        return
    ignore = DockerIgnore(DOCKERIGNORE.read_text())
    tracked = git_files()
    for src in sources:
        inside = [f for f in tracked if f == src or f.startswith(src + "/")]
        if not inside and not (ROOT / src).exists():
            rep.error("Dockerfile", f"COPY source {src!r} does not exist in the repository")
            continue
        if ignore.excluded(src):
            rep.error("Dockerfile", f"COPY source {src!r} is excluded by .dockerignore")
        for f in inside:
            if ignore.excluded(f) and not f.endswith(".pyc"):
                rep.error("Dockerfile", f"{f} (under COPY {src}) is excluded by .dockerignore")
    for f in tracked:
        if not ignore.excluded(f) and not any(f == s or f.startswith(s + "/") for s in sources):
            rep.error("Dockerfile", f"{f} is sent in the build context but no COPY uses it "
                                    "(add it to .dockerignore)")
    for probe in MUST_STAY_OUT:
        if not ignore.excluded(probe):
            rep.error("Dockerfile", f".dockerignore lets {probe} into the build context")
