"""The linearized network: y(x) = f(x; θ0) + J_θ f(x; θ0) · Δ.

The network is an ``nn.Sequential`` of named stages. The tangent region is a set of
parameter names; the network is split at the first stage that holds one of them:
the trunk before it runs as a plain forward (no dual numbers), the tail runs under
``torch.func.jvp`` with tangents only on the parameters the Delta names.

Optionally (``LinearizedNet.compile``) the tail's jvp, and the trunk, run through
``torch.compile``. There is one linearization either way: ``_jvp_fn`` builds the jvp
function, which the eager path calls as is and the compiled path wraps; training calls the
same eager path with autograd on (``LinearizedNet.tail_jvp_with_grad``). Compiled, θ0 and
Δ are graph inputs (never constants), and Δ always covers the whole region (missing names
as zeros), so a new composition of the same shapes reuses the compiled graph.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call, jvp

from tangent.delta import Delta
from tangent.errors import UnsupportedOpError

Inputs = Any  # a Tensor, or a tuple of tensors for multi-input stages (text: ids, mask)

CompileMode = Literal["none", "tail", "all"]
COMPILE_MODES: tuple[CompileMode, ...] = ("none", "tail", "all")

# (h, primals, tangents) -> (f_tail(h; θ0), J f_tail(h; θ0)·Δ)
TailJvpFn = Callable[[Inputs, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]],
                     tuple[torch.Tensor, torch.Tensor]]
Backend = str | Callable[..., Any]  # a torch.compile backend: "inductor", or a callable


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


# Normalization layers whose affine parameters torch.compile cannot leave out of the jvp:
# in torch 2.13, tracing forward AD through LayerNorm / GroupNorm / BatchNorm / InstanceNorm
# with a tangent-carrying input but plain (no tangent) weight and bias fails in Dynamo's
# fake-tensor propagation ("INTERNAL ASSERT FAILED ... native::_fw_primal"); eager is fine.
_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm,
                                       nn.modules.batchnorm._NormBase)


def _frozen_norm_params(tail: nn.Module, region: Sequence[str]) -> list[str]:
    """Parameters of normalization layers in the tail that are outside the region."""
    chosen = set(region)
    return [f"{mod_name}.{p_name}" for mod_name, mod in tail.named_modules()
            if isinstance(mod, _NORMS) for p_name, _ in mod.named_parameters(recurse=False)
            if f"{mod_name}.{p_name}" not in chosen]


def _jvp_fn(tail: nn.Module, names: Sequence[str]) -> TailJvpFn:
    """A module's linearization (the tail's; the whole network's for cost comparisons) over
    the parameters ``names`` (in this order): a function (h, primals, tangents) -> (y0, dy)
    with primals/tangents aligned with ``names``.

    The one implementation of the jvp: eager mode calls it as is, compiled modes wrap it
    in torch.compile (θ0's primals and Δ's tangents are then graph inputs)."""
    names = tuple(names)

    def tail_jvp(h: Inputs, primals: tuple[torch.Tensor, ...],
                 tangents: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        def tail_fn(*ps: torch.Tensor) -> torch.Tensor:
            res: torch.Tensor = functional_call(
                tail, dict(zip(names, ps, strict=True)), (h,), strict=False)
            return res

        out = jvp(tail_fn, primals, tangents)  # (value, tangent) without has_aux
        y0: torch.Tensor = out[0]
        dy: torch.Tensor = out[1]
        return y0, dy

    return tail_jvp


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
        self.compile_mode: CompileMode = "none"
        # the compiled jvp's primals: the whole region, then frozen normalization parameters
        # of the tail (see _NORMS), these always with zero tangents: the same linearization
        self._compiled_names = (*self.names, *_frozen_norm_params(self.tail, self.names))
        self._compiled_jvp: TailJvpFn | None = None  # over self._compiled_names
        self._compiled_trunk: Callable[[Inputs], Inputs] | None = None
        # (device, dtype, inference mode) -> name -> zeros: fills names a Δ omits (compiled)
        self._zeros: dict[tuple[torch.device, torch.dtype, bool], dict[str, torch.Tensor]] = {}

    def compile(self, mode: CompileMode, *, backend: Backend = "inductor") -> None:
        """Choose eager or torch.compile'd execution (compilation happens on first use).

        "none": eager (the default). "tail": the tail's jvp (a non-empty Δ) is compiled.
        "all": the trunk's forward is compiled too. The plain tail forward (an empty Δ)
        stays eager in every mode (bit for bit mode "none"'s). ``backend`` is torch.compile's
        (tests pass a counting one); each call starts from fresh compiled wrappers. A new
        composition (other Δ values, same shapes, any subset of names) reuses the graph; a
        new input shape compiles another (seconds: see bench/compile_cpu.py)."""
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
        self.compile_mode = mode
        self._compiled_jvp = self._compiled_trunk = None
        if mode in ("tail", "all"):
            # dynamic=None (automatic dynamic shapes) buys nothing here in torch 2.13: forward
            # AD under Dynamo specializes every size (make_dual on a symbolic size fails:
            # "Cannot call storage_offset() on tensor with symbolic sizes"), so each new batch
            # size or sequence length is one more graph, up to Dynamo's recompile_limit (8);
            # past it, new shapes run eagerly (still correct). Kept rather than dynamic=False:
            # the same graphs and compile times today, dynamic ones once torch can. Callers
            # with many shapes should pad to a few buckets. The trunk (no AD) goes dynamic.
            self._compiled_jvp = torch.compile(
                _jvp_fn(self.tail, self._compiled_names), backend=backend, dynamic=None)
        if mode == "all" and len(self.trunk):  # type: ignore[arg-type]
            self._compiled_trunk = torch.compile(
                self.trunk, backend=backend, dynamic=None)

    @property
    def split_index(self) -> int:
        return len(self.trunk)  # type: ignore[arg-type]

    def trunk_forward(self, x: Inputs) -> Inputs:
        """The frozen part before the tangent region: a plain forward."""
        with torch.no_grad():
            if self._compiled_trunk is not None:
                return self._compiled_trunk(x)
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
        """(f_tail(h; θ0), J f_tail(h; θ0)·Δ): only the parameters Δ names carry tangents
        (compiled: every region parameter does, with zeros for the names Δ omits)."""
        if self._compiled_jvp is not None:
            tangents = self._full_tangents(delta)
            primals = tuple(self.params[n] for n in self._compiled_names)
            with torch.no_grad():
                return self._compiled_jvp(h, primals, tangents)
        with torch.no_grad():
            return self._eager_tail_jvp(h, delta)

    def tail_jvp_with_grad(self, h: Inputs, delta: Mapping[str, torch.Tensor]
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """``tail_jvp`` for training: (f_tail(h; θ0) detached, J f_tail(h; θ0)·Δ) with
        autograd flowing through Δ into J·Δ (θ0 gets no gradient: it requires none).

        The same eager linearization as ``tail_jvp`` in compile mode "none" (bit for bit
        its output), only run with gradients enabled; always eager, whatever the compile
        mode (the compiled path detaches Δ). Never under inference mode: no autograd there,
        and forward AD drops tangents under it in some torch builds (see app/executor.py),
        which would leave training only the ‖Δ‖ term to fit: refused with an error."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError("tail_jvp_with_grad needs autograd: not under inference mode")
        with torch.enable_grad():
            y0, dy = self._eager_tail_jvp(h, delta)
        return y0.detach(), dy

    def _eager_tail_jvp(self, h: Inputs, delta: Mapping[str, torch.Tensor]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """The eager jvp of the tail, tangents only on the names Δ holds (in Δ's order),
        in the caller's gradient mode."""
        names = tuple(delta)
        primals = tuple(self.params[n] for n in names)
        return _jvp_fn(self.tail, names)(h, primals, tuple(delta[n] for n in names))

    def _full_tangents(self, delta: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Δ over the whole region in self.names order (then zeros for the frozen
        normalization parameters of the tail), for the compiled jvp.

        A missing name is a cached zero tensor on θ0's device and dtype, so the compiled
        graph always sees the same inputs. Every tangent is also made the same kind of
        tensor: no autograd history, contiguous, and an inference tensor exactly when
        inference mode is on. Dynamo guards on each input's dispatch keys, and an
        inference tensor has different ones from a normal tensor: a Δ built outside
        ``torch.inference_mode()`` but used inside it (or a zero filling a missing name of
        another kind than the Δ's tensors) would recompile. Tensors that already have the
        right kind (the executor's, all made under inference mode) are passed as is."""
        unknown = [n for n in delta if n not in self.region]
        if unknown:  # the eager path would tangent them (in the tail) or fail (in the trunk)
            raise KeyError(f"Delta names parameters outside the tangent region: {unknown}")
        inference = torch.is_inference_mode_enabled()
        out = []
        for n in self._compiled_names:
            t = delta.get(n)
            if t is None:
                p = self.params[n]
                zeros = self._zeros.setdefault((p.device, p.dtype, inference), {})
                if n not in zeros:
                    zeros[n] = torch.zeros(p.shape, device=p.device, dtype=p.dtype)
                t = zeros[n]
            else:
                if t.requires_grad:
                    t = t.detach()
                if not t.is_contiguous():
                    t = t.contiguous()
                if t.is_inference() != inference:
                    t = t.clone()  # made in the current mode: inference tensor iff it is on
            out.append(t)
        return tuple(out)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> LinearizedNet:
        """Move θ0 to a device/dtype in place (parameters are re-read afterwards)."""
        self.net.to(device=device, dtype=dtype)
        self.params = dict(self.net.named_parameters())
        self._zeros.clear()
        return self

    def forward(self, x: Inputs, delta: Mapping[str, torch.Tensor] | None = None
                ) -> torch.Tensor:
        return self.tail_forward(self.trunk_forward(x), delta)

    def full_jvp_forward(self, x: Inputs, delta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The same output, but with the whole network under jvp (for cost comparisons)."""
        names = tuple(delta)
        primals = tuple(self.params[n] for n in names)
        with torch.no_grad():
            out = _jvp_fn(self.net, names)(x, primals, tuple(delta[n] for n in names))
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

