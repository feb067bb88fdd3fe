"""The text trunk (minilm) gives (hidden, mask) pairs of varying length: cached rows,
re-batched in another composition, give the tail output of batching them directly."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from bases import init_base, load_base, make_spec
from tests.training.conftest import JIT_WARNING
from training.data import Dataset
from training.features import InputEncoder, trunk_features

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings(JIT_WARNING)]
WORDS = ["market", "election", "goal", "film", "chip", "shares", "vote", "match",
         "actor", "software"]


def test_cached_text_features_rebatch_exactly(tmp_path_factory: pytest.TempPathFactory,
                                              seed: int) -> None:
    rnd = random.Random(seed)
    out = tmp_path_factory.mktemp("bases") / "minilm"
    init_base(out, make_spec("minilm", options={"max_tokens": 32}))
    base = load_base(out)
    texts = [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(1, 60))) for _ in range(9)]
    ds = Dataset("text", texts, np.zeros(9, dtype=np.int64), base.labels, "random",
                 np.arange(9))
    feats = trunk_features(base, ds, batch_size=4)
    lengths = feats.lengths
    assert lengths is not None and int(lengths.max()) <= 32 and int(lengths.min()) >= 3
    rows = np.array(rnd.sample(range(9), 5))
    direct = base.net.trunk_forward(InputEncoder(base).batch(ds, rows))
    cached = feats.take(rows)
    assert torch.equal(cached[1], direct[1])  # the same mask
    delta = base.net.random_delta(torch.Generator().manual_seed(seed % 2**31), scale=1e-3)
    torch.testing.assert_close(base.net.tail_forward(cached, delta),
                               base.net.tail_forward(direct, delta), rtol=1e-4, atol=1e-5)
