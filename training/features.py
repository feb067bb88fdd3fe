"""Model inputs from a Dataset, and trunk features computed once.

The trunk (every stage before the tangent region) is frozen and runs in eval mode, so
without augmentation its outputs are a fixed function of the input: :func:`trunk_features`
computes them once per dataset and :class:`Features` hands out batches of them for the
tail, in any row order. Two layouts are supported:

- a tensor per batch (images, vectors): stored as one tensor [N, ...];
- a (hidden [B, T, ...], mask [B, T]) pair (text): hidden states are stored right-padded to
  the longest row, with each row's length; a batch is sliced to its own longest row and the
  mask rebuilt, which is what the collate of those rows would give (padding is masked).

Large feature sets go to a memory-mapped file in a temporary directory instead of RAM.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeGuard

import numpy as np
import torch

from training.data import Dataset
from training.errors import UsageError

if TYPE_CHECKING:
    from bases import Base
    from bases.contracts import ModelInput

DEFAULT_MEMORY_LIMIT = 4 * 1024**3  # bytes of trunk features kept in RAM; beyond: on disk
# What the trunk hands the tail: a tensor [B, ...], or (hidden [B, T, ...], mask [B, T]).
TailInput = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class InputEncoder:
    """Raw dataset rows -> the base's model input for a batch (what
    collate(decode_inputs()) gives)."""

    def __init__(self, base: Base) -> None:
        self.base = base
        self.kind = base.spec.input_kind
        self.pre = base.preprocessor

    def check(self, ds: Dataset) -> None:
        from bases.inputs import TensorPreprocessor

        if ds.kind != self.kind:
            raise UsageError(f"the base takes {self.kind} inputs but {ds.source} holds "
                             f"{ds.kind} inputs")
        if isinstance(self.pre, TensorPreprocessor):
            shape = tuple(np.asarray(ds.inputs).shape[1:])  # an ndarray: no copy
            if shape != tuple(self.pre.shape):
                raise UsageError(f"{ds.source} rows have shape {list(shape)}, the base takes "
                                 f"{list(self.pre.shape)}")

    def batch(self, ds: Dataset, rows: np.ndarray) -> ModelInput:
        from bases.inputs import ImagePreprocessor, TextPreprocessor, images_to_tensor

        if isinstance(self.pre, ImagePreprocessor):
            size = self.pre.size
            if isinstance(ds.inputs, np.ndarray):
                return images_to_tensor(torch.from_numpy(ds.inputs[rows]), size)
            return torch.cat([images_to_tensor(torch.from_numpy(ds.inputs[int(i)])[None], size)
                              for i in rows])
        if isinstance(self.pre, TextPreprocessor):
            limit = self.pre.max_chars
            texts = [ds.inputs[int(i)][:limit] if limit else ds.inputs[int(i)] for i in rows]
            return self.pre.collate(self.pre.decode_inputs(texts))
        return torch.from_numpy(np.ascontiguousarray(ds.inputs[rows], dtype=np.float32))


@dataclass
class Features:
    """Trunk outputs for every row of a dataset, in dataset row order."""

    kind: str  # "tensor" | "masked"
    data: torch.Tensor  # [N, ...] or padded hidden [N, T, ...]
    lengths: torch.Tensor | None = None  # int64 [N] for "masked"
    mask_dtype: torch.dtype = torch.long
    seconds: float = 0.0  # time spent computing them

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def take(self, rows: torch.Tensor | np.ndarray) -> TailInput:
        """The tail input for these rows."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        if self.kind == "tensor":
            return self.data[idx]
        assert self.lengths is not None
        lengths = self.lengths[idx]  # [B]
        width = int(lengths.max())
        hidden = self.data[idx, :width]  # [B, T, ...]
        mask = (torch.arange(width)[None, :] < lengths[:, None]).to(self.mask_dtype)  # [B, T]
        return hidden, mask

    def subset(self, rows: np.ndarray) -> Features:
        """The features of a subset of rows (a copy, in the given order)."""
        idx = torch.as_tensor(np.asarray(rows), dtype=torch.long)
        return Features(self.kind, self.data[idx],
                        None if self.lengths is None else self.lengths[idx], self.mask_dtype,
                        self.seconds)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def _is_masked(out: object) -> TypeGuard[tuple[torch.Tensor, torch.Tensor]]:
    return (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor)
            and isinstance(out[1], torch.Tensor) and out[1].dim() == 2
            and out[0].dim() >= 2 and out[0].shape[:2] == out[1].shape
            and not out[1].is_floating_point())


def batches(n: int, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, n, batch_size):
        yield np.arange(start, min(n, start + batch_size))


def trunk_features(base: Base, ds: Dataset, *, batch_size: int = 64, progress: bool = False,
                   desc: str = "trunk features",
                   memory_limit: int = DEFAULT_MEMORY_LIMIT) -> Features:
    """Run the frozen trunk once over every row of ds (eval mode, no grad)."""
    from tqdm import tqdm

    encoder = InputEncoder(base)
    encoder.check(ds)
    net = base.net
    n = len(ds)
    if n == 0:
        raise UsageError(f"{ds.source}: no rows to compute features for")
    start = time.perf_counter()
    feats: Features | None = None
    max_len = _max_tokens(base)
    bar = tqdm(total=n, desc=desc, unit="row", disable=not progress, leave=False,
               dynamic_ncols=True)
    try:
        for rows in batches(n, batch_size):
            out = net.trunk_forward(encoder.batch(ds, rows))
            if feats is None:
                feats = _allocate(out, n, max_len, memory_limit)
            _store(feats, out, rows)
            bar.update(len(rows))
    finally:
        bar.close()
    assert feats is not None
    feats.seconds = time.perf_counter() - start
    return feats


def _max_tokens(base: Base) -> int | None:
    from bases.spec import int_option

    options = base.spec.options
    return None if options.get("max_tokens") is None else int_option(options, "max_tokens")


def _allocate(out: TailInput, n: int, max_len: int | None, memory_limit: int) -> Features:
    if isinstance(out, torch.Tensor):
        shape = (n, *out.shape[1:])
        return Features("tensor", _empty(shape, out.dtype, memory_limit), None)
    if _is_masked(out):
        hidden, mask = out
        width = max_len if max_len is not None else hidden.shape[1]
        shape = (n, max(width, hidden.shape[1]), *hidden.shape[2:])
        return Features("masked", _empty(shape, hidden.dtype, memory_limit),
                        torch.zeros(n, dtype=torch.long), mask.dtype)
    raise UsageError("the trunk output is neither a tensor nor a (hidden, mask) pair; "
                     "train with --no-cache")


def _empty(shape: tuple[int, ...], dtype: torch.dtype, memory_limit: int) -> torch.Tensor:
    nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
    if nbytes <= memory_limit:
        return torch.zeros(shape, dtype=dtype)
    tmp = tempfile.mkdtemp(prefix="tmc-features-")
    path = Path(tmp) / "features.npy"
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np_dtype, shape=shape)
    t = torch.from_numpy(arr)
    t._tmc_tmpdir = tmp  # type: ignore[attr-defined]
    weakref.finalize(t, shutil.rmtree, tmp, True)  # the file goes when the tensor does
    return t


def _store(feats: Features, out: TailInput, rows: np.ndarray) -> None:
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    if isinstance(out, torch.Tensor):  # feats.kind "tensor"
        feats.data[lo:hi] = out
        return
    hidden, mask = out
    lengths = mask.sum(dim=1).to(torch.long)  # [B]
    if hidden.shape[1] > feats.data.shape[1]:
        raise UsageError("a trunk output is longer than max_tokens; train with --no-cache")
    if not bool((mask == (torch.arange(mask.shape[1])[None] < lengths[:, None])).all()):
        raise UsageError("the trunk mask is not right-padded; train with --no-cache")
    width = hidden.shape[1]
    keep = mask.to(hidden.dtype).reshape(*mask.shape, *([1] * (hidden.dim() - 2)))
    feats.data[lo:hi, :width] = hidden * keep  # padding rows zeroed: they are masked anyway
    assert feats.lengths is not None
    feats.lengths[lo:hi] = lengths


class TrunkSource:
    """Tail inputs for rows of a dataset: from cached Features, or the trunk each time."""

    def __init__(self, base: Base, ds: Dataset, features: Features | None) -> None:
        self.base, self.ds, self.features = base, ds, features
        self.encoder = InputEncoder(base)
        if features is not None and len(features) != len(ds):
            raise ValueError(f"features have {len(features)} rows, the dataset {len(ds)}")

    def take(self, rows: np.ndarray) -> TailInput:
        if self.features is not None:
            return self.features.take(rows)
        out: TailInput = self.base.net.trunk_forward(self.encoder.batch(self.ds, rows))
        return out
