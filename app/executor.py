"""Runs one group on the device: compose Δ (cached by digest), then one linearized forward.

Everything runs under ``torch.no_grad()``, never ``torch.inference_mode()``: torch.func.jvp
silently returns zero tangents under inference mode before torch 2.12 (pytorch#177318;
measured here on torch 2.11 + CUDA: every composition answered exactly θ0's logits).

On CUDA every kernel runs on the executor's own stream: inputs are copied from pinned host
memory without blocking, each group's logits are copied back into pinned host memory
without blocking (``tail_async``), and ``synchronize`` waits once for the whole batch.

No storage I/O here: a component not in the device cache comes from the job's staged host
tensors (fetched, verified and decoded at admission, app/fetch.py), which the device thread
only casts and moves. The service builds its executor without a loader; a missing tensor is
then ``NotStagedError`` (the service admits the request again with everything staged).
Benches and tools that drive an executor directly may give it a ``load_tensors`` of their
own (in-memory tensors) instead.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType

import torch

from app.cache import DeltaLRU
from app.fetch import NotStagedError
from app.host_tensors import HostTensors, LoadTensors
from app.plan import Plan
from app.purges import PurgeLog
from tangent import CompileMode, Delta, LinearizedNet, Term, compose
from tangent.delta import cast_delta
from tangent.errors import UnsupportedOpError

NOTHING_STAGED: Mapping[str, HostTensors] = MappingProxyType({})


class Executor:
    """Owns the device copies of θ0, component tangents and composed tangents."""

    def __init__(self, net: LinearizedNet, load_tensors: LoadTensors | None,
                 device: torch.device,
                 dtype: torch.dtype, cache_bytes: int, compile_mode: CompileMode = "none"
                 ) -> None:
        if device.type == "cuda" and dtype == torch.float32:
            exact_float32_on_cuda()
        net.compile(compile_mode)
        self.net = net.to(device, dtype)
        self.stream = (torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
                       if device.type == "cuda" else None)
        self.load_tensors = load_tensors
        self.device, self.dtype = device, dtype
        self.components = DeltaLRU(cache_bytes // 2)  # digest -> float32 Δ_k on device
        self.composed = DeltaLRU(cache_bytes // 2)  # composition digest -> Σ w_k Δ_k
        self.purges = PurgeLog()  # what purge dropped, and when (app/purges.py)

    def trunk(self, x: object) -> object:
        """The frozen part before the tangent region, once for a whole device batch."""
        with self.on_stream(), torch.no_grad():
            return self.net.trunk_forward(_to_device(x, self.device, self.dtype))

    def tail(self, plan: Plan, h: object,
             staged: Mapping[str, HostTensors] = NOTHING_STAGED) -> torch.Tensor:
        """Logits [B, C] (float32, CPU) of the tail under the plan's composition."""
        y = self.tail_async(plan, h, staged)
        self.synchronize()
        return y

    def tail_async(self, plan: Plan, h: object,
                   staged: Mapping[str, HostTensors] = NOTHING_STAGED) -> torch.Tensor:
        """Logits [B, C] (float32, host memory); on CUDA valid only after ``synchronize``."""
        with self.on_stream(), torch.no_grad():
            delta = self.composed_delta(plan, staged) if plan.terms else None
            return self._to_host(self.net.tail_forward(h, delta))

    def explain_tail(self, plan: Plan, h: object,
                     staged: Mapping[str, HostTensors] = NOTHING_STAGED
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, C] and each term's exact contribution w_k·J(x)Δ_k: [K, B, C]."""
        y, contrib = self.explain_tail_async(plan, h, staged)
        self.synchronize()
        return y, contrib

    def explain_tail_async(self, plan: Plan, h: object,
                           staged: Mapping[str, HostTensors] = NOTHING_STAGED
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        with self.on_stream(), torch.no_grad():
            y0, parts = self.net.tail_forward(h), []
            for term in sorted(plan.terms, key=lambda t: t.digest):
                scaled = {n: (t * term.weight).to(self.dtype)
                          for n, t in self.component(term.digest, staged).items()}
                parts.append(self.net.tail_jvp(h, scaled)[1])
            contrib = torch.stack(parts) if parts else y0.new_zeros((0, *y0.shape))
            y = (self.net.tail_forward(h, self.composed_delta(plan, staged)) if plan.terms
                 else y0)
            return self._to_host(y), self._to_host(contrib)

    def check_linearization(self, x: object) -> None:
        """Startup self-check on this device, dtype and compile mode: J·Δ of a non-zero Δ is
        non-zero and finite. Some torch builds silently drop forward-AD tangents (under
        inference mode before 2.12, pytorch#177318; through Inductor, pytorch#187284): a
        replica on one of them would answer θ0 for every composition."""
        delta = cast_delta(self.net.random_delta(torch.Generator().manual_seed(0)),
                           self.device, self.dtype)
        with self.on_stream(), torch.no_grad():
            _, dy = self.net.tail_jvp(self.trunk(x), delta)  # [B, C]
            finite, nonzero = bool(torch.isfinite(dy).all()), bool((dy != 0).any())
        if not (finite and nonzero):
            raise UnsupportedOpError(
                f"the linearized forward gave J·Δ {'= 0' if finite else 'non-finite'} for a "
                f"non-zero Δ on {self.device} ({self.dtype}, compile "
                f"{self.net.compile_mode!r}) with torch {torch.__version__}: forward-mode AD "
                "is broken in this setup, and every composition would answer θ0. Fix: "
                "another torch version, TMC_COMPILE=none, or TMC_DTYPE=float32")

    def synchronize(self) -> None:
        """Wait for every copy and kernel queued so far (once per batch on CUDA)."""
        if self.stream is not None:
            self.stream.synchronize()

    @contextlib.contextmanager
    def on_stream(self) -> Iterator[None]:
        if self.stream is None:
            yield
            return
        with torch.cuda.stream(self.stream):
            yield

    def _to_host(self, y: torch.Tensor) -> torch.Tensor:
        """A float32 host copy of a device result; not blocking on CUDA (pinned memory)."""
        if self.stream is None:
            return y.float()
        out = torch.empty(y.shape, dtype=torch.float32, pin_memory=True)
        out.copy_(y, non_blocking=True)
        return out

    def run(self, plan: Plan, x: object,
            staged: Mapping[str, HostTensors] = NOTHING_STAGED) -> torch.Tensor:
        return self.tail(plan, self.trunk(x), staged)

    def explain(self, plan: Plan, x: object,
                staged: Mapping[str, HostTensors] = NOTHING_STAGED
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.explain_tail(plan, self.trunk(x), staged)

    def composed_delta(self, plan: Plan,
                       staged: Mapping[str, HostTensors] = NOTHING_STAGED) -> Delta:
        return self.composed.get_or_build(plan.composition_digest, plan.digests,
                                          lambda: self._compose(plan, staged))

    def _compose(self, plan: Plan, staged: Mapping[str, HostTensors]) -> Delta:
        terms = [Term(t.digest, t.weight, self.component(t.digest, staged))
                 for t in plan.terms]
        return cast_delta(compose(terms, "none"), self.device, self.dtype)

    def component(self, digest: str,
                  staged: Mapping[str, HostTensors] = NOTHING_STAGED) -> Delta:
        """Δ_k on the device (float32): cached, else cast from the job's staged host
        tensors; never read from storage here (NotStagedError when neither has it)."""
        return self.components.get_or_build(
            digest, [digest],
            lambda: cast_delta(self._host_tensors(digest, staged), self.device, torch.float32))

    def _host_tensors(self, digest: str, staged: Mapping[str, HostTensors]) -> HostTensors:
        tensors = staged.get(digest)
        if tensors is not None:
            return tensors
        if self.load_tensors is not None:  # an executor driven directly (benches, tools)
            return self.load_tensors(digest)
        raise NotStagedError(f"component version {digest} left the device cache after the "
                             "request was admitted; retry")

    def to_stage(self, plan: Plan, everything: bool = False) -> list[str]:
        """The component digests a job of this plan must bring (read at admission, off the
        device thread): none when its composed Δ is cached (explain always needs every
        component), else those not in the component cache; with ``everything``, all of
        them (a retry after an eviction: the job then cannot miss again)."""
        if everything:
            return sorted(plan.digests)
        if not plan.terms or (plan.composition_digest in self.composed and not plan.explain):
            return []
        return sorted(d for d in plan.digests if d not in self.components)

    def purge(self, digests: Iterable[str]) -> None:
        """Forget: drop every cached tensor built from these component digests, and log the
        purge so that no job admitted before it uses what it brought (app/purges.py)."""
        gone = list(digests)
        self.purges.record(gone)
        self.components.purge(gone)
        self.composed.purge(gone)
        if self.stream is not None:
            self.synchronize()  # no queued kernel still reads a dropped tensor
            torch.cuda.empty_cache()  # the caching allocator hands the blocks back
        release_freed_memory()

    @property
    def cached_bytes(self) -> int:
        return self.components.nbytes + self.composed.nbytes


def exact_float32_on_cuda() -> None:
    """float32 serving means IEEE float32: no TF32 in matmuls or convolutions (cuDNN's
    default allows it, ~1e-3 relative error). Process-wide; reduced precision is opt-in
    through TMC_DTYPE=bfloat16|float16 instead."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


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
    if device.type == "cuda":
        x = x.pin_memory()  # page-locked, so the copy below does not block the host
    x = x.to(device, non_blocking=True)
    return x.to(dtype) if x.is_floating_point() else x
