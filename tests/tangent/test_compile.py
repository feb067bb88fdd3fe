"""LinearizedNet.compile: the torch.compile'd tail equals the eager tail (golden tests), keeps
every tangent, and a new composition of the same shapes never recompiles.

Tolerance of the golden comparisons (float32): inductor fuses ops and reorders the sums of
matmuls, convolutions, LayerNorm and softmax, so compiled and eager results differ by float32
rounding (eps 1.2e-7) accumulated over the reductions. Measured, as max |compiled − eager|
over the logit scale max |y|: minilm ≤ 6e-7, effnet-lite0 ≤ 2e-6 (its 1280-channel conv head;
eager float32 itself is 8e-7 off float64 there, compiled 1.7e-6), toys ≤ 2e-7. We allow 1e-5
of the logit scale: ≥ 5× that, yet ~1000× below the tangent term J·Δ the tests use (≥ 1e-2
of the logit scale), so a dropped or wrong tangent (output = y0) cannot pass.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters
from torch.func import functional_call, jvp

from tangent import COMPILE_MODES, LinearizedNet
from tests.tangent import toy
from tests.tangent.numerics import assert_close

# torch 2.13: forward AD's decompositions and inductor's first import (torch.utils.mkldnn) still
# go through the deprecated torch.jit.script / torch.jit.script_method.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings(
        "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")]

RTOL = 1e-5  # relative to the logit scale: see the module docstring
CONTEXTS: dict[str, Callable[[], contextlib.AbstractContextManager[Any]]] = {
    "inference_mode": torch.inference_mode, "no_grad": torch.no_grad}


class Counting:
    """A torch.compile backend that counts the graphs it is handed: inductor (the golden
    tests), or aot_eager (the recompile tests: Dynamo makes, and guards, the graphs before
    any backend sees them; aot_eager runs them through AOTAutograd like inductor does and
    only skips inductor's code generation, seconds per graph here)."""

    def __init__(self, inner: str = "inductor") -> None:
        self.inner = inner
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        self.graphs += 1
        return torch._dynamo.lookup_backend(self.inner)(gm, example_inputs)


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """Compiled code is cached per code object across LinearizedNets: start each test empty."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def reference_tail_jvp(net: LinearizedNet, h: Any, delta: dict[str, torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """LinearizedNet.tail_jvp as it was before compile() existed (the eager reference)."""
    names = tuple(delta)

    def tail_fn(*ps: torch.Tensor) -> torch.Tensor:
        res: torch.Tensor = functional_call(
            net.tail, dict(zip(names, ps, strict=True)), (h,), strict=False)
        return res

    with torch.no_grad():
        out = jvp(tail_fn, tuple(net.params[n] for n in names), tuple(delta[n] for n in names))
    return out[0], out[1]


def text_net(gen: torch.Generator, dim: int = 8) -> nn.Sequential:
    """minilm's own stages at toy width: layer0, layer1 (attention, LayerNorm, GELU), pool,
    classifier; the tail's input is a tuple (hidden [B, T, dim], mask [B, T])."""
    from bases.presets.minilm import Layer, MeanPool

    net = nn.Sequential(OrderedDict([
        ("layer0", Layer(dim, 2, 2 * dim, 1e-12)), ("layer1", Layer(dim, 2, 2 * dim, 1e-12)),
        ("pool", MeanPool()), ("classifier", nn.Linear(dim, 3))]))
    return toy._randomize(net, gen, torch.float32)  # type: ignore[return-value]


def padding_mask(gen: torch.Generator, b: int, t: int) -> torch.Tensor:
    mask = torch.zeros(b, t, dtype=torch.long)
    for row, n in enumerate(torch.randint(1, t + 1, (b,), generator=gen).tolist()):
        mask[row, :n] = 1  # padded rows: 1..t real tokens
    return mask


def text_inputs(gen: torch.Generator, b: int, t: int, dim: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(b, t, dim, generator=gen), padding_mask(gen, b, t)


TOYS: dict[str, Callable[[torch.Generator], tuple[LinearizedNet, Any]]] = {
    "mlp": lambda g: (LinearizedNet(toy.mlp(g), ["mid.*", "out.*"]),
                      torch.randn(5, 12, generator=g)),
    "convnet": lambda g: (LinearizedNet(toy.convnet(g), ["block.*", "classifier.*"]),
                          torch.randn(3, 3, 12, 12, generator=g)),
    "text": lambda g: (LinearizedNet(text_net(g), ["layer1.*", "classifier.*"]),
                       text_inputs(g, 3, 7, 8)),
    # gaps: frozen LayerNorm / BatchNorm (and linear, conv) layers inside the tail
    "text-gap": lambda g: (LinearizedNet(text_net(g), ["layer1.attention.self.*",
                                                       "classifier.*"]),
                           text_inputs(g, 3, 7, 8)),
}


def omit_some(net: LinearizedNet, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Δ without every other region name (missing = zero); at least one name dropped."""
    return {n: t for i, (n, t) in enumerate(delta.items()) if i % 2 == 1}


def single(net: LinearizedNet, h: Any, name: str, t: torch.Tensor
           ) -> tuple[dict[str, torch.Tensor], bool]:
    """(Δ on one parameter only, all others missing; does it move the output?). Scaled so
    that its eager J·Δ is 0.1 of the logit scale: a dropped tangent would then show. A
    parameter whose J·Δ is below the golden tolerance has no effect (attention key biases:
    softmax is invariant to a shift shared by all keys) and is checked unscaled."""
    e0, edy = reference_tail_jvp(net, h, {name: t})
    scale, size = float(e0.abs().max()), float(edy.abs().max())
    if size <= RTOL * scale:
        return {name: t}, False
    return {name: t * (0.1 * scale / size)}, True


def check_golden(net: LinearizedNet, h: Any, delta: dict[str, torch.Tensor],
                 eager: tuple[torch.Tensor, torch.Tensor], context: str,
                 moves: bool = True) -> None:
    """Compiled (y0, dy) and y0 + dy equal the eager ones; dy is no zero tangent (unless
    ``moves`` is False: a Δ known to have no effect)."""
    y0, dy = net.tail_jvp(h, delta)
    e0, edy = eager
    scale = float(e0.abs().max())
    atol = RTOL * scale
    if moves:
        assert float(edy.abs().max()) > 1e-3 * scale, f"degenerate eager tangent {context}"
    assert_close(y0, e0, rtol=0, atol=atol, context=f"y0 {context}")
    assert_close(dy, edy, rtol=0, atol=atol, context=f"dy {context}")
    assert_close(net.tail_forward(h, delta), e0 + edy, rtol=0, atol=atol, context=context)


def test_modes_are_exported_and_checked(gen: torch.Generator) -> None:
    assert COMPILE_MODES == ("none", "tail", "all")
    net, _ = TOYS["mlp"](gen)
    assert net.compile_mode == "none"
    with pytest.raises(ValueError, match="compile mode"):
        net.compile("fast")  # type: ignore[arg-type]


@pytest.mark.parametrize("case", list(TOYS))
def test_mode_none_is_bit_identical_to_the_eager_reference(case: str, gen: torch.Generator,
                                                           seed: int) -> None:
    net, x = TOYS[case](gen)
    net.compile("tail")
    net.compile("none")  # back to eager: nothing compiled stays in the way
    h = net.trunk_forward(x)
    full = net.random_delta(gen, scale=0.05)
    for delta in (full, omit_some(net, full)):
        for ctx in CONTEXTS.values():
            with ctx():
                y0, dy = net.tail_jvp(h, delta)
                y = net.tail_forward(h, delta)
            r0, rdy = reference_tail_jvp(net, h, delta)
            assert torch.equal(y0, r0) and torch.equal(dy, rdy), f"seed={seed}"
            assert torch.equal(y, r0 + rdy), f"seed={seed}"
    assert counters["stats"]["unique_graphs"] == 0


# (toy, mode, context): tensor and tuple tail inputs, both modes, both contexts, gaps;
# each case costs an inductor compile (2-10 s on 2 cores with a cold cache)
GOLDEN = [("mlp", "tail", "no_grad"), ("convnet", "all", "inference_mode"),
          ("text", "tail", "no_grad"), ("text-gap", "tail", "inference_mode")]


@pytest.mark.parametrize(("case", "mode", "ctx"), GOLDEN)
def test_compiled_toy_matches_eager(case: str, mode: str, ctx: str, gen: torch.Generator,
                                    seed: int) -> None:
    net, x = TOYS[case](gen)
    h_eager = net.trunk_forward(x)
    full = net.random_delta(gen, scale=0.05)
    partial = omit_some(net, full)
    eager = {k: reference_tail_jvp(net, h_eager, d) for k, d in (("full", full),
                                                                 ("partial", partial))}
    backend = Counting()
    net.compile(mode, backend=backend)  # type: ignore[arg-type]
    with CONTEXTS[ctx]():
        h = net.trunk_forward(x)
        for k, d in (("full", full), ("partial", partial)):
            check_golden(net, h, d, eager[k], f"{case} {mode} {ctx} Δ={k} seed={seed}")
        plain = net.tail_forward(h)  # empty Δ: eager in every mode
    h_ref, h_got = (h_eager[0], h[0]) if isinstance(h, tuple) else (h_eager, h)
    assert_close(h_got, h_ref, rtol=0, atol=RTOL * float(h_ref.abs().max()),
                 context=f"trunk seed={seed}")
    assert_close(plain, eager["full"][0], rtol=0, atol=RTOL * float(plain.abs().max()),
                 context=f"plain seed={seed}")
    # one graph for the jvp, plus one for the trunk in mode "all"; no graph breaks
    assert backend.graphs == 1 + (mode == "all"), f"seed={seed}"
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.parametrize("case", ["mlp", "text"])
def test_new_compositions_do_not_recompile(case: str, gen: torch.Generator, seed: int) -> None:
    net, x = TOYS[case](gen)
    h = net.trunk_forward(x)
    backend = Counting("aot_eager")
    net.compile("tail", backend=backend)
    deltas = [net.random_delta(gen, scale=0.05) for _ in range(3)]
    with torch.inference_mode():
        deltas += [{n: t * 0.5 for n, t in net.random_delta(gen, 0.05).items()}]  # inference
        outs = []
        for i, d in enumerate(deltas):
            check_golden(net, h, d, reference_tail_jvp(net, h, d), f"Δ{i} seed={seed}")
            outs.append(net.tail_forward(h, d))
        assert backend.graphs == 1, f"{backend.graphs} graphs for {len(deltas)} Δs, seed={seed}"
        # Δ is an input, not a constant: different Δs give different outputs
        assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])
        # every region parameter alone (all the others missing): its tangent gets through
        for n in net.names:
            one, moves = single(net, h, n, deltas[0][n])
            check_golden(net, h, one, reference_tail_jvp(net, h, one), f"{n} seed={seed}",
                         moves)
        assert backend.graphs == 1, f"a Δ with missing names recompiled, seed={seed}"
    # θ0 is read at call time (primals are inputs): new parameter values, same graph
    with torch.no_grad():
        for n in net.names[:2]:
            net.params[n].mul_(1.5).add_(0.01)  # in place, as load_state_dict does
    with torch.inference_mode():
        check_golden(net, h, deltas[1], reference_tail_jvp(net, h, deltas[1]),
                     f"new θ0 seed={seed}")
    assert backend.graphs == 1, f"seed={seed}"
    assert counters["stats"]["unique_graphs"] == 1


def test_batch_sizes_and_dtype_change(gen: torch.Generator, seed: int) -> None:
    """Batch sizes: correct at each, at most one graph per size and none for a size seen
    before. (torch 2.13: forward AD under Dynamo specializes every size, so dynamic=None
    does not make the batch dimension dynamic: each new size is one more graph.) Then .to()
    re-reads θ0 and drops the zero fillers (float64 now)."""
    net, _ = TOYS["mlp"](gen)
    backend = Counting("aot_eager")
    net.compile("tail", backend=backend)
    delta = net.random_delta(gen, scale=0.05)
    partial = omit_some(net, delta)
    with torch.inference_mode():
        for b in (4, 7, 4, 7):
            h = net.trunk_forward(torch.randn(b, 12, generator=gen))
            check_golden(net, h, partial, reference_tail_jvp(net, h, partial), f"B={b} {seed}")
    assert 1 <= backend.graphs <= 2, f"seed={seed}"
    graphs = backend.graphs
    net.to("cpu", torch.float64)
    d64 = {n: t.double() for n, t in partial.items()}
    with torch.inference_mode():
        h = net.trunk_forward(torch.randn(5, 12, generator=gen, dtype=torch.float64))
        y0, dy = net.tail_jvp(h, d64)
    assert y0.dtype == dy.dtype == torch.float64
    r0, rdy = reference_tail_jvp(net, h, d64)
    assert_close(dy, rdy, rtol=0, atol=1e-12, context=f"float64 seed={seed}")
    assert_close(y0, r0, rtol=0, atol=1e-12, context=f"float64 seed={seed}")
    assert backend.graphs == graphs + 1, f"seed={seed}"


def test_names_outside_the_region_are_refused(gen: torch.Generator) -> None:
    net, x = TOYS["mlp"](gen)
    net.compile("tail", backend="eager")
    delta = net.random_delta(gen)
    delta["inp.0.weight"] = torch.zeros(20, 12)
    with pytest.raises(KeyError, match="inp.0.weight"):
        net.tail_forward(net.trunk_forward(x), delta)


# -- the real presets (pretrained weights, no base directory) ---------------------------------
REAL = {"minilm": {"tangent_layers": 1},  # layer5 (attention, LayerNorm, GELU) + classifier
        "effnet-lite0": {"image_size": 32, "tangent_blocks": 1}}  # block15 + head + classifier


@pytest.fixture(scope="module", params=list(REAL))
def real_net(request: pytest.FixtureRequest) -> tuple[str, LinearizedNet]:
    from bases import make_spec
    from bases.presets import get_preset

    spec = make_spec(request.param, options=REAL[request.param])
    module = get_preset(spec.preset)
    net = module.build(spec)
    module.init_weights(spec, net)
    return request.param, LinearizedNet(net, spec.tangent)


def real_inputs(preset: str, gen: torch.Generator, b: int) -> Any:
    if preset == "minilm":
        mask = padding_mask(gen, b, 11)
        return torch.randint(1000, 30000, (b, 11), generator=gen) * mask, mask  # 0: [PAD]
    return torch.randn(b, 3, 32, 32, generator=gen)


@pytest.mark.slow
def test_real_preset_compiled_tail_matches_eager(real_net: tuple[str, LinearizedNet],
                                                 gen: torch.Generator, seed: int) -> None:
    preset, base = real_net
    net = LinearizedNet(base.net, base.names)  # own compile state; shares θ0
    with torch.inference_mode():
        h = net.trunk_forward(real_inputs(preset, gen, 3))
    full = net.random_delta(gen, scale=1e-2)
    partial = omit_some(net, full)
    # mode "none" is the eager reference, bit for bit
    for d in (full, partial):
        with torch.inference_mode():
            y0, dy = net.tail_jvp(h, d)
        r0, rdy = reference_tail_jvp(net, h, d)
        assert torch.equal(y0, r0) and torch.equal(dy, rdy), f"{preset} seed={seed}"
    backend = Counting()
    net.compile("tail", backend=backend)
    with torch.inference_mode():
        for k, d in (("full", full), ("partial", partial),
                     ("another", net.random_delta(gen, scale=1e-2))):
            check_golden(net, h, d, reference_tail_jvp(net, h, d),
                         f"{preset} Δ={k} seed={seed}")
        for n in net.names:  # one parameter at a time: each one's tangent gets through
            one, moves = single(net, h, n, full[n])
            check_golden(net, h, one, reference_tail_jvp(net, h, one), f"{preset} {n} {seed}",
                         moves)
    assert backend.graphs == 1, f"{preset}: {backend.graphs} graphs, seed={seed}"
    assert not counters["graph_break"], dict(counters["graph_break"])
