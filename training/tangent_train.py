"""Train one tangent component Δ: the linearized model f(x;θ0) + J·Δ, θ0 frozen.

Loss: the rescaled square loss of the paper, MSE(f(x;θ0) + J·Δ, κ·one-hot(y)) (mean over
batch and classes) + l2·‖Δ‖₂, AdamW, step learning-rate decay. Δ starts at zero. Only the
tail (the stages holding the tangent region) runs per step: with ``cache=True`` the trunk's
outputs are computed once (eval mode, no augmentation) and reused every epoch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, jvp

from training.data import Dataset
from training.errors import EmptyShardError
from training.features import Features, InputEncoder, TrunkSource, trunk_features
from training.loop import fit

# Defaults per shard rule, chosen on validation splits carved from the training data
# (bench/accuracy.py --select; the tables are in training/README.md).
# Class-incremental: κ decides the accuracy of the composition (each component must
# out-shout the others on its own classes). Fashion-MNIST 5×2, effnet R2, validation TMC
# accuracy for κ = 5/15/50/150/300/1000 at lr 1e-4: 0.28/0.47/0.61/0.65/0.68/0.67; lr 1e-4
# beat 1e-3 at every κ. Data-incremental: a small κ. Fashion-MNIST 5 shards, κ = 1/5/15/50 at
# lr 1e-3: 0.75/0.855/0.85/0.83 (lr 1e-4: lower); BBC 5 shards (minilm, last layer, 1.78M
# parameters): lr 1e-3 0.95 against lr 1e-4 0.83 at κ = 5.
KAPPA_BY_RULE = {"classes": 300.0, "shard": 5.0, "all": 5.0}
# AdamW learning rate: 1e-4 for class shards; otherwise 1e-3 up to the largest region
# measured (2M parameters), and 1e-4 beyond, unmeasured, as a precaution (the pilot saw Adam
# at 1e-3 go unstable on a larger effnet region).
LR_CLASSES, LR_SMALL_REGION, LR_LARGE_REGION, SMALL_REGION_PARAMS = 1e-4, 1e-3, 1e-4, 2_000_000


def default_kappa(rule: str) -> float:
    """κ for a shard rule: "classes" (class-incremental), "shard" (k of n) or "all"."""
    return KAPPA_BY_RULE.get(rule, KAPPA_BY_RULE["all"])


def region_size(base: Any) -> int:
    return sum(int(np.prod(p.shape)) for p in base.region.values())


def default_lr(base: Any, rule: str = "all") -> float:
    """AdamW learning rate for the tangent trainer, by shard rule and tangent-region size."""
    if rule == "classes":
        return LR_CLASSES
    return LR_SMALL_REGION if region_size(base) <= SMALL_REGION_PARAMS else LR_LARGE_REGION


@dataclass(frozen=True)
class TangentConfig:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    kappa: float = 50.0
    l2: float = 1e-5  # weight of ‖Δ‖₂ (the norm, not its square)
    weight_decay: float = 0.01  # AdamW's decoupled decay (pulls Δ towards 0, i.e. θ0)
    lr_step: int | None = None  # epochs between decays; None: once, after 70% of epochs
    lr_gamma: float = 0.1
    seed: int = 0
    cache: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TangentResult:
    delta: dict[str, torch.Tensor]  # float32, one tensor per tangent-region parameter
    epoch_losses: list[float]
    initial_loss: float
    steps: int
    samples: int
    train_seconds: float  # optimisation time (trunk included only when not cached)
    trunk_seconds: float  # time to compute the cached trunk features (0 if given/not cached)
    rows_per_s: float
    config: TangentConfig
    extra: dict[str, Any] = field(default_factory=dict)


def linearized_tail(net: Any, h: Any, delta: dict[str, torch.Tensor]) -> torch.Tensor:
    """f_tail(h;θ0) + J·Δ with autograd through Δ (LinearizedNet.tail_forward is no-grad)."""
    names = tuple(delta)
    primals = tuple(net.params[n] for n in names)

    def tail_fn(*ps: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = functional_call(net.tail, dict(zip(names, ps, strict=True)), (h,),
                                            strict=False)
        return out

    with torch.enable_grad():
        y0, dy = jvp(tail_fn, primals, tuple(delta[n] for n in names))
    return y0 + dy


def delta_norm(delta: dict[str, torch.Tensor]) -> torch.Tensor:
    """‖Δ‖₂ over the whole region (its gradient at Δ = 0 is 0, not NaN)."""
    return torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(t) for t in delta.values()]))


def square_loss(out: torch.Tensor, y: torch.Tensor, kappa: float) -> torch.Tensor:
    """Rescaled square loss: MSE between outputs [B, C] and κ·one-hot(y)."""
    target = F.one_hot(y, out.shape[-1]).to(out.dtype) * kappa  # [B, C]
    return F.mse_loss(out, target)


def train_tangent(base: Any, ds: Dataset, config: TangentConfig, *,
                  features: Features | None = None, progress: bool = False,
                  desc: str = "tangent") -> TangentResult:
    """Train Δ on ds (labels already indexing base.labels). ``features``: precomputed trunk
    features of ds's rows (reused across components by benchmarks)."""
    if len(ds) == 0:
        raise EmptyShardError("the training shard is empty")
    InputEncoder(base).check(ds)
    net = base.net
    trunk_seconds = 0.0
    if config.cache and features is None:
        features = trunk_features(base, ds, progress=progress)
        trunk_seconds = features.seconds
    source = TrunkSource(base, ds, features if config.cache else None)
    delta = {n: torch.zeros_like(net.params[n], dtype=torch.float32).requires_grad_(True)
             for n in net.names}
    kappa, l2 = config.kappa, config.l2

    def loss_fn(out: torch.Tensor, y: torch.Tensor, d: dict[str, torch.Tensor]
                ) -> torch.Tensor:
        loss = square_loss(out, y, kappa)
        return loss + l2 * delta_norm(d) if l2 else loss

    torch.manual_seed(config.seed)
    stats = fit(source, torch.from_numpy(ds.labels), delta,
                lambda h, d: linearized_tail(net, h, d), loss_fn,
                epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                weight_decay=config.weight_decay, lr_step=config.lr_step,
                lr_gamma=config.lr_gamma, seed=config.seed, progress=progress, desc=desc)
    return TangentResult({n: t.detach().clone() for n, t in delta.items()},
                         stats.epoch_losses, stats.initial_loss, stats.steps, len(ds),
                         stats.seconds, trunk_seconds, stats.rows_per_s, config)
