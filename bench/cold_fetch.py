"""Warm-composition latency while another client keeps asking for cold ~100 MB components,
before and after cold fetches moved off the device thread (issue 12, point 4).

    python -m bench.cold_fetch [--quick] [--before REF] [--after REF] [--phase-s S]

Base: the tiny-mlp preset widened to hidden=5120, so that its tangent region (the second
hidden layer and the classifier, 26.3 M float32 values) makes every component ~105 MB:
what a cold composition costs here is the fetch + sha256 + safetensors parse of 105 MB, the
cost issue 12 moves off the device thread. The registry is the default embedded one (SQLite +
blob files in the page cache): no network, so the figures are the CPU cost of a cold
component, a lower bound for a remote store.

Two servers, one after the other, each a real `tmc serve` (uvicorn) on loopback with the same
settings and base: "before", the code of REF (default: the parent of the commit that added
app/fetch.py, checked out with `git worktree add`), which loads a cold component on the
device thread; and "after", this checkout (or REF given with --after, checked out the same
way), which fetches it at admission on the fetch pool.
Each gets the same components over HTTP: a warm composition (2 components) and 4 cold ones.
The device cache is sized (TMC_CACHE_BYTES) to hold 2 composed and 2 component Δs, so the
warm composition stays cached while the cold client, cycling over 4 components with a new
weight each time, always needs a fetch.

Per server, two phases of the same length: "idle" (the warm client alone) and "cold load"
(the warm client, plus one cold client with one request in flight at a time). The warm
client sends one input per request, the next as soon as the answer arrives (closed loop).
Reported: warm p50/p99/max and count per phase, the cold requests' latency and count,
and the server's mean fetch time (after only). Results: bench/results/cold_fetch[_quick].json.
"""

# ruff: noqa: E402
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import argparse
import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from bases import init_base, load_base, make_spec
from bench import common, processes, scrape
from bench.http_load import client_loop, request_bytes
from tangent import encode_component

NAME = "cold_fetch"
WARM = {"w0": 0.5, "w1": 0.5}
COLD = [f"c{i}" for i in range(4)]
FETCH = "tmc_component_fetch_duration_seconds"  # the fetch pool's histogram (after only)


@dataclass(frozen=True)
class Config:
    hidden: int  # tiny-mlp width: the region is hidden² + hidden + 10·hidden + 10 values
    phase_s: float
    warmup_s: float = 2.0


FULL = Config(hidden=5120, phase_s=20.0)
QUICK = Config(hidden=1024, phase_s=4.0, warmup_s=1.0)


# -- setup ---------------------------------------------------------------------------------------
def make_base(out: Path, hidden: int) -> Path:
    init_base(out, make_spec("tiny-mlp", options={"hidden": hidden, "tangent_stages": 2}))
    return out


def component_files(base_dir: Path) -> dict[str, bytes]:
    """The warm and cold components' bytes (random Δ of the whole region), made once."""
    base = load_base(base_dir)
    gen = torch.Generator().manual_seed(0)
    out = {}
    for cid in [*WARM, *COLD]:
        delta = {n: torch.randn(p.shape, generator=gen) * 1e-3 for n, p in base.region.items()}
        out[cid] = encode_component(delta, base.fingerprint, {"bench": NAME, "id": cid})
    return out


def push(server: processes.Server, files: dict[str, bytes]) -> None:
    with httpx.Client(base_url=server.url, timeout=300.0) as client:
        for cid, data in files.items():
            r = client.put(f"/v1/components/{cid}", content=data, headers={
                **server.admin_headers, "Content-Type": "application/octet-stream"})
            r.raise_for_status()


@contextlib.contextmanager
def checkout(ref: str) -> Iterator[Path]:
    """The code of ``ref`` (resolved now) in a temporary git worktree (removed afterwards)."""
    with tempfile.TemporaryDirectory(prefix="tmc-before-") as tmp:
        path = Path(tmp) / "code"
        subprocess.run(["git", "worktree", "add", "--detach", str(path), ref], cwd=common.REPO,
                       check=True, capture_output=True)
        try:
            yield path
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(path)],
                           cwd=common.REPO, check=False, capture_output=True)


def default_before_ref() -> str:
    """The newest commit without app/fetch.py whose code starts on its own: the parent of the
    commit that added app/fetch.py, or the nearest ancestor of it that imports cleanly (during
    issue 12 a module's importer landed a few commits before the module itself, so some of
    those commits do not run alone)."""
    out = subprocess.run(["git", "log", "--diff-filter=A", "--format=%H", "--", "app/fetch.py"],
                         cwd=common.REPO, check=True, capture_output=True, text=True)
    added = out.stdout.split()
    if not added:
        raise SystemExit("app/fetch.py is not in this checkout's history: pass --before REF")
    ancestors = subprocess.run(["git", "rev-list", "--max-count=8", f"{added[-1]}^"],
                               cwd=common.REPO, check=True, capture_output=True, text=True)
    for ref in ancestors.stdout.split():
        with checkout(ref) as code:
            if starts_alone(code):
                return ref
    raise SystemExit("no commit just before app/fetch.py imports on its own: pass --before REF")


def isolated(code: Path, statement: str) -> str:
    """Python source that runs ``statement`` against ``code`` ONLY: this checkout's editable
    install and folder are taken off the import system first, so a module ``code`` lacks
    fails instead of being loaded, silently, from this checkout."""
    return ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if not "
            "getattr(f, '__module__', '').startswith('__editable__')]; "
            f"sys.path[:] = [{str(code)!r}] + [p for p in sys.path "
            f"if p not in ('', {str(common.REPO)!r})]; {statement}")


def starts_alone(code: Path) -> bool:
    """Whether the app of ``code`` imports with nothing of this checkout."""
    probe = subprocess.run([sys.executable, "-c", isolated(code, "import app.main")],
                           cwd=code, capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        common.log(f"{code}: does not import alone: {probe.stderr.strip().splitlines()[-1:]}")
    return probe.returncode == 0


def serve_command(code: Path | None) -> list[str] | None:
    """`tmc serve` from ``code`` (a checkout) alone instead of this one, or None for this one."""
    if code is None:
        return None
    module = "cli.main" if (code / "cli" / "main.py").is_file() else "app.cli"  # older checkouts
    return [sys.executable, "-c", isolated(code, f"from {module} import main; sys.exit(main())"),
            "serve"]


# -- clients -------------------------------------------------------------------------------------
@dataclass
class Samples:
    """One client's answers in a phase: latencies of the requests sent after ``start`` (the
    one in flight at the deadline included: a cold request outlives its phase), every error.
    Unlike http_load's window, which counts answers completed inside it."""

    start: float  # time.perf_counter
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def record(self, status: int, body: bytes, sent: float, answered: float) -> None:
        if status != 200:
            self.errors.append(f"{status}: {body[:200]!r}")
        elif sent >= self.start:
            self.latencies.append(answered - sent)

    def summary(self) -> dict[str, Any]:
        lat, ms = self.latencies, common.ms
        return {"requests": len(lat), "errors": len(self.errors),
                "first_error": self.errors[0] if self.errors else None,
                **{f"p{q}_ms": ms(common.percentile(lat, q)) for q in (50, 90, 99)},
                "max_ms": ms(max(lat, default=None))}


def cold_bodies(port: int, x: list[float]) -> list[bytes]:
    """Compositions of one cold component each, cycling over 4, a new weight every time (never
    a cached composition; the component left the 2-entry component cache 2 requests ago)."""
    return [request_bytes(port, {"inputs": [x], "components": {COLD[k % len(COLD)]:
                                                                 0.5 + 0.01 * k}})
            for k in range(200)]


async def phase(port: int, cfg: Config, with_cold: bool) -> dict[str, Any]:
    x = torch.randn(64, generator=torch.Generator().manual_seed(1)).tolist()
    warm = [request_bytes(port, {"inputs": [x], "components": WARM})]
    now = time.perf_counter()
    start, deadline = now + cfg.warmup_s, now + cfg.warmup_s + cfg.phase_s
    warm_s, cold_s = Samples(start), Samples(start)
    clients = [client_loop(port, warm, deadline, warm_s)]
    if with_cold:
        clients.append(client_loop(port, cold_bodies(port, x), deadline, cold_s))
    await asyncio.gather(*clients)
    out = {"warm": warm_s.summary()}
    if with_cold:
        out["cold"] = cold_s.summary()
    return out


# -- one server ----------------------------------------------------------------------------------
def measure(name: str, code: Path | None, base_dir: Path, files: dict[str, bytes],
            cache_bytes: int, cfg: Config, workdir: Path) -> dict[str, Any]:
    env = {"TMC_CACHE_BYTES": str(cache_bytes), "TMC_MAX_BATCH_SIZE": "32"}
    if code is not None:
        env["PYTHONPATH"] = str(code)
    with processes.tmc_server(base_dir, workdir / name, env=env,
                           command=serve_command(code)) as server:
        push(server, files)
        idle = asyncio.run(phase(server.port, cfg, with_cold=False))
        m0 = scrape.parse_metrics(httpx.get(f"{server.url}/metrics").text)
        loaded = asyncio.run(phase(server.port, cfg, with_cold=True))
        m1 = scrape.parse_metrics(httpx.get(f"{server.url}/metrics").text)
    result = {"code": "this checkout" if code is None else str(code), "idle": idle,
              "cold_load": loaded,
              "fetches_off_device": scrape.delta(m0, m1, f"{FETCH}_count"),
              "fetch_ms_mean": scrape.histogram_mean_ms(m0, m1, FETCH),
              "has_fetch_pool": f"{FETCH}_count" in m1}
    _log(name, result)
    return result


def _log(name: str, r: dict[str, Any]) -> None:
    idle, warm, cold = r["idle"]["warm"], r["cold_load"]["warm"], r["cold_load"]["cold"]
    common.log(f"{name}: warm idle p50 {idle['p50_ms']:.1f} / p99 {idle['p99_ms']:.1f} ms; "
               f"under cold load p50 {warm['p50_ms']:.1f} / p99 {warm['p99_ms']:.1f} / max "
               f"{warm['max_ms']:.1f} ms ({warm['requests']} warm, {cold['requests']} cold "
               f"requests, cold p50 {cold['p50_ms'] or 0:.0f} ms, errors "
               f"{warm['errors'] + cold['errors']})")


# -- main ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small base and short phases")
    parser.add_argument("--before", default=None,
                        help="git ref of the 'before' code (default: the parent of the commit "
                        "that added app/fetch.py)")
    parser.add_argument("--after", default=None,
                        help="git ref of the 'after' code (default: this checkout as it is)")
    parser.add_argument("--phase-s", type=float, default=None, help="seconds per phase")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    if args.phase_s is not None:
        cfg = Config(cfg.hidden, args.phase_s, cfg.warmup_s)
    started = time.perf_counter()
    ref = args.before or default_before_ref()
    machine = common.machine()
    with tempfile.TemporaryDirectory(prefix="tmc-cold-fetch-") as tmp:
        work = Path(tmp)
        base_dir = make_base(work / "base", cfg.hidden)
        files = component_files(base_dir)
        size = max(len(b) for b in files.values())
        cache_bytes = int(4.2 * size)  # 2 composed + 2 component Δs
        common.log(f"components: {len(files)} x {size / 1e6:.0f} MB; before = {ref}")
        with checkout(ref) as before_code:
            before = measure("before", before_code, base_dir, files, cache_bytes, cfg, work)
        if before["has_fetch_pool"]:  # before the 'after' server runs for nothing
            raise SystemExit("the 'before' server already has the fetch pool: --before must "
                             "name a commit without app/fetch.py")
        with checkout(args.after) if args.after else contextlib.nullcontext() as after_code:
            after = measure("after", after_code, base_dir, files, cache_bytes, cfg, work)
    results: dict[str, Any] = {
        "before": {**before, "ref": ref}, "after": {**after, "ref": args.after},
        "component_bytes": size, "cache_bytes": cache_bytes,
        "warm_p99_ms_under_cold_load": {"before": before["cold_load"]["warm"]["p99_ms"],
                                        "after": after["cold_load"]["warm"]["p99_ms"]},
        "warm_p99_ms_idle": {"before": before["idle"]["warm"]["p99_ms"],
                             "after": after["idle"]["warm"]["p99_ms"]}}
    if not after["has_fetch_pool"]:
        raise SystemExit("the 'after' server lacks the fetch pool: --after must name a commit "
                         "with app/fetch.py")
    after_p99, before_p99 = (results["warm_p99_ms_under_cold_load"][k]
                             for k in ("after", "before"))
    ratio = after_p99 / before_p99 if after_p99 and before_p99 else None
    targets = {"warm_p99_under_cold_load_after_over_before": common.target(
        ratio, 0.5, "<=", "warm p99 while cold components are fetched: at most half of "
        "before (cold bytes no longer read on the device thread)")}
    settings = {"hidden": cfg.hidden, "phase_s": cfg.phase_s, "warmup_s": cfg.warmup_s,
                "warm_composition": WARM, "cold_components": COLD,
                "registry": "embedded (SQLite + blob files)"}
    common.finish(NAME, args.quick, machine, settings, results, targets, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
