"""Evaluate TMC compositions and the paper's baselines on one split.

An :class:`Evaluator` computes the split's trunk features once and then runs only the tail
per method, so every method on a split shares one trunk pass:

- ``tangent(delta)``: one component alone, f(x;θ0) + J·Δ;
- ``tmc(deltas, weights, normalize)``: the composition Σ w_k Δ_k (one JVP);
- ``nonlinear(params)``: one non-linear fine-tune (the region's parameters replaced);
- ``ensemble(list of params)``: the non-linear ensemble, mean of softmax (or of logits);
- ``weight_average(list of params)``: the non-linear weight average;
- ``probe(linear_probe)``: the linear probe on the frozen base;
- ``base()``: θ0 itself.
Each returns the accuracy; ``*_logits`` variants return [N, C] scores.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from tangent import Normalize
from training.data import Dataset
from training.features import Features, InputEncoder, TailInput, batches, trunk_features
from training.nonlinear import tail_with, weight_average
from training.probe import LinearProbe

if TYPE_CHECKING:
    from bases import Base

Delta = Mapping[str, torch.Tensor]


def compose_deltas(deltas: Sequence[Delta], weights: Sequence[float] | None = None,
                   normalize: Normalize = "mean") -> dict[str, torch.Tensor]:
    """Σ w_k Δ_k with tangent.compose (weights default to 1; 'mean' divides by N)."""
    from tangent import Term, compose

    w = list(weights) if weights is not None else [1.0] * len(deltas)
    if len(w) != len(deltas):
        raise ValueError("one weight per delta")
    # digests only fix the summation order: keep the given order
    return compose([Term(f"{k:08d}", wk, d) for k, (d, wk) in enumerate(zip(deltas, w,
                                                                              strict=True))],
                   normalize)


def default_eval_batch(features: Features) -> int:
    """Rows per tail pass: 32 for token features (a minilm JVP tail ran at 65 rows/s at 32
    vs 48 at 128 on 2 CPU cores, measured; why is not), 128 otherwise."""
    return 32 if features.kind == "masked" else 128


class Evaluator:
    """Accuracy of any method on one dataset split; trunk features computed once."""

    def __init__(self, base: Base, ds: Dataset, *, features: Features | None = None,
                 batch_size: int | None = None, progress: bool = False,
                 desc: str = "eval features") -> None:
        InputEncoder(base).check(ds)
        self.base, self.ds = base, ds
        self.features = features if features is not None else trunk_features(
            base, ds, progress=progress, desc=desc)
        self.batch_size = batch_size or default_eval_batch(self.features)
        if len(self.features) != len(ds):
            raise ValueError("features and dataset differ in length")
        self.labels = torch.from_numpy(ds.labels)

    def __len__(self) -> int:
        return len(self.ds)

    def subset(self, rows: Sequence[int] | np.ndarray) -> Evaluator:
        """The same split restricted to these row positions (features reused, not recomputed)."""
        rows = np.asarray(rows, dtype=np.int64)
        return Evaluator(self.base, self.ds.subset(rows), features=self.features.subset(rows),
                         batch_size=self.batch_size)

    # -- scores ------------------------------------------------------------------------------
    def _map(self, fn: Callable[[TailInput], torch.Tensor]) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for rows in batches(len(self.features), self.batch_size):
                out.append(fn(self.features.take(rows)))
        return torch.cat(out)

    def tangent_logits(self, delta: Delta | None = None) -> torch.Tensor:
        net = self.base.net
        return self._map(lambda h: net.tail_forward(h, dict(delta) if delta else None))

    def params_logits(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        net = self.base.net
        return self._map(lambda h: tail_with(net, h, params))

    def accuracy_of(self, scores: torch.Tensor) -> float:
        return float((scores.argmax(-1) == self.labels).to(torch.float64).mean())

    # -- methods -------------------------------------------------------------------------------
    def base_model(self) -> float:
        return self.accuracy_of(self.tangent_logits(None))

    def tangent(self, delta: Delta) -> float:
        return self.accuracy_of(self.tangent_logits(delta))

    def tmc(self, deltas: Sequence[Delta], weights: Sequence[float] | None = None,
            normalize: Normalize = "mean") -> float:
        return self.tangent(compose_deltas(deltas, weights, normalize))

    def nonlinear(self, params: Mapping[str, torch.Tensor]) -> float:
        return self.accuracy_of(self.params_logits(params))

    def ensemble(self, models: Sequence[Mapping[str, torch.Tensor]],
                 mode: Literal["softmax", "logits"] = "softmax") -> float:
        total: torch.Tensor | None = None
        for m in models:
            logits = self.params_logits(m)
            s = torch.softmax(logits, -1) if mode == "softmax" else logits
            total = s if total is None else total + s
        if total is None:
            raise ValueError("an ensemble needs at least one model")
        return self.accuracy_of(total)

    def weight_average(self, models: Sequence[Mapping[str, torch.Tensor]]) -> float:
        return self.nonlinear(weight_average(models))

    def probe(self, probe: LinearProbe) -> float:
        return self.nonlinear(probe.params())

    def square_loss(self, delta: Delta | None, kappa: float) -> float:
        """The rescaled square loss (without the L2 term) of a tangent model on this split."""
        from training.tangent_train import square_loss

        return float(square_loss(self.tangent_logits(delta), self.labels, kappa))


def evaluate_files(base: Base, ds: Dataset, files: Sequence[bytes],
                   weights: Sequence[float] | None = None,
                   normalize: Normalize = "mean",
                   evaluator: Evaluator | None = None) -> dict[str, float]:
    """Accuracy of component files (tmc.component/1) composed, or of non-linear fine-tunes
    (tmc.nonlinear/1) as an ensemble and a weight average."""
    from tangent import decode_component, read_metadata
    from training.nonlinear import FORMAT as NL_FORMAT
    from training.nonlinear import decode_nonlinear

    ev = evaluator or Evaluator(base, ds)
    formats = {read_metadata(f).get("format") for f in files}
    if formats == {NL_FORMAT}:
        models = [decode_nonlinear(f, base) for f in files]
        return {"ensemble": ev.ensemble(models), "weight_average": ev.weight_average(models)}
    deltas = [decode_component(f, base.fingerprint, base.region).tensors for f in files]
    return {"tmc": ev.tmc(deltas, weights, normalize)}
