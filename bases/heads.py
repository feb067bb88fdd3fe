"""The seeded linear head every pretrained preset puts on its trunk."""

from __future__ import annotations

import torch
from torch import nn


def reset_head(net: nn.Sequential, seed: int) -> nn.Linear:
    """Re-initialise ``net``'s ``classifier`` stage (torch's default init) from ``seed``,
    leaving the global random state as it was; returns that stage."""
    head = net.get_submodule("classifier")
    if not isinstance(head, nn.Linear):
        raise TypeError(f"the classifier stage is a {type(head).__name__}, not nn.Linear")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head.reset_parameters()
    return head
