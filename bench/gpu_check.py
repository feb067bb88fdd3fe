"""The GPU check: correctness, reduced precision, compiled tail, memory and speed on a device.

    python -m bench.gpu_check [--smoke] [--device auto|cuda|cpu] [--payload DIR] [--out PATH]
    make gpu-check          (the same, full mode, device auto)

Per preset (effnet-lite0 on Fashion-MNIST test images, minilm on the BBC News test split):

  correctness  on the device in float32 against a float64 CPU reference of the same θ0:
               linearity (composed == Σ w_k (y_k − f0) + f0), weight-1 round trip, a zero
               tangent reproduces the base, forgetting bit-exact (purge, then compare with an
               executor that never saw the component), nothing left in the device cache.
  dtypes       bfloat16 and float16 serving (θ0, trunk and tail in that dtype, Δ composed in
               float32 then cast once) against float32: max |Δlogit|, top-1 agreement,
               accuracy, for θ0 alone and for a composition of 5 fitted components.
  compile      TMC_COMPILE=tail against eager: max error, first-call (compile) time, median.
  memory       (CUDA) allocated/reserved memory before, after composing 50 components, and
               after forgetting them all.
  timings      batch 1/32/256: plain vs linearized forward (ratio, and ÷ the FLOP floor
               1 + 2·tail/total); steady-state cost vs N = 1..50 components at batch 32.
and once (effnet): serving throughput through real HTTP (`tmc serve`, concurrency 64) against
the offline executor on the same device at the server's mean batch size.

Writes bench/results/gpu.json (``--out``); prints a summary. ``--smoke`` runs every section
on tiny sizes (CPU, a minute or two) so that the script cannot rot: ``make test`` runs it.
A section that fails records its error and the rest still run; the exit code is 1 if any
section failed or a correctness check did not hold.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from bases import Base, load_base
from bench import common
from bench.gpu_common import (
    DATASET,
    PRESETS,
    Components,
    EvalData,
    executor_for,
    load_eval_data,
    plan_of,
    prepare_base,
    probe_components,
    random_components,
)
from bench.gpu_correctness import check_correctness, max_abs
from bench.gpu_http import HttpLoad, check_http

NAME = "gpu"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Sizes:
    correctness_rows: int
    eval_rows: int  # real test rows for the dtype comparison
    batches: tuple[int, ...]
    ns: tuple[int, ...]
    memory_components: int
    repeats: int
    time_budget_s: float  # per timing section
    http_concurrency: int
    http_duration_s: float
    compile_presets: tuple[str, ...]


FULL = Sizes(64, 4000, (1, 32, 256), (1, 2, 5, 10, 20, 50), 50, 15, 40.0, 64, 8.0,
             tuple(PRESETS))
SMOKE = Sizes(8, 48, (1, 4), (1, 5), 4, 2, 2.0, 4, 1.5, ("effnet-lite0",))


# -- helpers -----------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def section(results: dict[str, Any], key: str, fn: Callable[[], dict[str, Any]]) -> None:
    """Run one section; a failure is recorded (with its traceback tail) and the rest go on."""
    started = time.perf_counter()
    common.log(f"{key} ...")
    try:
        results[key] = fn()
    except Exception as exc:  # noqa: BLE001 - every section reports, whatever fails
        results[key] = {"error": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc()[-3000:]}
        common.log(f"{key} FAILED: {exc}")
    results[key]["seconds"] = round(time.perf_counter() - started, 2)


# -- reduced precision -------------------------------------------------------------------------
def check_dtypes(base: Base, data: EvalData, device: torch.device) -> dict[str, Any]:
    half = len(data) // 2
    comps = Components()
    fitted = probe_components(base, data, slice(0, half), count=5, seed=3)
    digests = [comps.add(f"{base.spec.preset}-probe{k}", d) for k, d in enumerate(fitted)]
    mean = plan_of({d: 1.0 for d in digests}, "mean")
    eval_rows = slice(half, len(data))
    labels = data.labels[eval_rows]
    ref = _logits_by_plan(executor_for(base, comps, device, torch.float32), base, data,
                          eval_rows, mean)
    out: dict[str, Any] = {"eval_rows": len(labels), "data": data.source,
                           "components": "5 ridge-fitted classifier tangents (first half of the"
                                         " rows, one shard each) + small random tangents on "
                                         "the rest of the region; composition = their mean",
                           "float32_accuracy": {k: _acc(v, labels) for k, v in ref.items()}}
    for name, dtype in DTYPES.items():
        got = _logits_by_plan(executor_for(base, comps, device, dtype), base, data, eval_rows,
                              mean)
        out[name] = {k: _compare(got[k], ref[k], labels) for k in ref}
    return out


def _logits_by_plan(ex: Any, base: Base, data: EvalData, rows: slice, plan: Any
                    ) -> dict[str, torch.Tensor]:
    parts: dict[str, list[torch.Tensor]] = {"theta0": [], "composed": []}
    items = data.items[rows]
    for start in range(0, len(items), 64):
        h = ex.trunk(base.preprocessor.collate(items[start:start + 64]))
        parts["theta0"].append(ex.tail(plan_of({}), h))
        parts["composed"].append(ex.tail(plan, h))
    return {k: torch.cat(v) for k, v in parts.items()}


def _acc(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).double().mean())


def _compare(got: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    diff = (got.double() - ref.double()).abs()
    return {"max_abs_dlogit": float(diff.max()), "mean_abs_dlogit": float(diff.mean()),
            "logit_scale": float(ref.abs().max()),
            "top1_agreement": float((got.argmax(1) == ref.argmax(1)).double().mean()),
            "accuracy": _acc(got, labels), "finite": bool(torch.isfinite(got).all())}


# -- compiled tail -----------------------------------------------------------------------------
def check_compile(base: Base, data: EvalData, device: torch.device, batch: int, repeats: int
                  ) -> dict[str, Any]:
    """Each TMC_COMPILE mode against eager: first call (compile) time, a second composition
    (must reuse the graph), max error, and the median of the steady state."""
    comps = Components()
    digests = [comps.add(f"{base.spec.preset}-k{k}", d)
               for k, d in enumerate(random_components(base.net, 2, seed=5))]
    plans = [plan_of({digests[0]: 1.0}), plan_of({digests[0]: 0.5, digests[1]: 0.5})]
    x = data.batch(base, batch)
    eager = executor_for(base, comps, device, torch.float32)
    want = [eager.run(p, x) for p in plans]
    out: dict[str, Any] = {"batch": batch, "logit_scale": float(want[1].abs().max())}
    cases = [common.Case("eager", partial(eager.run, plans[1], x))]
    for mode in ("tail", "all"):
        compiled = executor_for(base, comps, device, torch.float32, compile_mode=mode)
        started = time.perf_counter()
        first = compiled.run(plans[0], x)
        first_s = time.perf_counter() - started
        started = time.perf_counter()
        second = compiled.run(plans[1], x)  # a new composition: must not recompile
        out[mode] = {"first_call_s": first_s, "new_composition_s": time.perf_counter() - started,
                     "max_abs_error": max(max_abs(first, want[0]), max_abs(second, want[1]))}
        cases.append(common.Case(mode, partial(compiled.run, plans[1], x)))
    timings = common.run_rounds(cases, repeats, budget_s=30.0)
    med = {k: common.summarize(v)["median"] for k, v in timings.wall.items()}
    out["median_ms"] = {k: v * 1e3 for k, v in med.items()}
    for mode in ("tail", "all"):
        out[mode]["over_eager"] = med[mode] / med["eager"]
    out["max_abs_error"] = max(out[m]["max_abs_error"] for m in ("tail", "all"))
    return out


# -- memory ------------------------------------------------------------------------------------
def check_memory(base: Base, data: EvalData, device: torch.device, count: int
                 ) -> dict[str, Any]:
    if device.type != "cuda":
        return {"skipped": "CPU device: allocator figures are CUDA-only"}
    comps = Components()
    digests = [comps.add(f"{base.spec.preset}-m{k}", d)
               for k, d in enumerate(random_components(base.net, count, seed=7))]
    ex = executor_for(base, comps, device, torch.float32)
    x = data.batch(base, 32)
    ex.run(plan_of({}), x)
    ex.run(plan_of({digests[0]: 1.0}), x)  # workspaces of both paths exist from here on
    ex.purge([digests[0]])
    sync(device)
    baseline = _mem(device)
    for d in digests:
        ex.run(plan_of({d: 1.0}), x)
    ex.run(plan_of({d: 1.0 / count for d in digests}), x)
    sync(device)
    loaded, cached_bytes = _mem(device), ex.cached_bytes
    ex.purge(digests)
    sync(device)
    after = _mem(device)
    return {"components": count, "cached_bytes_when_loaded": cached_bytes,
            "baseline": baseline, "after_composing": loaded, "after_forgetting_all": after,
            "allocated_back_to_baseline": after["allocated"] <= baseline["allocated"],
            "reserved_over_baseline": after["reserved"] / max(baseline["reserved"], 1),
            "cache_entries_left": len(ex.components) + len(ex.composed)}


def _mem(device: torch.device) -> dict[str, int]:
    return {"allocated": torch.cuda.memory_allocated(device),
            "reserved": torch.cuda.memory_reserved(device)}


# -- timings -----------------------------------------------------------------------------------
def time_forwards(base: Base, data: EvalData, device: torch.device, sizes: Sizes
                  ) -> dict[str, Any]:
    comps = Components()
    deltas = random_components(base.net, max(sizes.ns), seed=9)
    digests = [comps.add(f"{base.spec.preset}-t{k}", d) for k, d in enumerate(deltas)]
    ex = executor_for(base, comps, device, torch.float32)
    plans = {n: plan_of({d: 1.0 / n for d in digests[:n]}) for n in sizes.ns}
    cases = []
    for b in sizes.batches:
        x = data.batch(base, b)
        cases += [common.Case(f"plain|{b}", partial(ex.run, plan_of({}), x), group=f"b{b}"),
                  common.Case(f"linearized|{b}", partial(ex.run, plans[sizes.ns[0]], x),
                              group=f"b{b}")]
    x32 = data.batch(base, 32)
    cases += [common.Case(f"n|{n}", partial(ex.run, plans[n], x32), group="n")
              for n in sizes.ns]
    timings = common.run_rounds(cases, sizes.repeats, budget_s=sizes.time_budget_s)
    med = {k: common.summarize(v)["median"] for k, v in timings.wall.items()}
    floor = flop_floor(base, data)
    per_batch = {}
    for b in sizes.batches:
        ratio = med[f"linearized|{b}"] / med[f"plain|{b}"]
        per_batch[str(b)] = {"plain_ms": med[f"plain|{b}"] * 1e3,
                             "linearized_ms": med[f"linearized|{b}"] * 1e3,
                             "ratio": ratio, "ratio_over_flop_floor": ratio / floor["floor"]}
    by_n = {str(n): med[f"n|{n}"] * 1e3 for n in sizes.ns}
    return {"flops": floor, "per_batch": per_batch, "by_n_ms_batch32": by_n,
            "n_max_over_min": max(by_n.values()) / min(by_n.values()),
            "rounds": len(next(iter(timings.wall.values())))}


def flop_floor(base: Base, data: EvalData) -> dict[str, Any]:
    """FLOPs of a plain forward and of the tail alone (CPU, batch 1): floor = 1 + 2·tail/total."""
    net = base.net
    x = data.batch(base, 1)
    with torch.no_grad():
        h = net.trunk_forward(x)
        plain, tail = _flops(partial(net.forward, x)), _flops(partial(net.tail_forward, h))
    return {"plain": plain, "tail": tail, "floor": 1 + 2 * tail / plain}


def _flops(run: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


# -- driver ------------------------------------------------------------------------------------
def pick(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def run_preset(preset: str, device: torch.device, sizes: Sizes, payload: Path | None,
               workdir: Path) -> dict[str, Any]:
    base_dir = prepare_base(preset, workdir, payload)
    base = load_base(base_dir)
    data = load_eval_data(base, payload, sizes.eval_rows)
    out: dict[str, Any] = {"base": base.spec.name, "options": PRESETS[preset],
                           "fingerprint": base.fingerprint, "data": DATASET[preset],
                           "region_params": sum(base.net.params[n].numel()
                                                for n in base.net.names)}
    section(out, "correctness", partial(check_correctness, base, data, device,
                                        sizes.correctness_rows))
    section(out, "dtypes", partial(check_dtypes, base, data, device))
    if preset in sizes.compile_presets:
        section(out, "compile", partial(check_compile, base, data, device, 32, sizes.repeats))
    section(out, "memory", partial(check_memory, base, data, device, sizes.memory_components))
    section(out, "timings", partial(time_forwards, base, data, device, sizes))
    if preset == "effnet-lite0":
        load = HttpLoad(sizes.http_concurrency, sizes.http_duration_s, sizes.repeats,
                        sizes.time_budget_s)
        section(out, "http", partial(check_http, base_dir, base, payload, device, load,
                                     workdir))
    return out


def failures(results: dict[str, Any]) -> list[str]:
    bad = []
    for preset, res in results["presets"].items():
        for key, sec in res.items():
            if isinstance(sec, dict) and "error" in sec:
                bad.append(f"{preset}/{key}: {sec['error']}")
        corr = res.get("correctness", {})
        if "passed" in corr and not corr["passed"]:
            bad.append(f"{preset}/correctness: a check did not hold")
    return bad


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's GPU targets, measured (never asserted in tests)."""
    out: dict[str, Any] = {}
    for preset, res in results["presets"].items():
        t = res.get("timings", {})
        b32 = t.get("per_batch", {}).get("32", {})
        out[f"{preset}: linearized/plain ÷ FLOP floor, batch 32"] = common.target(
            b32.get("ratio_over_flop_floor"), 1.2, "<=", "same device, side by side")
        out[f"{preset}: cost max/min over N"] = common.target(
            t.get("n_max_over_min"), 1.1, "<=", "steady state, batch 32")
        bf16 = res.get("dtypes", {}).get("bfloat16", {}).get("composed", {})
        out[f"{preset}: bf16 top-1 agreement with fp32"] = common.target(
            bf16.get("top1_agreement"), 0.995, ">=", "composition of 5, real test rows")
        mem = res.get("memory", {})
        if "reserved_over_baseline" in mem:
            out[f"{preset}: reserved memory after forgetting all ÷ baseline"] = common.target(
                mem["reserved_over_baseline"], 1.01, "<=", "torch.cuda.memory_reserved")
        http = res.get("http", {})
        if "http_over_offline_at_mean_batch" in http:
            out[f"{preset}: HTTP throughput ÷ offline at the mean batch"] = common.target(
                http["http_over_offline_at_mean_batch"], 0.8, ">=",
                f"concurrency {http.get('concurrency')}")
    return out


def jvp_drops_tangents_in_inference_mode() -> bool:
    """pytorch#177318 on this torch? (the executor avoids inference mode either way)"""
    from torch.func import jvp

    with torch.inference_mode():
        tangent = jvp(lambda t: t * 2, (torch.ones(2),), (torch.ones(2),))[1]
    return bool((tangent == 0).all())


def write_doc(out: Path, smoke: bool, started: float, info: dict[str, Any],
              settings: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    doc = {"name": NAME, "smoke": smoke,
           "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "wall_seconds": time.perf_counter() - started, "machine": info,
           "settings": settings, "results": results, "targets": targets(results),
           "failures": failures(results)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU, a minute or two)")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--payload", type=Path, help="bases and data from bench.gpu_payload")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--out", type=Path, help="result JSON (default bench/results/gpu.json)")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    device = pick(args.device)
    sizes = SMOKE if args.smoke else FULL
    info = common.machine(str(device))
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    info["jvp_under_inference_mode_drops_tangents"] = jvp_drops_tangents_in_inference_mode()
    results: dict[str, Any] = {"presets": {}}
    out = args.out or common.RESULTS / "gpu.json"
    settings = {"sizes": sizes.__dict__, "device": str(device),
                "payload": ("θ0 rounded to float16 for transport, served as float32"
                            if args.payload else None)}
    with tempfile.TemporaryDirectory(prefix="tmc-gpu-check-") as tmp:
        for preset in args.presets.split(","):
            common.log(f"preset {preset} on {device}")
            results["presets"][preset] = run_preset(preset, device, sizes, args.payload,
                                                    Path(tmp))
            doc = write_doc(out, args.smoke, started, info, settings, results)  # so far
    bad = doc["failures"]
    if args.out is None:
        from bench.summary import write_summary

        write_summary()
    common.log(f"wrote {out} in {doc['wall_seconds']:.0f} s; "
               f"{'FAILED: ' + '; '.join(bad) if bad else 'every check held'}")
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    raise SystemExit(main())
