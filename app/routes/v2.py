"""Open Inference Protocol (KServe / Triton V2 REST) on the same port.

The composition travels as scalar request parameters: ``tmc_components``
("a:0.5,b:0.5" or "*"), ``tmc_composition`` (a name), ``tmc_normalize``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeAlias

import numpy as np
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from app.composition import BaseOnly, CompositionSpec, Named, parse_components_param
from app.deps import InferenceDep, ServiceDep
from app.errors import BadRequestError, NotReadyError, error_responses
from app.routes.v2_binary import (
    HEADER,
    attach_binary_inputs,
    decode_binary,
    encode_binary_outputs,
    split_body,
)
from app.service import Prediction, Service
from bases import InputError
from bases.inputs import TensorPreprocessor
from tangent import NORMALIZATIONS, Normalize

router = APIRouter(tags=["open inference protocol"])
SERVER_VERSION = "0.1.0"
DATATYPES = {"text": "BYTES", "image": "BYTES", "tensor": "FP32"}
NUMERIC = {"FP32", "FP64", "FP16", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16"}
OUTPUTS = ("logits", "probabilities", "label")


class V2Tensor(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    shape: list[int]
    datatype: str
    data: list[Any] | None = None  # absent when the data travels in binary
    parameters: dict[str, Any] | None = None


class V2Output(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str


V2Params: TypeAlias = dict[str, str | int | float | bool]  # a request's scalar parameters


class V2Request(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | None = None
    parameters: V2Params | None = None
    inputs: list[V2Tensor] = Field(min_length=1)
    outputs: list[V2Output] | None = None


@router.get("/v2")
async def server_metadata() -> dict[str, object]:
    return {"name": "tmc", "version": SERVER_VERSION, "extensions": ["tmc_composition"]}


@router.get("/v2/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready", responses=error_responses(503))
async def ready(service: ServiceDep) -> dict[str, bool]:
    if not (await run_in_threadpool(service.readiness))["ready"]:
        raise NotReadyError("not ready")
    return {"ready": True}


def _model(service: Service, name: str) -> None:
    if name != service.base.spec.name:
        raise_not_found(name, service)


def raise_not_found(name: str, service: Service) -> None:
    from registry import NotFoundError

    raise NotFoundError(f"unknown model {name!r}; this server serves {service.base.spec.name!r}")


@router.get("/v2/models/{model}", dependencies=[InferenceDep],
            responses=error_responses(401, 404, 422, 503))
async def model_metadata(model: str, service: ServiceDep) -> dict[str, object]:
    _model(service, model)
    kind, classes = service.base.spec.input_kind, len(service.base.labels)
    pre = service.base.preprocessor
    shape = [-1, *pre.shape] if isinstance(pre, TensorPreprocessor) else [-1]
    return {
        "name": model, "versions": [service.base.fingerprint[:12]], "platform": "tmc",
        "inputs": [{"name": "input", "datatype": DATATYPES[kind], "shape": shape}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, classes]},
                    {"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]},
                    {"name": "label", "datatype": "BYTES", "shape": [-1]}],
        "parameters": {"labels": ",".join(service.base.labels)},
    }


@router.get("/v2/models/{model}/ready", dependencies=[InferenceDep],
            responses=error_responses(401, 404, 422, 503))
async def model_ready(model: str, service: ServiceDep) -> dict[str, object]:
    _model(service, model)
    if not (await run_in_threadpool(service.readiness))["ready"]:
        raise NotReadyError("model not ready")
    return {"name": model, "ready": True}


def _openapi_schemas() -> dict[str, object]:
    """V2Request and the models it refers to, for the document's components/schemas (the
    infer route reads its body itself, so FastAPI does not register them): main.py adds
    them, so that every $ref in /openapi.json resolves."""
    schema = V2Request.model_json_schema(ref_template="#/components/schemas/{model}")
    return {**schema.pop("$defs", {}), "V2Request": schema}


OPENAPI_SCHEMAS = _openapi_schemas()


@router.post("/v2/models/{model}/infer", dependencies=[InferenceDep],
             responses=error_responses(400, 401, 404, 409, 413, 422, 503, 504),
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": {"$ref": "#/components/schemas/V2Request"}},
                 "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                              "description": "Triton binary tensor data: "
                                              "Inference-Header-Content-Length bytes of JSON, "
                                              "then the raw tensor bytes"}}}})
@router.post("/v2/models/{model}/versions/{version}/infer", dependencies=[InferenceDep],
             include_in_schema=False)
async def infer(model: str, request: Request, service: ServiceDep,
                version: str | None = None) -> Response:
    _model(service, model)
    raw_json, blob = split_body(await request.body(), request.headers.get(HEADER))
    payloads = attach_binary_inputs(raw_json if isinstance(raw_json, dict) else {}, blob)
    body = _validated(raw_json)
    if len(body.inputs) != 1:
        raise BadRequestError(f"expected exactly one input tensor, got {len(body.inputs)}")
    tensor = body.inputs[0]
    if payloads[0] is not None:
        tensor.data = decode_binary(tensor.datatype, tensor.shape, payloads[0])
    if tensor.data is None:
        raise BadRequestError(f"input {tensor.name!r} has no data (inline 'data' or binary)")
    params = body.parameters or {}
    raw = decode_input(tensor, service.base.spec.input_kind)
    pred = await service.predict(raw, _spec(params), _normalize(params), explain=False)
    wanted = [o.name for o in body.outputs] if body.outputs else list(OUTPUTS)
    response = encode_response(service, pred, model, body.id, wanted)
    binary = _binary_outputs(body, params)
    if not binary:
        return JSONResponse(response)
    content, head = encode_binary_outputs(response, binary)
    return Response(content, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(head)})


def _validated(raw_json: object) -> V2Request:
    try:
        return V2Request.model_validate(raw_json)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def _binary_outputs(body: V2Request, params: V2Params) -> set[str]:
    if body.outputs:
        return {o.name for o in body.outputs
                if (getattr(o, "parameters", None) or {}).get("binary_data")}
    return set(OUTPUTS) if params.get("binary_data_output") else set()


def _spec(params: V2Params) -> CompositionSpec:
    comps, name = params.get("tmc_components"), params.get("tmc_composition")
    if comps is not None and name is not None:
        raise BadRequestError("give tmc_components or tmc_composition, not both")
    if name is not None:
        return Named(str(name))
    return parse_components_param(str(comps)) if comps is not None else BaseOnly()


def _normalize(params: V2Params) -> Normalize | None:
    value = params.get("tmc_normalize")
    if value is None:
        return None
    for known in NORMALIZATIONS:
        if value == known:
            return known
    raise BadRequestError(f"tmc_normalize must be one of {list(NORMALIZATIONS)}")


def decode_input(tensor: V2Tensor, kind: str) -> list[object]:
    """V2 input tensor -> list of raw inputs for the base's preprocessor."""
    if not tensor.shape or tensor.shape[0] < 1:
        raise BadRequestError(f"input {tensor.name!r}: shape must start with a batch size ≥ 1")
    batch = tensor.shape[0]
    if tensor.datatype == "BYTES":
        if kind == "tensor":
            raise BadRequestError("this model takes FP32 tensors, not BYTES")
        flat = list(_flatten(tensor.data or []))
        strings = [v for v in flat if isinstance(v, str | bytes)]
        if len(flat) != batch or len(strings) != len(flat):
            raise BadRequestError(f"input {tensor.name!r}: BYTES data must be {batch} strings")
        return [_text(v) if kind == "text" else v for v in strings]
    if tensor.datatype not in NUMERIC:
        raise BadRequestError(f"input {tensor.name!r}: unsupported datatype {tensor.datatype}")
    if kind == "text":
        raise BadRequestError("this model takes text as BYTES")
    try:
        arr = np.asarray(list(_flatten(tensor.data or [])), dtype=np.float64)
        arr = arr.reshape(tensor.shape)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InputError(f"input {tensor.name!r}: data does not fit shape "
                         f"{tensor.shape}: {exc}") from None
    return [row for row in arr]


def _text(value: str | bytes) -> str:
    if isinstance(value, str):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError("text input is not valid UTF-8") from None


MAX_NESTING = 32  # a tensor's data nests at most this deep (one level per dimension)


def _flatten(data: Iterable[object]) -> Iterator[object]:
    """The leaves of nested lists, in order: iterative, and refusing absurd nesting (a
    recursive walk of JSON nested thousands deep would raise RecursionError: a 500)."""
    stack = [iter(data)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                if len(stack) >= MAX_NESTING:
                    raise BadRequestError(f"tensor data is nested more than {MAX_NESTING} "
                                          "levels deep")
                stack.append(iter(v))
                break
            yield v
        else:
            stack.pop()


def encode_response(service: Service, pred: Prediction, model: str, request_id: str | None,
                    wanted: list[str]) -> dict[str, Any]:
    unknown = [w for w in wanted if w not in OUTPUTS]
    if unknown:
        raise BadRequestError(f"unknown outputs {unknown}; this model has {list(OUTPUTS)}")
    logits = pred.logits
    b, c = logits.shape
    values = {
        "logits": {"datatype": "FP32", "shape": [b, c], "data": logits.flatten().tolist()},
        "probabilities": {"datatype": "FP32", "shape": [b, c],
                          "data": logits.softmax(-1).flatten().tolist()},
        "label": {"datatype": "BYTES", "shape": [b],
                  "data": [service.base.labels[i] for i in logits.argmax(-1).tolist()]},
    }
    plan = pred.plan
    return {
        "model_name": model, "model_version": service.base.fingerprint[:12],
        "id": request_id or "",
        "parameters": {
            "tmc_generation": plan.generation,
            "tmc_composition_digest": plan.composition_digest,
            "tmc_components": ",".join(f"{t.id}@{t.digest[:12]}:{t.weight:g}"
                                       for t in plan.terms),
            "tmc_normalize": plan.normalize,
            "tmc_base_fingerprint": service.base.fingerprint,
        },
        "outputs": [{"name": w, **values[w]} for w in wanted],
    }
