"""Tangent training on tiny-mlp + sklearn digits: gradients reach Δ, the loss falls, θ0 is
untouched, caching the trunk changes nothing, a seed fixes the result."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch.func import functional_call, vjp

from bases import Base, init_base, load_base, make_spec
from tests.training.conftest import JIT_WARNING
from training.data import Splits, shard_by_classes, shard_random, take
from training.evaluate import Evaluator
from training.features import Features, _allocate, _store, trunk_features
from training.tangent_train import (
    TangentConfig,
    delta_norm,
    square_loss,
    train_tangent,
)

pytestmark = pytest.mark.filterwarnings(JIT_WARNING)


def test_gradient_reaches_delta_and_is_the_vjp(tiny: Base, gen: torch.Generator) -> None:
    net = tiny.net
    h = net.trunk_forward(torch.rand(7, 64, generator=gen))
    delta = {n: (torch.randn(net.params[n].shape, generator=gen) * 0.1).requires_grad_(True)
             for n in net.names}
    y = torch.randint(0, 10, (7,), generator=gen)
    kappa = float(torch.rand((), generator=gen)) * 20 + 1
    y0, dy = net.tail_jvp_with_grad(h, delta)  # what training fits
    out = y0 + dy
    # serving's forward (no_grad) of the same Δ: the one linearization, bit for bit
    assert torch.equal(out, net.tail_forward(h, {k: v.detach() for k, v in delta.items()}))
    square_loss(out, y, kappa).backward()
    # d loss / dΔ = Jᵀ g with g = d loss / d out: a reverse-mode product at θ0
    with torch.enable_grad():
        o = out.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(square_loss(o, y, kappa), o)
    names = tuple(net.names)

    def f(*ps: torch.Tensor) -> torch.Tensor:
        res: torch.Tensor = functional_call(net.tail, dict(zip(names, ps, strict=True)), (h,))
        return res

    _, pullback = vjp(f, *(net.params[n] for n in names))
    for n, expected in zip(names, pullback(g), strict=True):
        assert delta[n].grad is not None
        torch.testing.assert_close(delta[n].grad, expected, rtol=1e-5, atol=1e-7)
    for n in names:
        assert net.params[n].grad is None  # θ0 gets no gradient



@pytest.mark.slow
@pytest.mark.parametrize(("preset", "options", "example"), [
    ("effnet-lite0", {"image_size": 32}, lambda g: torch.rand(3, 3, 32, 32, generator=g)),
    ("minilm", {"max_tokens": 32}, None)])
def test_training_output_is_the_serving_forward_on_real_bases(
        preset: str, options: dict[str, int], example: Any,
        tmp_path_factory: pytest.TempPathFactory, gen: torch.Generator) -> None:
    """Training's linearized tail (autograd through Δ) is serving's (no_grad), bit for bit,
    on the real backbones: an image tail (one tensor) and a text tail ((hidden, mask))."""
    out = tmp_path_factory.mktemp("bases") / preset
    init_base(out, make_spec(preset, options=options))
    net = load_base(out, check_forward_ad=False).net
    if example is None:  # ids and a mask with padding, as the text preprocessor makes
        ids = torch.randint(1000, 2000, (3, 12), generator=gen)
        mask = (torch.arange(12)[None] < torch.tensor([[12], [7], [3]])).long()
        x: Any = (ids, mask)
    else:
        x = example(gen)
    h = net.trunk_forward(x)
    delta = net.random_delta(gen, scale=1e-3)
    y0, dy = net.tail_jvp_with_grad(h, {n: t.clone().requires_grad_(True)
                                        for n, t in delta.items()})
    assert dy.requires_grad
    assert torch.equal(y0 + dy, net.tail_forward(h, delta))
    assert torch.equal(y0 + dy, net.forward(x, delta))

def test_delta_norm_has_zero_gradient_at_zero(tiny: Base) -> None:
    d = {n: torch.zeros(tiny.net.params[n].shape, requires_grad=True) for n in tiny.net.names}
    delta_norm(d).backward()
    assert all(bool(torch.equal(t.grad, torch.zeros_like(t))) for t in d.values()
               if t.grad is not None)


def test_training_lowers_loss_and_leaves_theta0(tiny: Base, digit_splits: Splits,
                                                seed: int) -> None:
    theta0 = {n: p.clone() for n, p in tiny.net.net.state_dict().items()}
    shard = shard_random(digit_splits.train, seed % 3, 3, seed=seed % 997)
    kappa = float(np.random.default_rng(seed).choice([1.0, 5.0, 15.0]))
    # 8 epochs: with κ = 15, 4 epochs left the loss at 0.80 of θ0's (on the threshold: flaky);
    # 8 reach ≤ 0.73 for every κ over 40 seeds
    res = train_tangent(tiny, shard, TangentConfig(epochs=8, lr=1e-2, kappa=kappa,
                                                   seed=seed % 1000))
    ev = Evaluator(tiny, shard)
    assert ev.square_loss(res.delta, kappa) < 0.8 * ev.square_loss(None, kappa)
    assert res.epoch_losses[-1] < res.initial_loss
    assert set(res.delta) == set(tiny.net.names)
    for n, p in tiny.net.net.state_dict().items():
        assert torch.equal(p, theta0[n]), f"θ0 parameter {n} changed"
    test = Evaluator(tiny, digit_splits.test)
    assert test.tangent(res.delta) > test.base_model() + 0.3


def test_cache_gives_the_same_delta(tiny: Base, digit_splits: Splits, seed: int) -> None:
    shard = take(digit_splits.train, 150, seed=seed % 1000)
    cfg = TangentConfig(epochs=2, lr=1e-2, kappa=5.0, seed=seed % 1000)
    cached = train_tangent(tiny, shard, cfg)
    fresh = train_tangent(tiny, shard, TangentConfig(**{**cfg.as_dict(), "cache": False}))
    for n in cached.delta:
        torch.testing.assert_close(cached.delta[n], fresh.delta[n], rtol=1e-5, atol=1e-7)
    assert cached.epoch_losses == pytest.approx(fresh.epoch_losses, rel=1e-5)


def test_same_seed_same_delta_other_seed_differs(tiny: Base, digit_splits: Splits,
                                                 seed: int) -> None:
    shard = shard_by_classes(digit_splits.train, [seed % 10, (seed + 3) % 10])
    cfg = TangentConfig(epochs=2, lr=1e-2, kappa=50.0, seed=seed % 1000)
    feats = trunk_features(tiny, shard)
    a = train_tangent(tiny, shard, cfg, features=feats)
    b = train_tangent(tiny, shard, cfg)
    c = train_tangent(tiny, shard, TangentConfig(**{**cfg.as_dict(), "seed": cfg.seed + 1}))
    assert all(torch.equal(a.delta[n], b.delta[n]) for n in a.delta)
    assert any(not torch.equal(a.delta[n], c.delta[n]) for n in a.delta)


def test_masked_features_rebuild_each_batch(gen: torch.Generator) -> None:
    """Text trunks give (hidden [B, T, D], mask [B, T]); cached rows re-batched in any order
    give the hidden states and mask that batching those rows directly would."""
    n, d, max_len = 11, 3, 9
    lengths = torch.randint(1, max_len + 1, (n,), generator=gen)
    hidden = torch.randn(n, max_len, d, generator=gen)
    feats: Features | None = None
    for lo in range(0, n, 4):
        rows = np.arange(lo, min(n, lo + 4))
        width = int(lengths[rows].max())
        mask = (torch.arange(width)[None] < lengths[rows][:, None]).long()
        out = (hidden[rows, :width], mask)
        feats = feats or _allocate(out, n, max_len, 1 << 30)
        _store(feats, out, rows)
    assert feats is not None
    order = torch.randperm(n, generator=gen)[:5].numpy()
    h, mask = feats.take(order)
    width = int(lengths[order].max())
    assert h.shape == (5, width, d) and mask.shape == (5, width)
    assert torch.equal(mask.sum(1), lengths[order])
    keep = mask.bool()
    assert torch.equal(h[keep], hidden[order, :width][keep])
    assert bool((h[~keep] == 0).all())


def test_adamw_matches_torch(gen: torch.Generator) -> None:
    from training.loop import AdamW

    w0 = torch.randn(5, 3, generator=gen)
    grads = [torch.randn(5, 3, generator=gen) for _ in range(6)]
    ours, ref = w0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    opt = AdamW([ours], lr=3e-3, weight_decay=0.05)
    ref_opt = torch.optim.AdamW([ref], lr=3e-3, weight_decay=0.05)
    for g in grads:
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


def test_features_beyond_the_memory_limit_go_to_disk(tiny: Base, digit_splits: Splits,
                                                     seed: int) -> None:
    shard = take(digit_splits.train, 100, seed=seed % 1000)
    in_ram = trunk_features(tiny, shard)
    on_disk = trunk_features(tiny, shard, memory_limit=0)
    assert hasattr(on_disk.data, "_tmc_tmpdir") and not hasattr(in_ram.data, "_tmc_tmpdir")
    assert torch.equal(in_ram.data, on_disk.data)
    cfg = TangentConfig(epochs=1, lr=1e-2, seed=seed % 1000)
    a = train_tangent(tiny, shard, cfg, features=in_ram)
    b = train_tangent(tiny, shard, cfg, features=on_disk)
    assert all(torch.equal(a.delta[n], b.delta[n]) for n in a.delta)
