"""The measurements bench.accuracy builds on: evaluator subsets, continual prefixes and the
forgetting check through a real registry (exact, by construction)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from bases import Base
from tests.training.conftest import JIT_WARNING
from training.data import Splits, shard_random
from training.evaluate import Evaluator, compose_deltas
from training.features import trunk_features
from training.probe import train_linear_probe
from training.protocols import (
    continual_curve,
    forgetting_check,
    method_scores,
    summarize_scores,
)

pytestmark = pytest.mark.filterwarnings(JIT_WARNING)


def random_deltas(tiny: Base, k: int, gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
    return [{n: 0.05 * torch.randn(p.shape, generator=gen) for n, p in tiny.region.items()}
            for _ in range(k)]


def methods_on(tiny: Base, ds: Any, k: int, gen: torch.Generator
               ) -> tuple[Evaluator, list[dict[str, torch.Tensor]], list[Any], Any]:
    """An evaluator on ds, k random tangents, their non-linear counterparts and a probe."""
    ev = Evaluator(tiny, ds)
    deltas = random_deltas(tiny, k, gen)
    models = [{n: tiny.net.params[n] + d.get(n, 0) for n in tiny.net.names} for d in deltas]
    return ev, deltas, models, train_linear_probe(tiny, ds, l2=1e-3, max_iter=20)


def test_evaluator_subset_matches_a_fresh_evaluator(tiny: Base, digit_splits: Splits,
                                                    gen: torch.Generator) -> None:
    ev = Evaluator(tiny, digit_splits.val)
    rows = np.sort(torch.randperm(len(ev), generator=gen)[: len(ev) // 3].numpy())
    delta = random_deltas(tiny, 1, gen)[0]
    sub, fresh = ev.subset(rows), Evaluator(tiny, digit_splits.val.subset(rows))
    assert torch.equal(sub.labels, fresh.labels)
    torch.testing.assert_close(sub.tangent_logits(delta), fresh.tangent_logits(delta),
                               rtol=0, atol=1e-6)


def test_continual_prefixes_are_the_compositions_of_the_first_k(
        tiny: Base, digit_splits: Splits, gen: torch.Generator) -> None:
    ev, deltas, models, probe = methods_on(tiny, digit_splits.test, 3, gen)
    scores = method_scores(ev, deltas, models, deltas[0], probe)
    curve = continual_curve(ev, deltas, models, scores, None)
    assert curve["k"] == [1, 2, 3] and curve["rows"] == [len(ev)] * 3
    one_row = 1.0 / len(ev) + 1e-12
    for k in (1, 2, 3):
        # prefixes k < K come from the components' own logits (linearity): the composed
        # forward gives the same logits up to float rounding, the same accuracy up to a tie
        composed = ev.tangent_logits(compose_deltas(deltas[:k], normalize="mean"))
        assert scores.alone is not None
        torch.testing.assert_close(torch.stack(scores.alone[:k]).mean(0), composed,
                                   rtol=0, atol=1e-5)
        assert curve["tmc_mean"][k - 1] == pytest.approx(ev.tmc(deltas[:k]), abs=one_row)
    assert curve["tmc_mean"][2] == ev.accuracy_of(scores.tmc_mean)  # k = K: composed
    assert curve["newest_component_alone"][2] == ev.tangent(deltas[2])
    # class-incremental scoring looks only at the rows of the classes seen so far
    classes = [[0, 1], [2, 3], [4, 5]]
    curve = continual_curve(ev, deltas, models, scores, classes)
    seen = np.isin(digit_splits.test.labels, [0, 1])
    assert curve["rows"][0] == int(seen.sum())
    assert curve["tmc_mean"][0] == ev.subset(np.flatnonzero(seen)).tmc(deltas[:1])


def test_validation_scores_hold_only_what_is_chosen_there(
        tiny: Base, digit_splits: Splits, gen: torch.Generator) -> None:
    ev, deltas, models, probe = methods_on(tiny, digit_splits.val, 2, gen)
    full = method_scores(ev, deltas, models, deltas[0], probe)
    val = method_scores(ev, deltas, models, deltas[0], probe, selection_only=True)
    assert val.alone is None and val.optional() == {} and val.variants == {}
    assert set(full.optional()) == {"linear_probe", "base_theta0", "joint_tangent"}
    assert full.alone is not None
    for a, b in zip([val.tmc_mean, val.tmc_sum, val.nl_weight_average, *val.nl],
                    [full.tmc_mean, full.tmc_sum, full.nl_weight_average, *full.nl],
                    strict=True):  # the same tails, the same logits
        assert torch.equal(a, b)
    acc = summarize_scores(ev, val, ["a", "b"])
    assert acc["tmc_mean"] == ev.tmc(deltas) and "components_alone" not in acc
    assert acc["nl_weight_average"] == summarize_scores(ev, full, ["a", "b"])[
        "nl_weight_average"]


def test_variants_are_composed_and_scored_like_tmc(tiny: Base, digit_splits: Splits,
                                                    gen: torch.Generator) -> None:
    ev, deltas, models, probe = methods_on(tiny, digit_splits.val, 2, gen)
    scores = method_scores(ev, deltas, models, None, probe, selection_only=True,
                           variants={"tmc_first": deltas[:1], "tmc_same": deltas})
    assert list(scores.variants) == ["tmc_first", "tmc_same"]
    assert torch.equal(scores.variants["tmc_same"]["mean"], scores.tmc_mean)
    assert torch.equal(scores.variants["tmc_same"]["sum"], scores.tmc_sum)
    acc = summarize_scores(ev, scores, ["a", "b"])
    assert acc["tmc_first_mean"] == acc["tmc_first_sum"] == ev.tangent(deltas[0])


def test_forgetting_through_the_registry_equals_never_having_it(
        tiny: Base, digit_splits: Splits, gen: torch.Generator, tmp_path) -> None:
    train = digit_splits.train
    shards = [shard_random(train, k, 3, seed=1) for k in range(3)]
    tasks = [(f"shard {k}", s, trunk_features(tiny, s)) for k, s in enumerate(shards)]
    deltas = random_deltas(tiny, 3, gen)
    test = Evaluator(tiny, digit_splits.test)
    out = forgetting_check(tiny, tasks, deltas, test, None, tmp_path)
    assert out["all_bit_identical"]
    for j, row in enumerate(out["per_component"]):
        assert row["own_rows_after_forget"] == row["own_rows_never"]
        assert row["other_rows_after_forget"] == row["other_rows_never"]
        # the registry sums in digest order, compose_deltas in list order: the Δ differ in
        # the last bits, so the accuracies may differ by a near-tie row at most
        one_row = 1.0 / len(test) + 1e-12
        kept = [d for i, d in enumerate(deltas) if i != j]
        assert row["other_rows_never"] == pytest.approx(test.tmc(kept), abs=one_row)
        assert row["other_rows_with"] == pytest.approx(test.tmc(deltas), abs=one_row)
