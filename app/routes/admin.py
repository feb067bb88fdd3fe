"""Admin API (its own bearer token, default-deny): components and named compositions."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Coroutine
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor

from app.composition import QueryWeight, Weight
from app.deps import AdminDep, ServiceDep, get_service, require_admin
from app.errors import BadRequestError, BodyTooLargeError, error_responses
from app.logs import actor
from app.service import Service

log = logging.getLogger("tmc.admin")


class AdminRoute(APIRoute):
    """Checks the admin token before anything reads the body: FastAPI reads (and parses) a
    route's JSON body before it solves any dependency, AdminDep included, so a request with
    no valid token would be read whole before its 401. (AdminDep stays: it runs again.)"""

    def get_route_handler(self) -> Callable[[Request], Coroutine[object, object, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            require_admin(request, get_service(request))
            return await handler(request)

        return checked


class AnyIdConvertor(Convertor[str]):
    """An id or name path segment that may contain '/' (``a%2Fb`` arrives decoded, as
    ``a/b``): matched, so that the registry's id rule refuses it with its 400 and message
    instead of the router's bare 404 (no route matches a path with one more segment)."""

    regex = r"[\s\S]+"  # not ".+": "." stops at a newline, so "ab%0A" matched as "ab" (the
    # newline silently dropped) and "a%0Ab" matched no route at all (fuzzing found both)

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("anyid", AnyIdConvertor())
COMPONENT = "/v1/components/{cid:anyid}"
COMPOSITION = "/v1/compositions/{name:anyid}"

# Every admin route can answer these: no/bad token, admin API disabled, service not ready
# or registry unavailable. Each route adds its own (app/errors.py's table says which).
router = APIRouter(tags=["admin"], dependencies=[AdminDep], route_class=AdminRoute,
                   responses=error_responses(401, 403, 503))


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing more than limit bytes without reading them all."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BodyTooLargeError(f"body is {declared} bytes, over the limit of {limit} bytes "
                                "(TMC_MAX_COMPONENT_BYTES)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLargeError(f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@router.put(COMPONENT, status_code=201,
            responses={200: {"description": "the same bytes were already stored: unchanged"},
                       **error_responses(400, 409, 413, 422, 507)}, openapi_extra={"requestBody": {
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    "required": True, "description": "a safetensors component file"}})
async def put_component(cid: str, request: Request, service: ServiceDep,
                        weight: QueryWeight = 1.0,
                        tag: Annotated[list[str] | None, Query()] = None,
                        active: bool = True) -> JSONResponse:
    data = await read_body(request, service.settings.max_component_bytes)
    if not data:
        raise BadRequestError("empty body: send the component's safetensors bytes")
    result = await run_in_threadpool(service.registry.add, cid, data, weight, tag or [], active)
    log.info("component %s %s", result.id, "added" if result.created_version else "unchanged",
             extra={"event": "add", "component": result.id, "digest": result.digest,
                    "generation": result.generation, "created_version": result.created_version,
                    "weight": weight, "tags": tag or [], "active": active, "nbytes": len(data),
                    "who": _who(request)})
    return JSONResponse(result.to_dict(), status_code=201 if result.created_version else 200)


@router.get("/v1/components", responses=error_responses(422))
async def list_components(service: ServiceDep, tag: str | None = None,
                          active: bool | None = None) -> dict[str, object]:
    infos = await run_in_threadpool(service.registry.list, tag, active)
    return {"components": [i.to_dict() for i in infos],
            "generation": await run_in_threadpool(service.registry.generation)}


@router.get(COMPONENT, responses=error_responses(400, 404, 422))
async def get_component(cid: str, service: ServiceDep) -> dict[str, object]:
    return (await run_in_threadpool(service.registry.get, cid)).to_dict()


class ComponentPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: Weight | None = None
    tags: list[str] | None = None
    active: bool | None = None


@router.patch(COMPONENT, responses=error_responses(400, 404, 409, 413, 422, 507))
async def patch_component(cid: str, body: ComponentPatch, service: ServiceDep,
                          request: Request) -> dict[str, object]:
    if body.weight is None and body.tags is None and body.active is None:
        raise BadRequestError("nothing to change: send weight, tags and/or active")
    generation = await run_in_threadpool(_apply_patch, service, cid, body)
    info = await run_in_threadpool(service.registry.get, cid)
    log.info("component %s updated", info.id,
             extra={"event": "reweight", "component": info.id, "digest": info.digest,
                    "generation": generation, "weight": body.weight, "tags": body.tags,
                    "active": body.active, "who": _who(request)})
    return info.to_dict()


def _apply_patch(service: Service, cid: str, body: ComponentPatch) -> int:
    """One atomic change: the generation moves once (returned)."""
    return int(service.registry.update(cid, weight=body.weight, tags=body.tags,
                                       active=body.active))


def _who(request: Request) -> str:
    """The admin, for log lines: a sha256 prefix of the token, never the token."""
    return actor(request.headers.get("authorization"))


@router.delete(COMPONENT, responses=error_responses(400, 404, 422, 507))
async def forget_component(cid: str, service: ServiceDep, request: Request
                           ) -> dict[str, object]:
    receipt = await run_in_threadpool(service.forget, cid)
    log.info("component %s forgotten", receipt.id,
             extra={"event": "forget", "component": receipt.id,
                    "digests": receipt.digests_removed,
                    "compositions_changed": receipt.compositions_changed,
                    "generation": receipt.generation, "who": _who(request)})
    return {"forgotten": True, **receipt.to_dict()}


class CompositionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weights: dict[str, Weight]
    normalize: Literal["none", "sum", "mean"] = "none"
    expected_generation: Annotated[StrictInt, Field(ge=0)] | None = Field(
        None, description="compare-and-set: the generation at which this composition was "
        "last written (0 = must not exist yet); refused with 409 when it moved")


@router.put(COMPOSITION, responses=error_responses(400, 404, 409, 413, 422, 507))
async def put_composition(name: str, body: CompositionBody, service: ServiceDep,
                          request: Request) -> dict[str, object]:
    if any(not math.isfinite(w) for w in body.weights.values()):
        raise BadRequestError("weights must be finite")
    comp = await run_in_threadpool(service.registry.put_composition, name, body.weights,
                                   body.normalize, body.expected_generation)
    log.info("composition %s written", comp.name,
             extra={"event": "composition_put", "composition": comp.name,
                    "components": sorted(comp.weights), "normalize": comp.normalize,
                    "generation": comp.generation, "who": _who(request)})
    return comp.to_dict()


@router.get("/v1/compositions")
async def list_compositions(service: ServiceDep) -> dict[str, object]:
    comps = await run_in_threadpool(service.registry.list_compositions)
    return {"compositions": [c.to_dict() for c in comps]}


@router.get(COMPOSITION, responses=error_responses(400, 404, 422))
async def get_composition(name: str, service: ServiceDep) -> dict[str, object]:
    return (await run_in_threadpool(service.registry.get_composition, name)).to_dict()


@router.delete(COMPOSITION, responses=error_responses(400, 404, 422, 507))
async def delete_composition(name: str, service: ServiceDep, request: Request
                             ) -> dict[str, object]:
    generation = await run_in_threadpool(service.registry.delete_composition, name)
    log.info("composition %s deleted", name,
             extra={"event": "composition_delete", "composition": name,
                    "generation": generation, "who": _who(request)})
    return {"deleted": name, "generation": generation}


@router.get("/v1/admin/registry/persistence")
async def registry_persistence(service: ServiceDep) -> dict[str, object]:
    """Whether every forget this replica made is out of the registry store's disk files.

    Redis: ``state`` "purged" (``covered``: each forget's records and bytes are out of the
    AOF/RDB files, rewritten by a rewrite that started after it), "rewriting", "failed",
    "not-persisted" or "unknown"; ``files`` per kind (in progress, scheduled, rewrites).
    Per replica: it covers the forgets this process made since it started.
    SQLite: what the embedded index does with deleted rows (``detail``).
    """
    return await run_in_threadpool(service.registry_persistence)
