"""effnet-lite0: the ImageNet trunk gives meaningful features (cheap linear probe)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from bases import Base
from tests.bases.conftest import JIT_WARNING

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings(JIT_WARNING)]

FASHION = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist


def _fashion_test_split() -> tuple[np.ndarray, np.ndarray]:
    images, labels = FASHION / "t10k-images-idx3-ubyte.gz", FASHION / "t10k-labels-idx1-ubyte.gz"
    if not images.is_file() or not labels.is_file():
        pytest.fail(f"Fashion-MNIST not installed at {FASHION}: run `apt-get install "
                    "dataset-fashion-mnist` (or `make setup`, which installs it)", pytrace=False)
    with gzip.open(images) as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(labels) as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    return x, y


def test_trunk_features_separate_two_fashion_classes(effnet_base: Base, seed: int) -> None:
    x, y = _fashion_test_split()
    rng = np.random.default_rng(seed)
    a, b = effnet_base.labels.index("t-shirt/top"), effnet_base.labels.index("trouser")
    n = 40  # per class and split
    picks = [rng.choice(np.flatnonzero(y == c), 2 * n, replace=False) for c in (a, b)]
    pre = effnet_base.preprocessor
    with torch.no_grad():
        feats = [effnet_base.net.net[:-1](pre.collate(pre.decode_inputs(list(x[p])))).double()
                 for p in picks]  # [2n, 1280] each: everything but the classifier
    train = torch.cat([f[:n] for f in feats])
    test = torch.cat([f[n:] for f in feats])
    target = torch.cat([torch.ones(n), -torch.ones(n)]).double()
    mu, sd = train.mean(0), train.std(0) + 1e-6

    def design(f: torch.Tensor) -> torch.Tensor:
        return torch.cat([(f - mu) / sd, torch.ones(len(f), 1, dtype=f.dtype)], 1)

    z = design(train)
    w = torch.linalg.solve(z.T @ z + 10.0 * torch.eye(z.shape[1], dtype=z.dtype), z.T @ target)
    accuracy = float(((design(test) @ w).sign() == target).double().mean())
    assert accuracy >= 0.8, f"held-out accuracy {accuracy:.3f} (chance 0.5), seed={seed}"
