"""Logits to probabilities and top-k labels."""

from __future__ import annotations

import torch

from tangent import probabilities, top_k
from tests.tangent.numerics import assert_close


def test_probabilities(gen: torch.Generator) -> None:
    logits = (torch.randn(4, 7, generator=gen) * 5).to(torch.float16)
    p = probabilities(logits)
    assert p.dtype == torch.float32 and p.shape == (4, 7)
    assert_close(p.sum(-1), torch.ones(4), rtol=0, atol=1e-6)
    assert torch.equal(p.argmax(-1), logits.float().argmax(-1))


def test_top_k(gen: torch.Generator) -> None:
    labels = [f"c{i}" for i in range(5)]
    logits = torch.randn(3, 5, generator=gen)
    rows = top_k(logits, labels, 2)
    p = probabilities(logits)
    assert len(rows) == 3
    for row, probs in zip(rows, p, strict=True):
        assert len(row) == 2 and row[0][1] >= row[1][1]
        assert row[0][0] == labels[int(probs.argmax())]
        assert abs(row[0][1] - float(probs.max())) < 1e-7
    assert all(len(r) == 5 for r in top_k(logits, labels, 99))  # k clamps to the label count
