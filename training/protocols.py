"""The accuracy protocols, on one seed: every method's scores, the continual curve
(class- or data-incremental tasks arriving one by one), and the forgetting check through a
real registry. bench/accuracy.py runs them on real data; tests/training checks them.

Scores are [N, C] logits on one split, computed once per method and reused by every figure
(accuracy, continual prefixes, the linearity check).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tangent import Normalize
from training.evaluate import Delta, Evaluator, compose_deltas
from training.nonlinear import weight_average

if TYPE_CHECKING:
    from bases import Base
    from registry import Registry
    from training.data import Dataset
    from training.features import Features
    from training.probe import LinearProbe

Task = tuple[str, "Dataset", "Features | None"]  # (label, training shard, its trunk features)

Params = Mapping[str, torch.Tensor]  # a non-linear model's region parameters
# a variant's figures: <name>_mean (mean-normalized) and <name>_sum (plain sum)
VARIANT_MODES: tuple[tuple[str, Normalize], ...] = (("mean", "mean"), ("sum", "none"))


def softmax_mean(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The non-linear ensemble's score: mean of the members' softmax, [N, C]."""
    return torch.stack([torch.softmax(lg, -1) for lg in logits]).mean(0)


@dataclass
class MethodLogits:
    """Logits [N, C] of every method on one split. The fields after ``variants`` are None on
    the validation split (only what is chosen there is computed) and ``joint_tangent`` when
    no joint model was trained."""

    tmc_mean: torch.Tensor  # TMC, mean-normalized weights
    tmc_sum: torch.Tensor  # TMC, plain sum
    nl: list[torch.Tensor]  # each non-linear fine-tune alone
    nl_weight_average: torch.Tensor
    # other component sets composed like TMC: name -> {"mean": [N, C], "sum": [N, C]}
    variants: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    alone: list[torch.Tensor] | None = None  # each tangent component alone
    linear_probe: torch.Tensor | None = None
    base_theta0: torch.Tensor | None = None
    joint_tangent: torch.Tensor | None = None

    def optional(self) -> dict[str, torch.Tensor]:
        """The single-logit methods present on this split, by their result name."""
        found = {"linear_probe": self.linear_probe, "base_theta0": self.base_theta0,
                 "joint_tangent": self.joint_tangent}
        return {name: lg for name, lg in found.items() if lg is not None}


def method_scores(ev: Evaluator, deltas: Sequence[Delta], models: Sequence[Params],
                  joint: Delta | None, probe: LinearProbe, selection_only: bool = False,
                  variants: Mapping[str, Sequence[Delta]] | None = None) -> MethodLogits:
    """Logits [N, C] of every method on ``ev``'s split (each tail runs once); no joint
    tangent when ``joint`` is None. ``selection_only`` (the validation split): only what is
    chosen on validation — TMC's normalization and the non-linear combination.
    ``variants``: other sets of components (e.g. without prototypes), composed the same
    way, reported as ``<name>_mean`` / ``<name>_sum``."""
    scores = MethodLogits(
        tmc_mean=ev.tangent_logits(compose_deltas(deltas, normalize="mean")),
        tmc_sum=ev.tangent_logits(compose_deltas(deltas, normalize="none")),
        nl=[ev.params_logits(m) for m in models],
        nl_weight_average=ev.params_logits(weight_average(models)),
        variants={name: {norm: ev.tangent_logits(compose_deltas(ds, normalize=mode))
                         for norm, mode in VARIANT_MODES}
                  for name, ds in (variants or {}).items()})
    if selection_only:
        return scores
    scores.alone = [ev.tangent_logits(d) for d in deltas]
    scores.linear_probe = ev.params_logits(probe.params())
    scores.base_theta0 = ev.tangent_logits(None)
    if joint is not None:
        scores.joint_tangent = ev.tangent_logits(joint)
    return scores


def summarize_scores(ev: Evaluator, scores: MethodLogits, labels: Sequence[str]
                     ) -> dict[str, Any]:
    """Accuracies from method_scores, plus the linearity check of the composition (when
    the components' own logits are there)."""
    acc = ev.accuracy_of
    out: dict[str, Any] = {
        "tmc_mean": acc(scores.tmc_mean),
        "tmc_sum": acc(scores.tmc_sum),
        "nl_alone": {lab: acc(lg) for lab, lg in zip(labels, scores.nl, strict=True)},
        "nl_alone_mean": float(np.mean([acc(lg) for lg in scores.nl])),
        "nl_ensemble_softmax": acc(softmax_mean(scores.nl)),
        "nl_ensemble_logits": acc(torch.stack(scores.nl).mean(0)),
        "nl_weight_average": acc(scores.nl_weight_average),
        "rows": len(ev),
    }
    for name, by_norm in scores.variants.items():
        for norm, logits in by_norm.items():
            out[f"{name}_{norm}"] = acc(logits)
    if scores.alone is not None:
        alone = [acc(lg) for lg in scores.alone]
        out["components_alone"] = dict(zip(labels, alone, strict=True))
        out["component_alone_mean"] = float(np.mean(alone))
        # linearity: f0 + J·mean(Δ) == mean over k of (f0 + J·Δ_k), up to float rounding
        out["tmc_vs_mean_of_alone_max_abs_logit"] = float(
            (scores.tmc_mean - torch.stack(scores.alone).mean(0)).abs().max())
    for key, logits in scores.optional().items():
        out[key] = acc(logits)
    return out


def seen_rows(labels: torch.Tensor, classes: list[list[int]] | None, k: int) -> torch.Tensor:
    """Bool [N]: the rows a model that has seen tasks 0..k-1 is scored on."""
    if classes is None:  # data-incremental: every task covers every class
        return torch.ones_like(labels, dtype=torch.bool)
    seen = torch.tensor(sorted({c for cs in classes[:k] for c in cs}))
    return torch.isin(labels, seen)


def continual_curve(ev: Evaluator, deltas: Sequence[Delta], models: Sequence[Params],
                    scores: MethodLogits, classes: list[list[int]] | None
                    ) -> dict[str, Any]:
    """Tasks arrive one by one: after k of them, each method combines the first k models.

    Class-incremental: scored on the test rows of the classes seen so far (all 10 outputs
    compete); data-incremental: on the whole test split. TMC of the first k < K is the mean
    of those components' own logits — f0 + J·mean(Δ) by linearity, exact up to float
    rounding (summarize_scores measures that difference at k = K, where the composed
    forward is run) — so the curve costs no extra JVP pass; the weight average is not
    linear and runs each prefix.
    """
    if scores.alone is None:
        raise ValueError("continual_curve needs every component's own logits: give it the "
                         "test split's scores (method_scores without selection_only)")
    alone = scores.alone
    curve: dict[str, Any] = {"k": [], "rows": [], "tmc_mean": [], "nl_ensemble_softmax": [],
                             "nl_weight_average": [], "newest_component_alone": []}
    for k in range(1, len(deltas) + 1):
        rows = seen_rows(ev.labels, classes, k)
        tmc = scores.tmc_mean if k == len(deltas) else torch.stack(alone[:k]).mean(0)
        wavg = scores.nl_weight_average if k == len(models) else ev.params_logits(
            weight_average(models[:k]))
        for key, lg in (("tmc_mean", tmc), ("nl_ensemble_softmax", softmax_mean(
                scores.nl[:k])), ("nl_weight_average", wavg),
                ("newest_component_alone", alone[k - 1])):
            curve[key].append(accuracy_on(lg, ev.labels, rows))
        curve["k"].append(k)
        curve["rows"].append(int(rows.sum()))
    curve["scope"] = ("test rows of the classes seen so far" if classes is not None
                      else "whole test split")
    curve["tmc_prefixes"] = ("k < K: mean of the first k components' logits (linearity); "
                             "k = K: the composed forward")
    return curve


def accuracy_on(logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor) -> float:
    hits = logits.argmax(-1)[rows] == labels[rows]
    return float(hits.to(torch.float64).mean()) if hits.numel() else float("nan")


# -- forgetting through the registry -------------------------------------------------------
def served_delta(reg: Registry) -> dict[str, torch.Tensor]:
    """The composition "*" (every active component, mean) as the service builds it: the
    registry resolves it, tangent.effective_weights normalizes the weights (what the
    service's plan applies), tangent.compose sums the terms with those weights."""
    from tangent import Term, compose, effective_weights

    res = reg.resolve_all_active("mean")
    weights = effective_weights([float(i.weight) for i in res.items], res.normalize)
    return compose([Term(i.digest, w, reg.load_tensors(i.digest))
                    for i, w in zip(res.items, weights, strict=True)], "none")


def registry_with(base: Base, path: Path, blobs: Mapping[str, bytes]) -> Registry:
    import registry

    reg = registry.open_registry(registry_dir=path, redis_url=None,
                                 base_fingerprint=base.fingerprint, region=base.region)
    for cid, data in blobs.items():
        reg.add(cid, data)
    return reg


def same_delta(a: Delta, b: Delta) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def forgetting_check(base: Base, tasks: Sequence[Task], deltas: Sequence[Delta],
                     test: Evaluator, classes: list[list[int]] | None, workdir: Path
                     ) -> dict[str, Any]:
    """For each component j: registry A holds all K, then forgets j; registry B never had j.

    Records whether A's served Δ (and logits) after the forget equal B's bit for bit, and the
    accuracy on j's own rows (class-incremental: test rows of its classes; data-incremental:
    its training shard) and on the other rows, with j, after forgetting j, and never with j.
    "With" is the same composition for every j: on the whole test split it runs once.
    """
    from tangent import encode_component

    blobs = {f"task-{k}": encode_component(d, base.fingerprint, {"task": label})
             for k, ((label, _, _), d) in enumerate(zip(tasks, deltas, strict=True))}
    rows: list[dict[str, Any]] = []
    with_on_test: torch.Tensor | None = None  # the all-K composition on the test split
    for j, (label, ds, feats) in enumerate(tasks):
        cid = f"task-{j}"
        reg_a = registry_with(base, workdir / f"a{j}", blobs)
        try:
            with_j = served_delta(reg_a)
            receipt = reg_a.forget(cid)
            after = served_delta(reg_a)
        finally:
            reg_a.close()
        reg_b = registry_with(base, workdir / f"b{j}", {c: b for c, b in blobs.items()
                                                         if c != cid})
        try:
            never = served_delta(reg_b)
        finally:
            reg_b.close()
        own, other = forgotten_rows(base, test, ds, feats, classes, j)
        if other is not test:
            with_other = other.tangent_logits(with_j)
        else:
            with_on_test = test.tangent_logits(with_j) if with_on_test is None else with_on_test
            with_other = with_on_test
        logits = {"with": (own.tangent_logits(with_j), with_other),
                  **{name: (own.tangent_logits(d), other.tangent_logits(d))
                     for name, d in (("after_forget", after), ("never", never))}}
        rows.append({
            "forgotten": label, "forget_generation": receipt.generation,
            "delta_bit_identical_to_never": same_delta(after, never),
            "logits_bit_identical_to_never": all(
                torch.equal(x, y) for x, y in zip(logits["after_forget"], logits["never"],
                                                  strict=True)),
            **{f"own_rows_{name}": own.accuracy_of(lg[0]) for name, lg in logits.items()},
            **{f"other_rows_{name}": other.accuracy_of(lg[1]) for name, lg in logits.items()},
            "own_rows": len(own), "other_rows": len(other)})
    return {"per_component": rows,
            "own_rows_are": ("test rows of the forgotten task's classes" if classes is not None
                             else "the forgotten shard's own training rows"),
            "other_rows_are": ("test rows of the other classes" if classes is not None
                               else "the whole test split"),
            "all_bit_identical": all(r["delta_bit_identical_to_never"]
                                     and r["logits_bit_identical_to_never"] for r in rows)}


def forgotten_rows(base: Base, test: Evaluator, ds: Dataset, feats: Features | None,
                   classes: list[list[int]] | None, j: int) -> tuple[Evaluator, Evaluator]:
    """(rows that tell whether component j is still there, the other rows) as evaluators."""
    if classes is None:
        return Evaluator(base, ds, features=feats), test
    mask = torch.isin(test.labels, torch.tensor(classes[j])).numpy()
    return test.subset(np.flatnonzero(mask)), test.subset(np.flatnonzero(~mask))
