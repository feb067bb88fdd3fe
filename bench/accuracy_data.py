"""What every method of an accuracy experiment shares: the base, the train/validation/test
rows, the tasks, the trunk features and the unlabeled pool (``prepare``).

Policy: trunk features are a pure function of (base fingerprint, rows), so they are kept on
disk between runs (safetensors under ``CACHE_DIR``, keyed by a digest of both) and computed
once per split; experiments running side by side (run_all --jobs) wait on one lock per cache
entry (filelock) and load what the first one wrote.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from bases import init_base, load_base, make_spec
from bench.accuracy_experiments import Experiment
from bench.common import log
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
from training.prototypes import PoolWhitening, pool_whitening

# Trunk features are a pure function of (base fingerprint, rows): kept on disk between runs
# (safetensors, keyed by a digest of both) so that sweeps do not recompute them.
CACHE_DIR = Path(os.environ.get("TMC_BENCH_CACHE", Path(tempfile.gettempdir()) /
                                "tmc-bench-features"))


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


def cache_entry_lock(path: Path) -> FileLock:
    """An exclusive lock on one cache entry (``with cache_entry_lock(path): ...``):
    experiments running side by side (run_all --jobs) that need the same features or joint
    model compute them once — the others wait here, then load what the first one wrote."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    return FileLock(path.with_suffix(".lock"))


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
    whitening = unlabeled_pool(exp, base, splits.train, union, progress)
    return Prepared(exp, base, union, union_features, class_tasks, whitening, val_ev, test_ev,
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
