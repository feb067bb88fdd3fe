"""Factories for the generic preset (options.factory = "tests.bases.factories:<name>")."""

from __future__ import annotations

import torch
from torch import nn

from tests.tangent import toy


def sdpa_net(dim: int = 8) -> nn.Sequential:
    """embed, attn (fused scaled_dot_product_attention), pool, classifier; input [T, dim]."""
    return toy.sdpa_net(torch.Generator().manual_seed(0), dim)


def mlp(d: int = 12) -> nn.Sequential:
    """inp, mid, out (tanh MLP); input [d]."""
    return toy.mlp(torch.Generator().manual_seed(0), d=d)


def not_sequential() -> nn.Module:
    return nn.Linear(2, 2)
