"""The tangent math on every preset's real tangent region: the JVP is the derivative (float64
finite differences), outputs are linear in the composition, and only the tail carries tangents."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bases import Base
from tangent import Term, compose
from tests.bases.conftest import JIT_WARNING
from tests.tangent.numerics import assert_close, central_difference, record_tangent_inputs

pytestmark = pytest.mark.filterwarnings(JIT_WARNING)

WORDS = ["the", "market", "rallied", "after", "strong", "quarterly", "results", "while", "a",
         "minister", "denied", "claims", "about", "new", "taxes", "on", "imported", "phones",
         "and", "striker", "scored", "twice", "in", "final", "film", "festival", "award"]

PRESETS = [
    pytest.param("tiny_base", id="tiny-mlp"),
    pytest.param("effnet_base", id="effnet-lite0", marks=pytest.mark.slow),
    pytest.param("minilm_base", id="minilm", marks=pytest.mark.slow),
]


def make_inputs(base: Base, gen: torch.Generator, seed: int, n: int = 2) -> object:
    """Fresh random inputs of the base's kind, through its own preprocessor."""
    rnd = random.Random(seed)
    if base.spec.input_kind == "tensor":
        raw: list[object] = torch.randn(n, *base.preprocessor.shape, generator=gen).tolist()
    elif base.spec.input_kind == "image":  # random pixels at random sizes, RGB and grey
        raw = [torch.randint(0, 256, (rnd.randint(20, 50), rnd.randint(20, 50), 3)[: 2 + i % 2],
                             generator=gen).tolist() for i in range(n)]
    else:
        raw = [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(3, 12))) for _ in range(n)]
    pre = base.preprocessor
    return pre.collate(pre.decode_inputs(raw))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("fixture", PRESETS)
def test_jvp_matches_central_differences_float64(fixture: str, request: pytest.FixtureRequest,
                                                 gen: torch.Generator, seed: int) -> None:
    base: Base = request.getfixturevalue(fixture)
    net = copy.deepcopy(base.net)  # the session's base stays float32
    net.net.double()
    x = make_inputs(base, gen, seed)
    if isinstance(x, torch.Tensor):
        x = x.double()
    delta = net.random_delta(gen, scale=1.0)
    assert set(delta) == set(base.region) and all(d.dtype == torch.float64
                                                   for d in delta.values())
    jvp_term = net.forward(x, delta) - net.forward(x)
    fd, h = central_difference(net.net, x, delta, h=1e-6)
    assert jvp_term.abs().max() > 1e-3, f"degenerate tangent, seed={seed}"
    err = _rel(jvp_term, fd)
    assert err < 1e-6, f"rel err {err:.2e} (h={h}), seed={seed}"


@pytest.mark.parametrize("fixture", PRESETS)
def test_linearity_round_trip_zero_and_negative(fixture: str, request: pytest.FixtureRequest,
                                                gen: torch.Generator, seed: int) -> None:
    base: Base = request.getfixturevalue(fixture)
    net, x = base.net, make_inputs(base, gen, seed)
    rnd = random.Random(seed)
    terms = [Term(f"{rnd.getrandbits(256):064x}", rnd.uniform(-1.5, 1.5),
                  net.random_delta(gen, scale=1e-2)) for _ in range(3)]
    f0 = net.forward(x)
    ys = [net.forward(x, t.delta) for t in terms]
    composed = net.forward(x, compose(terms))
    expected = f0 + sum(t.weight * (y - f0) for t, y in zip(terms, ys, strict=True))
    assert _rel(composed, expected) <= 1e-5, f"{_rel(composed, expected):.2e} seed={seed}"
    assert _rel(composed, f0) > 1e-4, f"degenerate tangent, seed={seed}"
    # weight 1 round-trips its own linearized model; a zero tangent is the base exactly
    one = compose([Term(terms[0].digest, 1.0, terms[0].delta)])
    assert torch.equal(net.forward(x, one), ys[0]), f"seed={seed}"
    zeros = {n: torch.zeros_like(d) for n, d in terms[0].delta.items()}
    assert torch.equal(net.forward(x, zeros), f0), f"seed={seed}"
    with torch.no_grad():
        assert torch.equal(base.net.net(x), f0)
    # negative weights subtract
    neg = net.forward(x, compose([Term(terms[0].digest, -1.0, terms[0].delta)]))
    assert _rel(neg - f0, -(ys[0] - f0)) <= 1e-5, f"seed={seed}"
    # forgetting term 1 = never having had it, bit for bit
    assert torch.equal(net.forward(x, compose([terms[2], terms[0]])),
                       net.forward(x, compose([t for t in terms if t is not terms[1]])))


def _flops(run: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["effnet_base", "minilm_base"])
def test_trunk_carries_no_tangent(fixture: str, request: pytest.FixtureRequest,
                                  gen: torch.Generator, seed: int) -> None:
    base: Base = request.getfixturevalue(fixture)
    net, x = base.net, make_inputs(base, gen, seed)
    delta = net.random_delta(gen, scale=1e-2)
    trunk_stages = list(net.trunk._modules)
    seen = record_tangent_inputs(net.net, lambda: net.forward(x, delta))
    trunk = {n: v for n, v in seen.items() if n.split(".")[0] in trunk_stages}
    assert len(trunk) > 20 and not any(trunk.values()), [n for n, v in trunk.items() if v]
    assert seen["classifier"], "the detector must see the tail's tangents"

    # FLOPs (FlopCounterMode counts matmuls and convolutions, under jvp too)
    everything = {n: torch.randn_like(p) * 1e-2 for n, p in net.params.items()}
    h = net.trunk_forward(x)
    plain = _flops(lambda: net.forward(x))
    trunk_flops = _flops(lambda: net.trunk_forward(x))
    tail = _flops(lambda: net.tail_forward(h))
    linearized = _flops(lambda: net.forward(x, delta))
    full_tail_delta = _flops(lambda: net.full_jvp_forward(x, delta))
    full = _flops(lambda: net.full_jvp_forward(x, everything))
    assert trunk_flops + tail == plain and 0 < tail < plain / 2
    assert linearized == plain + 2 * tail  # plain forward + the tail's tangent (2x its FLOPs)
    assert full == 3 * plain  # every layer linearized
    assert linearized < full
    # jvp adds nothing where no input carries a tangent: with a tail-only Δ the whole-network
    # jvp does the same arithmetic, and the same result
    assert full_tail_delta == linearized
    assert_close(net.full_jvp_forward(x, delta), net.forward(x, delta), rtol=1e-5, atol=1e-6,
                 context=f"seed={seed}")
    print(f"{base.spec.preset}: plain {plain} trunk {trunk_flops} tail {tail} "
          f"linearized {linearized} ({linearized / plain:.3f}x) full {full}")
