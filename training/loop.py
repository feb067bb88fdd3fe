"""The optimisation loop shared by tangent and non-linear fine-tuning.

AdamW over a dict of trainable tensors, mini-batches drawn by a seeded torch.Generator
(a fresh permutation every epoch), a step learning-rate schedule, a tqdm progress bar on
stderr. Deterministic on CPU for a given seed and thread count.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from training.errors import DivergedError
from training.features import TrunkSource

Forward = Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]
Loss = Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class FitStats:
    epoch_losses: list[float] = field(default_factory=list)  # mean training loss per epoch
    initial_loss: float = float("nan")  # loss of the first batch before any step
    steps: int = 0
    seconds: float = 0.0  # optimisation time (includes the trunk when not cached)
    rows_per_s: float = 0.0


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


def fit(source: TrunkSource, labels: torch.Tensor, trainable: dict[str, torch.Tensor],
        forward: Forward, loss_fn: Loss, *, epochs: int, batch_size: int, lr: float,
        weight_decay: float, lr_step: int | None, lr_gamma: float, seed: int,
        progress: bool = False, desc: str = "train") -> FitStats:
    """Optimise ``trainable`` in place; return per-epoch losses and timings."""
    from tqdm import tqdm

    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be >= 1")
    n = int(labels.shape[0])
    steps_per_epoch = math.ceil(n / batch_size)
    params = list(trainable.values())
    opt = AdamW(params, lr=lr, weight_decay=weight_decay)
    step_every = lr_step or default_lr_step(epochs)
    gen = torch.Generator().manual_seed(seed)
    stats = FitStats()
    bar = tqdm(total=epochs * steps_per_epoch, desc=desc, unit="step", disable=not progress,
               dynamic_ncols=True, leave=False)
    start = time.perf_counter()
    try:
        with deterministic():
            for epoch in range(epochs):
                opt.lr = lr * lr_gamma ** (epoch // step_every)  # step schedule
                perm = torch.randperm(n, generator=gen)
                total, seen = 0.0, 0
                for b in range(steps_per_epoch):
                    rows = perm[b * batch_size:(b + 1) * batch_size]
                    h = source.take(rows.numpy())
                    out = forward(h, trainable)  # [B, C]
                    loss = loss_fn(out, labels[rows], trainable)
                    value = float(loss.detach())
                    if stats.steps == 0:
                        stats.initial_loss = value
                    for p in params:
                        p.grad = None
                    loss.backward()
                    opt.step()
                    stats.steps += 1
                    total += value * len(rows)
                    seen += len(rows)
                    bar.update(1)
                    elapsed = time.perf_counter() - start
                    bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{total / seen:.4g}",
                                    rows_s=f"{stats.steps * batch_size / max(elapsed, 1e-9):.0f}",
                                    refresh=False)
                if not math.isfinite(total):
                    raise DivergedError(
                        f"training diverged in epoch {epoch + 1} (loss {total / seen}); "
                        "lower --lr or --kappa")
                stats.epoch_losses.append(total / seen)
    finally:
        bar.close()
    stats.seconds = time.perf_counter() - start
    stats.rows_per_s = epochs * n / max(stats.seconds, 1e-9)
    for p in params:
        p.grad = None
    return stats
