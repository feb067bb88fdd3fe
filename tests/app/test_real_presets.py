"""The service on real backbones: EfficientNet-Lite0 images and MiniLM text."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from bases import init_base, load_base, make_spec
from tangent import Term, compose, encode_component
from tests.app.conftest import ADMIN, fresh_seed, live_server, random_delta, settings_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def effnet(tmp_path_factory):
    out = tmp_path_factory.mktemp("effnet") / "base"
    init_base(out, make_spec("effnet-lite0", options={"image_size": 32}))
    base = load_base(out)
    with live_server(settings_for(out, out.parent / "registry")) as url:
        yield base, url


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm") / "base"
    init_base(out, make_spec("minilm", options={"max_chars": 200}))
    base = load_base(out)
    with live_server(settings_for(out, out.parent / "registry")) as url:
        yield base, url


def png_b64(pixels: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_effnet_png_prediction_equals_offline(effnet):
    base, url = effnet
    seed = fresh_seed()
    delta = random_delta(base, seed, scale=0.01)
    pixels = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
    with httpx.Client(base_url=url, timeout=60,
                      headers={"authorization": f"Bearer {ADMIN}"}) as c:
        r = c.put("/v1/components/img", content=encode_component(delta, base.fingerprint))
        assert r.status_code == 201, r.text
        out = c.post("/v1/predict", json={"inputs": [png_b64(pixels), pixels.tolist()],
                                          "components": {"img": 1.0}})
        assert out.status_code == 200, out.text
        got = torch.tensor([o["logits"] for o in out.json()["outputs"]])
        x = base.preprocessor.collate(base.preprocessor.decode_inputs([pixels.tolist()]))
        want = base.net.forward(x, compose([Term("d", 1.0, delta)]))
        torch.testing.assert_close(got, want.expand(2, -1), rtol=1e-4, atol=1e-5)
        bad = c.post("/v1/predict", json={"inputs": [base64.b64encode(b"not an image").decode()]})
        assert bad.status_code == 422 and "could not be decoded" in bad.json()["error"]
        bad = c.post("/v1/predict", json={"inputs": ["%%%"]})
        assert bad.status_code == 422 and "base64" in bad.json()["error"]
        bad = c.post("/v1/predict", json={"inputs": [[[300] * 4] * 4]})
        assert bad.status_code == 422 and "0-255" in bad.json()["error"]


def test_minilm_text_predictions_native_and_v2(minilm):
    base, url = minilm
    texts = ["Shares rose after the bank raised its forecast.", "The striker scored twice."]
    delta = random_delta(base, fresh_seed(), scale=0.01)
    with httpx.Client(base_url=url, timeout=60,
                      headers={"authorization": f"Bearer {ADMIN}"}) as c:
        assert c.put("/v1/components/txt",
                     content=encode_component(delta, base.fingerprint)).status_code == 201
        native = c.post("/v1/predict", json={"inputs": texts, "components": {"txt": 1.0}})
        assert native.status_code == 200, native.text
        got = torch.tensor([o["logits"] for o in native.json()["outputs"]])
        x = base.preprocessor.collate(base.preprocessor.decode_inputs(texts))
        want = base.net.forward(x, compose([Term("d", 1.0, delta)]))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        v2 = c.post(f"/v2/models/{base.spec.name}/infer", json={
            "inputs": [{"name": "input", "shape": [2], "datatype": "BYTES", "data": texts}],
            "parameters": {"tmc_components": "txt:1"}})
        assert v2.status_code == 200, v2.text
        logits = next(o for o in v2.json()["outputs"] if o["name"] == "logits")
        torch.testing.assert_close(torch.tensor(logits["data"]).view(2, -1), got)
        long = c.post("/v1/predict", json={"inputs": ["x" * 201]})
        assert long.status_code == 422 and "over the limit of 200" in long.json()["error"]
        wrong = c.post("/v1/predict", json={"inputs": [[1.0, 2.0]]})
        assert wrong.status_code == 422 and "text string" in wrong.json()["error"]
