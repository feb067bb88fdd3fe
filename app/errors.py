"""The one table that maps every domain error to an HTTP status.

Domain code (tangent, bases, registry, the device worker) never raises HTTP errors;
routes never build error responses by hand. Every error body is ``{"error": "..."}``.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import registry
import tangent
from bases import errors as base_errors

log = logging.getLogger("tmc.errors")


class ServiceError(Exception):
    """Errors raised by the service layer itself."""


class UnauthorizedError(ServiceError):
    pass


class ForbiddenError(ServiceError):
    pass


class BadRequestError(ServiceError):
    pass


class BodyTooLargeError(ServiceError):
    pass


class OverloadedError(ServiceError):
    """The queue is full or the service is draining: retry later."""


class RequestTimeoutError(ServiceError):
    pass


class NotReadyError(ServiceError):
    pass


class DeviceTimeoutError(ServiceError):
    """The device thread did not run a control action (a purge) within its timeout."""


# Most specific first: the first matching class wins.
STATUS_TABLE: list[tuple[type[BaseException], int]] = [
    (UnauthorizedError, 401),
    (ForbiddenError, 403),
    (BodyTooLargeError, 413),
    (tangent.ComponentTooLargeError, 413),
    (BadRequestError, 400),
    (registry.InvalidIdError, 400),
    (registry.NotFoundError, 404),
    (registry.ConflictError, 409),
    (registry.InvalidComponentError, 422),
    (registry.InvalidRequestError, 422),
    (tangent.ComponentError, 422),
    (tangent.CompositionError, 422),
    (base_errors.InputError, 422),
    (OverloadedError, 503),
    (NotReadyError, 503),
    (DeviceTimeoutError, 503),
    (registry.StorageError, 503),
    (RequestTimeoutError, 504),
]


def status_for(exc: BaseException) -> int:
    for cls, status in STATUS_TABLE:
        if isinstance(exc, cls):
            return status
    cause = getattr(exc, "cause", None)
    return status_for(cause) if isinstance(cause, BaseException) else 500


# tmc_rejected_requests_total{reason}: requests refused before reaching the device
REJECTION_REASONS: dict[type[Exception], str] = {
    OverloadedError: "overloaded", NotReadyError: "not_ready",
    DeviceTimeoutError: "device_timeout"}


def error_response(status: int, message: str) -> JSONResponse:
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts[:5])


def install_error_handlers(app: FastAPI) -> None:
    async def domain(request: Request, exc: Exception) -> JSONResponse:
        status = status_for(exc)
        reason = REJECTION_REASONS.get(type(exc))
        service = getattr(request.app.state, "service", None)
        if reason is not None and service is not None:  # refused before the device
            service.metrics.rejected.labels(reason=reason).inc()
        if status == 500:
            log.exception("internal error on %s", request.url.path, exc_info=exc)
            return error_response(500, "internal error; see the server log")
        return error_response(status, str(exc))

    async def validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(422, _validation_message(exc))

    async def http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return error_response(exc.status_code, str(exc.detail))

    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http)
    for cls in (ServiceError, registry.RegistryError, tangent.TangentError,
                base_errors.BaseError):
        app.add_exception_handler(cls, domain)
    app.add_exception_handler(Exception, domain)  # last resort: 500, no stack trace
