"""Reproduction benchmark: TMC against the paper's baselines, end to end, on this machine.

    python -m bench.accuracy --all | --experiment NAME [--quick] [--seeds 0,1,2] [--select]

fmnist-class-il: effnet-lite0 (tangent region R2: conv head + BN + classifier), Fashion-MNIST
    at 64×64, 5 class-incremental tasks of 2 classes, 2,000 training images per task.
fmnist-data-il / fmnist-data-il-10: the same base, one pool of 10,000 training images cut at
    random into 5 / 10 data-incremental shards.
bbc-data-il: minilm (last encoder layer + classifier), BBC News, 5 data-incremental shards of
    the training split.

For each seed (default 3): accuracy on the full held-out test split of each component alone,
the TMC mean composition, the non-linear (NL) ensemble (mean of softmax), the NL weight
average, joint tangent training on all the tasks' data, the linear probe, and θ0; the
continual curve (compositions of the first k components as tasks arrive one by one; TMC's
prefixes from the components' logits by linearity); on the first seed, the forgetting check
through a real registry (forget one component, compare with a registry that never had it).
On the validation split only what is chosen there is scored (TMC's normalization, the
non-linear combination). Mean ± spread over seeds, targets, training times, settings.
Trunk features are computed once per split and shared by every method and seed.
``--select`` instead sweeps κ / learning rates on the validation split (carved from the
training data; the test split is never looked at) and writes ``*_select.json``.
Results: bench/results/accuracy_<experiment>[_select|_quick].json, accuracy[_quick].png
(continual curves) and accuracy_forgetting[_quick].png.
"""
# ruff: noqa: E402

from __future__ import annotations

import os

# Shared 2-core machines: spinning OpenMP workers collapse throughput when other processes
# compete for the cores (measured here: 2 threads 10x slower than 1 under load). Passive
# waiting costs little when the machine is idle. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import fcntl
import json
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bases import init_base, load_base, make_spec
from bench.accuracy_report import (
    accuracy_targets,
    aggregate_accuracy,
    aggregate_continual,
)
from bench.common import machine
from training.data import (
    Dataset,
    align_labels,
    load_source,
    positions,
    shard_by_classes,
    shard_random,
    split_train_val_test,
    take,
)
from training.evaluate import Evaluator
from training.features import Features, trunk_features
from training.negatives import make_negatives
from training.nonlinear import NonlinearConfig, default_nonlinear_lr, train_nonlinear
from training.probe import train_linear_probe
from training.protocols import (
    continual_curve,
    forgetting_check,
    method_scores,
    summarize_scores,
)
from training.prototypes import PoolWhitening, add_prototypes, pool_whitening
from training.tangent_train import (
    TangentConfig,
    default_kappa,
    default_lr,
    default_recipe,
    train_tangent,
)

RESULTS = Path(__file__).resolve().parent / "results"
# Trunk features are a pure function of (base fingerprint, rows): kept on disk between runs
# (safetensors, keyed by a digest of both) so that sweeps do not recompute them.
CACHE_DIR = Path(os.environ.get("TMC_BENCH_CACHE", Path(tempfile.gettempdir()) /
                                "tmc-bench-features"))


# The joint tangent model (a reference: one model trained on every task's rows, not a
# composition) is trained on the first seed only, to keep `make bench` near an hour on 2
# cores: over 3 seeds its test accuracy varied by ≤ 0.06 points (0.8647–0.8653 class-IL,
# 0.8634–0.8635 data-IL; `make bench` of 2026-11-27 04:01), and it costs as much as 5
# components.
JOINT_SEEDS = 1


@dataclass
class Experiment:
    name: str
    preset: str
    data: str
    rule: str  # "classes" | "shard"
    tasks: int = 5
    per_task: int | None = None  # "classes": training rows drawn per task (fixed across seeds)
    pool: int | None = None  # "shard": rows drawn from the training split, then sharded
    epochs: int = 10
    nl_lr: float | None = None  # None: training.nonlinear.default_nonlinear_lr
    kappa: float | None = None  # None: training.tangent_train.default_kappa(rule)
    lr: float | None = None  # None: training.tangent_train.default_lr(base, rule)
    probe_l2s: tuple[float, ...] = (1e-3, 1e-2, 1e-1)  # chosen on the validation split
    split_seed: int = 0
    val_fraction: float = 0.1
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    test_limit: int | None = None
    val_limit: int | None = None
    selected_on: str = ""  # which --select sweep chose κ / lr (result file)
    joint_seeds: int | None = JOINT_SEEDS  # joint tangent on the first n seeds (None: all)
    # --select grids: (kappa, lr) pairs for TMC, lrs for the NL fine-tunes
    tmc_grid: list[tuple[float, float]] = field(default_factory=list)
    nl_grid: list[float] = field(default_factory=list)
    labels: tuple[str, ...] | None = None  # the base's labels (None: the preset's)
    # unlabeled pool for whitened prototypes: up to this many training rows outside every
    # task (seeded, the same for every component and seed); None: no pool variant
    pool_rows: int | None = None
    pool_shrinkage: float = 0.3
    recipe: dict[str, Any] = field(default_factory=dict)  # TangentConfig overrides
    # --select --recipes: option sets (TangentConfig overrides) scored on validation
    recipe_grid: list[dict[str, Any]] = field(default_factory=list)


FMNIST_DATA_IL_TMC_GRID = [(1.0, 1e-3), (5.0, 1e-3), (15.0, 1e-3), (50.0, 1e-3), (5.0, 1e-4),
                           (15.0, 1e-4)]
EXPERIMENTS = {
    "fmnist-class-il": Experiment(
        "fmnist-class-il", "effnet-lite0", "fashion-mnist", "classes", per_task=2000, epochs=10,
        selected_on="accuracy_fmnist-class-il_select*.json",
        tmc_grid=[(k, lr) for lr in (1e-4, 1e-3) for k in (5.0, 15.0, 50.0, 150.0)]
        + [(300.0, 1e-4), (1000.0, 1e-4)], nl_grid=[1e-4, 3e-4, 1e-3, 3e-3], pool_rows=2000),
    # data-incremental: one fixed pool of 10,000 training images cut into 5 or 10 shards
    # (2,000 or 1,000 images each); the shard assignment changes with the seed
    "fmnist-data-il": Experiment(
        "fmnist-data-il", "effnet-lite0", "fashion-mnist", "shard", pool=10_000, epochs=10,
        selected_on="accuracy_fmnist-data-il_select.json",
        tmc_grid=list(FMNIST_DATA_IL_TMC_GRID), nl_grid=[1e-4, 1e-3]),
    "fmnist-data-il-10": Experiment(
        "fmnist-data-il-10", "effnet-lite0", "fashion-mnist", "shard", tasks=10, pool=10_000,
        epochs=10, selected_on="accuracy_fmnist-data-il_select.json (5 shards)",
        tmc_grid=list(FMNIST_DATA_IL_TMC_GRID), nl_grid=[1e-4, 1e-3]),
    "bbc-data-il": Experiment(
        "bbc-data-il", "minilm", "bbc", "shard", epochs=5,
        selected_on="accuracy_bbc-data-il_select.json",
        tmc_grid=[(5.0, 1e-4), (5.0, 1e-3), (15.0, 1e-3), (5.0, 3e-4)], nl_grid=[1e-4, 1e-3]),
    # text, class-incremental: BBC News in 2 tasks, {business, entertainment} and
    # {politics, sport, tech}; every training row of a task's classes; no pool
    "bbc-class-il": Experiment(
        "bbc-class-il", "minilm", "bbc", "classes", tasks=2, epochs=5, kappa=15.0, lr=1e-3,
        selected_on="κ, lr from bbc-data-il's validation; p = the --classes default "
        "(accuracy_bbc-class-il_select.json: the κ = 15 row)", nl_grid=[3e-4, 1e-3]),
    # a second class-incremental dataset: scikit-learn's 8×8 digits as images, 5 tasks × 2
    # digits, 150 training rows per task; the ~330 training rows left form the unlabeled
    # pool; 20% validation, 20% test (359 rows each)
    "digits-class-il": Experiment(
        "digits-class-il", "effnet-lite0", "digits-images", "classes", per_task=150,
        epochs=10, pool_rows=1000, kappa=50.0, lr=1e-3, nl_lr=3e-4,
        recipe={"prototypes": 0.3},
        labels=tuple(str(i) for i in range(10)), val_fraction=0.2,
        selected_on="accuracy_digits-class-il_select.json",
        tmc_grid=[], nl_grid=[1e-4, 3e-4, 1e-3, 3e-3]),
}

DEFAULT_RUN = ("fmnist-class-il", "digits-class-il", "bbc-class-il", "fmnist-data-il",
               "fmnist-data-il-10", "bbc-data-il")
DEFAULT_SEEDS = (0, 1, 2)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


Task = tuple[str, Dataset, Features]  # (label, training rows, their trunk features)


@dataclass
class Prepared:
    exp: Experiment
    base: Any
    union: Dataset  # every training row any task can use
    union_features: Features
    class_tasks: list[tuple[str, Dataset]]  # "classes" rule: the fixed tasks
    pool: PoolWhitening | None  # the unlabeled pool's statistics (exp.pool_rows)
    val: Evaluator
    test: Evaluator
    seconds: dict[str, float]

    def tasks_for(self, seed: int) -> list[Task]:
        """The tasks of one seed: fixed class tasks, or a seeded random sharding of the pool."""
        if self.exp.rule == "classes":
            shards = self.class_tasks
        else:
            n = self.exp.tasks
            shards = [(f"shard {k}/{n}", shard_random(self.union, k, n, seed=seed))
                      for k in range(n)]
        out = []
        for label, shard in shards:
            pos = positions(self.union, shard)
            out.append((label, shard, self.union_features.subset(pos)))
        return out

    def task_classes(self, tasks: list[Task]) -> list[list[int]] | None:
        """Class ids of each task ("classes" rule), None for data-incremental shards."""
        if self.exp.rule != "classes":
            return None
        return [sorted({int(c) for c in ds.labels}) for _, ds, _ in tasks]


def cached_features(base: Any, ds: Dataset, desc: str, progress: bool) -> Features:
    import hashlib

    from safetensors.torch import load_file, save_file

    h = hashlib.sha256(f"{base.fingerprint}\0{ds.source}\0".encode())
    h.update(np.ascontiguousarray(ds.index).tobytes())
    path = CACHE_DIR / f"{h.hexdigest()[:32]}.safetensors"
    with cache_entry_lock(path):
        if path.is_file():
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                seconds = float((f.metadata() or {}).get("seconds", "nan"))
            t = load_file(str(path))
            log(f"{desc}: loaded from {path} (computed in {seconds:.1f}s)")
            return Features("masked" if "lengths" in t else "tensor", t["data"],
                            t.get("lengths"), seconds=seconds)
        feats = trunk_features(base, ds, progress=progress, desc=desc)
        tensors = {"data": feats.data.contiguous()}
        if feats.lengths is not None:
            tensors["lengths"] = feats.lengths
        save_file(tensors, str(path.with_suffix(".tmp")),
                  metadata={"seconds": str(feats.seconds)})
        os.replace(path.with_suffix(".tmp"), path)
    return feats


@contextmanager
def cache_entry_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on one cache entry: experiments running side by side
    (run_all --jobs) that need the same features or joint model compute them once — the
    others wait here, then load what the first one wrote."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def draw_class_tasks(exp: Experiment, train: Dataset, labels: list[str]
                     ) -> list[tuple[str, Dataset]]:
    per = len(labels) // exp.tasks
    out = []
    for k in range(exp.tasks):  # consecutive labels; the last task takes any remainder
        classes = list(range(k * per, len(labels) if k == exp.tasks - 1 else (k + 1) * per))
        shard = shard_by_classes(train, classes)
        if exp.per_task is not None:
            shard = take(shard, exp.per_task, seed=exp.split_seed + k)
        out.append(("classes " + ",".join(labels[c] for c in classes), shard))
    return out


def prepare(exp: Experiment, base_dir: Path, progress: bool) -> Prepared:
    t0 = time.perf_counter()
    init_base(base_dir, make_spec(exp.preset, options=exp.options,
                                  labels=list(exp.labels) if exp.labels else None), force=True)
    base = load_base(base_dir)
    pool, fixed_test = load_source(exp.data)
    pool = align_labels(pool, base.labels)
    fixed_test = align_labels(fixed_test, base.labels) if fixed_test is not None else None
    splits = split_train_val_test(pool, test=fixed_test, val_fraction=exp.val_fraction,
                                  seed=exp.split_seed)
    class_tasks: list[tuple[str, Dataset]] = []
    if exp.rule == "classes":
        class_tasks = draw_class_tasks(exp, splits.train, list(base.labels))
        rows = np.unique(np.concatenate([positions(splits.train, s) for _, s in class_tasks]))
        union = splits.train.subset(rows)
    else:
        union = take(splits.train, exp.pool, seed=exp.split_seed) if exp.pool else splits.train
    val = take(splits.val, exp.val_limit, exp.split_seed) if exp.val_limit else splits.val
    test = take(splits.test, exp.test_limit, exp.split_seed) if exp.test_limit else splits.test
    t1 = time.perf_counter()
    log(f"{exp.name}: {len(union)} training rows in {exp.tasks} tasks, {len(val)} val, "
        f"{len(test)} test; computing trunk features once")
    union_features = cached_features(base, union, "train features", progress)
    val_ev = Evaluator(base, val, features=cached_features(base, val, "val features", progress))
    test_ev = Evaluator(base, test,
                        features=cached_features(base, test, "test features", progress))
    seconds = {"data_and_base": t1 - t0, "trunk_train": union_features.seconds,
               "trunk_val": val_ev.features.seconds, "trunk_test": test_ev.features.seconds}
    log(f"trunk features: train {seconds['trunk_train']:.1f}s, val {seconds['trunk_val']:.1f}s,"
        f" test {seconds['trunk_test']:.1f}s")
    pool = unlabeled_pool(exp, base, splits.train, union, progress)
    return Prepared(exp, base, union, union_features, class_tasks, pool, val_ev, test_ev,
                    seconds)


def unlabeled_pool(exp: Experiment, base: Any, train: Dataset, union: Dataset,
                   progress: bool) -> PoolWhitening | None:
    """Whitening statistics of up to exp.pool_rows training rows that no task holds (labels
    dropped): fixed before any task, the same for every component."""
    if not exp.pool_rows:
        return None
    rest = np.flatnonzero(~np.isin(train.index, union.index))
    pool = take(train.subset(rest), exp.pool_rows, seed=exp.split_seed + 1)
    pool = replace(pool, labels=np.full(len(pool), -1, dtype=np.int64),
                   source=f"{pool.source} | unlabeled pool")
    log(f"unlabeled pool: {len(pool)} training rows outside every task")
    return pool_whitening(base.net, cached_features(base, pool, "pool features", progress),
                          exp.pool_shrinkage)


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


def run(exp: Experiment, seeds: Sequence[int], progress: bool, forgetting: bool = True
        ) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tmc-bench-") as tmp:
        p = prepare(exp, Path(tmp) / "base", progress)
        cfg = tangent_config(p)
        nl_cfg = NonlinearConfig(epochs=exp.epochs,
                                 lr=exp.nl_lr or default_nonlinear_lr(p.base, exp.rule))
        joint_cfg = replace(cfg, kappa=default_kappa("all"), lr=default_lr(p.base, "all"),
                            **default_recipe("all"))
        probe, probe_val, probe_s = best_probe(p)
        per_seed = []
        for i, seed in enumerate(seeds):
            log(f"== {exp.name} seed {seed} ({i + 1}/{len(seeds)}): tangent kappa={cfg.kappa} "
                f"lr={cfg.lr}, NL lr={nl_cfg.lr}, epochs={cfg.epochs}")
            joint = exp.joint_seeds is None or i < exp.joint_seeds
            per_seed.append(run_seed(p, seed, replace(cfg, seed=seed),
                                     replace(nl_cfg, seed=seed),
                                     replace(joint_cfg, seed=seed) if joint else None,
                                     probe, progress,
                                     Path(tmp) / f"forget-{seed}" if forgetting and i == 0
                                     else None))
        forget_result = per_seed[0].pop("forgetting", None)
        return {
            "experiment": exp.name,
            "seeds": list(seeds),
            "settings": {
                "experiment": {k: v for k, v in exp.__dict__.items()},
                "tangent": cfg.as_dict(), "nonlinear": nl_cfg.as_dict(),
                "joint_tangent": joint_cfg.as_dict(), "linear_probe_l2": probe.l2,
                "linear_probe_val_by_l2": probe_val,
                "joint_tangent_seeds": (f"first {exp.joint_seeds}" if exp.joint_seeds
                                        else "all") + " (a cached joint Δ is reused when "
                                        "base, rows, settings and seed are the same)",
                "seeds_vary": ("training randomness (minibatch order; seed·1000+task per "
                               "component)" + ("" if exp.rule == "classes" else
                                               " and the assignment of pool rows to shards")
                               + "; training pool, validation and test rows are fixed"),
                "base_spec": json.loads(p.base.spec.to_json()),
                "base_fingerprint": p.base.fingerprint,
                "tangent_region_params": sum(int(np.prod(t.shape))
                                             for t in p.base.region.values()),
                "pool_rows": len(p.union),
            },
            "per_seed": per_seed,
            "accuracy": aggregate_accuracy(per_seed),
            "continual": aggregate_continual(per_seed),
            "forgetting": forget_result,
            "targets": accuracy_targets(exp, per_seed, forget_result),
            "train_seconds": {"linear_probe_each_l2": probe_s,
                              **{f"{k}_features": v for k, v in p.seconds.items()}},
            "machine": machine(),
        }


def with_prototypes(p: Prepared, tasks: list[Task], plain: list[dict[str, torch.Tensor]],
                    cfg: TangentConfig, pool: PoolWhitening | None
                    ) -> list[dict[str, torch.Tensor]]:
    """The components with cfg's prototype term (p·κ, cosine or pool-whitened) added."""
    if not cfg.prototypes:
        return plain
    return [add_prototypes(d, p.base.net, ds, feats, cfg.prototypes * cfg.kappa, pool)
            for (_, ds, feats), d in zip(tasks, plain, strict=True)]


def prototype_variants(p: Prepared, tasks: list[Task], plain: list[dict[str, torch.Tensor]],
                       cfg: TangentConfig) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Side-by-side compositions: without prototypes (the pre-issue-16 recipe) and with
    pool-whitened prototypes (when the experiment has an unlabeled pool)."""
    out = {}
    if cfg.prototypes:
        out["tmc_no_prototypes"] = plain
    if cfg.prototypes and p.pool is not None:
        out["tmc_pool_prototypes"] = with_prototypes(p, tasks, plain, cfg, p.pool)
    return out


def run_seed(p: Prepared, seed: int, cfg: TangentConfig, nl_cfg: NonlinearConfig,
             joint_cfg: TangentConfig | None, probe: Any, progress: bool,
             forget_dir: Path | None) -> dict[str, Any]:
    tasks = p.tasks_for(seed)
    # the tangent part is trained once; the prototype term is added after training (exactly
    # what train_tangent does), so the components without it are scored side by side
    comps = train_components(p, tasks, replace(cfg, prototypes=0.0), progress)
    nls = train_nl_components(p, tasks, nl_cfg, progress)
    joint = joint_tangent(p, joint_cfg, progress) if joint_cfg is not None else None
    log("  evaluating")
    plain = [r.delta for _, r in comps]
    deltas = with_prototypes(p, tasks, plain, cfg, None)
    variants = prototype_variants(p, tasks, plain, cfg)
    models = [r.params for _, r in nls]
    labels = [lab for lab, _ in comps]
    t = time.perf_counter()
    # validation: only what is chosen there (TMC normalization, NL combination)
    scores = {split: method_scores(ev, deltas, models, joint.delta if joint else None, probe,
                                   selection_only=split == "val", variants=variants)
              for split, ev in (("test", p.test), ("val", p.val))}
    accuracy = {split: summarize_scores(ev, s, labels)
                for (split, s), ev in zip(scores.items(), (p.test, p.val), strict=True)}
    classes = p.task_classes(tasks)
    out: dict[str, Any] = {
        "seed": seed,
        "rows_per_task": {lab: len(ds) for lab, ds, _ in tasks},
        "accuracy": accuracy,
        "continual": continual_curve(p.test, deltas, models, scores["test"], classes),
        "train_seconds": {
            "tangent_per_component": {lab: r.train_seconds for lab, r in comps},
            "nonlinear_per_component": {lab: r.train_seconds for lab, r in nls},
            "joint_tangent": joint.train_seconds if joint else None,
            "joint_tangent_reused": joint.reused if joint else None},
        "losses": {"tangent": {lab: r.epoch_losses for lab, r in comps},
                   "nonlinear": {lab: r.epoch_losses for lab, r in nls},
                   "joint_tangent": joint.epoch_losses if joint else None},
    }
    if forget_dir is not None:
        out["forgetting"] = forgetting_check(p.base, tasks, deltas, p.test, classes, forget_dir)
    out["eval_seconds"] = time.perf_counter() - t
    log(f"  seed {seed}: test TMC {accuracy['test']['tmc_mean']:.4f}, NL ensemble "
        f"{accuracy['test']['nl_ensemble_softmax']:.4f}, joint "
        f"{accuracy['test'].get('joint_tangent', float('nan')):.4f}")
    return out


def select(exp: Experiment, progress: bool) -> dict[str, Any]:
    """Sweep κ and learning rates; score on the validation split only."""
    with tempfile.TemporaryDirectory(prefix="tmc-bench-") as tmp:
        p = prepare(exp, Path(tmp) / "base", progress)
        tasks = p.tasks_for(exp.seed)
        grid: list[dict[str, Any]] = []
        for kappa, lr in exp.tmc_grid:
            log(f"select: tangent kappa={kappa} lr={lr}")
            cfg = tangent_config(p, kappa=kappa, lr=lr)
            comps = train_components(p, tasks, cfg, progress)
            deltas = [r.delta for _, r in comps]
            grid.append({"method": "tmc", "kappa": kappa, "lr": lr,
                         "val_tmc_mean": p.val.tmc(deltas),
                         "val_alone": [p.val.tangent(d) for d in deltas],
                         "seconds": [r.train_seconds for _, r in comps]})
            log(f"  -> val TMC {grid[-1]['val_tmc_mean']:.4f}")
            _checkpoint(exp, grid)
        for options in exp.recipe_grid:
            grid.append(select_recipe(p, tasks, options, progress))
            _checkpoint(exp, grid)
        for lr in exp.nl_grid:
            log(f"select: non-linear lr={lr}")
            nls = train_nl_components(p, tasks, NonlinearConfig(epochs=exp.epochs, lr=lr),
                                      progress)
            models = [r.params for _, r in nls]
            grid.append({"method": "nonlinear", "lr": lr,
                         "val_ensemble_softmax": p.val.ensemble(models, "softmax"),
                         "val_weight_average": p.val.weight_average(models),
                         "val_alone": [p.val.nonlinear(m) for m in models]})
            log(f"  -> val NL ensemble {grid[-1]['val_ensemble_softmax']:.4f}")
            _checkpoint(exp, grid)
        for l2 in (1e-4, 1e-3, 1e-2, 1e-1) if exp.nl_grid else ():
            probe = train_linear_probe(p.base, p.union, features=p.union_features, l2=l2)
            grid.append({"method": "linear_probe", "l2": l2, "val": p.val.probe(probe)})
        return {"experiment": exp.name, "mode": "select (validation split only)",
                "settings": {k: v for k, v in exp.__dict__.items()}, "grid": grid,
                "machine": machine()}


PROTOTYPE_GRID = (0.0, 0.03, 0.1, 0.3, 1.0)  # p of --prototypes, scored after training


def select_recipe(p: Prepared, tasks: list[Task], options: dict[str, Any], progress: bool
                  ) -> dict[str, Any]:
    """Validation accuracy of TMC (mean and sum) with one set of tangent options, for every
    prototype weight p of PROTOTYPE_GRID (cosine, and pool-whitened when there is a pool):
    the prototype term is added after training, so one training serves the whole grid."""
    log(f"select: tangent {options}")
    cfg = tangent_config(p, **options)
    comps = train_components(p, tasks, replace(cfg, prototypes=0.0), progress)
    plain = [r.delta for _, r in comps]
    by_p: dict[str, Any] = {}
    for weight in PROTOTYPE_GRID:
        c = replace(cfg, prototypes=weight)
        for name, pool in (("cosine", None), ("pool", p.pool)):
            if pool is None and name == "pool":
                continue
            deltas = with_prototypes(p, tasks, plain, c, pool)
            by_p[f"{name} p={weight:g}"] = {
                "val_tmc_mean": p.val.tmc(deltas),
                "val_tmc_sum": p.val.tmc(deltas, normalize="none")}
    log("  -> val TMC mean " + ", ".join(f"{k}: {v['val_tmc_mean']:.4f}"
                                          for k, v in by_p.items()))
    return {"method": "tmc", "options": options, "config": cfg.as_dict(),
            "by_prototypes": by_p, "val_alone": [p.val.tangent(d) for d in plain],
            "seconds": [r.train_seconds for _, r in comps]}


def _checkpoint(exp: Experiment, grid: list[dict[str, Any]]) -> None:
    """Partial --select results, so a long sweep can be read while it runs."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"accuracy_{exp.name}_select.partial.json").write_text(
        json.dumps(grid, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", choices=sorted(EXPERIMENTS))
    ap.add_argument("--all", action="store_true",
                    help="run " + ", ".join(DEFAULT_RUN) + " (what `make bench` runs)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny smoke run (120 rows per task, 40 for text; 2 epochs; one seed)")
    ap.add_argument("--seeds", help="comma-separated training seeds (default $TMC_BENCH_SEEDS "
                    "or " + ",".join(map(str, DEFAULT_SEEDS)) + "; --quick: 0)")
    ap.add_argument("--no-forgetting", action="store_true",
                    help="skip the registry forget check (it runs on the first seed)")
    ap.add_argument("--select", action="store_true", help="sweep κ/lr on the validation split")
    ap.add_argument("--epochs", type=int, help="override the experiment's epochs")
    ap.add_argument("--tmc-grid", help="--select: (κ, lr) grid, e.g. 300:1e-4,1000:1e-4")
    ap.add_argument("--nl-grid", help="--select: NL lr grid, e.g. 1e-4,1e-3 ('' for none)")
    ap.add_argument("--recipes", help="--select: JSON list of tangent option sets, e.g. "
                    "'[{\"quiet\": 1, \"prototypes\": 100}]' ('[]' for none)")
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    ap.add_argument("--progress", action="store_true", help="progress bars on stderr")
    ap.add_argument("--out", type=Path, help="result file (default bench/results/...)")
    args = ap.parse_args(argv)
    if args.all == bool(args.experiment):
        ap.error("give exactly one of --experiment NAME or --all")
    if args.all and args.out:
        ap.error("--out names one result file: use it with --experiment")
    names = DEFAULT_RUN if args.all else (args.experiment,)
    for name in names:
        run_one(EXPERIMENTS[name], args)
    if not args.select:
        from bench.accuracy_report import write_plots

        for path in write_plots(RESULTS, quick=args.quick):
            log(f"wrote {path}")
    return 0


def run_one(exp: Experiment, args: argparse.Namespace) -> None:
    seeds_text = args.seeds or os.environ.get("TMC_BENCH_SEEDS")
    seeds = [int(x) for x in seeds_text.split(",")] if seeds_text else (
        [0] if args.quick else list(DEFAULT_SEEDS))
    if args.quick:  # text trunks cost ~10x more per row than the 64x64 image trunk
        rows, test, val = (40, 200, 100) if exp.preset == "minilm" else (120, 400, 200)
        exp = replace(exp, per_task=rows if exp.rule == "classes" else None,
                      pool=rows * exp.tasks if exp.rule == "shard" else None, epochs=2,
                      test_limit=test, val_limit=val)
    if args.epochs:
        exp = replace(exp, epochs=args.epochs)
    if args.tmc_grid is not None:
        pairs = (item.split(":") for item in args.tmc_grid.split(",") if item)
        exp = replace(exp, tmc_grid=[(float(k), float(lr)) for k, lr in pairs])
    if args.nl_grid is not None:
        exp = replace(exp, nl_grid=[float(x) for x in args.nl_grid.split(",") if x])
    if args.recipes is not None:
        exp = replace(exp, recipe_grid=list(json.loads(args.recipes)))

    torch.manual_seed(0)
    started = time.perf_counter()
    result = select(exp, args.progress) if args.select else run(
        exp, seeds, args.progress, forgetting=not args.no_forgetting)
    result["wall_seconds"] = time.perf_counter() - started
    result["written"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result["quick"] = bool(args.quick)
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    if args.quick:
        result["note"] = (f"smoke run ({exp.per_task or (exp.pool or 0) // exp.tasks} rows per "
                          "task, 2 epochs, one seed): far too few steps for the default "
                          "settings; not comparable with the full run")
    suffix = "_select" if args.select else "_quick" if args.quick else ""
    out = args.out or RESULTS / f"accuracy_{exp.name}{suffix}{args.tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {out} ({result['wall_seconds']:.0f}s)")


if __name__ == "__main__":
    raise SystemExit(main())
