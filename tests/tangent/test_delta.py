"""Composition algebra: effective weights, Σ w_k Δ_k in canonical order, composition digests."""

from __future__ import annotations

import hashlib
import itertools
import math
import random

import pytest
import torch

from tangent import (
    CompositionError,
    Term,
    compose,
    composition_digest,
    delta_nbytes,
    effective_weights,
)
from tests.tangent.numerics import assert_close

SHAPES = {"a.weight": (7, 5), "a.bias": (7,), "b.weight": (3, 7)}


def _digest(i: int, salt: int) -> str:
    return hashlib.sha256(f"{salt}:{i}".encode()).hexdigest()


def _terms(gen: torch.Generator, n: int, seed: int) -> list[Term]:
    rnd = random.Random(seed)
    terms = []
    for i in range(n):
        names = [k for k in SHAPES if rnd.random() < 0.8] or ["a.weight"]  # some names missing
        delta = {k: torch.randn(SHAPES[k], generator=gen) for k in names}
        terms.append(Term(_digest(i, seed), rnd.uniform(-2.0, 2.0), delta))
    return terms


def _bits(delta: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {k: v.numpy().tobytes() for k, v in sorted(delta.items())}


# -- effective weights ----------------------------------------------------------------------

def test_effective_weights_per_normalization(seed: int) -> None:
    rnd = random.Random(seed)
    ws = [rnd.uniform(0.1, 3.0) for _ in range(rnd.randint(1, 6))]
    assert effective_weights(ws, "none") == ws
    mean = effective_weights(ws, "mean")
    assert mean == [w / len(ws) for w in ws], f"seed={seed}"
    total = effective_weights(ws, "sum")
    assert math.isclose(math.fsum(total), 1.0, rel_tol=1e-12), f"seed={seed}"
    assert all(math.isclose(t * math.fsum(ws), w, rel_tol=1e-12)
               for t, w in zip(total, ws, strict=True))
    assert effective_weights([], "sum") == [] and effective_weights([], "mean") == []


def test_sum_normalization_with_negative_weights_keeps_signs() -> None:
    assert effective_weights([3.0, -1.0], "sum") == [1.5, -0.5]


def test_sum_normalization_rejects_zero_total() -> None:
    with pytest.raises(CompositionError, match="sum to zero"):
        effective_weights([1.5, -1.5], "sum")
    with pytest.raises(CompositionError, match="sum to zero"):
        compose([Term("a", 0.0, {}), Term("b", 0.0, {})], "sum")


@pytest.mark.parametrize("normalize", ["none", "sum", "mean"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_rejected(normalize: str, bad: float) -> None:
    with pytest.raises(CompositionError, match="finite") as info:
        effective_weights([1.0, bad], normalize)  # type: ignore[arg-type]
    assert repr(bad) in str(info.value)
    with pytest.raises(CompositionError, match="finite"):
        compose([Term("x", 1.0, {}), Term("y", bad, {})], normalize)  # type: ignore[arg-type]


def test_unknown_normalization_rejected() -> None:
    with pytest.raises(CompositionError, match="'median'"):
        effective_weights([1.0], "median")  # type: ignore[arg-type]


# -- compose --------------------------------------------------------------------------------

def test_compose_is_the_weighted_sum_with_missing_names_as_zero(gen: torch.Generator,
                                                                seed: int) -> None:
    terms = _terms(gen, 5, seed)
    out = compose(terms)
    assert set(out) == set().union(*(t.delta for t in terms))
    for name, got in out.items():
        want = torch.zeros(SHAPES[name], dtype=torch.float64)
        for t in terms:
            if name in t.delta:
                want += t.weight * t.delta[name].double()
        assert got.dtype == torch.float32
        assert_close(got.double(), want, rtol=1e-5, atol=1e-6, context=f"seed={seed}")


@pytest.mark.parametrize("normalize", ["none", "sum", "mean"])
def test_compose_order_independent_bit_for_bit(gen: torch.Generator, seed: int,
                                               normalize: str) -> None:
    terms = _terms(gen, 6, seed)
    if normalize == "sum" and math.fsum(t.weight for t in terms) == 0.0:
        pytest.skip("weights happen to sum to zero")
    ref = _bits(compose(terms, normalize))  # type: ignore[arg-type]
    rnd = random.Random(seed)
    for _ in range(10):
        shuffled = terms[:]
        rnd.shuffle(shuffled)
        assert _bits(compose(shuffled, normalize)) == ref, f"seed={seed}"  # type: ignore[arg-type]


def test_compose_order_independent_when_one_digest_appears_under_several_weights(
        gen: torch.Generator, seed: int) -> None:
    # content addressing: two ids with identical bytes share a digest
    delta = {"a.weight": torch.randn(64, 64, generator=gen)}
    ws = [0.1, 0.7, -0.33, 1.3]
    terms = [Term("same", w, delta) for w in ws] + [Term("other", 0.5, delta)]
    outs = {compose(list(p))["a.weight"].numpy().tobytes() for p in itertools.permutations(terms)}
    assert len(outs) == 1, f"{len(outs)} different results over orderings, seed={seed}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_compose_accumulates_in_float32(gen: torch.Generator, dtype: torch.dtype) -> None:
    delta = {"a.weight": torch.randn(7, 5, generator=gen).to(dtype)}
    out = compose([Term("d", 1.0, delta)])
    assert out["a.weight"].dtype == torch.float32
    assert torch.equal(out["a.weight"], delta["a.weight"].float())


def test_weight_one_round_trips_exactly_and_does_not_alias(gen: torch.Generator) -> None:
    delta = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    before = {k: v.clone() for k, v in delta.items()}
    out = compose([Term("d", 1.0, delta)])
    assert _bits(out) == _bits(delta)
    for v in out.values():
        v.add_(1.0)  # the caller may own the result; the component must not change
    assert _bits(delta) == _bits(before)


def test_opposite_weights_cancel_exactly(gen: torch.Generator) -> None:
    delta = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    out = compose([Term("a", 0.75, delta), Term("b", -0.75, delta)])
    assert all(not v.any() for v in out.values())


def test_forgetting_is_recomputation_bit_for_bit(gen: torch.Generator, seed: int) -> None:
    terms = _terms(gen, 6, seed)
    rnd = random.Random(seed)
    for k in range(len(terms)):
        history = terms[:]
        rnd.shuffle(history)
        kept = [t for t in history if t.digest != terms[k].digest]
        never_had = [Term(t.digest, t.weight, {n: v.clone() for n, v in t.delta.items()})
                     for t in reversed(terms) if t is not terms[k]]
        assert _bits(compose(kept)) == _bits(compose(never_had)), f"k={k} seed={seed}"


def test_empty_composition_is_the_empty_delta() -> None:
    for normalize in ("none", "sum", "mean"):
        assert compose([], normalize) == {}  # type: ignore[arg-type]


# -- digests --------------------------------------------------------------------------------

def test_composition_digest_order_independent_and_sensitive(seed: int) -> None:
    rnd = random.Random(seed)
    pairs = [(_digest(i, seed), rnd.uniform(-2, 2)) for i in range(5)]
    d = composition_digest(pairs, "none")
    assert len(d) == 64 and int(d, 16) >= 0
    for _ in range(5):
        shuffled = pairs[:]
        rnd.shuffle(shuffled)
        assert composition_digest(shuffled, "none") == d, f"seed={seed}"
    nudged = [(pairs[0][0], math.nextafter(pairs[0][1], math.inf)), *pairs[1:]]
    assert composition_digest(nudged, "none") != d
    assert composition_digest(pairs, "mean") != d
    assert composition_digest(pairs[1:], "none") != d
    swapped = [(pairs[0][0], pairs[1][1]), (pairs[1][0], pairs[0][1]), *pairs[2:]]
    assert composition_digest(swapped, "none") != d


def test_delta_nbytes() -> None:
    delta = {"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.float16)}
    assert delta_nbytes(delta) == 3 * 4 * 4 + 5 * 2
