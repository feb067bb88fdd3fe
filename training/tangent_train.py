"""Train one tangent component Δ: the linearized model f(x;θ0) + J·Δ, θ0 frozen.

Loss: the rescaled square loss of the paper, MSE(f(x;θ0) + J·Δ, κ·one-hot(y)) (mean over
batch and classes) + l2·‖Δ‖₂, AdamW, step learning-rate decay. Δ starts at zero. Only the
tail (the stages holding the tangent region) runs per step: with ``cache=True`` the trunk's
outputs are computed once (eval mode, no augmentation) and reused every epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

import numpy as np
import torch
import torch.nn.functional as F

from training.data import Dataset
from training.errors import UsageError
from training.features import Features, TailInput, trunk_features
from training.loop import (
    Loss,
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
    from training.prototypes import PoolWhitening

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
# targets="all": κ·one-hot on every output (the paper's loss); "own": κ·one-hot on the
# shard's own classes, J·Δ = 0 on the other outputs.
TARGETS = ("all", "own")
LR_CLASSES, LR_SMALL_REGION, LR_LARGE_REGION, SMALL_REGION_PARAMS = 1e-4, 1e-3, 1e-4, 2_000_000


# The off-distribution / composition options per shard rule (see training/README.md):
# class shards are where components must be made comparable with one another.
class Recipe(TypedDict):
    """The composition options of TangentConfig a shard rule sets by default."""

    targets: str
    quiet: float
    negatives: str
    prototypes: float


RECIPE_BY_RULE: dict[str, Recipe] = {
    "classes": {"targets": "all", "quiet": 0.0, "negatives": "rot", "prototypes": 0.1},
    "shard": {"targets": "all", "quiet": 0.0, "negatives": "rot", "prototypes": 0.0},
    "all": {"targets": "all", "quiet": 0.0, "negatives": "rot", "prototypes": 0.0},
}


def default_recipe(rule: str) -> Recipe:
    """targets / quiet / negatives / prototypes for a shard rule (a fresh copy)."""
    return RECIPE_BY_RULE.get(rule, RECIPE_BY_RULE["all"]).copy()


def default_kappa(rule: str) -> float:
    """κ for a shard rule: "classes" (class-incremental), "shard" (k of n) or "all"."""
    return KAPPA_BY_RULE.get(rule, KAPPA_BY_RULE["all"])


def region_size(base: Base) -> int:
    return sum(int(np.prod(p.shape)) for p in base.region.values())


def default_lr(base: Base, rule: str = "all") -> float:
    """AdamW learning rate for the tangent trainer, by shard rule and tangent-region size."""
    if rule == "classes":
        return LR_CLASSES
    return LR_SMALL_REGION if region_size(base) <= SMALL_REGION_PARAMS else LR_LARGE_REGION


@dataclass(frozen=True)
class TangentConfig(TrainConfig):
    """The loop's settings (training.loop.TrainConfig) and the tangent loss's options."""

    kappa: float = 50.0
    l2: float = 1e-5  # weight of ‖Δ‖₂ (the norm, not its square)
    targets: str = "all"  # "all": κ·one-hot on every output; "own": see TARGETS
    quiet: float = 0.0  # weight of mean ‖J(x̃)·Δ‖² over negatives x̃ (0: off)
    negatives: str = "rot"  # how x̃ is made from the shard's own rows (training.negatives)
    prototypes: float = 0.0  # p: add p·κ·(unit class mean of φ) to the output rows of own classes


class TangentResult(TrainResult[TangentConfig]):
    """A trained component: ``delta`` (= ``tensors``), float32, one tensor per parameter."""

    @property
    def delta(self) -> Params:
        return self.tensors


def delta_norm(delta: Params) -> torch.Tensor:
    """‖Δ‖₂ over the whole region (its gradient at Δ = 0 is 0, not NaN)."""
    norms = torch.stack([torch.linalg.vector_norm(t) for t in delta.values()])  # [P]
    norm: torch.Tensor = torch.linalg.vector_norm(norms)
    return norm


def square_loss(out: torch.Tensor, y: torch.Tensor, kappa: float) -> torch.Tensor:
    """Rescaled square loss: MSE between outputs [B, C] and κ·one-hot(y)."""
    target = F.one_hot(y, out.shape[-1]).to(out.dtype) * kappa  # [B, C]
    loss: torch.Tensor = F.mse_loss(out, target)
    return loss


def own_square_loss(y0: torch.Tensor, dy: torch.Tensor, y: torch.Tensor, kappa: float,
                    own: torch.Tensor) -> torch.Tensor:
    """The square loss with targets="own": κ·one-hot on the shard's own outputs (bool [C]
    ``own``), and on every other output the base's own value, i.e. J·Δ = 0 there: the
    component adds evidence for its own classes only and leaves the rest to the others."""
    out = y0 + dy  # [B, C]
    target = torch.where(own[None, :], F.one_hot(y, out.shape[-1]).to(out.dtype) * kappa,
                         y0)  # [B, C]
    loss: torch.Tensor = F.mse_loss(out, target)
    return loss


class NegativeBatches:
    """Seeded mini-batches of trunk features of the shard's negatives (training.negatives)."""

    def __init__(self, features: Features, batch_size: int, seed: int) -> None:
        self.features, self.batch_size = features, batch_size
        self.gen = torch.Generator().manual_seed(seed + 7919)

    def next(self) -> TailInput:
        rows = torch.randint(len(self.features), (self.batch_size,), generator=self.gen)
        return self.features.take(rows)


def negative_features(base: Base, ds: Dataset, config: TangentConfig, progress: bool
                      ) -> Features:
    """Trunk features of the shard's negatives (made from its own rows only)."""
    from training.negatives import make_negatives

    return trunk_features(base, make_negatives(ds, config.negatives, config.seed),
                          progress=progress, desc="negatives")


def make_loss(net: LinearizedNet, ds: Dataset, config: TangentConfig,
              negatives: Features | None) -> Loss:
    """loss(out, y, Δ) for the loop: out is the (f0, J·Δ) pair stacked [2, B, C]."""
    kappa, l2 = config.kappa, config.l2
    own = torch.zeros(len(ds.label_names), dtype=torch.bool)  # [C]
    own[np.unique(ds.labels)] = True
    sampler = (NegativeBatches(negatives, config.batch_size, config.seed)
               if negatives is not None and config.quiet else None)

    def loss_fn(out: torch.Tensor, y: torch.Tensor, d: Params) -> torch.Tensor:
        y0, dy = out[0], out[1]
        if config.targets == "own":
            loss = own_square_loss(y0, dy, y, kappa, own)
        else:
            loss = square_loss(y0 + dy, y, kappa)
        if sampler is not None:
            _, dy_neg = net.tail_jvp_with_grad(sampler.next(), d)  # [B, C]
            loss = loss + config.quiet * dy_neg.pow(2).mean()
        return loss + l2 * delta_norm(d) if l2 else loss

    return loss_fn


def linearized_objective(net: LinearizedNet, loss: Loss) -> Objective:
    """Δ trained from zero (float32) through the linearized tail: the output is the pair
    (f(x;θ0), J·Δ) stacked [2, B, C], the one linearization serving uses."""

    def start() -> Params:
        return {n: torch.zeros_like(net.params[n], dtype=torch.float32).requires_grad_(True)
                for n in net.names}

    def forward(h: TailInput, delta: Params) -> torch.Tensor:
        return torch.stack(net.tail_jvp_with_grad(h, delta))  # [2, B, C]

    return Objective(start, forward, loss)


def check_config(config: TangentConfig, ds: Dataset, net: LinearizedNet) -> None:
    from training.negatives import check_kind

    if config.targets not in TARGETS:
        raise UsageError(f"unknown targets {config.targets!r}; use one of {', '.join(TARGETS)}")
    if config.quiet < 0 or config.prototypes < 0:
        raise UsageError("quiet and prototypes must be >= 0")
    if config.prototypes:
        from training.prototypes import output_layer

        output_layer(net)
    if config.quiet:
        check_kind(config.negatives, ds.kind)


def shard_negatives(base: Base, ds: Dataset, config: TangentConfig,
                    negatives: Features | None, progress: bool) -> tuple[Features | None, float]:
    """The negatives' trunk features when quieting: the given ones, else made from the
    shard's own rows now; and the seconds spent computing them here."""
    if not config.quiet or negatives is not None:
        return negatives, 0.0
    computed = negative_features(base, ds, config, progress)
    return computed, computed.seconds


def train_tangent(base: Base, ds: Dataset, config: TangentConfig, *,
                  features: Features | None = None, negatives: Features | None = None,
                  pool: PoolWhitening | None = None, progress: bool = False,
                  desc: str = "tangent") -> TangentResult:
    """Train Δ on ds (labels already indexing base.labels). ``features``: precomputed trunk
    features of ds's rows (reused across components by benchmarks); ``negatives``: those of
    make_negatives(ds, config.negatives, config.seed), computed here when not given;
    ``pool``: a training.prototypes.PoolWhitening for whitened prototypes (else cosine)."""
    check_shard(base, ds)
    check_config(config, ds, base.net)
    features, trunk_seconds = shard_features(base, ds, config, features, progress)
    negatives, negatives_seconds = shard_negatives(base, ds, config, negatives, progress)
    objective = linearized_objective(base.net, make_loss(base.net, ds, config, negatives))
    trained, stats = train_region(base, ds, config, objective, features, progress=progress,
                                  desc=desc)
    if config.prototypes:
        from training.prototypes import add_prototypes

        if features is None:
            features = trunk_features(base, ds, progress=progress)
        trained = add_prototypes(trained, base.net, ds, features,
                                 config.prototypes * config.kappa, pool)
    return TangentResult.of(trained, stats, len(ds), trunk_seconds + negatives_seconds,
                            config)
