"""LinearizedNet on small random networks: the JVP is the derivative, outputs are exactly
linear in the tangent, the trunk carries no tangent, unsupported ops are named."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tangent import LinearizedNet, Term, UnsupportedOpError, compose, region_names
from tests.tangent import toy
from tests.tangent.numerics import assert_close, central_difference, record_tangent_inputs

# torch 2.13: the first forward-AD call imports torch._decomp.decompositions_for_jvp, which
# calls the deprecated torch.jit.script (a DeprecationWarning from torch.jit._script).
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning")

Net = Callable[..., nn.Sequential]
CASES: dict[str, tuple[Net, list[str], tuple[int, ...]]] = {
    # name: (builder, tangent patterns, input shape)
    "mlp": (toy.mlp, ["mid.*", "out.*"], (6, 12)),
    "convnet": (toy.convnet, ["head.*", "classifier.*"], (3, 3, 12, 12)),
    "convnet-all": (toy.convnet, ["*"], (3, 3, 12, 12)),
}


def _setup(case: str, gen: torch.Generator, dtype: torch.dtype = torch.float32
           ) -> tuple[LinearizedNet, torch.Tensor]:
    build, patterns, shape = CASES[case]
    return LinearizedNet(build(gen, dtype), patterns), torch.randn(shape, generator=gen,
                                                                   dtype=dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("case", list(CASES))
def test_jvp_matches_central_differences_float64(case: str, gen: torch.Generator,
                                                 seed: int) -> None:
    net, x = _setup(case, gen, torch.float64)
    delta = net.random_delta(gen, scale=1.0)
    jvp_term = net.forward(x, delta) - net.forward(x)
    fd, h = central_difference(net.net, x, delta, h=1e-6)
    assert jvp_term.dtype == torch.float64
    assert jvp_term.abs().max() > 1e-3, f"degenerate tangent, seed={seed}"
    assert _rel(jvp_term, fd) < 1e-6, f"rel err {_rel(jvp_term, fd):.2e}, h={h}, seed={seed}"


def test_region_and_split(gen: torch.Generator) -> None:
    net = toy.convnet(gen)
    assert region_names(net, ["classifier.*", "head.*"]) == [
        "head.0.weight", "head.1.weight", "head.1.bias", "classifier.weight", "classifier.bias"]
    with pytest.raises(ValueError, match="match no parameter"):
        region_names(net, ["nope.*"])
    lin = LinearizedNet(net, ["head.*", "classifier.*"])
    assert lin.split_index == 2 and list(lin.trunk._modules) == ["stem", "block"]
    assert list(lin.tail._modules) == ["head", "classifier"]
    p = lin.region["head.0.weight"]
    assert (p.name, p.shape, p.dtype) == ("head.0.weight", (16, 12, 1, 1), "float32")
    assert not net.training and not any(q.requires_grad for q in net.parameters())
    assert set(lin.random_delta(gen)) == set(lin.region)


def test_region_with_a_gap_splits_at_its_first_stage(gen: torch.Generator) -> None:
    lin = LinearizedNet(toy.convnet(gen), ["block.*", "classifier.*"])
    assert lin.split_index == 1  # head is frozen but runs inside the tail


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("normalize", ["none", "mean"])
def test_linearity_of_composed_outputs(case: str, normalize: str, gen: torch.Generator,
                                       seed: int) -> None:
    net, x = _setup(case, gen)
    rnd = random.Random(seed)
    terms = [Term(f"{i:064x}", rnd.uniform(-1.5, 1.5), net.random_delta(gen, scale=0.05))
             for i in range(4)]
    f0 = net.forward(x)
    composed = net.forward(x, compose(terms, normalize))  # type: ignore[arg-type]
    scale = 1 / len(terms) if normalize == "mean" else 1.0
    expected = f0 + sum(scale * t.weight * (net.forward(x, t.delta) - f0) for t in terms)
    assert _rel(composed, expected) <= 1e-5, f"rel err {_rel(composed, expected):.2e} seed={seed}"
    tangent = composed - f0
    assert tangent.abs().max() > 1e-3, f"degenerate tangent, seed={seed}"


@pytest.mark.parametrize("case", list(CASES))
def test_weight_one_round_trip_and_zero_tangent(case: str, gen: torch.Generator,
                                                seed: int) -> None:
    net, x = _setup(case, gen)
    delta = net.random_delta(gen, scale=0.05)
    own = net.forward(x, delta)
    assert torch.equal(net.forward(x, compose([Term("d" * 64, 1.0, delta)])), own), f"seed={seed}"
    f0 = net.forward(x)
    zeros = {n: torch.zeros_like(t) for n, t in delta.items()}
    assert torch.equal(net.forward(x, zeros), f0), f"seed={seed}"
    assert torch.equal(net.forward(x, {}), f0) and torch.equal(net.forward(x, None), f0)
    assert torch.equal(net.forward(x, compose([])), f0)
    with torch.no_grad():
        assert torch.equal(net.net(x), f0)


@pytest.mark.parametrize("case", list(CASES))
def test_negative_weights_subtract(case: str, gen: torch.Generator, seed: int) -> None:
    net, x = _setup(case, gen)
    a, b = net.random_delta(gen, scale=0.05), net.random_delta(gen, scale=0.05)
    f0 = net.forward(x)
    ya, yb = net.forward(x, a) - f0, net.forward(x, b) - f0
    neg = net.forward(x, compose([Term("a" * 64, -1.0, a)])) - f0
    assert _rel(neg, -ya) <= 1e-5, f"seed={seed}"
    diff = net.forward(x, compose([Term("a" * 64, 1.0, a), Term("b" * 64, -0.5, b)]))
    assert _rel(diff, f0 + ya - 0.5 * yb) <= 1e-5, f"seed={seed}"
    cancel = compose([Term("a" * 64, 1.0, a), Term("c" * 64, -1.0, a)])
    assert torch.equal(net.forward(x, cancel), f0), f"seed={seed}"


@pytest.mark.parametrize("case", ["mlp", "convnet"])
def test_exact_forgetting_bit_for_bit(case: str, gen: torch.Generator, seed: int) -> None:
    net, x = _setup(case, gen)
    rnd = random.Random(seed)
    terms = [Term(f"{rnd.getrandbits(256):064x}", rnd.uniform(-1, 1),
                  net.random_delta(gen, scale=0.05)) for _ in range(5)]
    for k in range(len(terms)):
        registry = terms[:]
        rnd.shuffle(registry)
        after_forget = net.forward(x, compose([t for t in registry if t is not terms[k]]))
        never_had = net.forward(x, compose([t for t in reversed(terms) if t is not terms[k]]))
        assert torch.equal(after_forget, never_had), f"k={k} seed={seed}"


@pytest.mark.parametrize("case", ["mlp", "convnet"])
def test_full_jvp_forward_agrees(case: str, gen: torch.Generator, seed: int) -> None:
    net, x = _setup(case, gen)
    delta = net.random_delta(gen, scale=0.05)
    assert_close(net.full_jvp_forward(x, delta), net.forward(x, delta), rtol=1e-5, atol=1e-6,
                 context=f"seed={seed}")
    h = net.trunk_forward(x)
    assert torch.equal(net.tail_forward(h, delta), net.forward(x, delta))



# -- training and serving share the linearization -------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_training_jvp_is_the_serving_jvp_bit_for_bit(case: str, dtype: torch.dtype,
                                                     gen: torch.Generator, seed: int) -> None:
    """tail_jvp_with_grad (training: autograd through Δ) and tail_jvp (serving: no_grad)
    run one linearization: the same outputs bit for bit, over the whole region or a part;
    the gradient reaches Δ and never θ0."""
    net, x = _setup(case, gen, dtype)
    h = net.trunk_forward(x)
    whole = net.random_delta(gen, scale=0.05)
    part = dict(list(whole.items())[1:])
    for delta in (whole, part):
        trainable = {n: t.clone().requires_grad_(True) for n, t in delta.items()}
        y0, dy = net.tail_jvp_with_grad(h, trainable)
        s0, sdy = net.tail_jvp(h, delta)
        assert torch.equal(y0, s0) and torch.equal(dy, sdy), f"seed={seed}"
        assert torch.equal(y0 + dy, net.forward(x, delta)), f"seed={seed}"
        assert dy.requires_grad and not y0.requires_grad
        torch.autograd.backward(dy.pow(2).sum())
        assert all(t.grad is not None and bool(t.grad.abs().sum() > 0)
                   for t in trainable.values()), f"seed={seed}"
        assert all(p.grad is None for p in net.params.values())


def test_training_jvp_stays_eager_when_compiled_and_refuses_inference_mode(
        gen: torch.Generator) -> None:
    net, x = _setup("convnet", gen)
    h = net.trunk_forward(x)
    delta = net.random_delta(gen, scale=0.05)
    graphs: list[object] = []

    def counting(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> object:
        graphs.append(gm)
        return gm.forward

    eager = net.tail_jvp(h, delta)
    net.compile("tail", backend=counting)
    trainable = {n: t.clone().requires_grad_(True) for n, t in delta.items()}
    y0, dy = net.tail_jvp_with_grad(h, trainable)
    assert not graphs  # the compiled path (which detaches Δ) is never taken
    assert torch.equal(y0, eager[0]) and torch.equal(dy, eager[1]) and dy.requires_grad
    net.tail_jvp(h, delta)  # serving does take it: the counter sees that graph
    assert graphs
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference mode"):
        net.tail_jvp_with_grad(h, trainable)

# -- the trunk carries no tangent -----------------------------------------------------------

def test_trunk_inputs_carry_no_tangent(gen: torch.Generator) -> None:
    net, x = _setup("convnet", gen)
    delta = net.random_delta(gen)
    seen = record_tangent_inputs(net.net, lambda: net.forward(x, delta))
    trunk = {n: v for n, v in seen.items() if n.split(".")[0] in ("stem", "block")}
    tail = {n: v for n, v in seen.items() if n.split(".")[0] in ("head", "classifier")}
    assert trunk and not any(trunk.values()), trunk
    assert tail["classifier"] and tail["head.1"], tail  # the detector does see tangents
    # whole network linearized: the same detector sees tangents in the trunk
    full = {n: torch.randn_like(p) for n, p in net.params.items()}
    seen_full = record_tangent_inputs(net.net, lambda: net.full_jvp_forward(x, full))
    assert seen_full["stem.1"] and seen_full["block.0"]


def _flops(run: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


def test_tail_only_linearization_costs_less_than_full(gen: torch.Generator) -> None:
    net, x = _setup("convnet", gen)
    delta = net.random_delta(gen)
    everything = {n: torch.randn_like(p) for n, p in net.params.items()}
    plain = _flops(lambda: net.forward(x))
    trunk = _flops(lambda: net.trunk_forward(x))
    h = net.trunk_forward(x)
    tail = _flops(lambda: net.tail_forward(h))
    linearized = _flops(lambda: net.forward(x, delta))
    full = _flops(lambda: net.full_jvp_forward(x, everything))
    assert 0 < tail < plain and trunk + tail == plain
    assert linearized == plain + 2 * tail  # tangent of a bilinear op: two more products
    assert full == 3 * plain
    assert linearized < full


# -- ops without forward-mode AD ------------------------------------------------------------

def test_fused_sdpa_in_tangent_region_is_named(gen: torch.Generator) -> None:
    net = LinearizedNet(toy.sdpa_net(gen), ["attn.*", "classifier.*"])
    x = torch.randn(2, 5, 8, generator=gen)
    with pytest.raises(UnsupportedOpError) as info:
        net.check_forward_ad(x)
    msg = str(info.value)
    assert "scaled_dot_product" in msg and "eager" in msg, msg
    assert isinstance(info.value.__cause__, NotImplementedError)


def test_math_sdpa_path_is_the_fix(gen: torch.Generator) -> None:
    net = LinearizedNet(toy.sdpa_net(gen), ["attn.*", "classifier.*"])
    x = torch.randn(2, 5, 8, generator=gen)
    with sdpa_kernel(SDPBackend.MATH):
        net.check_forward_ad(x)


def test_fused_sdpa_in_trunk_is_fine(gen: torch.Generator, seed: int) -> None:
    net = LinearizedNet(toy.sdpa_net(gen), ["classifier.*"])
    x = torch.randn(2, 5, 8, generator=gen)
    net.check_forward_ad(x)  # the trunk runs plain: no forward AD through SDPA
    delta = net.random_delta(gen)
    assert _rel(net.forward(x, delta), net.forward(x)) > 0, f"seed={seed}"


def test_custom_function_without_jvp_is_reported(gen: torch.Generator) -> None:
    net = LinearizedNet(toy.custom_function_net(gen), ["inp.*", "out.*"])
    with pytest.raises(UnsupportedOpError) as info:
        net.check_forward_ad(torch.randn(2, 6, generator=gen))
    msg = str(info.value)
    assert "jvp" in msg and "no forward-mode AD" in msg, msg


def test_check_forward_ad_passes_and_leaves_the_net_unchanged(gen: torch.Generator) -> None:
    net, x = _setup("convnet", gen)
    before = copy.deepcopy(net.net.state_dict())
    net.check_forward_ad(x)
    after = net.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
