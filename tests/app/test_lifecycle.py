"""Admin lifecycle through real HTTP: add, reweight, forget exactly; auth default-deny."""

from __future__ import annotations

import httpx
import torch

from tests.app.conftest import ADMIN, component_bytes, fresh_seed, live_server, settings_for
from tests.app.test_predict import logits, predict, push


def test_add_predict_reweight_forget_returns_never_had_it_output(admin_client, client,
                                                                  tiny_base):
    x = torch.randn(3, 64)
    push(admin_client, tiny_base, "keep", fresh_seed())
    never_had_it = logits(predict(client, x, components="*"))
    push(admin_client, tiny_base, "gone", fresh_seed())
    with_both = logits(predict(client, x, components="*"))
    assert not torch.equal(with_both, never_had_it)

    r = admin_client.patch("/v1/components/gone", json={"weight": 3.0})
    assert r.status_code == 200 and r.json()["weight"] == 3.0
    reweighted = predict(client, x, components="*")
    assert {c["id"]: c["weight"] for c in reweighted["provenance"]["components"]}["gone"] == 3.0

    receipt = admin_client.delete("/v1/components/gone").json()
    assert receipt["id"] == "gone" and len(receipt["digests_removed"]) == 1
    after = predict(client, x, components="*")
    assert [c["id"] for c in after["provenance"]["components"]] == ["keep"]
    assert after["provenance"]["generation"] >= receipt["generation"]
    assert torch.equal(logits(after), never_had_it)  # bit for bit
    r = client.post("/v1/predict", json={"inputs": x.tolist(), "components": {"gone": 1.0}})
    assert r.status_code == 404 and "gone" in r.json()["error"]


def test_readd_after_forget_is_a_new_registration(admin_client, client, tiny_base):
    seed = fresh_seed()
    first = push(admin_client, tiny_base, "again", seed)
    admin_client.delete("/v1/components/again")
    assert admin_client.get("/v1/components/again").status_code == 404
    second = push(admin_client, tiny_base, "again", seed)
    assert second["digest"] == first["digest"] and second["generation"] > first["generation"]
    x = torch.randn(2, 64)
    assert predict(client, x, components={"again": 1.0})["provenance"]["generation"] == \
        second["generation"]


def test_admin_api_denies_by_default(tiny_base_dir, tmp_path, tiny_base):
    settings = settings_for(tiny_base_dir, tmp_path / "r", admin_token=None)
    with live_server(settings) as url, httpx.Client(base_url=url) as c:
        r = c.get("/v1/components", headers={"authorization": "Bearer whatever-token-123"})
        assert r.status_code == 403 and "TMC_ADMIN_TOKEN" in r.json()["error"]
        r = c.put("/v1/components/x", content=component_bytes(tiny_base, 1))
        assert r.status_code == 403


def test_admin_token_checks(client, tiny_base):
    assert client.get("/v1/components").status_code == 401
    r = client.get("/v1/components", headers={"authorization": "Bearer wrong-token-xxxxxxxx"})
    assert r.status_code == 401 and r.json() == {"error": "invalid admin token"}
    ok = client.get("/v1/components", headers={"authorization": f"Bearer {ADMIN}"})
    assert ok.status_code == 200


def test_inference_token_when_configured(tiny_base_dir, tmp_path):
    settings = settings_for(tiny_base_dir, tmp_path / "r", inference_token="infer-token-0123456")
    with live_server(settings) as url, httpx.Client(base_url=url) as c:
        body = {"inputs": [[0.0] * 64]}
        assert c.post("/v1/predict", json=body).status_code == 401
        r = c.post("/v1/predict", json=body,
                   headers={"authorization": "Bearer infer-token-0123456"})
        assert r.status_code == 200
        # the admin token is not an inference token, and vice versa
        r = c.get("/v1/components", headers={"authorization": "Bearer infer-token-0123456"})
        assert r.status_code == 401


def test_named_composition_with_compare_and_set(admin_client, client, tiny_base):
    push(admin_client, tiny_base, "n1", fresh_seed())
    push(admin_client, tiny_base, "n2", fresh_seed())
    r = admin_client.put("/v1/compositions/prod", json={"weights": {"n1": 1.0, "n2": 1.0},
                                                         "normalize": "mean"})
    assert r.status_code == 200, r.text
    gen = r.json()["generation"]
    x = torch.randn(2, 64)
    named = predict(client, x, composition="prod")
    explicit = predict(client, x, components={"n1": 0.5, "n2": 0.5})
    assert torch.equal(logits(named), logits(explicit))
    stale = admin_client.put("/v1/compositions/prod", json={
        "weights": {"n1": 1.0}, "expected_generation": gen - 1})
    assert stale.status_code == 409
    ok = admin_client.put("/v1/compositions/prod", json={
        "weights": {"n1": 1.0}, "expected_generation": gen})
    assert ok.status_code == 200
    assert admin_client.delete("/v1/compositions/prod").status_code == 200
    assert client.post("/v1/predict", json={"inputs": x.tolist(),
                                            "composition": "prod"}).status_code == 404


def test_torch_threads_setting_applies_on_the_device_thread(tiny_base_dir, tmp_path):
    import pydantic
    import pytest

    from app.service import Service

    svc = Service.build(settings_for(tiny_base_dir, tmp_path / "r", torch_threads=1))
    svc.start()
    try:
        assert svc.intra_op_threads() == 1
    finally:
        svc.worker.stop(5.0)
        svc.registry.close()
    with pytest.raises(pydantic.ValidationError, match="torch_threads"):
        settings_for(tiny_base_dir, tmp_path / "r", torch_threads=0)


def test_a_request_whose_pinned_version_is_forgotten_before_it_runs_is_resolved_again(
        tiny_base_dir, tmp_path, tiny_base):
    """Replica B pinned a plan with `victim`; replica A's DELETE removed its bytes before B's
    device loaded them. B must not answer 404 'no component version' to a request for "*":
    it resolves again (now without victim) and answers like a registry that never had it —
    and a request that names victim gets the 404 that names it."""
    import asyncio

    import pytest

    import registry as reg
    from app.composition import AllActive, Explicit
    from app.service import Service

    svc = Service.build(settings_for(tiny_base_dir, tmp_path / "r"))
    svc.start()
    try:
        for cid in ("keep", "victim"):
            svc.registry.add(cid, component_bytes(tiny_base, fresh_seed()))
        x = torch.randn(3, 64).tolist()
        resolve = svc.resolve
        stale = {str(spec): resolve(spec, None) for spec in (AllActive(),
                                                              Explicit({"victim": 1.0}))}
        svc.forget("victim")
        served_stale: list[str] = []

        def stale_first(spec, normalize, explain=False):  # the plan pinned before the forget
            if str(spec) in stale and str(spec) not in served_stale:
                served_stale.append(str(spec))
                return stale[str(spec)]
            return resolve(spec, normalize, explain)

        svc.resolve = stale_first  # type: ignore[method-assign]
        got = asyncio.run(svc.predict(x, AllActive(), None, False))
        assert [t.id for t in got.plan.terms] == ["keep"] and served_stale == ["AllActive()"]
        never = asyncio.run(svc.predict(x, Explicit({"keep": 1.0}), "none", False))
        torch.testing.assert_close(got.logits, never.logits, rtol=0, atol=1e-6)
        with pytest.raises(reg.NotFoundError, match="victim"):
            asyncio.run(svc.predict(x, Explicit({"victim": 1.0}), None, False))
    finally:
        svc.worker.stop(5.0)
        svc.registry.close()
