"""GPU check, correctness section: the device in float32 against a float64 CPU reference."""

from __future__ import annotations

from typing import Any

import torch

from app.executor import Executor
from bases import Base
from bench.gpu_common import (
    Components,
    EvalData,
    executor_for,
    float64_reference,
    plan_of,
    random_components,
)

# float32 on the device against the float64 reference, relative to the largest |logit|:
# 12 decimal digits would be float64's own; float32 has ~7, deep nets lose one or two.
FP32_REL_TOL = 1e-4
LINEARITY_REL_TOL = 1e-5  # the same float32 ops summed two ways


def to_float64(x: Any) -> Any:
    if isinstance(x, tuple):
        return tuple(to_float64(t) for t in x)
    return x.double() if x.is_floating_point() else x


def rel(err: torch.Tensor | float, scale: torch.Tensor | float) -> float:
    return float(err) / max(float(scale), 1e-12)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def compose64(deltas: dict[str, dict[str, torch.Tensor]], weights: dict[str, float]
              ) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for d, w in weights.items():
        for n, t in deltas[d].items():
            out[n] = out.get(n, torch.zeros(t.shape, dtype=torch.float64)) + t.double() * w
    return out


def check_correctness(base: Base, data: EvalData, device: torch.device, rows: int
                      ) -> dict[str, Any]:
    comps = Components()
    deltas = random_components(base.net, 3, seed=1, rel_scale=0.05)
    names = [comps.add(f"{base.spec.preset}-c{k}", d) for k, d in enumerate(deltas)]
    by_digest = dict(zip(names, deltas, strict=True))
    zero = comps.add("zero", {n: torch.zeros_like(t) for n, t in deltas[0].items()})
    a, b, c = names
    weights = {a: 0.7, b: -0.4, c: 1.3}
    ex = executor_for(base, comps, device, torch.float32)
    x = data.batch(base, rows)
    f0 = ex.run(plan_of({}), x)  # [B, C]
    single = {d: ex.run(plan_of({d: 1.0}), x) for d in names}
    composed = ex.run(plan_of(weights), x)
    summed = f0 + sum(w * (single[d] - f0) for d, w in weights.items())
    direct_a = ex.net.forward(_device_input(ex, x), ex.composed_delta(plan_of({a: 1.0})))
    zero_out = ex.run(plan_of({zero: 1.0}), x)

    ref = float64_reference(base)
    x64 = to_float64(x)
    with torch.no_grad():
        f0_ref = ref.forward(x64)
        a_ref = ref.forward(x64, {n: t.double() for n, t in deltas[0].items()})
        composed_ref = ref.forward(x64, compose64(by_digest, weights))
    scale = composed_ref.abs().max()

    forget = check_forgetting(base, comps, ex, x, (a, b), c)

    out: dict[str, Any] = {
        "rows": rows, "logit_scale": float(scale),
        "base_vs_float64_rel": rel(max_abs(f0, f0_ref), f0_ref.abs().max()),
        "single_vs_float64_rel": rel(max_abs(single[a], a_ref), a_ref.abs().max()),
        "composed_vs_float64_rel": rel(max_abs(composed, composed_ref), scale),
        "linearity_rel": rel(max_abs(composed, summed), scale),
        "weight1_round_trip_max_abs": max_abs(single[a], direct_a.float().cpu()),
        "zero_tangent_vs_base_max_abs": max_abs(zero_out, f0),
        **forget,
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32,
                 "cudnn": torch.backends.cudnn.allow_tf32},
    }
    out["passed"] = bool(
        out["base_vs_float64_rel"] <= FP32_REL_TOL and out["single_vs_float64_rel"] <= FP32_REL_TOL
        and out["composed_vs_float64_rel"] <= FP32_REL_TOL
        and out["linearity_rel"] <= LINEARITY_REL_TOL
        and out["weight1_round_trip_max_abs"] == 0.0
        and out["zero_tangent_vs_base_max_abs"] <= 1e-6 * float(scale)
        and out["forget_bit_exact"] and out["forget_cache_entries_left"] == 0)
    out["tolerances"] = {"vs_float64_rel": FP32_REL_TOL, "linearity_rel": LINEARITY_REL_TOL,
                         "weight1_round_trip": "bit-exact", "zero_tangent_rel": 1e-6,
                         "forget": "bit-exact"}
    return out


def _device_input(ex: Any, x: Any) -> Any:
    from app.executor import _to_device

    return _to_device(x, ex.device, ex.dtype)


def check_forgetting(base: Base, comps: Components, ex: Executor, x: Any,
                     kept_digests: tuple[str, str], gone: str) -> dict[str, Any]:
    """Purge ``gone`` on the device, then compare with an executor that never had it."""
    kept = {kept_digests[0]: 0.7, kept_digests[1]: -0.4}
    before = ex.run(plan_of(kept), x)
    ex.purge([gone])
    after = ex.run(plan_of(kept), x)
    without = Components()
    for d in kept_digests:
        without.by_digest[d] = comps.by_digest[d]
    never_had = executor_for(base, without, ex.device, torch.float32).run(plan_of(kept), x)
    return {"forget_bit_exact": bool(torch.equal(after, never_had)),
            "forget_unchanged_kept_composition": bool(torch.equal(before, after)),
            "forget_cache_entries_left": (ex.components.count_built_from(gone)
                                          + ex.composed.count_built_from(gone))}
