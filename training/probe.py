"""The linear-probe baseline: a fresh last linear layer on the frozen base's features.

The penultimate features are the inputs of the last stage at θ0 (which must be an
nn.Linear, the classifier of every preset), captured by ``layer_inputs`` (which the
prototypes use too); the probe is fitted by full-batch L-BFGS on cross-entropy + l2·‖W‖²
from zero, so it is deterministic. It is represented as a replacement of the last stage's
weight and bias, so the evaluation library runs it like any other set of region parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.data import Dataset
from training.features import Features, batches, trunk_features

if TYPE_CHECKING:
    from bases import Base
    from tangent import LinearizedNet


@dataclass
class LinearProbe:
    stage: str  # name of the last stage, e.g. "classifier"
    weight: torch.Tensor  # [C, D]
    bias: torch.Tensor  # [C]
    l2: float
    train_accuracy: float

    def params(self) -> dict[str, torch.Tensor]:
        return {f"{self.stage}.weight": self.weight, f"{self.stage}.bias": self.bias}


def last_linear(base: Base) -> tuple[str, nn.Linear]:
    name, module = list(base.net.net.named_children())[-1]
    if not isinstance(module, nn.Linear):
        raise ValueError(f"the last stage {name!r} is not an nn.Linear; no linear probe")
    return name, module


def layer_inputs(net: LinearizedNet, layer: nn.Module, features: Features,
                 batch_size: int = 256) -> torch.Tensor:
    """The inputs of ``layer`` (a module of net's tail) at θ0, for every row of ``features``:
    [N, ...]. The tail runs in batches; a forward hook on ``layer`` keeps its inputs."""
    captured: list[torch.Tensor] = []
    hook = layer.register_forward_hook(
        lambda module, inputs, output: captured.append(inputs[0].detach()))
    try:
        with torch.no_grad():
            for rows in batches(len(features), batch_size):
                net.tail(features.take(rows))
    finally:
        hook.remove()
    return torch.cat(captured)


def penultimate(base: Base, features: Features, batch_size: int = 256) -> torch.Tensor:
    """Inputs of the last linear layer at θ0, for every row of ``features``: [N, D]."""
    _, layer = last_linear(base)
    return layer_inputs(base.net, layer, features, batch_size)


def train_linear_probe(base: Base, ds: Dataset, *, features: Features | None = None,
                       l2: float = 1e-4, max_iter: int = 300) -> LinearProbe:
    stage, layer = last_linear(base)
    if features is None:
        features = trunk_features(base, ds)
    x = penultimate(base, features)  # [N, D]
    y = torch.from_numpy(np.asarray(ds.labels))
    w = torch.zeros_like(layer.weight, requires_grad=True)
    b = torch.zeros_like(layer.bias, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + l2 * (w * w).sum()
        torch.autograd.backward(loss)
        return loss

    with torch.enable_grad():
        opt.step(closure)  # type: ignore[no-untyped-call]  # torch.optim's step is untyped
    with torch.no_grad():
        acc = float(((x @ w.T + b).argmax(-1) == y).float().mean())
    return LinearProbe(stage, w.detach().clone(), b.detach().clone(), l2, acc)
