"""Tangent vectors as a small algebra over ``dict[str, Tensor]``.

A Delta maps tangent-region parameter names to tensors shaped like the parameter;
a missing name means zero. Composition always sums in a canonical order (sorted by
component digest) so that a composition never depends on arrival order, and
forgetting is a recomputation, never a subtraction.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from tangent.errors import CompositionError

Delta = dict[str, torch.Tensor]
Normalize = Literal["none", "sum", "mean"]
NORMALIZATIONS: tuple[Normalize, ...] = ("none", "sum", "mean")


@dataclass(frozen=True)
class Term:
    """One component in a composition: its version digest, its weight, its tangent."""

    digest: str
    weight: float
    delta: Mapping[str, torch.Tensor]


def effective_weights(weights: Sequence[float], normalize: Normalize) -> list[float]:
    """The weights actually applied after normalization."""
    if normalize not in NORMALIZATIONS:
        raise CompositionError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    for w in weights:
        if not math.isfinite(w):
            raise CompositionError(f"weights must be finite numbers, got {w!r}")
    if normalize == "none" or not weights:
        return list(weights)
    if normalize == "mean":
        return [w / len(weights) for w in weights]
    total = math.fsum(weights)
    if total == 0.0:
        raise CompositionError("normalize='sum' needs weights that do not sum to zero")
    return [w / total for w in weights]


def compose(terms: Sequence[Term], normalize: Normalize = "none") -> Delta:
    """Σ_k w_k Δ_k in float32, summed in digest order (bit-stable under reordering)."""
    # (digest, weight): the same digest may appear under several ids with different weights
    ordered = sorted(terms, key=lambda t: (t.digest, t.weight))
    weights = effective_weights([t.weight for t in ordered], normalize)
    out: Delta = {}
    for term, w in zip(ordered, weights, strict=True):
        for name, tensor in term.delta.items():
            if name in out:
                # in place; the product is rounded first (no FMA), so w and -w cancel exactly
                out[name].add_(tensor.to(torch.float32) * w)
            else:
                out[name] = tensor.to(torch.float32) * w  # a fresh tensor: inputs untouched
    return out


def composition_digest(pairs: Sequence[tuple[str, float]], normalize: Normalize) -> str:
    """sha256 over (component digest, weight) pairs in digest order, and the normalization."""
    canonical = sorted((d, float(w)) for d, w in pairs)
    payload = json.dumps({"terms": canonical, "normalize": normalize}, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def delta_nbytes(delta: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in delta.values())


def cast_delta(delta: Mapping[str, torch.Tensor], device: torch.device | str,
               dtype: torch.dtype) -> Delta:
    return {name: t.to(device=device, dtype=dtype) for name, t in delta.items()}
