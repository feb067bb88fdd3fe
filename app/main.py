"""create_app(settings): the FastAPI application, its object graph built once in lifespan."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import registry as reg
from app.errors import error_response, install_error_handlers
from app.logs import REQUEST_ID, REQUEST_ID_HEADER, accept_request_id, setup_logging
from app.routes import admin, native, ops, v2
from app.service import Service
from app.settings import Settings

log = logging.getLogger("tmc")
ADMIN_UPLOAD_PREFIX = "/v1/components/"


def create_app(settings: Settings, service: Service | None = None) -> FastAPI:
    """Build the app; the Service (base, registry, worker) is created at startup.

    Logging is set up here and again at startup: uvicorn.run's default log config, applied in
    between, replaces its loggers' handlers (``log_config=None`` there keeps ours throughout).
    """
    setup_logging(settings.log_level, settings.log_format)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        setup_logging(settings.log_level, settings.log_format)
        started = time.perf_counter()
        svc = service if service is not None else await run_in_threadpool(Service.build,
                                                                         settings)
        fields = await run_in_threadpool(_startup_fields, settings, svc)
        log.info("tmc starting: base %s on %s", fields["base"], fields["device"],
                 extra={"event": "startup", **fields})
        await run_in_threadpool(svc.start)
        app.state.service = svc
        log.info("tmc ready: base %s (%s) on %s", svc.base.spec.name,
                 svc.base.fingerprint[:12], svc.device,
                 extra={"event": "ready", **fields,
                        "startup_s": round(time.perf_counter() - started, 3)})
        try:
            yield
        finally:
            await svc.drain_and_stop()
            log.info("tmc stopped", extra={"event": "shutdown"})

    app = FastAPI(title="tmc", version="0.1.0", lifespan=lifespan,
                  description="Tangent Model Composition serving: one forward + one JVP for "
                  "any weighted subset of components; exact forgetting.")
    install_error_handlers(app)
    app.middleware("http")(_limits_and_metrics(settings))
    app.add_middleware(RequestIdMiddleware)  # added last: outside the other middleware
    for router in (native.router, v2.router, admin.router, ops.router):
        app.include_router(router)
    return app


def _startup_fields(settings: Settings, svc: Service) -> dict[str, object]:
    try:
        generation: int | None = svc.registry.generation()
    except reg.StorageError:
        generation = None
    return {"base": svc.base.spec.name, "base_fingerprint": svc.base.fingerprint[:12],
            "device": str(svc.device), "dtype": settings.dtype, "compile": settings.compile,
            "registry": "redis" if settings.redis_url else "sqlite", "generation": generation}


class RequestIdMiddleware:
    """Every HTTP request gets an id: the client's valid X-Request-ID or a new one. It is
    echoed in the X-Request-ID response header (errors included) and set in the context, so
    every log line emitted while handling the request carries it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = accept_request_id(Headers(scope=scope).get(REQUEST_ID_HEADER))
        token = REQUEST_ID.set(rid)
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = rid
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # An unexpected error (the 500 handler of Starlette runs outside this middleware,
            # where the id would be lost): logged here with the id, answered here with it.
            if started:
                raise
            log.exception("internal error on %s", scope.get("path", "?"))
            response = error_response(500, "internal error; see the server log")
            response.headers[REQUEST_ID_HEADER] = rid
            await response(scope, receive, send)
        finally:
            REQUEST_ID.reset(token)


Handler = Callable[[Request], Awaitable[Response]]


def _limits_and_metrics(settings: Settings) -> Callable[[Request, Handler], Awaitable[Response]]:
    async def middleware(request: Request, call_next: Handler) -> Response:
        started = time.perf_counter()
        refused = _too_large(request, settings)
        if refused is not None:
            _count_rejection(request, "body_too_large")
        response = refused or await call_next(request)
        route = request.scope.get("route")
        template = getattr(route, "path", "unmatched")
        service = getattr(request.app.state, "service", None)
        if service is not None:
            m = service.metrics
            m.requests.labels(route=template, status=str(response.status_code)).inc()
            m.request_seconds.labels(route=template).observe(time.perf_counter() - started)
        return response

    return middleware


def _count_rejection(request: Request, reason: str) -> None:
    service = getattr(request.app.state, "service", None)
    if service is not None:
        service.metrics.rejected.labels(reason=reason).inc()


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
