"""Turn logits into what a client reads: probabilities and top-k labels."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    # logits: [B, C] -> [B, C]
    return torch.softmax(logits.to(torch.float32), dim=-1)


def top_k(logits: torch.Tensor, labels: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    """Per row, the k most probable (label, probability) pairs."""
    probs = probabilities(logits)  # [B, C]
    values, indices = probs.topk(min(k, probs.shape[-1]), dim=-1)  # [B, k]
    return [
        [(labels[i], float(v)) for v, i in zip(vrow.tolist(), irow.tolist(), strict=True)]
        for vrow, irow in zip(values, indices, strict=True)
    ]
