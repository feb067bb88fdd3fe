"""Weights are bounded JSON numbers, outputs are never inf/NaN, malformed V2 input is a 4xx.

Every refused admin request leaves the registry exactly as it was.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import struct
from pathlib import Path

import httpx
import pytest
import torch

from registry.validate import MAX_WEIGHT
from tangent import encode_component
from tests.app.conftest import (
    ADMIN,
    fresh_seed,
    live_server,
    random_delta,
    settings_for,
)
from tests.app.test_predict import logits, predict, push

X = [[0.1] * 64]


def v2_url(base) -> str:  # noqa: ANN001
    return f"/v2/models/{base.spec.name}/infer"


def v2_body(params: dict | None = None, rows: int = 1) -> dict:
    body: dict = {"inputs": [{"name": "input", "shape": [rows, 64], "datatype": "FP32",
                              "data": [0.1] * (64 * rows)}]}
    if params is not None:
        body["parameters"] = params
    return body


def snapshot(admin: httpx.Client) -> dict:
    """Everything the admin API can see of the registry, generation included."""
    comps = admin.get("/v1/components")
    names = admin.get("/v1/compositions")
    assert comps.status_code == 200 and names.status_code == 200
    return {"components": comps.json(), "compositions": names.json()}


def huge_component(base, scale: float = 1e37) -> bytes:  # noqa: ANN001
    """A valid component (finite float32 values) whose Δ overflows once weighted."""
    delta = random_delta(base, fresh_seed(), scale=scale)
    assert all(bool(torch.isfinite(t).all()) for t in delta.values())
    return encode_component(delta, base.fingerprint, {"data": "huge"})


def assert_error(r: httpx.Response, status: int | tuple[int, ...], *fragments: str) -> None:
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.status_code in statuses, r.text
    message = r.json()["error"]
    for fragment in fragments:
        assert fragment.lower() in message.lower(), message


# -- 1. weights are bounded: |w| ≤ MAX_WEIGHT ---------------------------------------------

def test_max_weight_is_one_million():
    assert MAX_WEIGHT == 1e6


@pytest.mark.parametrize("weight", [1e38, -1e38, 1e6 * (1 + 1e-9), -2e6, 10**40])
def test_native_weight_beyond_max_is_422(admin_client, client, tiny_base, weight):
    push(admin_client, tiny_base, "a", fresh_seed())
    r = client.post("/v1/predict", json={"inputs": X, "components": {"a": weight}})
    assert_error(r, 422, "components", "MAX_WEIGHT")
    assert client.post("/v1/predict", json={"inputs": X, "components": {"a": 1.0}}
                       ).status_code == 200


def test_native_weight_at_max_is_served(admin_client, client, tiny_base):
    push(admin_client, tiny_base, "a", fresh_seed())
    for w in (MAX_WEIGHT, -MAX_WEIGHT):
        out = predict(client, torch.tensor(X), components={"a": w})
        assert all(math.isfinite(v) for v in out["outputs"][0]["logits"])


@pytest.mark.parametrize("spec", ["a:1e38", "a:-1e38", "a:1000001", "a:1e6,a2:2e6"])
def test_v2_weight_beyond_max_is_400_not_500(admin_client, client, tiny_base, spec):
    push(admin_client, tiny_base, "a", fresh_seed())
    push(admin_client, tiny_base, "a2", fresh_seed())
    r = client.post(v2_url(tiny_base), json=v2_body({"tmc_components": spec}))
    assert_error(r, 400, "tmc_components", "MAX_WEIGHT")
    ok = client.post(v2_url(tiny_base), json=v2_body({"tmc_components": "a:1e6"}))
    assert ok.status_code == 200, ok.text


def test_admin_weight_beyond_max_is_refused_and_changes_nothing(admin_client, client,
                                                                tiny_base):
    push(admin_client, tiny_base, "a", fresh_seed())
    before = snapshot(admin_client)
    r = admin_client.patch("/v1/components/a", json={"weight": 1e38})
    assert_error(r, 422, "weight", "MAX_WEIGHT")
    r = admin_client.put("/v1/components/b", content=huge_component(tiny_base, 0.1),
                         params={"weight": "1e38"})
    assert_error(r, 422, "weight", "MAX_WEIGHT")
    r = admin_client.put("/v1/compositions/n", json={"weights": {"a": -1e38}})
    assert_error(r, 422, "weights", "MAX_WEIGHT")
    assert snapshot(admin_client) == before
    # the refused PATCH did not poison "*": all active components still answer finitely
    out = predict(client, torch.tensor(X), components="*")
    assert all(math.isfinite(v) for v in out["outputs"][0]["logits"])
    assert admin_client.patch("/v1/components/a", json={"weight": -1e6}).status_code == 200


# -- 2. weights and expected_generation are JSON numbers, strictly -------------------------

@pytest.mark.parametrize("weight", ["0.5", True, False, None, [1]])
def test_native_non_number_weight_is_422(admin_client, client, tiny_base, weight):
    push(admin_client, tiny_base, "a", fresh_seed())
    r = client.post("/v1/predict", json={"inputs": X, "components": {"a": weight}})
    assert_error(r, 422, "components")


@pytest.mark.parametrize("body, field", [
    ({"weight": "0.5"}, "weight"),
    ({"weight": True}, "weight"),
    ({"weight": False}, "weight"),
])
def test_patch_non_number_weight_is_422_and_changes_nothing(admin_client, tiny_base, body,
                                                            field):
    push(admin_client, tiny_base, "a", fresh_seed())
    before = snapshot(admin_client)
    assert_error(admin_client.patch("/v1/components/a", json=body), 422, field)
    assert snapshot(admin_client) == before


@pytest.mark.parametrize("body, field", [
    ({"weights": {"a": "0.5"}}, "weights"),
    ({"weights": {"a": True}}, "weights"),
    ({"weights": {"a": 1.0}, "expected_generation": False}, "expected_generation"),
    ({"weights": {"a": 1.0}, "expected_generation": True}, "expected_generation"),
    ({"weights": {"a": 1.0}, "expected_generation": "0"}, "expected_generation"),
    ({"weights": {"a": 1.0}, "expected_generation": 0.0}, "expected_generation"),
    ({"weights": {"a": 1.0}, "expected_generation": -1}, "expected_generation"),
])
def test_put_composition_non_numbers_are_422_and_change_nothing(admin_client, tiny_base,
                                                                body, field):
    push(admin_client, tiny_base, "a", fresh_seed())
    before = snapshot(admin_client)
    assert_error(admin_client.put("/v1/compositions/n", json=body), 422, field)
    assert snapshot(admin_client) == before
    assert admin_client.get("/v1/compositions/n").status_code == 404
    ok = admin_client.put("/v1/compositions/n", json={"weights": {"a": 1},
                                                      "expected_generation": 0})
    assert ok.status_code == 200, ok.text


# -- 3. an output that overflows is refused, for that request only -------------------------

def test_overflowing_composition_is_422_not_null_logits(admin_client, client, tiny_base):
    r = admin_client.put("/v1/components/huge", content=huge_component(tiny_base),
                         params={"weight": MAX_WEIGHT})
    assert r.status_code == 201, r.text
    for explain in (False, True):
        r = client.post("/v1/predict", json={"inputs": X, "components": {"huge": 1e6},
                                             "explain": explain})
        assert_error(r, 422, "not finite", "lower the weights")
    r = client.post("/v1/predict", json={"inputs": X, "components": "*"})
    assert_error(r, 422, "not finite")
    r = client.post(v2_url(tiny_base), json=v2_body({"tmc_components": "huge:1e6"}))
    assert_error(r, 422, "not finite")
    assert client.post("/v1/predict", json={"inputs": X}).status_code == 200


def test_an_overflowing_request_does_not_affect_its_batch_mates(tiny_base_dir, tiny_base,
                                                                 tmp_path: Path):
    # a long queue delay so that concurrent requests share device batches
    settings = settings_for(tiny_base_dir, tmp_path / "registry", max_queue_delay_ms=100.0)
    with live_server(settings) as url, httpx.Client(
            base_url=url, headers={"authorization": f"Bearer {ADMIN}"}, timeout=30) as c:
        push(c, tiny_base, "fine", fresh_seed())
        assert c.put("/v1/components/huge", content=huge_component(tiny_base)
                     ).status_code == 201
        x = torch.randn(2, 64)
        expected = logits(predict(c, x, components={"fine": 0.5}))

        def call(bad: bool) -> httpx.Response:
            comps = {"huge": 1e6} if bad else {"fine": 0.5}
            return c.post("/v1/predict", json={"inputs": x.tolist(), "components": comps})

        with cf.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(call, [i % 2 == 0 for i in range(16)]))
        for i, r in enumerate(results):
            if i % 2 == 0:
                assert_error(r, 422, "not finite")
            else:
                assert r.status_code == 200, r.text
                torch.testing.assert_close(logits(r.json()), expected, rtol=1e-6, atol=1e-6)


# -- 4. malformed V2 input is a 4xx with a message, never a 500 ---------------------------

def binary_request(client: httpx.Client, base, header: dict, blob: bytes,  # noqa: ANN001
                   length: str | None = None) -> httpx.Response:
    head = json.dumps(header).encode()
    return client.post(v2_url(base), content=head + blob, headers={
        "content-type": "application/octet-stream",
        "inference-header-content-length": length if length is not None else str(len(head))})


def binary_input(shape: list[int], datatype: str, size: int) -> dict:
    return {"inputs": [{"name": "input", "shape": shape, "datatype": datatype,
                        "parameters": {"binary_data_size": size}}]}


@pytest.mark.parametrize("depth", [10_000, 100_000])
def test_v2_deeply_nested_json_is_400(client, tiny_base, depth):
    body = ('{"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": '
            + "[" * depth + "0" + "]" * depth + "}]}")
    r = client.post(v2_url(tiny_base), content=body,
                    headers={"content-type": "application/json"})
    assert_error(r, 400, "nested too deeply")
    assert client.post(v2_url(tiny_base), json=v2_body()).status_code == 200


def test_v2_a_body_of_5000_digits_is_400_not_500(client, tiny_base):
    """json refuses integers over 4,300 digits with a plain ValueError (not JSONDecodeError)."""
    r = client.post(v2_url(tiny_base), content="1" * 5000,
                    headers={"content-type": "application/json"})
    assert_error(r, 400, "not valid JSON")
    assert client.post(v2_url(tiny_base), json=v2_body()).status_code == 200


def test_v2_nested_data_within_the_parser_limit_is_a_4xx(client, tiny_base):
    for depth in (40, 500, 900):
        body = ('{"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": '
                + "[" * depth + "0" + "]" * depth + "}]}")
        r = client.post(v2_url(tiny_base), content=body,
                        headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500 and "nested" in r.json()["error"], (depth, r.text)


def test_v2_binary_fp32_payload_not_a_multiple_of_4_is_400(client, tiny_base):
    r = binary_request(client, tiny_base, binary_input([1, 64], "FP32", 7), b"\0" * 7)
    assert_error(r, 400, "7 bytes", "multiple")


def test_v2_binary_negative_shape_is_400(client, tiny_base):
    r = binary_request(client, tiny_base, binary_input([-1, -64], "FP32", 256), b"\0" * 256)
    assert_error(r, 400, "shape", "[-1, -64]")
    good = torch.zeros(1, 64).numpy().astype("<f4").tobytes()
    r = binary_request(client, tiny_base, binary_input([1, 64], "FP32", 256), good)
    assert r.status_code == 200, r.text


def test_v2_bytes_element_longer_than_the_payload_is_400(client, tiny_base):
    blob = struct.pack("<I", 10**6) + b"hello"
    r = binary_request(client, tiny_base, binary_input([1], "BYTES", len(blob)), blob)
    assert_error(r, 400, "truncated", "1000000")


@pytest.mark.parametrize("length", [b"\xb2", b"9" * 5000, b"-1", b"1e3", b""])
def test_v2_bad_header_length_is_400(client, tiny_base, length):
    # b"\xb2" is latin-1 '²', for which str.isdigit() is True; 5000 digits exceed int()'s
    # default limit of 4300 digits
    head = json.dumps(v2_body()).encode()
    r = client.post(v2_url(tiny_base), content=head, headers=[
        (b"content-type", b"application/json"),
        (b"inference-header-content-length", length)])
    assert_error(r, 400, "Inference-Header-Content-Length")


@pytest.mark.parametrize("body, fragment", [
    ({"inputs": 5}, "inputs"),
    ({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                  "data": [0.1] * 64, "parameters": [1]}]}, "parameters"),
    ({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                  "data": [10**400] + [0] * 63}]}, "input"),
])
def test_v2_malformed_structures_are_4xx(client, tiny_base, body, fragment):
    r = client.post(v2_url(tiny_base), content=json.dumps(body),
                    headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    assert fragment in r.json()["error"], r.text


# -- the registry is the one choke point every weight passes (API, CLI, Python callers) ----

def test_registry_refuses_weights_beyond_max(tiny_base, tmp_path: Path):
    import registry as reg

    with reg.open_registry(registry_dir=tmp_path / "r", redis_url=None,
                           base_fingerprint=tiny_base.fingerprint, region=tiny_base.region,
                           max_component_bytes=1 << 20, cache_dir=None) as r:
        data = huge_component(tiny_base, 0.1)
        for bad in (1e38, -1e38, 2e6, 10**400, True, "0.5"):
            with pytest.raises(reg.InvalidRequestError):
                r.add("a", data, weight=bad)  # type: ignore[arg-type]
        assert r.list() == [] and r.generation() == 0
        r.add("a", data, weight=MAX_WEIGHT)
        generation = r.generation()
        for call in (lambda: r.update("a", weight=1e38),
                     lambda: r.reweight("a", -2e6),
                     lambda: r.put_composition("n", {"a": 1e38}),
                     lambda: r.resolve_explicit({"a": 1e7})):
            with pytest.raises(reg.InvalidRequestError, match="MAX_WEIGHT"):
                call()
        assert r.generation() == generation and r.get("a").weight == MAX_WEIGHT
        assert r.list_compositions() == []
