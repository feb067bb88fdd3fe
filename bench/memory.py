"""Memory of a serving replica while components come and go.

    python -m bench.memory [--quick]

`tmc serve` runs as a subprocess (effnet-lite0 64×64 with the last 2 MBConv blocks in the
tangent region, so that one component is 6 MB and 50 of them dominate the noise; the device
cache budget TMC_CACHE_BYTES is raised to 4 GiB so nothing is evicted). After a warm-up (a
throwaway component added, used and forgotten, so that the first linearized forward's own
allocations are in the baseline), components are pushed through the admin API up to 1, 10
and 50; after each milestone, one request composes all of them (mean weights), which loads
every component tangent into the device cache and caches the composed Δ. Then every
component is forgotten (DELETE). The server's resident set size (VmRSS, read with psutil)
is taken at each stage, next to the exact tensor accounting of /metrics (``tmc_cache_bytes``).

glibc does not always return freed heap memory to the OS, so after forgetting, the server is
asked (SIGUSR1, handled by this module's ``--serve-child`` wrapper around `tmc serve`) to call
``malloc_trim(0)``, and RSS is read again; both figures are reported. The whole run is done
twice: with the default allocator settings, and with a fixed glibc mmap threshold
(``MALLOC_MMAP_THRESHOLD_``, an environment variable a deployment can set) under which large
tensors are mmapped and go back to the OS as soon as they are freed.
On CUDA the device's allocated bytes would be the figure to watch; this CPU run has none.
Results: bench/results/memory[_quick].json and .png.
"""

# ruff: noqa: E402
from __future__ import annotations

import os

# Shared 2-core machine: spinning OpenMP workers collapse throughput under competition.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import argparse
import ctypes
import ctypes.util
import signal
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import torch

from bases import init_base, load_base, make_spec
from bench import common, processes, scrape
from tangent import encode_component

NAME = "memory"
BASE_OPTIONS = {"image_size": 64, "tangent_blocks": 2}
MILESTONES = (1, 10, 50)
TRIM_MARKER_ENV = "TMC_BENCH_TRIM_MARKER"
# Each variant is the same run with extra server environment. glibc raises its mmap threshold
# dynamically when a large mmapped block is freed, after which tensors of that size come from
# the heap and are not returned to the OS on free; a fixed threshold turns that off.
VARIANTS: dict[str, dict[str, str]] = {
    "default": {},
    "MALLOC_MMAP_THRESHOLD_=131072": {"MALLOC_MMAP_THRESHOLD_": "131072"},
}


# -- the server side: `tmc serve` that trims its heap on SIGUSR1 -------------------------------
def serve_child() -> int:
    """`tmc serve`, plus: on SIGUSR1 call malloc_trim(0) and append the result to a file."""
    marker = Path(os.environ[TRIM_MARKER_ENV])
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")

    def trim(signum: int, frame: Any) -> None:
        released = libc.malloc_trim(0)
        with marker.open("a") as f:
            f.write(f"{released}\n")

    signal.signal(signal.SIGUSR1, trim)
    from cli.main import main as tmc_main

    return tmc_main(["serve"])


def request_trim(server: processes.Server, marker: Path, timeout_s: float = 30.0) -> bool:
    before = _lines(marker)
    server.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _lines(marker) > before:
            return True
        time.sleep(0.05)
    return False


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


# -- the client side ---------------------------------------------------------------------------
class Probe:
    """Reads the server's RSS and its tensor accounting at named stages."""

    def __init__(self, server: processes.Server, client: httpx.Client, settle_s: float) -> None:
        self.server, self.client, self.settle_s = server, client, settle_s
        self.stages: list[dict[str, Any]] = []

    def read(self, stage: str, components: int, component_bytes: int) -> dict[str, Any]:
        time.sleep(self.settle_s)
        m = scrape.parse_metrics(self.client.get("/metrics").text)
        rss = [processes.rss_bytes(self.server.proc.pid)]
        for _ in range(2):
            time.sleep(0.1)
            rss.append(processes.rss_bytes(self.server.proc.pid))
        row: dict[str, Any] = {
               "stage": stage, "components": components, "rss_bytes": statistics.median(rss),
               "rss_bytes_samples": rss,
               "cache_bytes_components": m.get('tmc_cache_bytes{cache="components"}', 0.0),
               "cache_bytes_compositions": m.get('tmc_cache_bytes{cache="compositions"}', 0.0),
               "registered_component_bytes": component_bytes}
        row["cache_bytes"] = row["cache_bytes_components"] + row["cache_bytes_compositions"]
        self.stages.append(row)
        common.log(f"{stage:24s} RSS {row['rss_bytes'] / 2**20:8.1f} MiB, tensors cached "
                   f"{row['cache_bytes'] / 2**20:7.1f} MiB")
        return row


def random_component(region: dict[str, Any], fingerprint: str, k: int) -> bytes:
    gen = torch.Generator().manual_seed(1000 + k)
    tensors = {n: torch.randn(p.shape, generator=gen) * 1e-2 for n, p in region.items()}
    return encode_component(tensors, fingerprint, {"bench": "memory", "index": k})


def put(client: httpx.Client, server: processes.Server, cid: str, data: bytes) -> None:
    r = client.put(f"/v1/components/{cid}", content=data, headers={
        **server.admin_headers, "Content-Type": "application/octet-stream"})
    r.raise_for_status()


def predict(client: httpx.Client, ids: list[str], image: list[list[int]]) -> None:
    comps = {cid: 1.0 for cid in ids}
    r = client.post("/v1/predict", json={"inputs": [image], "components": comps,
                                         "normalize": "mean", "top_k": 1})
    r.raise_for_status()


def forget(client: httpx.Client, server: processes.Server, cid: str) -> None:
    client.delete(f"/v1/components/{cid}", headers=server.admin_headers).raise_for_status()


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(server: processes.Server, base_dir: Path, marker: Path, registry_dir: Path,
        settle_s: float) -> dict[str, Any]:
    base = load_base(base_dir, check_forward_ad=False)
    images, _ = common.fashion_mnist_images(1)
    image = images[0].tolist()
    with httpx.Client(base_url=server.url, timeout=120.0) as client:
        probe = Probe(server, client, settle_s)
        probe.read("started", 0, 0)
        put(client, server, "warmup", random_component(base.region, base.fingerprint, -1))
        for _ in range(3):
            predict(client, ["warmup"], image)
        forget(client, server, "warmup")
        baseline = probe.read("baseline (after warm-up)", 0, 0)
        sizes: list[int] = []
        for milestone in MILESTONES:
            while len(sizes) < milestone:
                data = random_component(base.region, base.fingerprint, len(sizes))
                put(client, server, f"m{len(sizes)}", data)
                sizes.append(len(data))
            probe.read(f"added {milestone}", milestone, sum(sizes))
            predict(client, [f"m{k}" for k in range(milestone)], image)
            probe.read(f"composed {milestone}", milestone, sum(sizes))
        for k in range(len(sizes)):
            forget(client, server, f"m{k}")
        forgotten = probe.read("forgot all", 0, 0)
        trimmed_ok = request_trim(server, marker)
        trimmed = probe.read("forgot all + malloc_trim", 0, 0)
    return {"stages": probe.stages, "baseline": baseline, "forgotten": forgotten,
            "trimmed": trimmed, "malloc_trim_ran": trimmed_ok,
            "malloc_trim_results": marker.read_text().split() if marker.is_file() else [],
            "registry_dir_bytes_after_forget": dir_bytes(registry_dir),
            "component_file_bytes": sizes[0] if sizes else 0,
            "region_params": sum(torch.Size(p.shape).numel() for p in base.region.values())}


# -- analysis ----------------------------------------------------------------------------------
def analyse(res: dict[str, Any]) -> dict[str, Any]:
    base_rss = res["baseline"]["rss_bytes"]
    for row in res["stages"]:
        row["rss_growth_bytes"] = row["rss_bytes"] - base_rss
        row["rss_growth_over_cache_bytes"] = (row["rss_growth_bytes"] / row["cache_bytes"]
                                              if row["cache_bytes"] else None)
    return res


def make_targets(res: dict[str, Any], prefix: str) -> dict[str, Any]:
    base_rss = res["baseline"]["rss_bytes"]
    last = next(r for r in res["stages"] if r["stage"] == f"composed {MILESTONES[-1]}")
    growth = last["rss_growth_bytes"]
    t = {
        f"RSS growth after composing {MILESTONES[-1]} / tensor bytes cached": common.target(
            last["rss_growth_over_cache_bytes"], 1.2, "<=",
            f"growth {growth / 2**20:.1f} MiB; tmc_cache_bytes {last['cache_bytes'] / 2**20:.1f}"
            f" MiB ({MILESTONES[-1]} components + composed Δ's); component files "
            f"{last['registered_component_bytes'] / 2**20:.1f} MiB"),
        "RSS after forgetting all vs baseline (relative)": common.target(
            (res["forgotten"]["rss_bytes"] - base_rss) / base_rss, 0.05, "<=",
            "no malloc_trim; negative = below the baseline"),
        "RSS after forgetting all + malloc_trim vs baseline (relative)": common.target(
            (res["trimmed"]["rss_bytes"] - base_rss) / base_rss, 0.05, "<=",
            "malloc_trim(0) inside the server" + ("" if res["malloc_trim_ran"]
                                                  else " (did NOT run)")),
        "tensor bytes cached after forgetting all": common.target(
            res["forgotten"]["cache_bytes"], 0.0, "<=", "tmc_cache_bytes, exact"),
    }
    return {f"{prefix}: {k}": v for k, v in t.items()}


def plot(variants: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(11, 4.5))
    for name, res in variants.items():
        stages = res["stages"]
        xs = list(range(len(stages)))
        ax.plot(xs, [s["rss_growth_bytes"] / 2**20 for s in stages], marker="o",
                label=f"server RSS − baseline, {name}")
    ax.plot(xs, [s["cache_bytes"] / 2**20 for s in stages], marker="s", color="black",
            linestyle="--", label="tensor bytes cached (tmc_cache_bytes)")
    ax.plot(xs, [1.2 * s["cache_bytes"] / 2**20 for s in stages], linestyle=":",
            color="grey", label="1.2 × tensor bytes")
    ax.set_xticks(xs, [s["stage"] for s in stages], rotation=25, ha="right", fontsize=8)
    ax.set(ylabel="MiB over the baseline", title="tmc serve memory while adding, composing "
           "and forgetting components (effnet-lite0, 6 MB each)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="shorter settling pauses, default allocator settings only")
    ap.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_child:
        return serve_child()
    started = time.perf_counter()
    info = common.machine("cpu")
    info["cuda"] = torch.cuda.is_available()
    settle = 0.3 if args.quick else 1.0
    variants: dict[str, Any] = {}
    targets: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tmc-bench-memory-") as tmp:
        base_dir = Path(tmp) / "base"
        init_base(base_dir, make_spec("effnet-lite0", options=BASE_OPTIONS))
        chosen = {"default": VARIANTS["default"]} if args.quick else VARIANTS
        for i, (name, extra_env) in enumerate(chosen.items()):
            common.log(f"variant {name}")
            work, marker = Path(tmp) / f"server{i}", Path(tmp) / f"trim{i}.log"
            env = {"TMC_CACHE_BYTES": str(4 << 30), TRIM_MARKER_ENV: str(marker), **extra_env}
            command = [sys.executable, "-m", "bench.memory", "--serve-child"]
            with processes.tmc_server(base_dir, work, env=env, command=command) as server:
                variants[name] = analyse(run(server, base_dir, marker, work / "registry",
                                             settle))
            variants[name]["server_env"] = extra_env
            targets.update(make_targets(variants[name], name))
    settings = {"base": {"preset": "effnet-lite0", **BASE_OPTIONS}, "milestones": MILESTONES,
                "server_env": {"TMC_CACHE_BYTES": "4 GiB (no eviction)"},
                "component": "random float32 Δ over the whole region",
                "rss": "VmRSS of the server process, median of 3 reads after a settle pause",
                "settle_s": settle, "variants": {k: VARIANTS[k] for k in variants}}
    results = {"variants": variants}
    common.finish(NAME, args.quick, info, settings, results, targets, started,
                  partial(plot, variants))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
