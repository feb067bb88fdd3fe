"""Serving under load: `tmc serve` (uvicorn, real HTTP) against closed-loop clients.

    python -m bench.serving [--quick] [--duration S] [--concurrency 1,8,32,64]

A base (effnet-lite0, 64×64, region R2) and 8 random components are set up in a temporary
folder; `tmc serve` runs as a subprocess on a free loopback port with its default batching
(TMC_MAX_BATCH_SIZE 32, TMC_MAX_QUEUE_DELAY_MS 2). Each client sends one Fashion-MNIST
28×28 image (base64 PNG) per POST /v1/predict and sends the next request as soon as the
answer arrives (closed loop), over its own keep-alive connection, for a fixed duration after
a warm-up. Three workloads per concurrency, interleaved: homogeneous (every client the same
2-component composition), mixed (8 distinct 2-component compositions among the clients), and
homogeneous with 8 images per request (shows which costs are per request, not per input).
Measured: p50/p99 latency, throughput (inputs/s), mean device batch size and groups per batch
(from /metrics deltas), server and client CPU use.

The offline baseline is the same linearized forward, ``Executor.run`` on the same base and
composition, in this process, at batch 1..32, timed in interleaved rounds before and after
the load phase; the service is compared with it at the mean batch size the service formed.
The load generator is a minimal asyncio HTTP/1.1 client (pre-built requests, responses read
by Content-Length) so that it takes as little of the shared CPU as possible; it still runs
on the same cores as the server, and its CPU use is reported.
Results: bench/results/serving[_quick].json and .png.
"""

# ruff: noqa: E402
from __future__ import annotations

import os

# Shared 2-core machine: spinning OpenMP workers collapse throughput under competition.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import argparse
import asyncio
import base64
import json
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import torch

from app.composition import make_plan
from app.executor import Executor
from bases import init_base, load_base, make_spec
from bench import common, processes
from bench.http_load import exchange, request_bytes, rotate, run_level
from registry import ResolvedItem
from tangent import encode_component

NAME = "serving"
N_COMPONENTS = 8
OFFLINE_BATCHES = (1, 2, 4, 8, 16, 24, 32)
BASE_OPTIONS = {"image_size": 64, "tangent_blocks": 0}


# -- setup -------------------------------------------------------------------------------------
def compositions() -> list[dict[str, float]]:
    """8 distinct 2-component compositions; the first one is the homogeneous workload's."""
    return [{f"c{j}": 0.5, f"c{(j + 1) % N_COMPONENTS}": 0.5} for j in range(N_COMPONENTS)]


def push_components(server: processes.Server, region: dict[str, Any], fingerprint: str
                    ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """PUT 8 random components: (digest -> tensors for the offline executor, id -> digest)."""
    gen = torch.Generator().manual_seed(0)
    by_digest: dict[str, dict[str, torch.Tensor]] = {}
    ids: dict[str, str] = {}
    with httpx.Client(base_url=server.url, timeout=60.0) as client:
        for k in range(N_COMPONENTS):
            tensors = {n: torch.randn(p.shape, generator=gen) * 1e-2 for n, p in region.items()}
            data = encode_component(tensors, fingerprint, {"bench": "serving", "index": k})
            r = client.put(f"/v1/components/c{k}", content=data, headers={
                **server.admin_headers, "Content-Type": "application/octet-stream"})
            r.raise_for_status()
            by_digest[r.json()["digest"]] = tensors
            ids[f"c{k}"] = r.json()["digest"]
    return by_digest, ids


# workload -> (inputs per request, distinct compositions among the clients)
MODES = {"homogeneous": (1, 1), "mixed": (1, N_COMPONENTS), "homogeneous, 8 per request": (8, 1)}


def run_load(server: processes.Server, images_b64: list[str], levels: list[int],
             warmup_s: float, duration_s: float) -> dict[str, Any]:
    comps = compositions()

    def bodies(comp: dict[str, float], per_request: int) -> list[bytes]:
        n = len(images_b64)
        return [request_bytes(server.port, {
            "inputs": [images_b64[(j * per_request + i) % n] for i in range(per_request)],
            "components": comp, "top_k": 1}) for j in range(n)]

    asyncio.run(prime(server, [bodies(c, 1) for c in comps]))
    out: dict[str, Any] = {mode: {} for mode in MODES}
    for conc in levels:
        for mode, (per_request, distinct) in MODES.items():
            reqs = [bodies(c, per_request) for c in comps[:distinct]]
            per_client = [rotate(reqs[i % distinct], i) for i in range(conc)]
            res = asyncio.run(run_level(server, per_client, per_request, warmup_s, duration_s))
            out[mode][str(conc)] = res
            lat = res["latency_ms"]
            common.log(f"{mode:26s} c={conc:2d}: {res['throughput_inputs_per_s']:.1f} inputs/s,"
                       f" p50 {lat['p50'] or 0:.1f} ms, p99 {lat['p99'] or 0:.1f} ms, "
                       f"batch {res['mean_batch_size']}, errors {res['errors']}")
    return out


async def prime(server: processes.Server, reqs: list[list[bytes]]) -> None:
    """One request per composition (composes and caches each Δ); checks the answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        for j, per_comp in enumerate(reqs):
            status, body = await exchange(reader, writer, per_comp[0])
            if status != 200:
                raise RuntimeError(f"composition {j}: HTTP {status}: {body[:300]!r}")
            prov = json.loads(body)["provenance"]
            ids = sorted(c["id"] for c in prov["components"])
            if ids != sorted(compositions()[j]) or not prov["composition_digest"]:
                raise RuntimeError(f"composition {j}: unexpected provenance {prov}")
    finally:
        writer.close()


# -- offline baseline --------------------------------------------------------------------------
def offline_cases(base_dir: Path, by_digest: dict[str, dict[str, torch.Tensor]],
                  ids: dict[str, str], images: list[Any]) -> list[common.Case]:
    base = load_base(base_dir)
    executor = Executor(base.net, by_digest.__getitem__, torch.device("cpu"), torch.float32,
                        1 << 34)
    comp = compositions()[0]
    plan = make_plan([ResolvedItem(cid, ids[cid], w) for cid, w in sorted(comp.items())],
                     1, "none", False)
    raw = [base64.b64decode(common.png_base64(img)) for img in images]
    items = base.preprocessor.decode_inputs(raw)
    cases = []
    for b in OFFLINE_BATCHES:
        x = base.preprocessor.collate([items[i % len(items)] for i in range(b)])
        cases.append(common.Case(f"offline|{b}", partial(executor.run, plan, x)))
    return cases


def offline_summary(timings: common.Timings) -> dict[str, Any]:
    out = {}
    for b in OFFLINE_BATCHES:
        stats = common.summarize(timings.wall[f"offline|{b}"])
        cpu = common.summarize(timings.cpu[f"offline|{b}"])
        out[str(b)] = {"ms_per_call": common.scale(stats, 1e3),
                       "inputs_per_s": common.per_second(stats, b),
                       "cpu_ms_per_input": common.scale(cpu, 1e3 / b)}
    return out


def offline_at(offline: dict[str, Any], batch: float) -> tuple[float, float]:
    """(ms per call, inputs/s) at a fractional batch size: per-call time interpolated."""
    bs = [int(b) for b in offline]
    ms = [offline[str(b)]["ms_per_call"]["median"] for b in bs]
    batch = min(max(batch, bs[0]), bs[-1])
    for (b0, m0), (b1, m1) in zip(zip(bs, ms, strict=True), zip(bs[1:], ms[1:], strict=True),
                                  strict=False):
        if b0 <= batch <= b1:
            t = m0 + (m1 - m0) * (batch - b0) / (b1 - b0)
            return t, batch / t * 1e3
    return ms[-1], bs[-1] / ms[-1] * 1e3


def _offline_cpu_at(offline: dict[str, Any], batch: float) -> float:
    """Offline CPU ms per input at the nearest measured batch size at or below `batch`."""
    bs = [int(b) for b in offline if int(b) <= max(batch, 1.0)]
    return float(offline[str(max(bs))]["cpu_ms_per_input"]["median"])


# -- analysis ----------------------------------------------------------------------------------
def compare(load: dict[str, Any], offline: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    t1 = offline["1"]["ms_per_call"]["median"]
    thr32 = offline["32"]["inputs_per_s"]["median"]
    for mode, levels in load.items():
        for conc, res in levels.items():
            mb = res["mean_batch_size"] or 1.0
            _, thr_at = offline_at(offline, mb)
            thr = res["throughput_inputs_per_s"] or 0.0
            out[f"{mode}|{conc}"] = {
                "offline_inputs_per_s_at_mean_batch": thr_at,
                "throughput_over_offline_at_mean_batch": thr / thr_at,
                "throughput_over_offline_batch32": thr / thr32,
                "p50_minus_offline_batch1_ms": (res["latency_ms"]["p50"] or 0.0) - t1,
                "server_cpu_per_input_over_offline": (
                    (res["server_cpu_ms_per_input"] or 0.0) / _offline_cpu_at(offline, mb)),
                "p50_minus_server_forward_same_window_ms": (
                    (res["latency_ms"]["p50"] or 0.0) - (res["server_forward_ms_mean"] or 0.0)
                    - (res.get("server_trunk_ms_mean") or 0.0)),
            }
    for mode, key in (("mixed", "mixed_over_homogeneous"),
                      ("homogeneous, 8 per request", "eight_per_request_over_one")):
        if mode in load:
            out[key] = {conc: (load[mode][conc]["throughput_inputs_per_s"] or 0.0)
                        / (load["homogeneous"][conc]["throughput_inputs_per_s"] or 1.0)
                        for conc in load["homogeneous"]}
    return out


def make_targets(load: dict[str, Any], cmp: dict[str, Any], levels: list[int]
                 ) -> dict[str, Any]:
    t: dict[str, Any] = {}
    if 1 in levels:
        t["service overhead at concurrency 1 (p50 − offline batch-1 forward, ms)"] = \
            common.target(cmp["homogeneous|1"]["p50_minus_offline_batch1_ms"], 2.0, "<=",
                          "homogeneous, one PNG per request; p50 − the server's own mean "
                          "trunk + tail time in the same window: "
                          f"{cmp['homogeneous|1']['p50_minus_server_forward_same_window_ms']:.1f}"
                          " ms")
    top = 32 if 32 in levels else max(levels)
    c = cmp[f"homogeneous|{top}"]
    mb = load["homogeneous"][str(top)]["mean_batch_size"]
    t[f"throughput at concurrency {top} / offline at the same batch size"] = common.target(
        c["throughput_over_offline_at_mean_batch"], 0.8, ">=",
        f"mean batch {mb:.1f}; vs offline at batch 32: "
        f"{c['throughput_over_offline_batch32']:.2f}; server CPU per input / offline CPU per "
        f"input: {c['server_cpu_per_input_over_offline']:.2f}" if mb else "no batches seen")
    groups = load["mixed"][str(top)]["mean_groups_per_batch"]
    t[f"mixed / homogeneous throughput at concurrency {top}"] = common.target(
        cmp["mixed_over_homogeneous"][str(top)], 0.7, ">=",
        f"8 distinct compositions; {groups or 0:.1f} groups (forwards) per device batch")
    return t


# -- plot --------------------------------------------------------------------------------------
def plot(load: dict[str, Any], offline: dict[str, Any], cmp: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()
    fig, (ax_thr, ax_lat, ax_b) = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = {"homogeneous": "tab:blue", "mixed": "tab:orange",
              "homogeneous, 8 per request": "tab:green"}
    for mode, levels in load.items():
        cs = [int(c) for c in levels]
        color = colors.get(mode, "tab:green")
        ax_thr.plot(cs, [levels[str(c)]["throughput_inputs_per_s"] for c in cs], marker="o",
                    color=color, label=f"service, {mode}")
        ax_thr.plot(cs, [cmp[f"{mode}|{c}"]["offline_inputs_per_s_at_mean_batch"]
                         for c in cs], linestyle=":", marker="s", color=color,
                    label=f"offline forward at the service's mean batch ({mode})")
        ax_lat.plot(cs, [levels[str(c)]["latency_ms"]["p50"] for c in cs], marker="o",
                    color=color, label=f"p50, {mode}")
        ax_lat.plot(cs, [levels[str(c)]["latency_ms"]["p99"] for c in cs], marker="x",
                    linestyle="--", color=color, label=f"p99, {mode}")
        ax_b.plot(cs, [levels[str(c)]["mean_batch_size"] for c in cs], marker="o", color=color,
                  label=mode)
    ax_thr.axhline(offline["32"]["inputs_per_s"]["median"], color="grey", linestyle="--",
                   label="offline forward, batch 32")
    ax_thr.set(title="throughput", xlabel="concurrent clients", ylabel="inputs / s",
               xscale="log")
    ax_lat.axhline(offline["1"]["ms_per_call"]["median"], color="grey", linestyle="--",
                   label="offline forward, batch 1")
    ax_lat.set(title="latency", xlabel="concurrent clients", ylabel="ms", xscale="log",
               yscale="log")
    ax_b.set(title="mean device batch size", xlabel="concurrent clients", ylabel="inputs",
             xscale="log")
    for ax in (ax_thr, ax_lat, ax_b):
        ax.legend(fontsize=7)
    fig.suptitle("tmc serve (effnet-lite0 64×64, R2) under closed-loop load")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -- main --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2.5 s per level")
    ap.add_argument("--duration", type=float, help="seconds measured per level (default 10)")
    ap.add_argument("--warmup", type=float, help="seconds discarded per level (default 2)")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--offline-rounds", type=int, help="rounds before and after the load")
    ap.add_argument("--torch-threads", type=int,
                    help="TMC_TORCH_THREADS for the server (result: serving_threads<N>.json)")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    duration = args.duration or (2.5 if args.quick else 10.0)
    warmup = args.warmup or (0.5 if args.quick else 2.0)
    rounds = args.offline_rounds or (3 if args.quick else 7)
    levels = [int(c) for c in args.concurrency.split(",")]
    info = common.machine("cpu")
    images, source = common.fashion_mnist_images(64)
    images_b64 = [common.png_base64(img) for img in images]
    with tempfile.TemporaryDirectory(prefix="tmc-bench-serving-") as tmp:
        base_dir = Path(tmp) / "base"
        init_base(base_dir, make_spec("effnet-lite0", options=BASE_OPTIONS))
        common.log("base ready; starting tmc serve")
        server_env = ({"TMC_TORCH_THREADS": str(args.torch_threads)} if args.torch_threads
                      else {})
        with processes.tmc_server(base_dir, Path(tmp) / "server", env=server_env) as server:
            base = load_base(base_dir, check_forward_ad=False)
            by_digest, ids = push_components(server, base.region, base.fingerprint)
            cases = offline_cases(base_dir, by_digest, ids, images)
            common.log("offline baseline (before the load)")
            common.run_rounds(cases, rounds)
            load = run_load(server, images_b64, levels, warmup, duration)
            common.log("offline baseline (after the load)")
            timings = common.run_rounds(cases, rounds, seed=1)  # appends to the same cases
    offline = offline_summary(timings)
    cmp = compare(load, offline)
    targets = make_targets(load, cmp, levels)
    settings = {"base": {"preset": "effnet-lite0", **BASE_OPTIONS}, "components": N_COMPONENTS,
                "compositions": compositions(), "workloads": {
                    m: {"inputs_per_request": k, "distinct_compositions": d}
                    for m, (k, d) in MODES.items()},
                "input_format": "base64 PNG, 28×28 grey", "images": source,
                "concurrency": levels, "warmup_s": warmup, "duration_s": duration,
                "offline_batches": list(OFFLINE_BATCHES), "offline_rounds": 2 * rounds,
                "server": {**server_env, "TMC_MAX_BATCH_SIZE": "32 (default)",
                           "TMC_MAX_QUEUE_DELAY_MS": "2 (default)", "TMC_DEVICE": "cpu"},
                "client": "asyncio, one keep-alive HTTP/1.1 connection per client, closed loop"}
    results = {"load": load, "offline": offline, "comparison": cmp,
               "offline_raw_seconds": {"wall": timings.wall, "cpu": timings.cpu}}
    name = f"{NAME}_threads{args.torch_threads}" if args.torch_threads else NAME
    common.finish(name, args.quick, info, settings, results, targets, started,
                  partial(plot, load, offline, cmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
