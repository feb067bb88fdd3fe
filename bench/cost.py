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

This module builds the fixtures and times the cases; bench.cost_config holds the methods and
per-preset settings, bench.cost_report the analysis, targets and plot.
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
from bench.cost_config import BATCHES, METHOD_LABELS, MIN_SAMPLE_S, PresetConfig, configs
from bench.cost_report import analyse, plot, preset_targets
from registry import ResolvedItem
from tangent import Term, compose, delta_nbytes
from tangent.delta import cast_delta

NAME = "cost"


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
    res = analyse(timings, cfg, fx.delta_bytes)
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
