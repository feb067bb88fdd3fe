"""Inference cost against the number of composed components N (the paper's cost claim).

    python -m bench.cost [--quick] [--presets effnet-r2,effnet-r3,minilm] [--repeats R]

For N in 1, 2, 5, 10, 20, 50, at batch 1 (latency) and batch 32 (throughput), per preset:

  (a)  TMC, steady state: ``Executor.run`` with the composed Δ = Σ w_k Δ_k already cached:
       one trunk forward + one JVP through the tangent region, whatever N is.
  (b)  TMC, first request of a new composition: the composed-Δ cache is cleared before each
       call, so Σ w_k Δ_k is summed (the N component tangents are already on the device).
  (c)  an ensemble of N fully fine-tuned non-linear models: N full forwards, mean of softmax.
       The N models are deep copies of the network with randomly perturbed weights: only the
       timing matters here, not what they predict.
  (c') an ensemble of N tail-only non-linear fine-tunes sharing ONE trunk pass: N plain
       forwards of the tail (deep copies of the tail, perturbed) on the same trunk output.
       This is the competitor a careful user would build instead of TMC.
  (d)  N separate linearized models: N × (trunk + JVP tail), mean of softmax.

(c) and (d) are measured up to a cap and extrapolated linearly beyond it (per round:
t(N) = t(cap)·N/cap); (c') beyond its cap adds (N − cap) plain tails measured in the same
round. Every extrapolated point says so in the JSON (``"extrapolated": true``).
The summing cost of (b) is also timed alone (``compose`` + cast of N random float32 Δ's)
next to ``torch.Tensor.copy_`` of the same N·|Δ| bytes and an in-place ``add_`` reference,
in the same rounds; bandwidth = N·|Δ| bytes / time.
Results: bench/results/cost[_quick].json and .png.
"""

# ruff: noqa: E402
from __future__ import annotations

import os

# Shared 2-core machine: spinning OpenMP workers collapse throughput under competition.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import argparse
import copy
import hashlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.composition import make_plan
from app.executor import Executor
from bases import Base, init_base, load_base, make_spec
from bench import common
from registry import ResolvedItem
from tangent import Term, compose, delta_nbytes
from tangent.delta import cast_delta

NAME = "cost"
BATCHES = (1, 32)
METHODS = ("a", "b", "c", "c'", "d")
C_PRIME = "c'"
METHOD_LABELS = {
    "a": "(a) TMC, Δ cached",
    "b": "(b) TMC, new composition (Σ on the request)",
    "c": "(c) N full non-linear models",
    "c'": "(c') N non-linear tails, shared trunk",
    "d": "(d) N separate linearized models",
}


@dataclass
class PresetConfig:
    key: str
    preset: str
    options: dict[str, Any]
    ns: tuple[int, ...]
    cap_full: int  # (c) and (d) measured for N <= cap_full, extrapolated beyond
    cap_tails: int  # (c') measured for N <= cap_tails
    repeats: int  # rounds at batch 32
    budget_s: float  # per phase: batch 1, batch 32, compose
    description: str
    seq_len: int = 0  # text presets: tokens per input
    repeats_b1: int = 15  # rounds at batch 1 (cheap, and noisier per call)
    repeats_compose: int = 15


FULL_NS = (1, 2, 5, 10, 20, 50)
MIN_SAMPLE_S = 0.15  # cheap calls are averaged until one sample takes this long


def configs(quick: bool) -> dict[str, PresetConfig]:
    if quick:
        return {
            "effnet-r2": PresetConfig(
                "effnet-r2", "effnet-lite0", {"image_size": 64, "tangent_blocks": 0},
                (1, 2, 5, 10, 50), 2, 50, 2, 45.0,
                "EfficientNet-Lite0 64×64, region R2 = conv head + BN + classifier",
                repeats_b1=6, repeats_compose=6),
            "minilm": PresetConfig(
                "minilm", "minilm", {"tangent_layers": 1, "max_tokens": 32},
                (1, 5, 50), 1, 5, 2, 30.0,
                "MiniLM-L6, region = last encoder layer + classifier, 32 tokens (quick)",
                seq_len=32, repeats_b1=4, repeats_compose=4),
        }
    return {
        "effnet-r2": PresetConfig(
            "effnet-r2", "effnet-lite0", {"image_size": 64, "tangent_blocks": 0},
            FULL_NS, 10, 50, 7, 180.0,
            "EfficientNet-Lite0 64×64, region R2 = conv head + BN + classifier",
            repeats_b1=21, repeats_compose=21),
        "effnet-r3": PresetConfig(
            "effnet-r3", "effnet-lite0", {"image_size": 64, "tangent_blocks": 1},
            FULL_NS, 5, 50, 5, 120.0,
            "EfficientNet-Lite0 64×64, region R3 = last MBConv block + R2",
            repeats_b1=15, repeats_compose=15),
        "minilm": PresetConfig(
            "minilm", "minilm", {"tangent_layers": 1, "max_tokens": 128},
            FULL_NS, 2, 10, 3, 200.0,
            "MiniLM-L6, region = last encoder layer + classifier, 128 tokens", seq_len=128,
            repeats_b1=11, repeats_compose=11),
    }


# -- fixtures ----------------------------------------------------------------------------------
def build_base(cfg: PresetConfig, workdir: Path) -> Base:
    spec = make_spec(cfg.preset, options=cfg.options)
    init_base(workdir / cfg.key, spec)
    return load_base(workdir / cfg.key)


def make_input(base: Base, cfg: PresetConfig, batch: int, gen: torch.Generator) -> Any:
    if base.spec.input_kind == "image":
        size = int(cfg.options["image_size"])
        return torch.randn(batch, 3, size, size, generator=gen)  # [B, 3, S, S]
    embed: Any = base.net.net[0]
    emb = int(embed.word_embeddings.num_embeddings)
    ids = torch.randint(1000, emb, (batch, cfg.seq_len), generator=gen)  # [B, T]
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    return ids, torch.ones_like(ids)


def perturbed(module: nn.Module, gen: torch.Generator, scale: float = 1e-3) -> nn.Module:
    """A deep copy with every parameter nudged: a stand-in for a fine-tuned copy."""
    clone = copy.deepcopy(module)
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return clone.eval()


def ensemble(outputs: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(outputs).softmax(-1).mean(0)  # [B, C]


@dataclass
class Fixture:
    base: Base
    executor: Executor  # (a): composed Δ's stay cached
    cold: Executor  # (b): its composed-Δ cache is cleared before every call
    deltas: list[dict[str, torch.Tensor]]
    plans: dict[int, Any]
    full_models: list[nn.Module]
    tails: list[nn.Module]
    delta_bytes: int


def build_fixture(cfg: PresetConfig, base: Base) -> Fixture:
    gen = torch.Generator().manual_seed(0)
    n_max = max(cfg.ns)
    net = base.net
    deltas = [net.random_delta(gen) for _ in range(n_max)]
    digests = [hashlib.sha256(f"{cfg.key}-{k}".encode()).hexdigest() for k in range(n_max)]
    store = dict(zip(digests, deltas, strict=True))
    executor = Executor(net, store.__getitem__, torch.device("cpu"), torch.float32, 1 << 40)
    cold = Executor(net, store.__getitem__, torch.device("cpu"), torch.float32, 1 << 40)
    plans = {n: make_plan([ResolvedItem(f"c{k}", digests[k], 1.0) for k in range(n)],
                          1, "mean", False) for n in cfg.ns}
    full_models = [perturbed(net.net, gen) for _ in range(cfg.cap_full)]
    tails = [perturbed(net.tail, gen) for _ in range(min(cfg.cap_tails, n_max))]
    return Fixture(base, executor, cold, deltas, plans, full_models, tails,
                   delta_nbytes(deltas[0]))


# -- cases -------------------------------------------------------------------------------------
def inference(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with torch.no_grad():
            return fn()
    return run


def method_cases(fx: Fixture, cfg: PresetConfig, batch: int, x: Any) -> list[common.Case]:
    net, ex, cold = fx.base.net, fx.executor, fx.cold
    cases: list[common.Case] = []
    for n in cfg.ns:
        plan = fx.plans[n]
        cases.append(common.Case(f"a|{n}|{batch}", partial(ex.run, plan, x)))
        cases.append(common.Case(f"b|{n}|{batch}", partial(cold.run, plan, x),
                                 setup=cold.composed.clear))
        if n <= cfg.cap_full:
            cases.append(common.Case(f"c|{n}|{batch}", inference(
                partial(full_ensemble, fx.full_models[:n], x))))
            cases.append(common.Case(f"d|{n}|{batch}", inference(
                partial(linearized_ensemble, net, fx.deltas[:n], x))))
        if n <= cfg.cap_tails:
            cases.append(common.Case(f"c'|{n}|{batch}", inference(
                partial(shared_trunk_ensemble, net, fx.tails[:n], x))))
    return cases


def full_ensemble(models: list[nn.Module], x: Any) -> torch.Tensor:
    return ensemble([m(x) for m in models])


def linearized_ensemble(net: Any, deltas: list[dict[str, torch.Tensor]], x: Any
                        ) -> torch.Tensor:
    return ensemble([net.forward(x, d) for d in deltas])


def shared_trunk_ensemble(net: Any, tails: list[nn.Module], x: Any) -> torch.Tensor:
    h = net.trunk_forward(x)  # one trunk pass for every tail
    return ensemble([t(h) for t in tails])


def breakdown_cases(fx: Fixture, batch: int, x: Any) -> list[common.Case]:
    """Pieces: trunk, one plain tail, one JVP tail, a full plain forward, whole-net JVP."""
    net = fx.base.net
    with torch.no_grad():
        h = net.trunk_forward(x)
    delta = fx.deltas[0]
    return [
        common.Case(f"trunk|{batch}", inference(lambda: net.trunk_forward(x))),
        common.Case(f"tail_plain|{batch}", inference(lambda: fx.tails[0](h))),
        common.Case(f"tail_jvp|{batch}", inference(lambda: net.tail_forward(h, delta))),
        common.Case(f"full_plain|{batch}", inference(lambda: fx.full_models[0](x))),
        common.Case(f"full_jvp_naive|{batch}", inference(
            lambda: net.full_jvp_forward(x, delta))),
    ]


def compose_and_cast(terms: list[Term]) -> dict[str, torch.Tensor]:
    """What Executor._compose does on a cache miss."""
    return cast_delta(compose(terms, "none"), "cpu", torch.float32)


def cases_for_batch(fx: Fixture, cfg: PresetConfig, batch: int, x: Any) -> list[common.Case]:
    """Every model call at one batch size, one call per sample: each sample then follows a
    different case (same cache state for all), and ratios compare like with like."""
    cases = method_cases(fx, cfg, batch, x) + breakdown_cases(fx, batch, x)
    for case in cases:
        case.inner = 1
    return cases


def compose_cases(fx: Fixture, cfg: PresetConfig) -> list[common.Case]:
    """Σ w_k Δ_k (+ cast) alone, next to a plain copy_ and an in-place add_ of the same bytes."""
    cases: list[common.Case] = []
    numel = sum(t.numel() for t in fx.deltas[0].values())
    for n in cfg.ns:
        terms = [Term(f"{k:064x}", 1.0 / n, fx.deltas[k]) for k in range(n)]
        group = f"compose|{n}"  # compose, copy_ and add_ at one N: the same calls per sample
        cases.append(common.Case(f"compose|{n}", partial(compose_and_cast, terms), group=group))
        src, dst = torch.randn(n * numel), torch.empty(n * numel)
        cases.append(common.Case(f"copy|{n}", partial(dst.copy_, src), group=group))
        acc = {name: torch.empty_like(t) for name, t in fx.deltas[0].items()}

        def inplace(ts: list[Term] = terms, out: dict[str, torch.Tensor] = acc) -> None:
            for name, t in out.items():
                t.copy_(ts[0].delta[name]).mul_(ts[0].weight)
            for term in ts[1:]:
                for name, t in out.items():
                    t.add_(term.delta[name], alpha=term.weight)
        cases.append(common.Case(f"add_inplace|{n}", inplace, group=group))
    return cases


# -- analysis ----------------------------------------------------------------------------------
def method_series(samples: dict[str, list[float]], cfg: PresetConfig, method: str, n: int,
                  batch: int) -> tuple[list[float], bool]:
    """Per-round seconds of one method at N (measured, or extrapolated from the cap)."""
    key = f"{method}|{n}|{batch}"
    if key in samples:
        return samples[key], False
    if method in ("c", "d"):
        cap = cfg.cap_full
        return [t * n / cap for t in samples[f"{method}|{cap}|{batch}"]], True
    cap = cfg.cap_tails
    at_cap, tail = samples[f"c'|{cap}|{batch}"], samples[f"tail_plain|{batch}"]
    return [t + (n - cap) * s for t, s in zip(at_cap, tail, strict=False)], True


def analyse(timings: common.Timings, cfg: PresetConfig, fx: Fixture) -> dict[str, Any]:
    """Wall-clock figures (latency, throughput, ratios) plus the same ratios in CPU time."""
    out = analyse_clock(timings.wall, cfg)
    cpu = analyse_clock(timings.cpu, cfg)
    for method, info in out["methods"].items():
        for point, cpu_point in zip(info["points"], cpu["methods"][method]["points"],
                                    strict=True):
            point["cpu_ms_per_call"] = cpu_point["ms_per_call"]
    out["ratios_cpu"] = cpu["ratios"]
    out["breakdown_cpu"] = cpu["breakdown"]
    out["a_flatness_cpu"] = cpu["a_flatness"]
    out["compose"] = compose_analysis(timings.wall, cfg, fx.delta_bytes)
    return out


def analyse_clock(samples: dict[str, list[float]], cfg: PresetConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"methods": {}, "ratios": {}, "breakdown": {}}
    series: dict[tuple[str, int, int], list[float]] = {}
    for method in METHODS:
        rows = []
        for batch in BATCHES:
            for n in cfg.ns:
                xs, extrapolated = method_series(samples, cfg, method, n, batch)
                series[(method, n, batch)] = xs
                stats = common.summarize(xs)
                rows.append({"n": n, "batch": batch, "extrapolated": extrapolated,
                             "ms_per_call": common.scale(stats, 1e3),
                             "ms_per_item": common.scale(stats, 1e3 / batch),
                             "items_per_s": common.per_second(stats, batch)})
        out["methods"][method] = {"label": METHOD_LABELS[method], "points": rows}
    for batch in BATCHES:
        for n in cfg.ns:
            a = series[("a", n, batch)]
            out["ratios"][f"{n}|{batch}"] = {
                other: common.ratio_samples(series[(other, n, batch)], a)
                for other in ("b", "c", "c'", "d")}
        out["breakdown"][str(batch)] = {
            piece: common.scale(common.summarize(samples[f"{piece}|{batch}"]), 1e3)
            for piece in ("trunk", "tail_plain", "tail_jvp", "full_plain", "full_jvp_naive")}
        out["breakdown"][str(batch)]["jvp_tail_over_plain_tail"] = common.ratio_samples(
            samples[f"tail_jvp|{batch}"], samples[f"tail_plain|{batch}"])
        out["breakdown"][str(batch)]["crossover_n_vs_c_prime"] = crossover(series, cfg, batch)
    out["a_flatness"] = {str(b): common.ratio_samples(series[("a", cfg.ns[-1], b)],
                                                      series[("a", cfg.ns[0], b)])
                         for b in BATCHES}
    return out


def crossover(series: dict[tuple[str, int, int], list[float]], cfg: PresetConfig,
              batch: int) -> float | None:
    """N at which (c') costs as much as (a): a line through (c')'s measured medians."""
    import statistics

    ns = [n for n in cfg.ns if n <= cfg.cap_tails]
    if len(ns) < 2:
        return None
    fit = common.linear_fit(ns, [statistics.median(series[("c'", n, batch)]) for n in ns])
    a = statistics.median([t for n in cfg.ns for t in series[("a", n, batch)]])
    return (a - fit["intercept"]) / fit["slope"] if fit["slope"] > 0 else None


def compose_analysis(samples: dict[str, list[float]], cfg: PresetConfig, nbytes: int
                     ) -> dict[str, Any]:
    import statistics

    rows = []
    for n in cfg.ns:
        payload = n * nbytes
        row: dict[str, Any] = {"n": n, "bytes": payload}
        for kind in ("compose", "copy", "add_inplace"):
            xs = samples[f"{kind}|{n}"]
            row[f"{kind}_ms"] = common.scale(common.summarize(xs), 1e3)
            row[f"{kind}_gb_per_s"] = common.per_second(common.summarize(xs), payload / 1e9)
        row["compose_over_copy_bandwidth"] = common.ratio_samples(
            samples[f"copy|{n}"], samples[f"compose|{n}"])
        rows.append(row)
    fit = common.linear_fit([r["bytes"] / 1e6 for r in rows],
                            [statistics.median(samples[f"compose|{r['n']}"]) * 1e3
                             for r in rows])
    return {"delta_bytes": nbytes, "points": rows,
            "linear_fit_ms_vs_mb": fit,
            "definition": "GB/s = N·|Δ| bytes / seconds (payload, not bytes moved: a copy "
                          "reads and writes each byte once)"}


def median_of(stats: dict[str, Any]) -> float | None:
    return stats.get("median") if stats else None


def preset_targets(cfg: PresetConfig, res: dict[str, Any]) -> dict[str, Any]:
    t: dict[str, Any] = {}
    ns = cfg.ns
    for batch in BATCHES:
        flat, flat_cpu = res["a_flatness"][str(batch)], res["a_flatness_cpu"][str(batch)]
        t[f"{cfg.key}: (a) flat N={ns[0]}→{ns[-1]}, batch {batch} (abs(ratio − 1))"] = \
            common.target(abs(flat["median"] - 1.0), 0.10, "<=",
                          f"(a) at N={ns[-1]} / (a) at N={ns[0]}, per round: "
                          f"{flat['median']:.3f} ({flat['min']:.3f}–{flat['max']:.3f}); "
                          f"in CPU time {flat_cpu['median']:.3f}")
    n5 = 5 if 5 in ns else ns[min(1, len(ns) - 1)]
    r, r_cpu = res["ratios"][f"{n5}|32"], res["ratios_cpu"][f"{n5}|32"]
    t[f"{cfg.key}: (c)/(a) at N={n5}, batch 32"] = common.target(
        median_of(r["c"]), 2.5, ">=", "paper: TMC 2.5–10× cheaper than N full models"
        + (" (c extrapolated)" if n5 > cfg.cap_full else "")
        + f"; in CPU time {median_of(r_cpu['c']):.2f}")
    t[f"{cfg.key}: (c')/(a) at N={n5}, batch 32"] = common.target(
        median_of(r["c'"]), 1.0, ">=", "TMC should beat the shared-trunk tail ensemble from "
        f"N≈4; in CPU time {median_of(r_cpu[C_PRIME]):.2f}")
    comp = res["compose"]
    t[f"{cfg.key}: (b) Σ time linear in N·|Δ| (R²)"] = common.target(
        comp["linear_fit_ms_vs_mb"]["r2"], 0.95, ">=", "least squares over N")
    last = comp["points"][-1]
    name = f"{cfg.key}: Σ bandwidth / copy bandwidth at N={last['n']} (OMP_WAIT_POLICY=PASSIVE)"
    t[name] = common.target(
        median_of(last["compose_over_copy_bandwidth"]), 0.5, ">=",
        f"compose {last['compose_gb_per_s']['median']:.2f} GB/s vs copy "
        f"{last['copy_gb_per_s']['median']:.2f} GB/s; under the service's OpenMP setting "
        "see bench/compose_bandwidth.py")
    return t


# -- plot --------------------------------------------------------------------------------------
def plot(results: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()
    keys = list(results)
    fig, axes = plt.subplots(len(keys), 3, figsize=(15, 4.2 * len(keys)), squeeze=False)
    for row, key in enumerate(keys):
        res = results[key]
        ax_lat, ax_thr, ax_bw = axes[row]
        for info in res["methods"].values():
            for ax, batch, field_, scale in ((ax_lat, 1, "ms_per_call", 1.0),
                                             (ax_thr, 32, "items_per_s", 1.0)):
                pts = [p for p in info["points"] if p["batch"] == batch]
                xs = [p["n"] for p in pts]
                ys = [p[field_]["median"] * scale for p in pts]
                line, = ax.plot(xs, ys, marker="o", label=info["label"])
                meas = [p for p in pts if not p["extrapolated"]]
                if len(meas) < len(pts):
                    line.set_linestyle("--")
                    ax.plot([p["n"] for p in meas], [p[field_]["median"] for p in meas],
                            marker="o", linestyle="-", color=line.get_color())
                lo = [p[field_]["min"] for p in pts]
                hi = [p[field_]["max"] for p in pts]
                ax.fill_between(xs, lo, hi, alpha=0.15, color=line.get_color())
        ax_lat.set(title=f"{key}: latency, batch 1", xlabel="components N", ylabel="ms",
                   xscale="log", yscale="log")
        ax_thr.set(title=f"{key}: throughput, batch 32", xlabel="components N",
                   ylabel="inputs / s", xscale="log", yscale="log")
        comp = res["compose"]["points"]
        for kind, label in (("compose", "tangent.compose + cast"), ("add_inplace",
                            "in-place add_ (reference)"), ("copy", "Tensor.copy_")):
            ax_bw.plot([p["bytes"] / 1e6 for p in comp],
                       [p[f"{kind}_gb_per_s"]["median"] for p in comp], marker="o", label=label)
        ax_bw.set(title=f"{key}: Σ w_k Δ_k bandwidth", xlabel="N·|Δ| (MB)", ylabel="GB/s",
                  xscale="log")
        ax_lat.legend(fontsize=7)
        ax_bw.legend(fontsize=7)
    fig.suptitle("TMC inference cost vs number of components (dashed: extrapolated; band: "
                 "min–max over rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def prefixed_log(prefix: str, message: str) -> None:
    common.log(f"{prefix}: {message}")


# -- main --------------------------------------------------------------------------------------
def run_preset(cfg: PresetConfig, workdir: Path, repeats: int | None) -> dict[str, Any]:
    common.log(f"{cfg.key}: building base and {max(cfg.ns)} components")
    base = build_base(cfg, workdir)
    fx = build_fixture(cfg, base)
    gen = torch.Generator().manual_seed(1)
    timings = common.Timings({}, {})
    inner: dict[str, int] = {}
    phases = [(f"batch {b}", cases_for_batch(fx, cfg, b, make_input(base, cfg, b, gen)),
               cfg.repeats_b1 if b == 1 else (repeats or cfg.repeats)) for b in BATCHES]
    phases.append(("compose", compose_cases(fx, cfg), cfg.repeats_compose))
    for label, cases, rounds in phases:
        common.log(f"{cfg.key}, {label}: {len(cases)} cases, warming up")
        t = common.run_rounds(cases, rounds, budget_s=cfg.budget_s, min_sample_s=MIN_SAMPLE_S,
                              progress=partial(prefixed_log, f"{cfg.key}, {label}"))
        timings.update(t.wall)
        timings.cpu.update(t.cpu)
        inner.update({c.key: c.inner for c in cases})
    res = analyse(timings, cfg, fx)
    res["settings"] = {"description": cfg.description, "preset": cfg.preset,
                       "options": cfg.options, "ns": list(cfg.ns), "batches": list(BATCHES),
                       "cap_full_c_d": cfg.cap_full, "cap_tails_c_prime": cfg.cap_tails,
                       "rounds": {"batch 1": len(timings["a|1|1"]),
                                  "batch 32": len(timings["a|1|32"]),
                                  "compose": len(timings[f"compose|{cfg.ns[0]}"])},
                       "region_params": sum(t.numel() for t in fx.deltas[0].values()),
                       "region_bytes": fx.delta_bytes,
                       "network_params": sum(p.numel() for p in base.net.params.values()),
                       "inner_calls_per_sample": inner,
                       "seq_len": cfg.seq_len or None}
    res["raw_seconds"] = {"wall": timings.wall, "cpu": timings.cpu}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer N, rounds, presets")
    ap.add_argument("--presets", help="comma-separated subset of the presets")
    ap.add_argument("--repeats", type=int, help="rounds per preset (default: per preset)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    torch.manual_seed(0)
    cfgs = configs(args.quick)
    chosen = args.presets.split(",") if args.presets else list(cfgs)
    info = common.machine("cpu")
    results: dict[str, Any] = {}
    targets: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tmc-bench-cost-") as tmp:
        for key in chosen:
            results[key] = run_preset(cfgs[key], Path(tmp), args.repeats)
            targets.update(preset_targets(cfgs[key], results[key]))
    settings = {"presets": chosen, "methods": METHOD_LABELS, "batches": list(BATCHES),
                "timing": "interleaved shuffled rounds, median and min–max over rounds; "
                          "ratios per round",
                "extrapolation": "(c),(d): t(cap)·N/cap beyond cap_full_c_d; (c'): t(cap) + "
                                 "(N − cap)·t(one plain tail) beyond cap_tails_c_prime",
                "perturbed_models": "(c)/(c') models are deep copies with weights + 1e-3·noise;"
                                    " only their cost is measured"}
    common.finish(NAME, args.quick, info, settings, results, targets, started,
                  partial(plot, results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
