"""Eager against torch.compile'd linearized tail (``LinearizedNet.compile("tail")``) on CPU.

    python -m bench.compile_cpu [--quick] [--repeats R]

For both real presets (minilm: last encoder layer + classifier, 128 tokens (32 with
--quick); effnet-lite0 64×64: last MBConv block + conv head + classifier), at batch 1 and
batch 32, on the trunk's output h (made once, under ``torch.inference_mode()`` as the
executor does) and one random Δ over the whole region:

  compile     seconds of the first compiled call at that shape (Dynamo + AOTAutograd +
              inductor + C++ builds), in a fresh inductor cache directory (cold; its path
              is in the settings); batch 32 comes after batch 1 in the same process, so its
              figure is the cost of a new input shape: forward AD under Dynamo specializes
              every size in torch 2.13 (``dynamic=None`` gets no dynamic batch dimension),
              so each new shape compiles a graph of its own (``graphs`` counts them).
  ms per call eager ``tail_forward(h, Δ)`` (mode "none") and compiled, in interleaved
              rounds (bench/common.py): median, min, max of wall and process CPU time.
  error       max |compiled − eager| of the output (and of J·Δ alone), absolute and over
              the logit scale max |y|, plus max |J·Δ| (a dropped tangent would show).
  recompiles  graphs made by 3 more calls with new Δs of the same shapes, one with half
              the names missing (0 expected).

Results: bench/results/compile_cpu[_quick].json.
"""

# ruff: noqa: E402
from __future__ import annotations

import os
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see bench/common.py
_CACHE = os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                               tempfile.mkdtemp(prefix="tmc-bench-inductor-"))

import argparse
import time
from typing import Any

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from bases import make_spec
from bases.presets import get_preset
from bench import common
from tangent import LinearizedNet

NAME = "compile_cpu"
BATCHES = (1, 32)
PRESETS: dict[str, dict[str, Any]] = {
    "minilm": {"tangent_layers": 1},
    "effnet-lite0": {"image_size": 64, "tangent_blocks": 1},
}
GOLDEN_REL = 1e-5  # the tolerance of tests/tangent/test_compile.py, over the logit scale


def build(preset: str) -> LinearizedNet:
    spec = make_spec(preset, options=PRESETS[preset])
    module = get_preset(spec.preset)
    net = module.build(spec)
    module.init_weights(spec, net)
    return LinearizedNet(net, spec.tangent)


def make_input(preset: str, batch: int, tokens: int, gen: torch.Generator) -> Any:
    if preset == "minilm":
        ids = torch.randint(1000, 30000, (batch, tokens), generator=gen)  # [B, T]
        ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
        return ids, torch.ones_like(ids)
    size = int(PRESETS[preset]["image_size"])
    return torch.randn(batch, 3, size, size, generator=gen)  # [B, 3, S, S]


def graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def bench_preset(preset: str, tokens: int, repeats: int, budget_s: float
                 ) -> dict[str, Any]:
    torch._dynamo.reset()
    counters.clear()
    gen = torch.Generator().manual_seed(0)
    eager = build(preset)
    compiled = LinearizedNet(eager.net, eager.names)  # the same θ0, its own compile state
    compiled.compile("tail")
    with torch.inference_mode():
        delta = eager.random_delta(gen, scale=1e-2)
        delta = {n: t.clone() for n, t in delta.items()}  # inference tensors, as the executor's
    out: dict[str, Any] = {"region": eager.names, "region_params": sum(
        eager.params[n].numel() for n in eager.names), "batches": {}}
    for batch in BATCHES:
        with torch.inference_mode():
            h = eager.trunk_forward(make_input(preset, batch, tokens, gen))
            row = compile_and_check(eager, compiled, h, delta, gen)
        common.log(f"{preset} B={batch}: first compiled call {row['compile_s']:.1f} s "
                   f"({row['graphs_made_by_first_call']} graph), max err "
                   f"{row['max_abs_err']:.2e} (logit scale {row['logit_scale']:.3g}), "
                   f"recompiles {row['recompiles_for_3_new_deltas']}")
        timed = time_eager_and_compiled(f"{preset} B={batch}", str(batch), eager, compiled, h,
                                        delta, repeats, budget_s)
        row["graphs_total"] = graphs()
        row.update(timed)
        out["batches"][str(batch)] = row
        common.log(f"{preset} B={batch}: eager {row['eager_ms']['median']:.2f} ms, compiled "
                   f"{row['compiled_ms']['median']:.2f} ms (×"
                   f"{row['speedup_eager_over_compiled']['median']:.2f})")
    return out


def compile_and_check(eager: LinearizedNet, compiled: LinearizedNet, h: Any,
                      delta: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, Any]:
    """The first compiled call (seconds, graphs made), its error against eager for y and for
    the JVP's dy, and the recompiles 3 new Δ's cause (the third with half its tensors)."""
    before = graphs()
    t0 = time.perf_counter()
    y_c = compiled.tail_forward(h, delta)
    compile_s = time.perf_counter() - t0
    made = graphs() - before
    y_e = eager.tail_forward(h, delta)
    _, dy_e = eager.tail_jvp(h, delta)
    dy_c = compiled.tail_jvp(h, delta)[1]
    scale = float(y_e.abs().max())
    err = float((y_c - y_e).abs().max())
    before = graphs()
    for i in range(3):
        d = compiled.random_delta(gen, scale=1e-2)
        if i == 2:
            d = {n: t for k, (n, t) in enumerate(d.items()) if k % 2}
        compiled.tail_forward(h, d)
    return {"compile_s": compile_s, "graphs_made_by_first_call": made,
            "graphs_total": None,  # set after the timing rounds
            "recompiles_for_3_new_deltas": graphs() - before,
            "max_abs_err": err, "max_abs_err_dy": float((dy_c - dy_e).abs().max()),
            "logit_scale": scale, "max_abs_err_over_logit_scale": err / scale,
            "max_abs_dy": float(dy_e.abs().max())}


def time_eager_and_compiled(label: str, group: str, eager: LinearizedNet,
                            compiled: LinearizedNet, h: Any, delta: dict[str, torch.Tensor],
                            repeats: int, budget_s: float) -> dict[str, Any]:
    """Eager and compiled tail forwards in interleaved rounds: wall and CPU ms, and the
    eager/compiled ratio per round."""
    def run(net: LinearizedNet) -> None:
        with torch.inference_mode():
            net.tail_forward(h, delta)

    cases = [common.Case(f"eager|{group}", lambda: run(eager), group=group),
             common.Case(f"compiled|{group}", lambda: run(compiled), group=group)]
    timings = common.run_rounds(cases, repeats, min_sample_s=0.1, budget_s=budget_s,
                                progress=lambda message: common.log(f"  {label}: {message}"))
    row: dict[str, Any] = {}
    for kind in ("eager", "compiled"):
        row[f"{kind}_ms"] = common.scale(common.summarize(timings[f"{kind}|{group}"]), 1e3)
        row[f"{kind}_cpu_ms"] = common.scale(
            common.summarize(timings.cpu[f"{kind}|{group}"]), 1e3)
    row["speedup_eager_over_compiled"] = common.ratio_samples(
        timings[f"eager|{group}"], timings[f"compiled|{group}"])
    row["cpu_speedup_eager_over_compiled"] = common.ratio_samples(
        timings.cpu[f"eager|{group}"], timings.cpu[f"compiled|{group}"])
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 tokens, fewer rounds")
    parser.add_argument("--repeats", type=int, default=None, help="timing rounds per batch")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    machine = common.machine("cpu")
    tokens = 32 if args.quick else 128
    repeats = args.repeats or (5 if args.quick else 15)
    budget_s = 30.0 if args.quick else 120.0
    settings = {"presets": PRESETS, "batches": BATCHES, "tokens": tokens, "repeats": repeats,
                "budget_s_per_batch": budget_s, "compile_mode": "tail", "dynamic": None,
                "backend": "inductor", "delta_scale": 1e-2, "inductor_cache_dir": _CACHE,
                "context": "torch.inference_mode()"}
    results = {p: bench_preset(p, tokens, repeats, budget_s) for p in PRESETS}
    targets = {}
    for p, res in results.items():
        for b, row in res["batches"].items():
            targets[f"{p} B={b}: compiled == eager (max err / logit scale)"] = common.target(
                row["max_abs_err_over_logit_scale"], GOLDEN_REL, "<=",
                "the golden tolerance of tests/tangent/test_compile.py")
            targets[f"{p} B={b}: no recompile for new Δs"] = common.target(
                float(row["recompiles_for_3_new_deltas"]), 0.0, "<=", "graphs made")
    common.finish(NAME, args.quick, machine, settings, results, targets, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
