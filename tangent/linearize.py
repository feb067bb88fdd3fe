"""The linearized network: y(x) = f(x; θ0) + J_θ f(x; θ0) · Δ.

The network is an ``nn.Sequential`` of named stages. The tangent region is a set of
parameter names; the network is split at the first stage that holds one of them:
the trunk before it runs as a plain forward (no dual numbers), the tail runs under
``torch.func.jvp`` with tangents only on the parameters the Delta names.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jvp

from tangent.delta import Delta
from tangent.errors import UnsupportedOpError

Inputs = Any  # a Tensor, or a tuple of tensors for multi-input stages (text: ids, mask)


@dataclass(frozen=True)
class TangentParam:
    """A parameter of the tangent region, as an outside trainer must produce it."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # e.g. "float32": the dtype of θ0 for this parameter


def region_names(net: nn.Sequential, patterns: Sequence[str]) -> list[str]:
    """Parameter names matching any glob pattern, in network order."""
    names = [n for n, _ in net.named_parameters()]
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        raise ValueError(f"tangent region patterns {list(patterns)} match no parameter")
    return chosen


def _first_stage(net: nn.Sequential, names: Sequence[str]) -> int:
    stage_names = list(net._modules)
    owners = {n.split(".", 1)[0] for n in names}
    return min(stage_names.index(o) for o in owners)


class LinearizedNet:
    """A frozen network with a tangent region; evaluates plain and linearized outputs."""

    def __init__(self, net: nn.Sequential, patterns: Sequence[str]) -> None:
        net.eval().requires_grad_(False)
        self.net = net
        self.names = region_names(net, patterns)
        split = _first_stage(net, self.names)
        self.trunk: nn.Module = net[:split]
        self.tail: nn.Module = net[split:]
        self.params: dict[str, torch.Tensor] = dict(net.named_parameters())
        self.region: dict[str, TangentParam] = {
            n: TangentParam(n, tuple(self.params[n].shape), str(self.params[n].dtype)[6:])
            for n in self.names
        }

    @property
    def split_index(self) -> int:
        return len(self.trunk)  # type: ignore[arg-type]

    def trunk_forward(self, x: Inputs) -> Inputs:
        """The frozen part before the tangent region: a plain forward."""
        with torch.no_grad():
            return self.trunk(x)

    def tail_forward(self, h: Inputs, delta: Mapping[str, torch.Tensor] | None = None
                     ) -> torch.Tensor:
        """f_tail(h; θ0) + J f_tail(h; θ0)·Δ; a plain forward when Δ is empty."""
        if not delta:
            with torch.no_grad():
                out: torch.Tensor = self.tail(h)
            return out
        y0, dy = self.tail_jvp(h, delta)
        return y0 + dy

    def tail_jvp(self, h: Inputs, delta: Mapping[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(f_tail(h; θ0), J f_tail(h; θ0)·Δ): only the parameters Δ names carry tangents."""
        names = tuple(delta)
        primals = tuple(self.params[n] for n in names)
        tangents = tuple(delta[n] for n in names)

        def tail_fn(*ps: torch.Tensor) -> torch.Tensor:
            res: torch.Tensor = functional_call(
                self.tail, dict(zip(names, ps, strict=True)), (h,), strict=False)
            return res

        with torch.no_grad():
            out = jvp(tail_fn, primals, tangents)  # (value, tangent) without has_aux
        y0: torch.Tensor = out[0]
        dy: torch.Tensor = out[1]
        return y0, dy

    def to(self, device: torch.device | str, dtype: torch.dtype) -> LinearizedNet:
        """Move θ0 to a device/dtype in place (parameters are re-read afterwards)."""
        self.net.to(device=device, dtype=dtype)
        self.params = dict(self.net.named_parameters())
        return self

    def forward(self, x: Inputs, delta: Mapping[str, torch.Tensor] | None = None
                ) -> torch.Tensor:
        return self.tail_forward(self.trunk_forward(x), delta)

    def full_jvp_forward(self, x: Inputs, delta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The same output, but with the whole network under jvp (for cost comparisons)."""
        names = tuple(delta)

        def net_fn(*ps: torch.Tensor) -> torch.Tensor:
            res: torch.Tensor = functional_call(
                self.net, dict(zip(names, ps, strict=True)), (x,), strict=False)
            return res

        with torch.no_grad():
            out = jvp(net_fn, tuple(self.params[n] for n in names),
                      tuple(delta[n] for n in names))
        y: torch.Tensor = out[0] + out[1]
        return y

    def random_delta(self, generator: torch.Generator, scale: float = 1e-2) -> Delta:
        """A random tangent over the whole region (for probes and tests)."""
        return {n: torch.randn(self.params[n].shape, generator=generator,
                               dtype=self.params[n].dtype) * scale for n in self.names}

    def check_forward_ad(self, example: Inputs) -> None:
        """Run one linearized forward; name the op and the fix if forward AD is missing."""
        delta = self.random_delta(torch.Generator().manual_seed(0))
        try:
            self.forward(example, delta)
        except (NotImplementedError, RuntimeError) as exc:
            raise UnsupportedOpError(_forward_ad_message(exc)) from exc


_OP = re.compile(r"forward AD with (\S+)|derivative for (\S+)|for (\S+) that does not support")


def _forward_ad_message(exc: BaseException) -> str:
    text = str(exc)
    match = _OP.search(text)
    op = next((g for g in match.groups() if g), "an op") if match else "an op"
    return (
        f"the tangent region uses {op}, which has no forward-mode AD rule in torch "
        f"{torch.__version__}, so the linearized forward cannot run. Fix: use the "
        "math/eager path of that op (Hugging Face models: attn_implementation='eager'; "
        "custom autograd Functions need a jvp), or move the op out of the tangent region. "
        f"(torch said: {text.splitlines()[0] if text else type(exc).__name__})"
    )

