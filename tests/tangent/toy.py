"""Small randomly initialised networks of named stages, for the tangent math tests."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


def _randomize(net: nn.Module, gen: torch.Generator, dtype: torch.dtype) -> nn.Module:
    """Fresh parameters and BatchNorm statistics drawn from gen (no zeros, no ones)."""
    net.to(dtype)
    with torch.no_grad():
        for name, p in net.named_parameters():
            fan_in = p[0].numel() if p.dim() > 1 else p.numel()
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) / math.sqrt(fan_in))
            if name.endswith("bias"):
                p.mul_(0.3)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen, dtype=dtype) * .1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen, dtype=dtype) + .5)
                m.weight.add_(1.0)
    return net


def mlp(gen: torch.Generator, dtype: torch.dtype = torch.float32, d: int = 12, h: int = 20,
        c: int = 5) -> nn.Sequential:
    """Stages inp, mid, out (tanh MLP): smooth everywhere. Input [B, d]."""
    net = nn.Sequential(OrderedDict([
        ("inp", nn.Sequential(nn.Linear(d, h), nn.Tanh())),
        ("mid", nn.Sequential(nn.Linear(h, h), nn.Tanh())),
        ("out", nn.Linear(h, c)),
    ]))
    return _randomize(net, gen, dtype)  # type: ignore[return-value]


class Pool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))  # [B, C, H, W] -> [B, C]


def convnet(gen: torch.Generator, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """Stages stem, block (depthwise+pointwise), head, classifier: conv/BN(eval)/ReLU6 like
    EfficientNet. Input [B, 3, 12, 12]."""
    net = nn.Sequential(OrderedDict([
        ("stem", nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),
                               nn.BatchNorm2d(8), nn.ReLU6())),
        ("block", nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
                                nn.BatchNorm2d(8), nn.ReLU6(),
                                nn.Conv2d(8, 12, 1, bias=False), nn.BatchNorm2d(12))),
        ("head", nn.Sequential(nn.Conv2d(12, 16, 1, bias=False), nn.BatchNorm2d(16),
                               nn.ReLU6(), Pool())),
        ("classifier", nn.Linear(16, 4)),
    ]))
    return _randomize(net, gen, dtype)  # type: ignore[return-value]


class SDPAStage(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention. [B, T, D] -> [B, T, D].

    With 4-d [B, H, T, d] inputs torch 2.13 on CPU picks the fused flash kernel
    (_scaled_dot_product_flash_attention_for_cpu), which has no forward-mode AD; 3-d inputs
    would take the math path and work."""

    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for z in self.qkv(x).chunk(3, dim=-1))  # [B, H, T, d/H]
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)


class MeanTokens(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)  # [B, T, D] -> [B, D]


def sdpa_net(gen: torch.Generator, dim: int = 8) -> nn.Sequential:
    """Stages embed, attn (fused SDPA), pool, classifier. Input [B, T, dim]."""
    net = nn.Sequential(OrderedDict([
        ("embed", nn.Linear(dim, dim)),
        ("attn", SDPAStage(dim)),
        ("pool", MeanTokens()),
        ("classifier", nn.Linear(dim, 3)),
    ]))
    return _randomize(net, gen, torch.float32)  # type: ignore[return-value]


class DoubleNoJvp(torch.autograd.Function):
    """x -> 2x with a backward but no jvp: forward-mode AD cannot go through it."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x * 2

    @staticmethod
    def setup_context(ctx: object, inputs: object, output: object) -> None:
        pass

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad * 2


class NoJvpStage(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = DoubleNoJvp.apply(x)
        return out


def custom_function_net(gen: torch.Generator) -> nn.Sequential:
    """Stages inp, nojvp (custom autograd.Function without jvp), out. Input [B, 6]."""
    net = nn.Sequential(OrderedDict([
        ("inp", nn.Linear(6, 6)), ("nojvp", NoJvpStage()), ("out", nn.Linear(6, 2))]))
    return _randomize(net, gen, torch.float32)  # type: ignore[return-value]
