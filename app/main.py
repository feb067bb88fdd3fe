"""create_app(settings): the FastAPI application, its object graph built once in lifespan."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool

from app.errors import error_response, install_error_handlers
from app.routes import admin, native, ops, v2
from app.service import Service
from app.settings import Settings

log = logging.getLogger("tmc")
ADMIN_UPLOAD_PREFIX = "/v1/components/"


def create_app(settings: Settings, service: Service | None = None) -> FastAPI:
    """Build the app; the Service (base, registry, worker) is created at startup."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc = service if service is not None else await run_in_threadpool(Service.build,
                                                                         settings)
        await run_in_threadpool(svc.start)
        app.state.service = svc
        log.info("tmc ready: base %s (%s) on %s", svc.base.spec.name,
                 svc.base.fingerprint[:12], svc.device)
        try:
            yield
        finally:
            await svc.drain_and_stop()

    app = FastAPI(title="tmc", version="0.1.0", lifespan=lifespan,
                  description="Tangent Model Composition serving: one forward + one JVP for "
                  "any weighted subset of components; exact forgetting.")
    install_error_handlers(app)
    app.middleware("http")(_limits_and_metrics(settings))
    for router in (native.router, v2.router, admin.router, ops.router):
        app.include_router(router)
    return app


Handler = Callable[[Request], Awaitable[Response]]


def _limits_and_metrics(settings: Settings) -> Callable[[Request, Handler], Awaitable[Response]]:
    async def middleware(request: Request, call_next: Handler) -> Response:
        started = time.perf_counter()
        response = _too_large(request, settings) or await call_next(request)
        route = request.scope.get("route")
        template = getattr(route, "path", "unmatched")
        service = getattr(request.app.state, "service", None)
        if service is not None:
            m = service.metrics
            m.requests.labels(route=template, status=str(response.status_code)).inc()
            m.request_seconds.labels(route=template).observe(time.perf_counter() - started)
        return response

    return middleware


def _too_large(request: Request, settings: Settings) -> Response | None:
    """Bodies over TMC_MAX_BODY_BYTES are refused up front (component uploads have their own
    limit, enforced while streaming)."""
    if request.method == "PUT" and request.url.path.startswith(ADMIN_UPLOAD_PREFIX):
        return None
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > settings.max_body_bytes:
        return error_response(413, f"body is {declared} bytes, over the limit of "
                              f"{settings.max_body_bytes} bytes (TMC_MAX_BODY_BYTES)")
    return None
