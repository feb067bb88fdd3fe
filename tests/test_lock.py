"""The lock files agree with pyproject.toml and the Dockerfile (issue 15: reproducible builds).

``make lock`` writes requirements/serve.lock (``[project.dependencies]``) and
requirements/train.lock (the same plus the ``data`` extra) for Linux x86_64 / Python 3.11. The
Dockerfile installs torch==TORCH_VERSION first from its own index, then each lock with
``--require-hashes --no-deps``. So, checked here from the files alone (no network):

- every dependency pyproject declares for that image is locked, at a version its specifier
  admits, except torch, which no lock may contain (it would fight the torch index's build);
- every requirement in a lock is ``name==version`` with at least one ``--hash=sha256:`` (pip
  refuses a whole --require-hashes file over one line without);
- no lock carries torch's CUDA runtime (a new name after a torch bump belongs in
  requirements/torch-cuda.exclude);
- train.lock pins every package of serve.lock at serve.lock's version (one set of libraries for
  training and serving);
- the torch version the locks were resolved against (their header) is the Dockerfile's default,
  and the Dockerfile installs both locks with --require-hashes.

The checker runs on mutated locks too, to show it refuses what it should. Whether a lock is
complete (every dependency of every locked package) is pip's job: the image build ends with
``pip check``.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements"
LOCKS = {"serve": REQUIREMENTS / "serve.lock", "train": REQUIREMENTS / "train.lock"}
EXTRAS = {"serve": (), "train": ("data",)}
CUDA_EXCLUDE = REQUIREMENTS / "torch-cuda.exclude"
DOCKERFILE = ROOT / "Dockerfile"
# The image's platform, for dependency markers (the locks are made for it).
TARGET_ENV = {"python_version": "3.11", "python_full_version": "3.11.11", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython"}
HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}(?:\s|$)")
CUDA_PREFIXES = ("nvidia-", "cuda-", "triton")


@dataclass(frozen=True)
class Pin:
    name: str  # canonical (PEP 503)
    version: str
    hashes: int
    line: str


def lock_entries(text: str) -> list[str]:
    """The lock's requirement entries, each with its continuation lines joined; no comments."""
    entries, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += " " + line.removesuffix("\\").strip()
        if not line.endswith("\\"):
            entries.append(current.strip())
            current = ""
    return entries + ([current.strip()] if current.strip() else [])


def parse_pin(entry: str) -> Pin | str:
    """One entry as a Pin, or the problem with it."""
    spec, _, options = entry.partition(" --")
    match = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", spec.strip())
    if match is None:
        return f"{entry!r} is not name==version: a hash lock pins exact versions"
    hashes = len(HASH.findall("--" + options)) if options else 0
    if hashes == 0:
        return (f"{spec} has no --hash=sha256:<64 hex digits> (pip --require-hashes refuses "
                "the whole file): run `make lock`")
    return Pin(canonicalize_name(match.group(1)), match.group(2), hashes, entry)


def parse_lock(text: str) -> tuple[dict[str, Pin], list[str]]:
    pins: dict[str, Pin] = {}
    problems: list[str] = []
    for entry in lock_entries(text):
        pin = parse_pin(entry)
        if isinstance(pin, str):
            problems.append(pin)
        elif pin.name in pins:
            problems.append(f"{pin.name} is locked twice")
        else:
            pins[pin.name] = pin
    return pins, problems


def declared(pyproject: dict[str, object], extras: tuple[str, ...]) -> list[Requirement]:
    """pyproject's dependencies (and those of `extras`) whose markers hold on the image."""
    project = pyproject["project"]
    assert isinstance(project, dict)
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    reqs = [Requirement(line) for line in lines]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(TARGET_ENV)]


def lock_problems(reqs: list[Requirement], lock_text: str) -> list[str]:
    """Everything that makes `lock_text` disagree with `reqs` or unfit for --require-hashes."""
    pins, problems = parse_lock(lock_text)
    for req in reqs:
        name = canonicalize_name(req.name)
        pin = pins.get(name)
        if name == "torch":
            if pin is not None:
                problems.append("torch is locked: the Dockerfile installs it first, from "
                                "TORCH_INDEX_URL (make lock passes --no-emit-package torch)")
        elif pin is None:
            problems.append(f"{req} is not in the lock: run `make lock`")
        elif not req.specifier.contains(pin.version, prereleases=True):
            problems.append(f"{name}=={pin.version} is locked, pyproject wants {req}: "
                            "run `make lock`")
    problems += [f"{name} (torch's CUDA runtime) is locked: add it to {CUDA_EXCLUDE.name}"
                 for name in pins if name.startswith(CUDA_PREFIXES) or name in cuda_excluded()]
    return problems


def cuda_excluded() -> set[str]:
    lines = CUDA_EXCLUDE.read_text().splitlines()
    return {canonicalize_name(ln.strip()) for ln in lines if ln.strip() and not ln.startswith("#")}


def pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def locked_torch_version(lock_text: str) -> str:
    """The TORCH_VERSION `make lock` resolved against, from the header it writes."""
    match = re.search(r"^#\s+make lock TORCH_VERSION=(\S+)$", lock_text, re.M)
    assert match, "the lock header does not say `make lock TORCH_VERSION=...`: run `make lock`"
    return match.group(1)


def dockerfile_logical_lines() -> list[str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


# ------------------------------------------------------------------------------ the real files

@pytest.mark.parametrize("image", sorted(LOCKS))
def test_lock_agrees_with_pyproject(image: str) -> None:
    problems = lock_problems(declared(pyproject(), EXTRAS[image]), LOCKS[image].read_text())
    assert not problems, f"{LOCKS[image].name}:\n" + "\n".join(problems)


def test_train_lock_keeps_serve_versions() -> None:
    serve, _ = parse_lock(LOCKS["serve"].read_text())
    train, _ = parse_lock(LOCKS["train"].read_text())
    differ = [f"{n}: serve {p.version}, train {train[n].version if n in train else 'missing'}"
              for n, p in serve.items() if n not in train or train[n].version != p.version]
    assert not differ, "train.lock must be resolved with -c serve.lock (make lock):\n" + \
        "\n".join(differ)


def test_locks_resolved_against_the_dockerfile_torch() -> None:
    match = re.search(r"^ARG TORCH_VERSION=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert match, "the Dockerfile has no `ARG TORCH_VERSION=<default>`"
    torch_req = next(r for r in declared(pyproject(), ()) if r.name == "torch")
    assert torch_req.specifier.contains(match.group(1)), (match.group(1), str(torch_req))
    for image, path in LOCKS.items():
        assert locked_torch_version(path.read_text()) == match.group(1), (
            f"{path.name} was resolved against another torch than the Dockerfile's "
            f"{match.group(1)}: run `make lock TORCH_VERSION={match.group(1)}` ({image})")


def test_dockerfile_installs_each_lock_with_hashes() -> None:
    installs = [ln for ln in dockerfile_logical_lines() if "pip install" in ln and ".lock" in ln]
    for path in LOCKS.values():
        rel = path.relative_to(ROOT).as_posix()
        using = [ln for ln in installs if f"-r {rel}" in ln]
        assert using, f"the Dockerfile never installs {rel}"
        assert all("--require-hashes" in ln and "--no-deps" in ln for ln in using), using


# ----------------------------------------------------------- the checker refuses bad locks

GOOD = """# This file was autogenerated by uv via the following command:
#    make lock TORCH_VERSION=2.13.0
numpy==2.4.6 \\
    --hash=sha256:{a} \\
    --hash=sha256:{b}
    # via tmc (pyproject.toml)
pillow==13.0.0 \\
    --hash=sha256:{a}
""".format(a="a" * 64, b="b" * 64)
REQS = [Requirement("numpy>=1.26"), Requirement("Pillow>=10"), Requirement("torch>=2.4,<3")]


def test_checker_accepts_a_good_lock() -> None:
    assert lock_problems(REQS, GOOD) == []
    assert locked_torch_version(GOOD) == "2.13.0"


@pytest.mark.parametrize(("mutate", "expected"), [
    (lambda t: t.replace("pillow==13.0.0", "pillow==9.5.0"), "pillow==9.5.0 is locked"),
    (lambda t: t[:t.index("pillow")], "Pillow>=10 is not in the lock"),
    (lambda t: t.replace("pillow==13.0.0 \\\n    --hash=sha256:" + "a" * 64, "pillow==13.0.0"),
     "pillow==13.0.0 has no --hash"),
    (lambda t: t.replace("--hash=sha256:" + "a" * 64 + "\n", "--hash=sha256:abc\n"),
     "pillow==13.0.0 has no --hash"),
    (lambda t: t.replace("numpy==2.4.6", "numpy>=2.4"), "is not name==version"),
    (lambda t: t + "torch==2.13.0 \\\n    --hash=sha256:" + "c" * 64 + "\n", "torch is locked"),
    (lambda t: t + "nvidia-nccl-cu13==2.29.7 \\\n    --hash=sha256:" + "c" * 64 + "\n",
     "nvidia-nccl-cu13 (torch's CUDA runtime) is locked"),
    (lambda t: t + "numpy==2.4.6 \\\n    --hash=sha256:" + "c" * 64 + "\n", "locked twice"),
])
def test_checker_refuses_a_bad_lock(mutate: Callable[[str], str], expected: str) -> None:
    problems = lock_problems(REQS, mutate(GOOD))
    assert any(expected in p for p in problems), problems
