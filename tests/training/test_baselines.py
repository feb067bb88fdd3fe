"""Non-linear fine-tuning, weight averaging, the linear probe and the evaluation library."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load

from bases import Base
from tangent import read_metadata
from tests.training.conftest import JIT_WARNING
from training.data import Splits, shard_random
from training.errors import UsageError
from training.evaluate import Evaluator, compose_deltas, evaluate_files
from training.nonlinear import (
    FORMAT,
    NonlinearConfig,
    decode_nonlinear,
    encode_nonlinear,
    tail_with,
    train_nonlinear,
    weight_average,
)
from training.probe import penultimate, train_linear_probe

pytestmark = pytest.mark.filterwarnings(JIT_WARNING)


def test_nonlinear_fine_tune_learns_and_round_trips(tiny: Base, digit_splits: Splits,
                                                    seed: int) -> None:
    shard = shard_random(digit_splits.train, 0, 2, seed=seed % 1000)
    res = train_nonlinear(tiny, shard, NonlinearConfig(epochs=4, lr=1e-2, seed=seed % 1000))
    assert res.epoch_losses[-1] < 0.5 * res.initial_loss
    assert set(res.params) == set(tiny.net.names)
    test = Evaluator(tiny, digit_splits.test)
    assert test.nonlinear(res.params) > test.base_model() + 0.3
    data = encode_nonlinear(res.params, tiny.fingerprint, {"samples": len(shard)})
    assert read_metadata(data)["format"] == FORMAT
    back = decode_nonlinear(data, tiny)
    assert all(torch.equal(back[n], res.params[n]) for n in res.params)
    other = encode_nonlinear(res.params, "0" * 64)
    with pytest.raises(UsageError, match="another base"):
        decode_nonlinear(other, tiny)


def test_weight_average_and_ensemble(tiny: Base, digit_splits: Splits,
                                     gen: torch.Generator) -> None:
    names = tiny.net.names
    models = [{n: tiny.net.params[n] + 0.3 * torch.randn(tiny.net.params[n].shape,
                                                          generator=gen) for n in names}
              for _ in range(3)]
    avg = weight_average(models)
    for n in names:
        torch.testing.assert_close(avg[n], (models[0][n] + models[1][n] + models[2][n]) / 3)
    ev = Evaluator(tiny, digit_splits.val)
    assert ev.weight_average(models) == ev.nonlinear(avg)
    assert ev.ensemble(models[:1]) == ev.nonlinear(models[0])
    probs = sum(torch.softmax(ev.params_logits(m), -1) for m in models)
    assert isinstance(probs, torch.Tensor)
    assert ev.ensemble(models) == ev.accuracy_of(probs)
    h = ev.features.take(np.arange(len(ev)))
    torch.testing.assert_close(ev.params_logits(models[1]), tail_with(tiny.net, h, models[1]))


def test_tmc_composition_is_the_mean_delta(tiny: Base, digit_splits: Splits,
                                           gen: torch.Generator) -> None:
    deltas = [tiny.net.random_delta(gen, scale=0.2) for _ in range(4)]
    ev = Evaluator(tiny, digit_splits.val)
    mean = {n: sum(d[n] for d in deltas) / 4 for n in deltas[0]}
    composed = compose_deltas(deltas, normalize="mean")
    for n in mean:
        torch.testing.assert_close(composed[n], mean[n])
    logits = ev.tangent_logits(composed)
    # linearity: the composed output is the mean of the individual linearized outputs
    each = torch.stack([ev.tangent_logits(d) for d in deltas]).mean(0)
    torch.testing.assert_close(logits, each, rtol=1e-5, atol=1e-5)
    assert ev.tmc(deltas) == ev.accuracy_of(logits)
    weights = torch.rand(4, generator=gen).tolist()
    weighted = compose_deltas(deltas, weights, normalize="none")
    for n in mean:
        torch.testing.assert_close(weighted[n], sum(w * d[n] for w, d in
                                                    zip(weights, deltas, strict=True)))
    from tangent import encode_component

    files = [encode_component(d, tiny.fingerprint, {}) for d in deltas]
    assert evaluate_files(tiny, digit_splits.val, files, evaluator=ev) == {"tmc": ev.tmc(deltas)}


def test_linear_probe_fits_the_last_layer(tiny: Base, digit_splits: Splits) -> None:
    probe = train_linear_probe(tiny, digit_splits.train, l2=1e-4)
    assert probe.stage == "classifier"
    assert probe.weight.shape == tiny.net.params["classifier.weight"].shape
    ev = Evaluator(tiny, digit_splits.test)
    x = penultimate(tiny, ev.features)
    direct = ev.accuracy_of(x @ probe.weight.T + probe.bias)
    assert ev.probe(probe) == direct
    assert ev.probe(probe) > ev.base_model() + 0.3
    again = train_linear_probe(tiny, digit_splits.train, l2=1e-4)
    assert torch.equal(again.weight, probe.weight)  # deterministic


def test_nonlinear_file_tensors_use_region_names(tiny: Base, digit_splits: Splits) -> None:
    res = train_nonlinear(tiny, shard_random(digit_splits.train, 1, 4),
                          NonlinearConfig(epochs=1, lr=1e-3))
    data = encode_nonlinear(res.params, tiny.fingerprint)
    assert set(st_load(data)) == set(tiny.region)
