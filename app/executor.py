"""Runs one group on the device: compose Δ (cached by digest), then one linearized forward."""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable, Iterable

import torch

from app.cache import DeltaLRU
from app.plan import Plan
from tangent import Delta, LinearizedNet, Term, compose
from tangent.delta import cast_delta

LoadTensors = Callable[[str], dict[str, torch.Tensor]]


class Executor:
    """Owns the device copies of θ0, component tangents and composed tangents."""

    def __init__(self, net: LinearizedNet, load_tensors: LoadTensors, device: torch.device,
                 dtype: torch.dtype, cache_bytes: int) -> None:
        self.net = net.to(device, dtype)
        self.load_tensors = load_tensors
        self.device, self.dtype = device, dtype
        self.components = DeltaLRU(cache_bytes // 2)  # digest -> float32 Δ_k on device
        self.composed = DeltaLRU(cache_bytes // 2)  # composition digest -> Σ w_k Δ_k

    def trunk(self, x: object) -> object:
        """The frozen part before the tangent region, once for a whole device batch."""
        x = _to_device(x, self.device, self.dtype)
        with torch.inference_mode():
            return self.net.trunk_forward(x)

    def tail(self, plan: Plan, h: object) -> torch.Tensor:
        """Logits [B, C] (float32, CPU) of the tail under the plan's composition."""
        with torch.inference_mode():
            delta = self.composed_delta(plan) if plan.terms else None
            y = self.net.tail_forward(h, delta)
        return y.float().cpu()

    def explain_tail(self, plan: Plan, h: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, C] and each term's exact contribution w_k·J(x)Δ_k: [K, B, C]."""
        with torch.inference_mode():
            y0, parts = self.net.tail_forward(h), []
            for term in sorted(plan.terms, key=lambda t: t.digest):
                scaled = {n: (t * term.weight).to(self.dtype)
                          for n, t in self.component(term.digest).items()}
                parts.append(self.net.tail_jvp(h, scaled)[1])
            contrib = torch.stack(parts) if parts else y0.new_zeros((0, *y0.shape))
            y = self.net.tail_forward(h, self.composed_delta(plan)) if plan.terms else y0
        return y.float().cpu(), contrib.float().cpu()

    def run(self, plan: Plan, x: object) -> torch.Tensor:
        return self.tail(plan, self.trunk(x))

    def explain(self, plan: Plan, x: object) -> tuple[torch.Tensor, torch.Tensor]:
        return self.explain_tail(plan, self.trunk(x))

    def composed_delta(self, plan: Plan) -> Delta:
        return self.composed.get_or_build(plan.key, plan.digests, lambda: self._compose(plan))

    def _compose(self, plan: Plan) -> Delta:
        terms = [Term(t.digest, t.weight, self.component(t.digest)) for t in plan.terms]
        return cast_delta(compose(terms, "none"), self.device, self.dtype)

    def component(self, digest: str) -> Delta:
        return self.components.get_or_build(
            digest, [digest],
            lambda: cast_delta(self.load_tensors(digest), self.device, torch.float32))

    def purge(self, digests: Iterable[str]) -> None:
        """Forget: drop every cached tensor built from these component digests."""
        gone = list(digests)
        self.components.purge(gone)
        self.composed.purge(gone)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        release_freed_memory()

    @property
    def cached_bytes(self) -> int:
        return self.components.nbytes + self.composed.nbytes


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise), so a forget
    shows in the process's RSS too. Best effort: a no-op off glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def select_rows(h: object, rows: slice) -> object:
    """Rows of a trunk output: a tensor [B, ...] or a tuple of them (text: hidden, mask)."""
    if isinstance(h, tuple):
        return tuple(select_rows(t, rows) for t in h)
    assert isinstance(h, torch.Tensor)
    return h[rows]


def _to_device(x: object, device: torch.device, dtype: torch.dtype) -> object:
    if isinstance(x, tuple):
        return tuple(_to_device(t, device, dtype) for t in x)
    assert isinstance(x, torch.Tensor)
    x = x.to(device, non_blocking=True)
    return x.to(dtype) if x.is_floating_point() else x
