"""The Dataset type: raw inputs with integer labels, and the three splits of one source.

A :class:`Dataset` is raw inputs (uint8 images, text strings or numeric vectors) with
integer labels, the label names those integers index, and a description of its source.
``index`` keeps each row's position in the source, so shards can be checked for being
disjoint and covering. Loaders (training.sources) build them with :func:`make_dataset`;
training.data splits and shards them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import cast

import numpy as np

# Raw rows: uint8 images [N, H, W] / [N, H, W, 3] or a list of such arrays (sizes differ),
# float32 vectors [N, ...], or a list of str.
RowInputs = np.ndarray | list[np.ndarray] | list[str]


@dataclass(frozen=True)
class Dataset:
    """Raw inputs + integer labels indexing ``label_names``.

    inputs: uint8 ndarray [N, H, W] or [N, H, W, 3] (kind "image"; a list of such arrays
    when sizes differ), a list of str (kind "text"), or float32 ndarray [N, ...] ("tensor").
    """

    kind: str
    inputs: RowInputs
    labels: np.ndarray  # int64 [N]
    label_names: list[str]
    source: str
    index: np.ndarray  # int64 [N]: row positions in the source

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, rows: Sequence[int] | np.ndarray) -> Dataset:
        rows = np.asarray(rows, dtype=np.int64)
        inputs: RowInputs
        if isinstance(self.inputs, np.ndarray):
            inputs = self.inputs[rows]
        else:
            inputs = cast(RowInputs, [self.inputs[int(i)] for i in rows])  # rows of one kind
        return replace(self, inputs=inputs, labels=self.labels[rows], index=self.index[rows])

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.label_names))
        return {n: int(c) for n, c in zip(self.label_names, counts, strict=True) if c}

    def classes_present(self) -> list[str]:
        return list(self.class_counts())


@dataclass(frozen=True)
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset


def make_dataset(kind: str, inputs: RowInputs, labels: Sequence[int] | np.ndarray,
                 names: list[str], source: str) -> Dataset:
    """A dataset of a whole source: every row, in source order."""
    y = np.asarray(labels, dtype=np.int64)
    return Dataset(kind, inputs, y, list(names), source, np.arange(len(y), dtype=np.int64))
