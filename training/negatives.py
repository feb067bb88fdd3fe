"""Off-distribution inputs made from a shard's OWN rows, for quieting a component.

A component trained on its own classes only is unconstrained on inputs of other classes:
there its tangent term J(x)·Δ adds arbitrary evidence, and a composition sums those errors.
``--quiet W --negatives KIND`` adds W·mean‖J(x̃)·Δ‖² over inputs x̃ that belong to no class,
made here from the shard's own rows only (no other task's data, labels or components):

- ``rot``: each image turned by 90°, 180° or 270° (seeded per row);
- ``jigsaw``: each image cut into a 4×4 grid of tiles, the tiles shuffled;
- ``mix``: each image blended 50/50 with another row of the shard (another class where the
  shard has several);
- ``rot+jigsaw``: half of each.

These are "negative augmentations" (Sinha et al., ICLR 2021): transformations that keep
local statistics but leave the data distribution. Text and vector inputs: ``mix`` only
(text: two documents' words interleaved; vectors: blended).

The negatives are a pure function of (shard rows, kind, seed); their trunk features are
computed once (the trunk is frozen) and batches are drawn by their own seeded generator.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from training.data import Dataset
from training.errors import UsageError

KINDS = ("rot", "jigsaw", "mix", "rot+jigsaw")
IMAGE_ONLY = {"rot", "jigsaw", "rot+jigsaw"}
JIGSAW_GRID = 4


def check_kind(kind: str, input_kind: str) -> None:
    """Refuse a negative kind the data's inputs cannot take (exit 2 from the CLI)."""
    if kind not in KINDS:
        raise UsageError(f"unknown negatives {kind!r}; use one of {', '.join(KINDS)}")
    if kind in IMAGE_ONLY and input_kind != "image":
        raise UsageError(f"negatives {kind!r} need image inputs; use 'mix' for {input_kind} "
                         "inputs")


def make_negatives(ds: Dataset, kind: str, seed: int = 0) -> Dataset:
    """One negative row per shard row (labels -1: they belong to no class)."""
    check_kind(kind, ds.kind)
    rng = np.random.Generator(np.random.PCG64(seed))
    inputs: np.ndarray | list[np.ndarray] | list[str]
    if kind == "rot+jigsaw":
        half = len(ds) // 2
        a, b = _images(ds, "rot", rng)[:half], _images(ds, "jigsaw", rng)[half:]
        inputs = a + b
    elif ds.kind == "image":
        inputs = _images(ds, kind, rng)
    elif ds.kind == "text":
        inputs = _mixed_texts([str(text) for text in ds.inputs], rng)
    else:
        x = np.asarray(ds.inputs, dtype=np.float32)
        inputs = 0.5 * (x + x[_partners(ds.labels, rng)])
    if isinstance(ds.inputs, np.ndarray) and isinstance(inputs, list):
        inputs = np.stack(inputs)
    return replace(ds, inputs=inputs, labels=np.full(len(ds), -1, dtype=np.int64),
                   source=f"{ds.source} | negatives {kind} seed {seed}")


def _images(ds: Dataset, kind: str, rng: np.random.Generator) -> list[np.ndarray]:
    rows = [np.asarray(ds.inputs[i]) for i in range(len(ds))]  # [H, W] or [H, W, 3] uint8
    if kind == "rot":
        turns = rng.integers(1, 4, size=len(rows))
        return [np.ascontiguousarray(np.rot90(im, int(k))) for im, k in zip(rows, turns,
                                                                            strict=True)]
    if kind == "jigsaw":
        return [_jigsaw(im, rng) for im in rows]
    partners = _partners(ds.labels, rng)
    return [((im.astype(np.uint16) + rows[j].astype(np.uint16)) // 2).astype(np.uint8)
            if rows[j].shape == im.shape else im[::-1].copy()
            for im, j in zip(rows, partners, strict=True)]


def _jigsaw(im: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image's JIGSAW_GRID² tiles in a random order (edges that do not divide: kept)."""
    h, w = im.shape[0] // JIGSAW_GRID, im.shape[1] // JIGSAW_GRID
    out = im.copy()
    tiles = [im[r * h:(r + 1) * h, c * w:(c + 1) * w]
             for r in range(JIGSAW_GRID) for c in range(JIGSAW_GRID)]
    for slot, t in enumerate(rng.permutation(len(tiles))):
        r, c = divmod(slot, JIGSAW_GRID)
        out[r * h:(r + 1) * h, c * w:(c + 1) * w] = tiles[int(t)]
    return out


def _partners(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each row another row, of another class when the shard has several."""
    n = len(labels)
    partners = rng.permutation(n)
    classes = np.unique(labels)
    if classes.size < 2:
        return partners
    for i in np.flatnonzero(labels[partners] == labels):
        others = np.flatnonzero(labels != labels[i])
        partners[i] = others[rng.integers(others.size)]
    return partners


def _mixed_texts(texts: list[str], rng: np.random.Generator) -> list[str]:
    """Each document's words interleaved with another document's (a topic blend)."""
    partners = rng.permutation(len(texts))
    out = []
    for text, j in zip(texts, partners, strict=True):
        a, b = text.split(), texts[int(j)].split()
        words = [w for pair in zip(a, b, strict=False) for w in pair] or a or b
        out.append(" ".join(words))
    return out
