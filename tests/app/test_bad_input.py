"""Bad input gets a precise 4xx, loses nothing, and leaves the worker serving."""

from __future__ import annotations

import pytest
import torch

from tangent import encode_component
from tests.app.conftest import component_bytes, fresh_seed, random_delta
from tests.app.test_predict import predict, push

GOOD = {"inputs": [[0.1] * 64]}


@pytest.mark.parametrize("body, status, fragment", [
    (b"{not json", 422, "json"),
    (b'{"inputs": "x"}', 422, "inputs"),
    (b'{"inputs": []}', 400, "empty"),
    (b'{"inputs": [[1, 2, 3]]}', 422, "shape [3], expected [64]"),
    (b'{"inputs": [["a"]]}', 422, "not a numeric array"),
    (b'{"inputs": [[0.1]], "components": {"a": NaN}}', 422, "components"),
    (b'{"inputs": [[0.1]], "components": {"a": Infinity}}', 422, "components"),
    (b'{"inputs": [[0.1]], "components": 5}', 422, "components"),
    (b'{"inputs": [[0.1]], "components": "*", "composition": "x"}', 400, "not both"),
    (b'{"inputs": [[0.1]], "normalize": "max"}', 422, "normalize"),
    (b'{"inputs": [[0.1]], "surprise": 1}', 422, "surprise"),
    (b'{"inputs": [[0.1]], "top_k": 0}', 422, "top_k"),
])
def test_malformed_requests(client, body, status, fragment):
    r = client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert fragment.lower() in r.json()["error"].lower()
    assert client.post("/v1/predict", json=GOOD).status_code == 200  # still serving


def test_unknown_component_is_404_naming_it(client):
    r = client.post("/v1/predict", json={**GOOD, "components": {"nope": 1.0, "nada": 1.0}})
    assert r.status_code == 404
    assert "nope" in r.json()["error"] and "nada" in r.json()["error"]


def test_batch_over_the_limit(client):
    r = client.post("/v1/predict", json={"inputs": [[0.0] * 64] * 65})
    assert r.status_code == 400 and "limit of 64" in r.json()["error"]


def test_oversize_body_is_413(client):
    r = client.post("/v1/predict", content=b"[" + b"0," * (5 * 1024 * 1024) + b"0]",
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and "TMC_MAX_BODY_BYTES" in r.json()["error"]


def test_sum_normalization_of_weights_summing_to_zero(admin_client, client, tiny_base):
    push(admin_client, tiny_base, "p", fresh_seed())
    push(admin_client, tiny_base, "q", fresh_seed())
    r = client.post("/v1/predict", json={**GOOD, "components": {"p": 1, "q": -1},
                                         "normalize": "sum"})
    assert r.status_code == 422 and "sum" in r.json()["error"]


def _bad_components(base):
    good = random_delta(base, 1)
    name = next(iter(good))
    shape_bad = {**good, name: torch.zeros(3, 3)}
    nan_bad = {**good, name: torch.full(base.region[name].shape, float("nan"))}
    yield "wrong base", encode_component(good, "0" * 64), "made for base"
    yield "unknown name", encode_component({**good, "nope.weight": torch.zeros(2)},
                                           base.fingerprint), "nope.weight"
    yield "wrong shape", encode_component(shape_bad, base.fingerprint), "shape [3, 3]"
    yield "non-finite", encode_component(nan_bad, base.fingerprint), "nan"
    yield "not safetensors", b"\x00" * 64, "safetensors"
    valid = encode_component(good, base.fingerprint)
    yield "truncated", valid[: len(valid) // 2], "truncated"


def test_invalid_component_uploads_store_nothing(admin_client, client, tiny_base):
    before = admin_client.get("/v1/components").json()
    for what, data, fragment in _bad_components(tiny_base):
        r = admin_client.put("/v1/components/bad", content=data)
        assert r.status_code == 422, (what, r.text)
        assert fragment.lower() in r.json()["error"].lower(), (what, r.json())
    assert admin_client.get("/v1/components").json() == before
    assert admin_client.get("/v1/components/bad").status_code == 404


def test_bad_ids_and_empty_and_oversize_uploads(tiny_base_dir, tmp_path, tiny_base):
    import httpx

    from tests.app.conftest import ADMIN, live_server, settings_for

    settings = settings_for(tiny_base_dir, tmp_path / "r", max_component_bytes=4096)
    with live_server(settings) as url, httpx.Client(
            base_url=url, headers={"authorization": f"Bearer {ADMIN}"}) as c:
        data = component_bytes(tiny_base, 2, names=["classifier.bias"])
        assert c.put("/v1/components/Bad_Id", content=data).status_code == 400
        assert c.put("/v1/components/" + "a" * 65, content=data).status_code == 400
        assert c.put("/v1/components/ok", content=b"").status_code == 400
        big = component_bytes(tiny_base, 3)
        r = c.put("/v1/components/ok", content=big)
        assert r.status_code == 413 and "4096" in r.json()["error"]
        assert c.put("/v1/components/ok", content=data).status_code == 201
        assert c.get("/v1/components").json()["components"][0]["id"] == "ok"


def test_unknown_route_and_method_are_json_errors(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = client.delete("/v1/predict")
    assert r.status_code == 405 and "error" in r.json()


def test_predict_still_works_after_errors(admin_client, client, tiny_base):
    push(admin_client, tiny_base, "fine", fresh_seed())
    for _ in range(3):
        client.post("/v1/predict", json={**GOOD, "components": {"missing": 1.0}})
    assert predict(client, torch.randn(1, 64), components={"fine": 1.0})["outputs"]
