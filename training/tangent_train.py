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

from training.data import Dataset
from training.errors import EmptyShardError, UsageError
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
# targets="all": κ·one-hot on every output (the paper's loss); "own": κ·one-hot on the
# shard's own classes, J·Δ = 0 on the other outputs.
TARGETS = ("all", "own")
LR_CLASSES, LR_SMALL_REGION, LR_LARGE_REGION, SMALL_REGION_PARAMS = 1e-4, 1e-3, 1e-4, 2_000_000


# The off-distribution / composition options per shard rule (see training/README.md):
# class shards are where components must be made comparable with one another.
RECIPE_BY_RULE: dict[str, dict[str, Any]] = {
    "classes": {"targets": "all", "quiet": 0.0, "negatives": "rot", "prototypes": 0.1},
    "shard": {"targets": "all", "quiet": 0.0, "negatives": "rot", "prototypes": 0.0},
    "all": {"targets": "all", "quiet": 0.0, "negatives": "rot", "prototypes": 0.0},
}


def default_recipe(rule: str) -> dict[str, Any]:
    """targets / quiet / negatives / prototypes for a shard rule."""
    return dict(RECIPE_BY_RULE.get(rule, RECIPE_BY_RULE["all"]))


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
    targets: str = "all"  # "all": κ·one-hot on every output; "own": see TARGETS
    quiet: float = 0.0  # weight of mean ‖J(x̃)·Δ‖² over negatives x̃ (0: off)
    negatives: str = "rot"  # how x̃ is made from the shard's own rows (training.negatives)
    prototypes: float = 0.0  # p: add p·κ·(unit class mean of φ) to the output rows of own classes

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


def delta_norm(delta: dict[str, torch.Tensor]) -> torch.Tensor:
    """‖Δ‖₂ over the whole region (its gradient at Δ = 0 is 0, not NaN)."""
    return torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(t) for t in delta.values()]))


def square_loss(out: torch.Tensor, y: torch.Tensor, kappa: float) -> torch.Tensor:
    """Rescaled square loss: MSE between outputs [B, C] and κ·one-hot(y)."""
    target = F.one_hot(y, out.shape[-1]).to(out.dtype) * kappa  # [B, C]
    return F.mse_loss(out, target)


def own_square_loss(y0: torch.Tensor, dy: torch.Tensor, y: torch.Tensor, kappa: float,
                    own: torch.Tensor) -> torch.Tensor:
    """The square loss with targets="own": κ·one-hot on the shard's own outputs (bool [C]
    ``own``), and on every other output the base's own value, i.e. J·Δ = 0 there: the
    component adds evidence for its own classes only and leaves the rest to the others."""
    out = y0 + dy  # [B, C]
    target = torch.where(own[None, :], F.one_hot(y, out.shape[-1]).to(out.dtype) * kappa,
                         y0)  # [B, C]
    return F.mse_loss(out, target)


class NegativeBatches:
    """Seeded mini-batches of trunk features of the shard's negatives (training.negatives)."""

    def __init__(self, features: Features, batch_size: int, seed: int) -> None:
        self.features, self.batch_size = features, batch_size
        self.gen = torch.Generator().manual_seed(seed + 7919)

    def next(self) -> Any:
        rows = torch.randint(len(self.features), (self.batch_size,), generator=self.gen)
        return self.features.take(rows)


def negative_features(base: Any, ds: Dataset, config: TangentConfig, progress: bool
                      ) -> Features:
    """Trunk features of the shard's negatives (made from its own rows only)."""
    from training.negatives import make_negatives

    return trunk_features(base, make_negatives(ds, config.negatives, config.seed),
                          progress=progress, desc="negatives")


def make_loss(net: Any, ds: Dataset, config: TangentConfig,
              negatives: Features | None) -> Any:
    """loss(out, y, Δ) for fit(): out is the (f0, J·Δ) pair stacked [2, B, C]."""
    kappa, l2 = config.kappa, config.l2
    own = torch.zeros(len(ds.label_names), dtype=torch.bool)  # [C]
    own[np.unique(ds.labels)] = True
    sampler = (NegativeBatches(negatives, config.batch_size, config.seed)
               if negatives is not None and config.quiet else None)

    def loss_fn(out: torch.Tensor, y: torch.Tensor, d: dict[str, torch.Tensor]
                ) -> torch.Tensor:
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


def check_config(config: TangentConfig, ds: Dataset, net: Any) -> None:
    from training.negatives import check_kind

    if config.targets not in TARGETS:
        raise UsageError(f"unknown targets {config.targets!r}; use one of {', '.join(TARGETS)}")
    if config.quiet < 0 or config.prototypes < 0:
        raise UsageError("quiet and prototypes must be >= 0")
    if config.prototypes:
        from training.prototypes import output_layer

        output_layer(net)
    if config.quiet and not config.negatives.startswith("pool:"):
        check_kind(config.negatives, ds.kind)


def train_tangent(base: Any, ds: Dataset, config: TangentConfig, *,
                  features: Features | None = None, negatives: Features | None = None,
                  pool: Any = None, progress: bool = False, desc: str = "tangent"
                  ) -> TangentResult:
    """Train Δ on ds (labels already indexing base.labels). ``features``: precomputed trunk
    features of ds's rows (reused across components by benchmarks); ``negatives``: those of
    make_negatives(ds, config.negatives, config.seed), computed here when not given;
    ``pool``: a training.prototypes.PoolWhitening for whitened prototypes (else cosine)."""
    if len(ds) == 0:
        raise EmptyShardError("the training shard is empty")
    InputEncoder(base).check(ds)
    net = base.net
    check_config(config, ds, net)
    trunk_seconds = 0.0
    if config.cache and features is None:
        features = trunk_features(base, ds, progress=progress)
        trunk_seconds = features.seconds
    if config.quiet and negatives is None:
        if config.negatives.startswith("pool:"):
            raise UsageError("negatives from a pool: pass the pool's trunk features")
        negatives = negative_features(base, ds, config, progress)
        trunk_seconds += negatives.seconds
    source = TrunkSource(base, ds, features if config.cache else None)
    delta = {n: torch.zeros_like(net.params[n], dtype=torch.float32).requires_grad_(True)
             for n in net.names}
    loss_fn = make_loss(net, ds, config, negatives)
    torch.manual_seed(config.seed)
    stats = fit(source, torch.from_numpy(ds.labels), delta,
                lambda h, d: torch.stack(net.tail_jvp_with_grad(h, d)), loss_fn,
                epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                weight_decay=config.weight_decay, lr_step=config.lr_step,
                lr_gamma=config.lr_gamma, seed=config.seed, progress=progress, desc=desc)
    trained = {n: t.detach().clone() for n, t in delta.items()}
    if config.prototypes:
        from training.prototypes import add_prototypes

        if features is None:
            features = trunk_features(base, ds, progress=progress)
        trained = add_prototypes(trained, net, ds, features,
                                 config.prototypes * config.kappa, pool)
    return TangentResult(trained, stats.epoch_losses, stats.initial_loss, stats.steps, len(ds),
                         stats.seconds, trunk_seconds, stats.rows_per_s, config)
