"""Open Inference Protocol with a stock client (tritonclient), ops endpoints, metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.app.conftest import fresh_seed
from tests.app.test_predict import logits, predict, push


def test_v2_metadata_and_health(client, tiny_base):
    assert client.get("/v2").json()["name"] == "tmc"
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").json() == {"ready": True}
    meta = client.get(f"/v2/models/{tiny_base.spec.name}").json()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert meta["outputs"][0] == {"name": "logits", "datatype": "FP32", "shape": [-1, 10]}
    assert client.get(f"/v2/models/{tiny_base.spec.name}/ready").json()["ready"] is True
    r = client.get("/v2/models/other")
    assert r.status_code == 404 and "tiny-mlp" in r.json()["error"]


def test_v2_infer_equals_native(admin_client, client, tiny_base):
    push(admin_client, tiny_base, "a", fresh_seed())
    push(admin_client, tiny_base, "b", fresh_seed())
    x = torch.randn(3, 64)
    native = logits(predict(client, x, components={"a": 0.5, "b": 0.5}))
    body = {"inputs": [{"name": "input", "shape": [3, 64], "datatype": "FP32",
                        "data": x.flatten().tolist()}],
            "parameters": {"tmc_components": "a:0.5,b:0.5"}}
    r = client.post(f"/v2/models/{tiny_base.spec.name}/infer", json=body)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    got = torch.tensor(out["logits"]["data"]).view(out["logits"]["shape"])
    torch.testing.assert_close(got, native, rtol=1e-6, atol=1e-6)
    params = r.json()["parameters"]
    assert params["tmc_components"].startswith("a@") and params["tmc_generation"] >= 2


@pytest.mark.parametrize("params, fragment", [
    ({"tmc_components": "a:x"}, "not a number"),
    ({"tmc_components": "a:nan"}, "finite"),
    ({"tmc_components": "a:1", "tmc_composition": "n"}, "not both"),
    ({"tmc_normalize": "max"}, "tmc_normalize"),
    ({"tmc_components": "zzz:1"}, "zzz"),
])
def test_v2_bad_parameters(client, tiny_base, params, fragment):
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                        "data": [0.0] * 64}], "parameters": params}
    r = client.post(f"/v2/models/{tiny_base.spec.name}/infer", json=body)
    assert 400 <= r.status_code < 500 and fragment in r.json()["error"], r.text


def test_stock_triton_client_works_unchanged(admin_client, client, server, tiny_base):
    import tritonclient.http as httpclient

    push(admin_client, tiny_base, "t", fresh_seed())
    x = np.random.default_rng(fresh_seed()).standard_normal((2, 64)).astype(np.float32)
    native = logits(predict(client, torch.from_numpy(x), components={"t": 1.0}))
    tc = httpclient.InferenceServerClient(url=server.removeprefix("http://"))
    try:
        assert tc.is_server_live() and tc.is_server_ready()
        assert tc.is_model_ready(tiny_base.spec.name)
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = tc.infer(tiny_base.spec.name, [inp], parameters={"tmc_components": "t:1"})
        np.testing.assert_allclose(result.as_numpy("logits"), native.numpy(), rtol=1e-6,
                                   atol=1e-6)
    finally:
        tc.close()


def test_metrics_parse_as_prometheus_text(admin_client, client, tiny_base):
    push(admin_client, tiny_base, "m", fresh_seed())
    predict(client, torch.randn(2, 64), components={"m": 1.0})
    admin_client.delete("/v1/components/m")
    text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("tmc_requests", "tmc_request_duration_seconds", "tmc_batch_size",
                 "tmc_forward_duration_seconds", "tmc_trunk_duration_seconds", "tmc_forgets",
                 "tmc_queue_wait_seconds",
                 "tmc_registry_generation"):
        assert name in families, name
    assert "tmc_build_info" in text and tiny_base.fingerprint in text
    assert all(s.name.startswith("tmc_") for f in families.values() for s in f.samples)
    assert not any(s.name.endswith("_created") for f in families.values() for s in f.samples)
    labels = {k for f in families.values() for s in f.samples for k in s.labels}
    assert labels <= {"route", "status", "kind", "cache", "reason", "le", "base",
                      "base_fingerprint", "device", "version"}
    forgets = [s.value for s in families["tmc_forgets"].samples if s.name == "tmc_forgets_total"]
    assert forgets == [1.0]


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "live"}
    ready = client.get("/readyz").json()
    assert ready["ready"] is True and ready["warm_forward"] is True and ready["registry"] is True


def _rejected(client, reason: str) -> float:
    from tests.app.conftest import metric_sample

    return metric_sample(client, "tmc_rejected_requests_total", reason=reason)


def test_requests_refused_before_the_device_are_counted_by_reason(client, server):
    """tmc_rejected_requests_total (alerted on and charted) moves when a request is refused."""
    big = b"[" + b"0," * (5 << 20) + b"0]"  # over the 8 MiB default body limit
    r = client.post("/v1/predict", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert _rejected(client, "body_too_large") == 1.0


def test_an_overloaded_refusal_is_counted(tiny_base_dir, tmp_path):
    """A draining replica refuses with 503 (OverloadedError): counted as "overloaded"."""

    import httpx
    import uvicorn

    from app.main import create_app
    from app.service import Service
    from tests.app.conftest import free_port, settings_for, uvicorn_in_thread

    settings = settings_for(tiny_base_dir, tmp_path / "reg")
    service = Service.build(settings)
    port = free_port()
    config = uvicorn.Config(create_app(settings, service), host="127.0.0.1", port=port,
                            log_level="warning", lifespan="on")
    with uvicorn_in_thread(config), \
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
        service.draining = True  # as on SIGTERM: new requests go to another replica
        r = c.post("/v1/predict", json={"inputs": [[0.0] * 64], "components": {}})
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert _rejected(c, "overloaded") == 1.0
