"""Training the models an accuracy experiment compares: tangent components (as `tmc train`
trains them), non-linear fine-tunes, the joint tangent model on every task's rows, and the
validation-best linear probe.

Policy: every model starts from the experiment's settings, seeded per task
(``seed * 1000 + k``); the joint model, the costliest, is kept on disk by (base, rows,
settings, trainer source), so experiments sharing a pool train it once.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.accuracy_data import CACHE_DIR, Prepared, Task, cache_entry_lock, cached_features
from bench.common import log
from training.data import Dataset
from training.features import Features
from training.negatives import make_negatives
from training.nonlinear import NonlinearConfig, train_nonlinear
from training.probe import train_linear_probe
from training.tangent_train import (
    TangentConfig,
    default_kappa,
    default_lr,
    default_recipe,
    train_tangent,
)


def tangent_config(p: Prepared, **overrides: Any) -> TangentConfig:
    """The tangent settings of an experiment: `tmc train`'s defaults for its shard rule
    (κ, lr, recipe), then the experiment's own, then ``overrides``."""
    cfg = TangentConfig(epochs=p.exp.epochs, kappa=p.exp.kappa or default_kappa(p.exp.rule),
                        lr=p.exp.lr or default_lr(p.base, p.exp.rule), seed=p.exp.seed,
                        **default_recipe(p.exp.rule))
    return replace(cfg, **{**p.exp.recipe, **overrides})


def negatives_for(p: Prepared, ds: Dataset, cfg: TangentConfig) -> Features | None:
    """Trunk features of a shard's negatives (cached on disk like every trunk output)."""
    if not cfg.quiet:
        return None
    return cached_features(p.base, make_negatives(ds, cfg.negatives, cfg.seed), "negatives",
                           False)


def train_components(p: Prepared, tasks: list[Task], cfg: TangentConfig, progress: bool
                     ) -> list[tuple[str, Any]]:
    out = []
    for k, (label, ds, feats) in enumerate(tasks):
        c = replace(cfg, seed=cfg.seed * 1000 + k)
        r = train_tangent(p.base, ds, c, features=feats, negatives=negatives_for(p, ds, c),
                          progress=progress, desc=f"tangent {k}")
        log(f"  tangent {label}: {len(ds)} rows, {r.train_seconds:.1f}s, "
            f"loss {r.epoch_losses[0]:.4g} -> {r.epoch_losses[-1]:.4g}")
        out.append((label, r))
    return out


def train_nl_components(p: Prepared, tasks: list[Task], cfg: NonlinearConfig, progress: bool
                        ) -> list[tuple[str, Any]]:
    out = []
    for k, (label, ds, feats) in enumerate(tasks):
        r = train_nonlinear(p.base, ds, replace(cfg, seed=cfg.seed * 1000 + k), features=feats,
                            progress=progress, desc=f"non-linear {k}")
        log(f"  NL {label}: {r.train_seconds:.1f}s, loss {r.epoch_losses[0]:.4g} -> "
            f"{r.epoch_losses[-1]:.4g}")
        out.append((label, r))
    return out


@dataclass
class Joint:
    delta: dict[str, torch.Tensor]
    train_seconds: float
    epoch_losses: list[float]
    reused: bool


def joint_tangent(p: Prepared, cfg: TangentConfig, progress: bool) -> Joint:
    """Tangent fine-tuning on all the tasks' rows, kept on disk by (base, rows, settings,
    trainer source): fmnist-data-il and fmnist-data-il-10 share one pool, so one model."""
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    import training.loop
    import training.tangent_train

    h = hashlib.sha256(f"joint\0{p.base.fingerprint}\0{json.dumps(cfg.as_dict())}\0".encode())
    h.update(np.ascontiguousarray(p.union.index).tobytes())
    for module in (training.tangent_train, training.loop):  # a changed trainer: a new key
        h.update(Path(str(module.__file__)).read_bytes())
    path = CACHE_DIR / f"joint-{h.hexdigest()[:32]}.safetensors"
    with cache_entry_lock(path):
        if path.is_file():
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            log(f"  joint tangent: reusing {path} (same base, rows, settings and seed)")
            return Joint(load_file(str(path)), float(meta["seconds"]),
                         json.loads(meta["losses"]), True)
        log(f"  joint tangent on {len(p.union)} rows: kappa={cfg.kappa}")
        r = train_tangent(p.base, p.union, cfg, features=p.union_features, progress=progress,
                          desc="joint tangent")
        save_file({n: t.contiguous() for n, t in r.delta.items()}, str(path.with_suffix(".tmp")),
                  metadata={"seconds": str(r.train_seconds),
                            "losses": json.dumps(r.epoch_losses)})
        os.replace(path.with_suffix(".tmp"), path)
    return Joint(r.delta, r.train_seconds, r.epoch_losses, False)


def best_probe(p: Prepared) -> tuple[Any, dict[str, float], float]:
    """The linear probe (deterministic: L-BFGS from zero) at the validation-best L2."""
    t = time.perf_counter()
    probes = [train_linear_probe(p.base, p.union, features=p.union_features, l2=l2)
              for l2 in p.exp.probe_l2s]
    val = [p.val.probe(pr) for pr in probes]
    seconds = (time.perf_counter() - t) / len(probes)
    return probes[int(np.argmax(val))], dict(zip(map(str, p.exp.probe_l2s), val,
                                                 strict=True)), seconds
