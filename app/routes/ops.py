"""Operations: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from app.deps import ServiceDep
from app.errors import error_responses

router = APIRouter(tags=["ops"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "live"}


@router.get("/readyz", responses={503: {
    "description": "not ready: the same checks, with ready false (or the error body while "
    "the service is starting)", "content": {"application/json": {"schema": {
        "type": "object", "additionalProperties": True}}}}})
async def readyz(service: ServiceDep) -> JSONResponse:
    checks = await run_in_threadpool(service.readiness)  # storage round trips: off the loop
    return JSONResponse(checks, status_code=200 if checks["ready"] else 503)


@router.get("/metrics", responses={
    200: {"description": "Prometheus text format", "content": {CONTENT_TYPE_LATEST.split(";")[0]: {
        "schema": {"type": "string"}}}}, **error_responses(503)})
async def metrics(service: ServiceDep) -> Response:
    m, ex = service.metrics, service.executor
    m.cache_bytes.labels(cache="components").set(ex.components.nbytes)
    m.cache_bytes.labels(cache="compositions").set(ex.composed.nbytes)
    m.queue_depth.set(service.worker.pending)
    m.sync_cache(ex.composed.hits, ex.composed.misses)
    m.components.set(await run_in_threadpool(service.registry.count))
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
