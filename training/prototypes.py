"""Class prototypes written into a component's Δ: the nearest-class-mean term.

With ``--prototypes α`` the trainer adds, for every class c of the shard, α·μ̂_c to row c of
Δ of the output layer's weight, where μ̂_c is the unit-length mean of the output layer's
inputs φ(x) (the base's penultimate features at θ0) over the shard's rows of class c.
The output layer is linear, so the component's tangent term gains exactly α·μ̂_c·φ(x) on
output c: the cosine nearest-class-mean score up to a per-input factor ‖φ(x)‖ that all
classes share (argmax unchanged). It needs the rows of class c only, so it respects
isolation, and it is part of Δ: composition stays exactly linear, forgetting exact, and
nothing new travels to the server.

Why it helps class-incremental composition: a tangent component trained on two classes
learns to tell THOSE apart and is unconstrained elsewhere; its evidence is not comparable
with another component's. Prototype scores are: every class is scored by the same rule
(similarity to its own mean), whichever component carries it — the classic prototype
classifier on pretrained features of class-incremental learning (Rebuffi et al., iCaRL,
CVPR 2017; Janson et al., 2022; Zhou et al., SimpleCIL, IJCV 2024).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from training.data import Dataset
from training.errors import UsageError
from training.features import Features, batches


def output_layer(net: Any) -> tuple[str, nn.Linear]:
    """(parameter-name prefix, module) of the tail's last nn.Linear, which must produce the
    model output and have its weight in the tangent region."""
    last: tuple[str, nn.Linear] | None = None
    for name, module in net.tail.named_modules():
        if isinstance(module, nn.Linear):
            last = (name, module)
    if last is None or f"{last[0]}.weight" not in net.names:
        raise UsageError("--prototypes needs the base's output layer (a Linear, last in the "
                         "model) inside the tangent region")
    return last


def penultimate(net: Any, features: Features, batch_size: int = 256) -> torch.Tensor:
    """φ(x): the inputs of the output layer at θ0, [N, D], for every row of ``features``."""
    _, layer = output_layer(net)
    captured: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda m, inputs, out: captured.append(
        inputs[0].detach().reshape(inputs[0].shape[0], -1)))
    try:
        with torch.no_grad():
            for rows in batches(len(features), batch_size):
                net.tail(features.take(rows))
    finally:
        hook.remove()
    return torch.cat(captured)


def prototype_rows(net: Any, ds: Dataset, features: Features) -> dict[int, torch.Tensor]:
    """{class: μ̂_c [D]} for every class of the shard (unit-length means of φ)."""
    phi = penultimate(net, features)  # [N, D]
    labels = torch.from_numpy(ds.labels)
    out = {}
    for c in np.unique(ds.labels):
        mean = phi[labels == int(c)].mean(0)
        out[int(c)] = mean / mean.norm().clamp_min(1e-12)
    return out


def add_prototypes(delta: dict[str, torch.Tensor], net: Any, ds: Dataset,
                   features: Features, scale: float) -> dict[str, torch.Tensor]:
    """Δ with scale·μ̂_c added to row c of the output layer's weight, for the shard's classes."""
    prefix, _ = output_layer(net)
    name = f"{prefix}.weight"
    weight = delta[name].clone()  # [C, D]
    for c, proto in prototype_rows(net, ds, features).items():
        weight[c] += scale * proto.to(weight.dtype)
    return {**delta, name: weight}
