"""The training loop shared by tangent and non-linear fine-tuning.

Both trainers run the same steps (:func:`train_region`): refuse an empty shard or one the base
cannot read, compute the trunk features once (``cache``), start the trainable tensors,
optimise them, and report a :class:`TrainResult`. What differs is an :class:`Objective`, a
small strategy of three functions: where the trainable tensors start, what the tail computes
from them, and the loss on that output. training.tangent_train's objective trains Δ from zero
through the linearized tail f(x;θ0) + J·Δ; training.nonlinear's trains the region's
parameters from θ0 through the plain tail.

AdamW over a dict of trainable tensors, mini-batches drawn by a seeded torch.Generator
(a fresh permutation every epoch), a step learning-rate schedule, a tqdm progress bar on
stderr. Deterministic on CPU for a given seed and thread count. Gradients are enabled for
the whole optimisation, whatever the caller's mode.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Generic, Self, TypeVar

import torch

from training.errors import DivergedError, EmptyShardError
from training.features import Features, InputEncoder, TailInput, TrunkSource, trunk_features

if TYPE_CHECKING:
    from tqdm import tqdm

    from bases import Base
    from training.data import Dataset

Params = dict[str, torch.Tensor]  # parameter name -> tensor, one per tangent-region parameter
Forward = Callable[[TailInput, Params], torch.Tensor]
Loss = Callable[[torch.Tensor, torch.Tensor, Params], torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation settings every trainer shares (its own loss options come on top)."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01  # AdamW's decoupled decay (pulls towards the start)
    lr_step: int | None = None  # epochs between decays; None: once, after 70% of epochs
    lr_gamma: float = 0.1
    seed: int = 0
    cache: bool = True  # compute the trunk features once and reuse them every epoch

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


C = TypeVar("C", bound=TrainConfig)


@dataclass
class FitStats:
    epoch_losses: list[float] = field(default_factory=list)  # mean training loss per epoch
    initial_loss: float = float("nan")  # loss of the first batch before any step
    steps: int = 0
    seconds: float = 0.0  # optimisation time (includes the trunk when not cached)
    rows_per_s: float = 0.0


@dataclass
class TrainResult(Generic[C]):
    """What a trainer returns: the trained tensors and how the optimisation went."""

    tensors: Params  # float32, one tensor per tangent-region parameter
    epoch_losses: list[float]
    initial_loss: float
    steps: int
    samples: int
    train_seconds: float  # optimisation time (trunk included only when not cached)
    trunk_seconds: float  # time to compute the cached trunk features (0 if given/not cached)
    rows_per_s: float
    config: C

    @classmethod
    def of(cls, tensors: Params, stats: FitStats, samples: int, trunk_seconds: float,
           config: C) -> Self:
        return cls(tensors, stats.epoch_losses, stats.initial_loss, stats.steps, samples,
                   stats.seconds, trunk_seconds, stats.rows_per_s, config)


@dataclass(frozen=True)
class Objective:
    """What one trainer optimises: the trainable tensors' start, the tail's output from them
    (``forward(h, trainable)``) and the loss on it (``loss(out, y, trainable)``)."""

    start: Callable[[], Params]  # fresh tensors with requires_grad set
    forward: Forward
    loss: Loss


class AdamW:
    """AdamW (decoupled weight decay), the update of torch.optim.AdamW with its defaults.

    Written out because torch.optim imports torch._dynamo on first use (seconds per process),
    which dominates short training runs and subprocess-based CLI calls.
    """

    def __init__(self, params: list[torch.Tensor], lr: float, weight_decay: float = 0.01,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params, self.lr, self.weight_decay = params, lr, weight_decay
        self.beta1, self.beta2, self.eps = betas[0], betas[1], eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        bc1 = 1 - self.beta1 ** self.t
        bc2_sqrt = math.sqrt(1 - self.beta2 ** self.t)
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            if p.grad is None:
                continue
            g = p.grad
            p.mul_(1 - self.lr * self.weight_decay)
            m.lerp_(g, 1 - self.beta1)
            v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
            denom = (v.sqrt() / bc2_sqrt).add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / bc1)


def default_lr_step(epochs: int) -> int:
    """Decay the learning rate once, after 70% of the epochs."""
    return max(1, math.ceil(0.7 * epochs))


@contextmanager
def deterministic() -> Iterator[None]:
    """torch.use_deterministic_algorithms(True) for the block, then the previous setting."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def check_shard(base: Base, ds: Dataset) -> None:
    """Refuse an empty shard, or one whose inputs the base does not take."""
    if len(ds) == 0:
        raise EmptyShardError("the training shard is empty")
    InputEncoder(base).check(ds)


def shard_features(base: Base, ds: Dataset, config: TrainConfig, features: Features | None,
                   progress: bool) -> tuple[Features | None, float]:
    """The trunk features of ds's rows: the given ones, else (with ``cache``) computed once
    now; and the seconds spent computing them here."""
    if config.cache and features is None:
        computed = trunk_features(base, ds, progress=progress)
        return computed, computed.seconds
    return features, 0.0


def train_region(base: Base, ds: Dataset, config: TrainConfig, objective: Objective,
                 features: Features | None, *, progress: bool, desc: str
                 ) -> tuple[Params, FitStats]:
    """Optimise the objective's tensors on ds (trunk features reused when ``cache``); return
    them detached, with the loop's statistics."""
    source = TrunkSource(base, ds, features if config.cache else None)
    trainable = objective.start()
    torch.manual_seed(config.seed)
    with torch.enable_grad():
        stats = fit(source, torch.from_numpy(ds.labels), trainable, objective, config,
                    progress=progress, desc=desc)
    return {n: t.detach().clone() for n, t in trainable.items()}, stats


def fit(source: TrunkSource, labels: torch.Tensor, trainable: Params, objective: Objective,
        config: TrainConfig, *, progress: bool = False, desc: str = "train") -> FitStats:
    """Optimise ``trainable`` in place; return per-epoch losses and timings."""
    from tqdm import tqdm

    if config.epochs < 1 or config.batch_size < 1:
        raise ValueError("epochs and batch_size must be >= 1")
    steps_per_epoch = math.ceil(int(labels.shape[0]) / config.batch_size)
    opt = AdamW(list(trainable.values()), lr=config.lr, weight_decay=config.weight_decay)
    step_every = config.lr_step or default_lr_step(config.epochs)
    gen = torch.Generator().manual_seed(config.seed)
    stats = FitStats()
    bar = tqdm(total=config.epochs * steps_per_epoch, desc=desc, unit="step",
               disable=not progress, dynamic_ncols=True, leave=False)
    start = time.perf_counter()
    try:
        with deterministic():
            for epoch in range(config.epochs):
                opt.lr = config.lr * config.lr_gamma ** (epoch // step_every)  # step schedule
                perm = torch.randperm(int(labels.shape[0]), generator=gen)
                mean = _epoch(source, labels, perm, trainable, objective, opt, stats,
                              config.batch_size, _Progress(bar, epoch, config, start))
                stats.epoch_losses.append(mean)
    finally:
        bar.close()
    stats.seconds = time.perf_counter() - start
    stats.rows_per_s = config.epochs * int(labels.shape[0]) / max(stats.seconds, 1e-9)
    for p in opt.params:
        p.grad = None
    return stats


@dataclass
class _Progress:
    """The tqdm bar of one epoch: a step done, with the epoch, mean loss and rows/s so far."""

    bar: tqdm[None]
    epoch: int
    config: TrainConfig
    start: float

    def step(self, steps: int, mean_loss: float) -> None:
        self.bar.update(1)
        elapsed = time.perf_counter() - self.start
        self.bar.set_postfix(
            epoch=f"{self.epoch + 1}/{self.config.epochs}", loss=f"{mean_loss:.4g}",
            rows_s=f"{steps * self.config.batch_size / max(elapsed, 1e-9):.0f}",
            refresh=False)


def _epoch(source: TrunkSource, labels: torch.Tensor, perm: torch.Tensor, trainable: Params,
           objective: Objective, opt: AdamW, stats: FitStats, batch_size: int,
           bar: _Progress) -> float:
    """One pass over the rows in ``perm`` order, one AdamW step per mini-batch; the mean
    training loss over the epoch (DivergedError when it is not finite)."""
    total, seen = 0.0, 0
    for b in range(math.ceil(int(perm.shape[0]) / batch_size)):
        rows = perm[b * batch_size:(b + 1) * batch_size]
        out = objective.forward(source.take(rows.numpy()), trainable)  # [B, C] or [2, B, C]
        loss = objective.loss(out, labels[rows], trainable)
        value = float(loss.detach())
        if stats.steps == 0:
            stats.initial_loss = value
        for p in opt.params:
            p.grad = None
        torch.autograd.backward(loss)
        opt.step()
        stats.steps += 1
        total += value * len(rows)
        seen += len(rows)
        bar.step(stats.steps, total / seen)
    if not math.isfinite(total):
        raise DivergedError(f"training diverged in epoch {bar.epoch + 1} (loss {total / seen}); "
                            "lower --lr or --kappa")
    return total / seen
