"""Class prototypes written into a component's Δ: the nearest-class-mean term.

With ``--prototypes α`` the trainer adds, for every class c of the shard, α·μ̂_c to row c of
Δ of the output layer's weight, where μ̂_c is the unit-length mean of the output layer's
inputs φ(x) (the base's penultimate features at θ0) over the shard's rows of class c.
The output layer is linear, so the component's tangent term gains exactly α·μ̂_c·φ(x) on
output c: the cosine nearest-class-mean score up to a per-input factor ‖φ(x)‖ that all
classes share (argmax unchanged). It needs the rows of class c only, so it respects
isolation, and it is part of Δ: composition stays exactly linear, forgetting exact, and
nothing new travels to the server.

With an unlabeled pool (``--pool``, fixed with the base: the same rows for every component)
the prototypes are whitened by the pool's feature covariance Σ (shrunk towards a multiple of
the identity): row c gains α·Σ⁻¹μ_c and the output layer's bias −α/2·μ_cᵀΣ⁻¹μ_c — linear
discriminant analysis with a covariance nobody's task owns. Σ of the pool's φ is a total
(not within-class) covariance, which gives Fisher's discriminant directions all the same.

Why it helps class-incremental composition: a tangent component trained on two classes
learns to tell THOSE apart and is unconstrained elsewhere; its evidence is not comparable
with another component's. Prototype scores are: every class is scored by the same rule
(similarity to its own mean), whichever component carries it — the classic prototype
classifier on pretrained features of class-incremental learning (Rebuffi et al., iCaRL,
CVPR 2017; Janson et al., 2022; Zhou et al., SimpleCIL, IJCV 2024).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from training.data import Dataset
from training.errors import UsageError
from training.features import Features
from training.probe import layer_inputs

if TYPE_CHECKING:
    from tangent import LinearizedNet


def output_layer(net: LinearizedNet) -> tuple[str, nn.Linear]:
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


def penultimate(net: LinearizedNet, features: Features, batch_size: int = 256) -> torch.Tensor:
    """φ(x): the inputs of the output layer at θ0, [N, D], for every row of ``features``."""
    _, layer = output_layer(net)
    phi = layer_inputs(net, layer, features, batch_size)
    return phi.reshape(phi.shape[0], -1)


def prototype_rows(net: LinearizedNet, ds: Dataset, features: Features) -> dict[int, torch.Tensor]:
    """{class: μ̂_c [D]} for every class of the shard (unit-length means of φ)."""
    phi = penultimate(net, features)  # [N, D]
    labels = torch.from_numpy(ds.labels)
    out = {}
    for c in np.unique(ds.labels):
        mean = phi[labels == int(c)].mean(0)
        out[int(c)] = mean / mean.norm().clamp_min(1e-12)
    return out


def class_means(net: LinearizedNet, ds: Dataset, features: Features) -> dict[int, torch.Tensor]:
    """{class: μ_c [D]}: the mean of φ over the shard's rows of each of its classes."""
    phi = penultimate(net, features).to(torch.float64)  # [N, D]
    labels = torch.from_numpy(ds.labels)
    return {int(c): phi[labels == int(c)].mean(0) for c in np.unique(ds.labels)}


def dataset_fingerprint(ds: Dataset) -> str:
    """sha256 over a dataset's rows (inputs and source positions): which pool was used."""
    import hashlib

    h = hashlib.sha256(np.ascontiguousarray(ds.index).tobytes())
    if isinstance(ds.inputs, np.ndarray):
        h.update(np.ascontiguousarray(ds.inputs).tobytes())
    else:
        for row in ds.inputs:
            h.update(row.encode() if isinstance(row, str) else np.ascontiguousarray(row)
                     .tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class PoolWhitening:
    """Σ⁻¹ of φ over an unlabeled pool, Σ shrunk: (1−s)·Σ + s·mean(diag Σ)·I."""

    precision: torch.Tensor  # float64 [D, D]
    rows: int
    shrinkage: float


def pool_whitening(net: LinearizedNet, pool_features: Features, shrinkage: float) -> PoolWhitening:
    if not 0.0 < shrinkage <= 1.0:
        raise UsageError(f"shrinkage must be within (0, 1], got {shrinkage}")
    phi = penultimate(net, pool_features).to(torch.float64)  # [P, D]
    if phi.shape[0] < 2:
        raise UsageError("the pool needs at least 2 rows")
    centred = phi - phi.mean(0)
    cov = centred.T @ centred / phi.shape[0]  # [D, D]
    eye = torch.eye(cov.shape[0], dtype=cov.dtype)
    shrunk = (1.0 - shrinkage) * cov + shrinkage * cov.diagonal().mean() * eye
    return PoolWhitening(torch.linalg.inv(shrunk), phi.shape[0], shrinkage)


def add_prototypes(delta: dict[str, torch.Tensor], net: LinearizedNet, ds: Dataset,
                   features: Features, scale: float, pool: PoolWhitening | None = None
                   ) -> dict[str, torch.Tensor]:
    """Δ plus the prototype term for the shard's classes: scale·μ̂_c on row c of the output
    layer's weight (no pool), or scale·Σ⁻¹μ_c there and −scale/2·μ_cᵀΣ⁻¹μ_c on its bias."""
    prefix, _ = output_layer(net)
    w_name, b_name = f"{prefix}.weight", f"{prefix}.bias"
    weight = delta[w_name].clone()  # [C, D]
    out = dict(delta)
    if pool is None:
        for c, proto in prototype_rows(net, ds, features).items():
            weight[c] += scale * proto.to(weight.dtype)
        out[w_name] = weight
        return out
    if b_name not in delta:
        raise UsageError("--pool prototypes need the output layer's bias in the tangent region")
    bias = delta[b_name].clone()  # [C]
    for c, mean in class_means(net, ds, features).items():
        row = pool.precision @ mean  # [D]
        weight[c] += (scale * row).to(weight.dtype)
        bias[c] += float(-0.5 * scale * (mean @ row))
    out[w_name], out[b_name] = weight, bias
    return out
