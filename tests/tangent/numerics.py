"""Numerical helpers for the tests: kink-aware central finite differences over parameters,
a light assert_close, and a probe for which modules receive tangent-carrying inputs."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call

KINKED = (nn.ReLU, nn.Hardtanh)  # nn.ReLU6 is a Hardtanh: kinks at its min_val and max_val


def _run(net: nn.Module, params: Mapping[str, torch.Tensor], x: object
         ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output, and for every kinked activation the side of each kink its inputs are on."""
    sides: list[torch.Tensor] = []

    def hook(mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        lo, hi = (0.0, float("inf")) if isinstance(mod, nn.ReLU) else (
            mod.min_val, mod.max_val)  # type: ignore[attr-defined]
        sides.append((args[0] > lo).to(torch.int8) + (args[0] > hi).to(torch.int8))

    handles = [m.register_forward_pre_hook(hook) for m in net.modules() if isinstance(m, KINKED)]
    try:
        with torch.no_grad():
            out = functional_call(net, dict(params), (x,))
    finally:
        for handle in handles:
            handle.remove()
    return out, sides


def central_difference(net: nn.Module, x: object, delta: Mapping[str, torch.Tensor],
                       h: float, tries: int = 4) -> tuple[torch.Tensor, float]:
    """(f(θ0 + hΔ) − f(θ0 − hΔ)) / 2h over the whole network, by functional_call.

    If some ReLU/ReLU6 input is on different sides of a kink at θ0 ± hΔ, the function is not
    smooth on that step and the difference is not a derivative: retry with h/10. Returns the
    difference and the step used."""
    params = dict(net.named_parameters())
    for _ in range(tries):
        plus, sides_p = _run(net, {n: params[n] + h * d for n, d in delta.items()}, x)
        minus, sides_m = _run(net, {n: params[n] - h * d for n, d in delta.items()}, x)
        if all(torch.equal(a, b) for a, b in zip(sides_p, sides_m, strict=True)):
            return (plus - minus) / (2 * h), h
        h /= 10
    raise AssertionError(f"every step down to h={h * 10:g} crosses a kink")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float,
                 context: str = "") -> None:
    """Elementwise |a − e| ≤ atol + rtol·|e|, like torch.testing.assert_close but without its
    first-call import of torch.distributed.tensor (seconds)."""
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape} {context}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype} {context}"
    if not torch.allclose(actual, expected, rtol=rtol, atol=atol):
        err = (actual - expected).abs()
        worst = int(err.view(-1).argmax())
        raise AssertionError(
            f"not close: max abs err {float(err.max()):.3g} at flat index {worst} "
            f"(actual {float(actual.view(-1)[worst]):.8g}, expected "
            f"{float(expected.view(-1)[worst]):.8g}; rtol={rtol}, atol={atol}) {context}")


def _carries_tangent(t: object) -> bool:
    if isinstance(t, tuple | list):
        return any(_carries_tangent(u) for u in t)
    if not isinstance(t, torch.Tensor):
        return False
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(t)) or (
        fwAD.unpack_dual(t).tangent is not None)


def record_tangent_inputs(net: nn.Module, run: Callable[[], object]) -> dict[str, bool]:
    """For every submodule called during run(): did any of its inputs carry a tangent?"""
    seen: dict[str, bool] = {}
    handles = []
    for name, module in net.named_modules():
        if name:
            def hook(mod: nn.Module, args: tuple[object, ...], name: str = name) -> None:
                seen[name] = seen.get(name, False) or _carries_tangent(args)
            handles.append(module.register_forward_pre_hook(hook))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return seen
