"""create_app(settings): the FastAPI application, its object graph built once in lifespan."""

from __future__ import annotations

import logging
import time
from asyncio import CancelledError
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import registry as reg
from app.errors import BodyTooLargeError, error_response, install_error_handlers
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
    app.add_middleware(LimitsAndMetricsMiddleware, settings=settings)
    app.add_middleware(RequestIdMiddleware)  # added last: outside the other middleware
    for router in (native.router, v2.router, admin.router, ops.router):
        app.include_router(router)
    _add_openapi_schemas(app, v2.OPENAPI_SCHEMAS)
    return app


def _add_openapi_schemas(app: FastAPI, schemas: dict[str, Any]) -> None:
    """Models that routes refer to by $ref without FastAPI registering them (the V2 infer
    body, read by the route itself) go into components/schemas, so every $ref resolves."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = generate()
            found = doc.setdefault("components", {}).setdefault("schemas", {})
            for name, schema in schemas.items():
                found.setdefault(name, schema)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


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
        except CancelledError:
            # uvicorn cancels what is still running when its graceful-shutdown wait ends (a
            # client that never finished its body): answer 503 "retry elsewhere" instead of
            # uvicorn's plain-text 500 and "Exception in ASGI application" (the task ends here)
            if started:
                raise
            log.info("request cancelled by shutdown before it was answered",
                     extra={"event": "cancelled_by_shutdown"})
            response = error_response(503, "server is shutting down; retry on another replica")
            response.headers[REQUEST_ID_HEADER] = rid
            await response(scope, receive, send)
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


class LimitsAndMetricsMiddleware:
    """Bounds every request body while it streams and counts every response.

    TMC_MAX_BODY_BYTES: a declared Content-Length over it is refused before reading; a body
    without one (chunked) is counted as the app pulls it and refused with 413 as soon as it
    crosses the limit, the app's own answer to the cut-off body replaced (component uploads
    have their own limit, enforced by their route while streaming). A response sent before the
    body was read to its end says ``Connection: close``: the rest is never read.

    tmc_requests_total{route,status} counts every request: an exception escaping the app as
    "500" (RequestIdMiddleware, outside, answers it), and "499" when the client disconnected
    before any response was sent (the nginx convention: nobody received one).
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = Headers(scope=scope)
        limit = None if _own_limit(scope) else self.settings.max_body_bytes
        if limit is not None and await _refused_as_declared(scope, receive, send, headers,
                                                            limit, started):
            return
        status: int | None = None
        received, over, disconnected = 0, False, False
        body_done = not _has_body(headers)

        async def limited_receive() -> Message:
            nonlocal received, over, disconnected, body_done
            if over:
                raise BodyTooLargeError(f"body is over the limit of {limit} bytes")
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = body_done or not message.get("more_body", False)
                if limit is not None and received > limit:
                    over = True
                    raise BodyTooLargeError(f"body is over the limit of {limit} bytes")
            elif message["type"] == "http.disconnect":
                disconnected = True
            return message

        async def counted_send(message: Message) -> None:
            nonlocal status
            if over and status is None:
                return  # the app's answer to a cut-off body: replaced by the 413 below
            if message["type"] == "http.response.start":
                status = 499 if disconnected else int(message["status"])
                if not body_done:
                    MutableHeaders(scope=message)["connection"] = "close"
            await send(message)

        try:
            await self.app(scope, limited_receive, counted_send)
        except BaseException as exc:
            if not (over and status is None):
                if status is None:
                    gone = disconnected or isinstance(exc, ClientDisconnect | CancelledError)
                    status = 499 if gone else 500
                _observe(scope, status, started)
                raise
        if over and status is None:
            _count_rejection(scope, "body_too_large")
            response = error_response(413, f"body is over the limit of {limit} bytes "
                                      "(TMC_MAX_BODY_BYTES)")
            response.headers["connection"] = "close"
            status = 413
            await response(scope, receive, send)
        # an app that returned without answering gets uvicorn's 500
        _observe(scope, 500 if status is None else status, started)


async def _refused_as_declared(scope: Scope, receive: Receive, send: Send, headers: Headers,
                               limit: int, started: float) -> bool:
    """True after answering 413 to a request whose Content-Length declares a body over
    ``limit``, before reading any of it; False (nothing sent) otherwise."""
    refused = _too_large(headers, limit)
    if refused is None:
        return False
    _count_rejection(scope, "body_too_large")
    refused.headers["connection"] = "close"
    await refused(scope, receive, send)
    _observe(scope, 413, started)
    return True


def _observe(scope: Scope, status: int, started: float) -> None:
    route = scope.get("route")
    # the template without convertors: "/v1/components/{cid}", not "{cid:anyid}"
    template = getattr(route, "path_format", None) or getattr(route, "path", "unmatched")
    service = getattr(scope["app"].state, "service", None) if "app" in scope else None
    if service is not None:
        m = service.metrics
        m.requests.labels(route=template, status=str(status)).inc()
        m.request_seconds.labels(route=template).observe(time.perf_counter() - started)


def _count_rejection(scope: Scope, reason: str) -> None:
    service = getattr(scope["app"].state, "service", None) if "app" in scope else None
    if service is not None:
        service.metrics.rejected.labels(reason=reason).inc()


def _own_limit(scope: Scope) -> bool:
    """Component uploads have their own limit (TMC_MAX_COMPONENT_BYTES), enforced by the
    route while streaming."""
    return scope["method"] == "PUT" and str(scope["path"]).startswith(ADMIN_UPLOAD_PREFIX)


def _has_body(headers: Headers) -> bool:
    declared = headers.get("content-length", "")
    return "transfer-encoding" in headers or (declared.isdigit() and int(declared) > 0)


def _too_large(headers: Headers, limit: int) -> Response | None:
    """A declared Content-Length over TMC_MAX_BODY_BYTES is refused up front, unread."""
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return error_response(413, f"body is {declared} bytes, over the limit of "
                              f"{limit} bytes (TMC_MAX_BODY_BYTES)")
    return None
