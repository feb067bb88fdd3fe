"""The non-linear baseline: ordinary fine-tuning of the same region, and weight averaging.

The parameters of the tangent region start at θ0 and are trained directly (cross-entropy,
AdamW, the same loop and schedule as the tangent trainer); everything else stays θ0 and
BatchNorm stays in eval mode, exactly as in the tangent model. The result is a dict of the
region's fine-tuned parameter values (not differences), saved as safetensors with the
component's tensor names and metadata ``format = tmc.nonlinear/1``. An ensemble of N such
models costs N tail forwards; their weight average costs one but is inexact.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch.func import functional_call

from training.data import Dataset
from training.errors import UsageError
from training.features import Features, TailInput
from training.loop import (
    Objective,
    Params,
    TrainConfig,
    TrainResult,
    check_shard,
    shard_features,
    train_region,
)

if TYPE_CHECKING:
    from bases import Base
    from tangent import LinearizedNet

FORMAT = "tmc.nonlinear/1"


@dataclass(frozen=True)
class NonlinearConfig(TrainConfig):
    """The loop's settings (training.loop.TrainConfig), with this baseline's default lr."""

    lr: float = 1e-4


class NonlinearResult(TrainResult[NonlinearConfig]):
    """A non-linear fine-tune: ``params`` (= ``tensors``), the region's trained values."""

    @property
    def params(self) -> Params:
        return self.tensors


def default_nonlinear_lr(base: Base, rule: str = "all") -> float:
    """AdamW learning rate of the non-linear baseline, chosen on validation data like the
    tangent defaults (Fashion-MNIST 5×2, effnet R2, NL ensemble val accuracy at lr
    1e-4/3e-4/1e-3/3e-3: 0.46/0.53/0.51/0.34); data shards as the tangent default."""
    from training.tangent_train import default_lr

    return 3e-4 if rule == "classes" else default_lr(base, rule)


def tail_with(net: LinearizedNet, h: TailInput, params: Mapping[str, torch.Tensor]
              ) -> torch.Tensor:
    """The plain tail forward with some region parameters replaced."""
    out: torch.Tensor = functional_call(net.tail, dict(params), (h,), strict=False)
    return out


def plain_objective(net: LinearizedNet) -> Objective:
    """The region's parameters trained from θ0 through the plain tail, cross-entropy."""

    def start() -> Params:
        return {n: net.params[n].detach().clone().requires_grad_(True) for n in net.names}

    def forward(h: TailInput, params: Params) -> torch.Tensor:
        return tail_with(net, h, params)  # [B, C]

    def loss(out: torch.Tensor, y: torch.Tensor, params: Params) -> torch.Tensor:
        return F.cross_entropy(out, y)

    return Objective(start, forward, loss)


def train_nonlinear(base: Base, ds: Dataset, config: NonlinearConfig, *,
                    features: Features | None = None, progress: bool = False,
                    desc: str = "non-linear") -> NonlinearResult:
    """Fine-tune the tangent region's parameters on ds (labels indexing base.labels)."""
    check_shard(base, ds)
    features, trunk_seconds = shard_features(base, ds, config, features, progress)
    trained, stats = train_region(base, ds, config, plain_objective(base.net), features,
                                  progress=progress, desc=desc)
    return NonlinearResult.of(trained, stats, len(ds), trunk_seconds, config)


def weight_average(models: Sequence[Mapping[str, torch.Tensor]]) -> Params:
    """The element-wise mean of N fine-tuned parameter sets (one forward, inexact)."""
    if not models:
        raise ValueError("weight_average needs at least one model")
    names = list(models[0])
    for m in models[1:]:
        if list(m) != names:
            raise ValueError("models to average must hold the same parameter names")
    return {n: torch.stack([m[n].to(torch.float32) for m in models]).mean(0) for n in names}


def encode_nonlinear(params: Mapping[str, torch.Tensor], base_fingerprint: str,
                     provenance: Mapping[str, object] | None = None) -> bytes:
    metadata = {"format": FORMAT, "base_fingerprint": base_fingerprint}
    for key, value in (provenance or {}).items():
        metadata[key] = value if isinstance(value, str) else json.dumps(value)
    data: bytes = st_save({n: t.detach().contiguous().cpu() for n, t in params.items()},
                          metadata=metadata)
    return data


def decode_nonlinear(data: bytes, base: Base) -> Params:
    """Parameters of a tmc.nonlinear/1 file, checked against the base's region."""
    from tangent import read_metadata

    meta = read_metadata(data)
    if meta.get("format") != FORMAT:
        raise UsageError(f"not a non-linear fine-tune file (format {meta.get('format')!r}, "
                         f"expected {FORMAT!r})")
    if meta.get("base_fingerprint") != base.fingerprint:
        raise UsageError("the non-linear fine-tune was made for another base")
    tensors = st_load(data)
    for name, t in tensors.items():
        param = base.region.get(name)
        if param is None or tuple(t.shape) != param.shape:
            raise UsageError(f"tensor {name!r} does not fit the base's tangent region")
    return dict(tensors)
