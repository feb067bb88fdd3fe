"""The class-incremental options of the tangent trainer: negatives made from the shard's own
rows, the quiet penalty, own-class targets and prototypes. Each keeps the component a plain
Δ (composition linear, zero Δ = θ0) and uses nothing but the shard."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bases import Base, load_base
from tangent import read_metadata
from tests.training.conftest import JIT_WARNING, run_cli
from training.data import Dataset, Splits, shard_by_classes
from training.errors import UsageError
from training.evaluate import Evaluator, compose_deltas
from training.features import trunk_features
from training.negatives import make_negatives
from training.prototypes import class_means, penultimate, pool_whitening, prototype_rows
from training.tangent_train import (
    TangentConfig,
    own_square_loss,
    square_loss,
    train_tangent,
)

pytestmark = pytest.mark.filterwarnings(JIT_WARNING)


def fake_images(n: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    y = np.arange(n, dtype=np.int64) % 2
    return Dataset("image", x, y, ["a", "b"], "fake", np.arange(n, dtype=np.int64))


@pytest.mark.parametrize("kind", ["rot", "jigsaw", "mix", "rot+jigsaw"])
def test_image_negatives_are_seeded_functions_of_the_rows(kind: str, seed: int) -> None:
    ds = fake_images(12, seed)
    a, b = make_negatives(ds, kind, seed), make_negatives(ds, kind, seed)
    other = make_negatives(ds, kind, seed + 1)
    assert a.inputs.shape == ds.inputs.shape and a.inputs.dtype == np.uint8
    assert np.array_equal(a.inputs, b.inputs)
    assert not np.array_equal(a.inputs, other.inputs)
    assert (a.labels == -1).all() and np.array_equal(a.index, ds.index)
    changed = [not np.array_equal(x, y) for x, y in zip(a.inputs, ds.inputs, strict=True)]
    assert all(changed), "every negative must differ from its source row"
    if kind in ("rot", "jigsaw"):  # a permutation of the row's own pixels
        for x, y in zip(a.inputs, ds.inputs, strict=True):
            assert np.array_equal(np.sort(x, axis=None), np.sort(y, axis=None))


def test_mix_blends_rows_of_another_class(seed: int) -> None:
    ds = fake_images(10, seed)
    neg = make_negatives(ds, "mix", seed)
    for i, row in enumerate(neg.inputs):
        partners = [j for j in range(len(ds)) if np.array_equal(
            row, ((ds.inputs[i].astype(np.uint16) + ds.inputs[j]) // 2).astype(np.uint8))]
        assert any(ds.labels[j] != ds.labels[i] for j in partners)


def test_image_only_negatives_refused_for_vectors(tiny: Base, digit_splits: Splits) -> None:
    shard = shard_by_classes(digit_splits.train, [0, 1])
    with pytest.raises(UsageError, match="need image inputs"):
        train_tangent(tiny, shard, TangentConfig(epochs=1, quiet=1.0, negatives="rot"))
    with pytest.raises(UsageError, match="unknown negatives 'pool:x'; use one of rot, "):
        train_tangent(tiny, shard, TangentConfig(epochs=1, quiet=1.0, negatives="pool:x"))


def test_quiet_shrinks_the_tangent_term_on_negatives(tiny: Base, digit_splits: Splits,
                                                     seed: int) -> None:
    shard = shard_by_classes(digit_splits.train, [seed % 10, (seed + 1) % 10])
    cfg = TangentConfig(epochs=4, lr=1e-2, kappa=15.0, seed=seed % 1000, negatives="mix")
    loud = train_tangent(tiny, shard, cfg)
    quiet = train_tangent(tiny, shard, replace(cfg, quiet=3.0))
    neg = Evaluator(tiny, make_negatives(shard, "mix", cfg.seed))
    f0 = neg.tangent_logits(None)

    def energy(delta: dict[str, torch.Tensor]) -> float:
        return float((neg.tangent_logits(delta) - f0).pow(2).mean())

    assert energy(quiet.delta) < 0.7 * energy(loud.delta)
    own = Evaluator(tiny, shard)
    # it still fits its own classes: far above chance (0.5) and close to the loud fit (an
    # absolute 0.9 failed for the hardest digit pairs, e.g. 1 and 2 at 0.889, for either fit)
    fit_quiet, fit_loud = own.tangent(quiet.delta), own.tangent(loud.delta)
    assert fit_quiet > 0.8 and fit_quiet > fit_loud - 0.1, (fit_quiet, fit_loud)


def test_own_targets_ask_nothing_of_the_other_outputs(gen: torch.Generator) -> None:
    y0 = torch.randn(6, 10, generator=gen) * 3  # [B, C]: the base's outputs
    y = torch.tensor([2, 7, 2, 7, 7, 2])
    own = torch.zeros(10, dtype=torch.bool)
    own[[2, 7]] = True
    kappa = 15.0
    # a tangent term that reaches κ·one-hot on the own outputs and is 0 elsewhere: no loss
    dy = torch.zeros(6, 10)
    dy[:, own] = F.one_hot(y, 10).float()[:, own] * kappa - y0[:, own]
    assert float(own_square_loss(y0, dy, y, kappa, own)) < 1e-10
    assert float(square_loss(y0 + dy, y, kappa)) > 1.0  # "all" wants the others at 0
    # any change of an off-class output is penalised
    dy[:, 4] += 1.0
    assert float(own_square_loss(y0, dy, y, kappa, own)) == pytest.approx(6 / 60)


def test_own_targets_train_own_outputs_and_leave_the_others(tiny: Base, digit_splits: Splits,
                                                           seed: int) -> None:
    classes = [seed % 10, (seed + 5) % 10]
    shard = shard_by_classes(digit_splits.train, classes)
    cfg = TangentConfig(epochs=8, lr=1e-2, kappa=15.0, seed=seed % 1000, targets="own")
    res = train_tangent(tiny, shard, cfg)
    ev = Evaluator(tiny, shard)
    dy = ev.tangent_logits(res.delta) - ev.tangent_logits(None)  # [N, C]: J·Δ
    others = [c for c in range(10) if c not in classes]
    assert float(dy[:, others].abs().mean()) < 0.05 * float(dy[:, classes].abs().mean())
    picked = torch.tensor(classes)[ev.tangent_logits(res.delta)[:, classes].argmax(-1)]
    assert float((picked == ev.labels).double().mean()) > 0.8  # chance: 0.5


def test_prototypes_add_exactly_the_cosine_class_mean_score(tiny: Base, digit_splits: Splits,
                                                           seed: int) -> None:
    classes = [seed % 10, (seed + 3) % 10]
    shard = shard_by_classes(digit_splits.train, classes)
    alpha = 7.0
    cfg = TangentConfig(epochs=1, lr=1e-2, kappa=5.0, seed=seed % 1000)
    plain = train_tangent(tiny, shard, cfg)
    with_p = train_tangent(tiny, shard, replace(cfg, prototypes=alpha / cfg.kappa))
    ev = Evaluator(tiny, digit_splits.test)
    phi = penultimate(tiny.net, ev.features)  # [N, D]
    shard_features = trunk_features(tiny, shard)
    phi_shard, labels = penultimate(tiny.net, shard_features), torch.from_numpy(shard.labels)
    rows = prototype_rows(tiny.net, shard, shard_features)
    assert sorted(rows) == sorted(classes)
    expected = ev.tangent_logits(plain.delta).clone()
    for c in classes:  # μ̂_c: the unit-length mean of φ over the shard's rows of class c
        mean = phi_shard[labels == c].mean(0)  # [D]
        mu = mean / mean.norm()
        torch.testing.assert_close(rows[c], mu)
        expected[:, c] += alpha * phi @ mu
    torch.testing.assert_close(ev.tangent_logits(with_p.delta), expected, rtol=1e-5,
                               atol=1e-4)
    # only the output layer's rows of the shard's own classes changed
    for name in plain.delta:
        diff = (with_p.delta[name] - plain.delta[name]).abs()
        if name.endswith("classifier.weight"):
            assert set(torch.nonzero(diff.sum(1)).flatten().tolist()) == set(classes)
        else:
            assert torch.equal(with_p.delta[name], plain.delta[name])


def test_recipe_components_compose_linearly_and_zero_is_theta0(effnet_dir: object,
                                                               seed: int) -> None:
    base = load_base(effnet_dir)  # type: ignore[arg-type]
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(24, 28, 28), dtype=np.uint8)
    ds = Dataset("image", x, np.arange(24) % 4, list(base.labels), "fake",
                 np.arange(24, dtype=np.int64))
    cfg = TangentConfig(epochs=1, batch_size=8, lr=1e-3, kappa=50.0, quiet=1.0,
                        negatives="rot+jigsaw", prototypes=5.0, seed=seed % 1000)
    deltas = [train_tangent(base, ds.subset(np.flatnonzero(ds.labels // 2 == k)), cfg).delta
              for k in range(2)]
    ev = Evaluator(base, ds)
    composed = ev.tangent_logits(compose_deltas(deltas, normalize="mean"))
    alone = torch.stack([ev.tangent_logits(d) for d in deltas]).mean(0)
    torch.testing.assert_close(composed, alone, rtol=1e-4, atol=1e-3)
    zero = {n: torch.zeros_like(t) for n, t in deltas[0].items()}
    assert torch.equal(ev.tangent_logits(zero), ev.tangent_logits(None))


def test_pool_prototypes_add_exactly_the_whitened_class_mean_score(
        tiny: Base, digit_splits: Splits, seed: int) -> None:
    classes = [seed % 10, (seed + 4) % 10]
    shard = shard_by_classes(digit_splits.train, classes)
    pool_rows = digit_splits.train.subset(np.arange(0, len(digit_splits.train), 3))
    pool_features = trunk_features(tiny, pool_rows)
    pool = pool_whitening(tiny.net, pool_features, shrinkage=0.3)
    # Σ⁻¹: the pool's φ covariance (population), shrunk 30% towards mean(diag Σ)·I
    phi_pool = penultimate(tiny.net, pool_features).to(torch.float64)  # [P, D]
    cov = torch.cov(phi_pool.T, correction=0)  # [D, D]
    eye = torch.eye(cov.shape[0], dtype=torch.float64)
    shrunk = 0.7 * cov + 0.3 * cov.diagonal().mean() * eye
    assert pool.rows == len(pool_rows)
    torch.testing.assert_close(pool.precision, torch.linalg.inv(shrunk))
    cfg = TangentConfig(epochs=1, lr=1e-2, kappa=5.0, seed=seed % 1000, prototypes=2.0)
    plain = train_tangent(tiny, shard, replace(cfg, prototypes=0.0))
    whitened = train_tangent(tiny, shard, cfg, pool=pool)
    ev = Evaluator(tiny, digit_splits.test)
    phi = penultimate(tiny.net, ev.features).to(torch.float64)  # [N, D]
    shard_features = trunk_features(tiny, shard)
    phi_shard = penultimate(tiny.net, shard_features).to(torch.float64)  # [n, D]
    labels = torch.from_numpy(shard.labels)
    means = class_means(tiny.net, shard, shard_features)
    assert sorted(means) == sorted(classes)
    expected = ev.tangent_logits(plain.delta).to(torch.float64)
    for c in classes:  # μ_c: the mean of φ over the shard's rows of class c
        mean = phi_shard[labels == c].mean(0)  # [D]
        torch.testing.assert_close(means[c], mean)
        row = pool.precision @ mean
        expected[:, c] += cfg.prototypes * cfg.kappa * (phi @ row - 0.5 * mean @ row)
    torch.testing.assert_close(ev.tangent_logits(whitened.delta).to(torch.float64), expected,
                               rtol=1e-4, atol=1e-3)


def test_cli_pool_recorded_and_pool_without_prototypes_refused(
        tiny_dir: Path, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "c.safetensors"
    argv = ["--base", str(tiny_dir), "--data", "digits", "--classes", "1,7", "--epochs", "1",
            "--out", str(out), "--json", "--quiet", "--pool", "digits", "--pool-limit", "300"]
    code, stdout, _ = run_cli([*argv, "--prototypes", "0.1"], capsys)
    assert code == 0
    meta = read_metadata(out.read_bytes())
    assert json.loads(meta["pool_rows"]) == 300 and len(meta["pool_fingerprint"]) == 64
    assert json.loads(meta["prototypes"]) == 0.1 and meta["pool"] == "digits"
    again = tmp_path / "again.safetensors"
    code, _, _ = run_cli([*argv[:-6], "--out", str(again), "--quiet", "--pool", "digits",
                          "--pool-limit", "300", "--classes", "2,3"], capsys)
    assert code == 0  # another shard, the same pool: the same fingerprint
    assert read_metadata(again.read_bytes())["pool_fingerprint"] == meta["pool_fingerprint"]
    code, stdout, err = run_cli([*argv, "--prototypes", "0", "--out",
                                 str(tmp_path / "no.st")], capsys)
    assert code == 2 and "--prototypes > 0" in err and not (tmp_path / "no.st").exists()
