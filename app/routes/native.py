"""Native inference API: POST /v1/predict, GET /v1/base."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from app.composition import Weight, spec_from_fields
from app.deps import InferenceDep, ServiceDep
from app.errors import error_responses
from app.service import Prediction, Service
from tangent import top_k

router = APIRouter(tags=["inference"])
# {id: weight} or "*"; tagged so that a refusal names one form ("components.weights.a: …")
Components = Annotated[
    Annotated[dict[str, Weight], Tag("weights")] | Annotated[Literal["*"], Tag("all")],
    Discriminator(lambda v: "all" if isinstance(v, str) else "weights")]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"inputs": ["Shares rose after the bank raised its forecast."],
         "components": {"shard-0": 0.5, "shard-1": 0.5}, "normalize": "none", "top_k": 3},
        {"inputs": ["Elections are due in May."], "components": "*"},
    ]})
    inputs: list[object] = Field(description="text strings, base64 images / pixel arrays, or "
                              "numeric arrays, per the base's input kind")
    components: Components | None = Field(
        None, description='{id: weight} (JSON numbers, |weight| ≤ 1e6), or "*" for all active '
        'components at registry weights')
    composition: str | None = Field(None, description="a named composition")
    normalize: Literal["none", "sum", "mean"] | None = Field(
        None, description="default: the named composition's, else none")
    top_k: int = Field(5, ge=1, le=1000)
    explain: bool = Field(False, description="return each component's contribution w_k·J(x)Δ_k")


@router.post("/v1/predict", dependencies=[InferenceDep],
             responses=error_responses(400, 401, 404, 409, 413, 422, 503, 504))
async def predict(body: PredictRequest, service: ServiceDep) -> dict[str, object]:
    spec = spec_from_fields(body.components, body.composition)
    pred = await service.predict(body.inputs, spec, body.normalize, body.explain)
    return render(service, pred, body.top_k)


def render(service: Service, pred: Prediction, k: int) -> dict[str, object]:
    labels = service.base.labels
    probs = pred.logits.softmax(-1)
    ranked = top_k(pred.logits, labels, k)
    outputs = []
    for row in range(pred.logits.shape[0]):
        out: dict[str, object] = {
            "logits": pred.logits[row].tolist(),
            "probabilities": probs[row].tolist(),
            "top_k": [{"label": lab, "probability": p} for lab, p in ranked[row]],
        }
        if pred.contributions is not None:
            ordered = sorted(pred.plan.terms, key=lambda t: t.digest)
            out["contributions"] = {t.id: pred.contributions[i, row].tolist()
                                    for i, t in enumerate(ordered)}
        outputs.append(out)
    return {"outputs": outputs, "provenance": provenance(service, pred)}


def provenance(service: Service, pred: Prediction) -> dict[str, object]:
    plan = pred.plan
    return {
        "base_fingerprint": service.base.fingerprint,
        "components": [{"id": t.id, "digest": t.digest, "weight": t.weight}
                       for t in plan.terms],
        "composition_digest": plan.composition_digest or None,
        "normalize": plan.normalize,
        "generation": plan.generation,
    }


@router.get("/v1/base", dependencies=[InferenceDep], responses=error_responses(401, 503))
async def base_info(service: ServiceDep) -> dict[str, object]:
    base = service.base
    return {
        "name": base.spec.name,
        "preset": base.spec.preset,
        "fingerprint": base.fingerprint,
        "input_kind": base.spec.input_kind,
        "labels": base.labels,
        "options": base.spec.options,
        "component_format": "tmc.component/1",
        "tangent_region": [{"name": p.name, "shape": list(p.shape), "dtype": p.dtype}
                           for p in base.region.values()],
        "tangent_parameters": sum(_numel(p.shape) for p in base.region.values()),
    }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
