"""Fixed splits and shards of a dataset, and label bookkeeping.

Splits are fixed by a split seed: the held-out test split is the source's own test set
(Fashion-MNIST t10k) or a stratified ``test_fraction`` of the data; the validation split is
a stratified ``val_fraction`` of what remains; training shards are cut from the rest, so no
shard ever sees a validation or test row. Shards are either a class subset
(class-incremental) or part k of n of a seeded permutation (data-incremental; k counts from
0), disjoint across k and covering the training split.

The Dataset type lives in training.dataset and the loaders in training.sources; both are
re-exported here, the one import path the CLI, the demo, the benchmarks and tests use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from training.dataset import Dataset, RowInputs, Splits, make_dataset
from training.errors import EmptyShardError, UsageError
from training.sources import (
    BBC_ALIASES,
    BBC_LABELS,
    DATA_CHOICES,
    FASHION_LABELS,
    FASHION_MNIST_DIR,
    IMAGE_SUFFIXES,
    bbc_dir,
    load_bbc,
    load_digits,
    load_digits_images,
    load_fashion_mnist,
    load_image_folder,
    load_source,
    load_text_table,
)

__all__ = [
    "BBC_ALIASES", "BBC_LABELS", "DATA_CHOICES", "FASHION_LABELS", "FASHION_MNIST_DIR",
    "IMAGE_SUFFIXES", "Dataset", "RowInputs", "Splits", "align_labels", "bbc_dir",
    "load_bbc", "load_digits", "load_digits_images", "load_fashion_mnist", "load_image_folder",
    "load_source", "load_text_table", "make_dataset", "parse_classes", "parse_shard",
    "positions", "shard_by_classes", "shard_random", "split_train_val_test", "take",
]


# -- labels --------------------------------------------------------------------------------------
def align_labels(ds: Dataset, base_labels: Sequence[str]) -> Dataset:
    """Re-index labels onto the base's label list (by name); refuse names the base lacks."""
    position = {name: i for i, name in enumerate(base_labels)}
    present = ds.classes_present()
    unknown = [n for n in present if n not in position]
    if unknown:
        raise UsageError(
            f"labels {unknown} of {ds.source} are outside the base's label set "
            f"{list(base_labels)}; create a base with these labels (`tmc base init --labels`)")
    mapping = np.array([position.get(n, -1) for n in ds.label_names], dtype=np.int64)
    return replace(ds, labels=mapping[ds.labels], label_names=list(base_labels))


def parse_classes(spec: str, label_names: Sequence[str]) -> list[int]:
    """'0,1' or 'trouser,bag' (names first, then indices) -> sorted label indices."""
    chosen: set[int] = set()
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item in label_names:
            chosen.add(list(label_names).index(item))
        elif item.lstrip("-").isdigit():
            i = int(item)
            if not 0 <= i < len(label_names):
                raise UsageError(f"class index {i} is outside the base's label set "
                                 f"(0..{len(label_names) - 1}: {list(label_names)})")
            chosen.add(i)
        else:
            raise UsageError(f"class {item!r} is not in the base's label set "
                             f"{list(label_names)}")
    if not chosen:
        raise UsageError("--classes names no class")
    return sorted(chosen)


def parse_shard(spec: str) -> tuple[int, int]:
    """'k/n' -> (k, n), k counting from 0."""
    k_text, sep, n_text = spec.partition("/")
    try:
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise UsageError(f"--shard must be k/n with integers (k from 0), got {spec!r}") from None
    if not sep or n < 1 or not 0 <= k < n:
        raise UsageError(f"--shard {spec!r}: need n >= 1 and 0 <= k < n (k counts from 0)")
    return k, n


# -- splits and shards ---------------------------------------------------------------------------
def split_train_val_test(pool: Dataset, *, test: Dataset | None = None,
                         val_fraction: float = 0.1, test_fraction: float = 0.2,
                         seed: int = 0) -> Splits:
    """Stratified, seeded split. With ``test`` given (a source's own test set) only the
    validation split is carved from the pool. The test rows do not depend on val_fraction."""
    if not 0.0 <= val_fraction < 1.0 or not 0.0 <= test_fraction < 1.0:
        raise UsageError("val and test fractions must be within [0, 1)")
    rng = np.random.Generator(np.random.PCG64(seed))
    test_rows: list[np.ndarray] = []
    val_rows: list[np.ndarray] = []
    train_rows: list[np.ndarray] = []
    for c in range(len(pool.label_names)):
        rows = np.flatnonzero(pool.labels == c)
        if rows.size == 0:
            continue
        rows = rows[rng.permutation(rows.size)]
        n_test = 0 if test is not None else int(round(test_fraction * rows.size))
        n_val = int(round(val_fraction * rows.size))
        test_rows.append(rows[:n_test])
        val_rows.append(rows[n_test:n_test + n_val])
        train_rows.append(rows[n_test + n_val:])

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)

    held_out = test if test is not None else pool.subset(cat(test_rows))
    return Splits(pool.subset(cat(train_rows)), pool.subset(cat(val_rows)), held_out)


def shard_by_classes(ds: Dataset, classes: Sequence[int]) -> Dataset:
    """The rows whose label is in ``classes`` (class-incremental)."""
    rows = np.flatnonzero(np.isin(ds.labels, np.asarray(list(classes), dtype=np.int64)))
    if rows.size == 0:
        names = [ds.label_names[c] for c in classes]
        raise EmptyShardError(f"the shard is empty: {ds.source} has no training rows of "
                              f"classes {names}")
    return ds.subset(rows)


def shard_random(ds: Dataset, k: int, n: int, seed: int = 0) -> Dataset:
    """Part k (from 0) of n of a seeded permutation (data-incremental); disjoint, covering."""
    if not 0 <= k < n:
        raise UsageError(f"shard {k}/{n}: need 0 <= k < n")
    perm = np.random.Generator(np.random.PCG64(seed)).permutation(len(ds))
    rows = np.sort(np.array_split(perm, n)[k])
    if rows.size == 0:
        raise EmptyShardError(f"shard {k}/{n} of {len(ds)} training rows is empty; "
                              "use fewer shards")
    return ds.subset(rows)


def positions(parent: Dataset, child: Dataset) -> np.ndarray:
    """Row positions in ``parent`` of every row of ``child`` (a subset of it)."""
    order = np.argsort(parent.index, kind="stable")
    pos = np.searchsorted(parent.index, child.index, sorter=order)
    pos = np.minimum(pos, len(parent) - 1)
    rows = order[pos]
    if not np.array_equal(parent.index[rows], child.index):
        raise ValueError("child is not a subset of parent")
    return rows


def take(ds: Dataset, limit: int, seed: int = 0) -> Dataset:
    """A seeded random subset of at most ``limit`` rows (kept in source order)."""
    if limit < 1:
        raise UsageError(f"--limit must be >= 1, got {limit}")
    if len(ds) <= limit:
        return ds
    rng = np.random.Generator(np.random.PCG64(seed))
    return ds.subset(np.sort(rng.permutation(len(ds))[:limit]))
