"""The service's own errors, and the one table that maps every domain error to an HTTP status.

ServiceError                      raised by the service layer itself (routes, deps, worker)
 ├── UnauthorizedError      401   a missing or wrong bearer token (``WWW-Authenticate``)
 ├── ForbiddenError         403   the admin API is disabled (no TMC_ADMIN_TOKEN)
 ├── BadRequestError        400   a malformed body, composition or parameter
 ├── BodyTooLargeError      413   a body over TMC_MAX_BODY_BYTES / TMC_MAX_COMPONENT_BYTES
 ├── OverloadedError        503   the queue is full or the server is draining (``Retry-After``)
 ├── RequestTimeoutError    504   no result within TMC_REQUEST_TIMEOUT_S
 ├── NotReadyError          503   not ready: starting, or the device worker has stopped
 └── DeviceTimeoutError     503   the device thread did not run a control action (a purge)

The other packages' errors (``STATUS_TABLE``, most specific first):

  tangent.ComponentTooLargeError                                          413
  registry.InvalidIdError                                                 400
  registry.NotFoundError                                                  404
  registry.ConflictError                                                  409
  registry.InvalidComponentError, registry.InvalidRequestError            422
  tangent.ComponentError, tangent.CompositionError, bases InputError      422
  registry.StorageError                                                   503
    ... with ENOSPC/EDQUOT or SQLITE_FULL in its cause chain              507
  FastAPI's RequestValidationError                                        422
  a client that went away before its request was read                     499
  anything else                                                           500 (logged)

Domain code (tangent, bases, registry, the device worker) never raises HTTP errors;
routes never build error responses by hand. Every error body is ``{"error": "..."}``.
"""

from __future__ import annotations

import errno
import json
import logging
import sqlite3
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

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


# Disk full (or over quota) anywhere in the cause chain: 507 Insufficient Storage, not a
# retryable 503: retrying in a second will not free space.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
INSUFFICIENT_STORAGE = 507
# The status counted and logged for a request whose client went away before any answer
# (the nginx convention, as in tmc_requests_total): nobody receives it.
CLIENT_CLOSED = 499


def _chain(exc: BaseException | None) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and len(seen) < 16 and not any(exc is s for s in seen):
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT from a file write, or SQLite's SQLITE_FULL, anywhere in the chain."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return True
        if isinstance(e, sqlite3.Error) and (
                getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL):
            return True
    return False


def status_for(exc: BaseException) -> int:
    if isinstance(exc, registry.StorageError) and is_disk_full(exc):
        return INSUFFICIENT_STORAGE
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
    headers = {"Retry-After": "1"} if status in (429, 503) else None  # never on 507
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def json_error_message(exc: BaseException, doc: str | bytes | None = None,
                       pos: int | None = None) -> str:
    """``request body is not valid JSON: <msg> at line L column C`` for any JSON parse
    failure: a JSONDecodeError (its position as line/column), json's plain ValueErrors
    (a UnicodeDecodeError, an integer over 4,300 digits) or a RecursionError (nesting)."""
    if isinstance(exc, json.JSONDecodeError):
        return (f"request body is not valid JSON: {exc.msg} at line {exc.lineno} "
                f"column {exc.colno}")
    if isinstance(exc, RecursionError):
        return "request body is not valid JSON: it is nested too deeply"
    if isinstance(doc, str | bytes) and isinstance(pos, int):
        nl = "\n" if isinstance(doc, str) else b"\n"
        line = doc.count(nl, 0, pos) + 1  # type: ignore[arg-type]
        column = pos - doc.rfind(nl, 0, pos)  # type: ignore[arg-type]
        return f"request body is not valid JSON: {exc} at line {line} column {column}"
    return f"request body is not valid JSON: {exc}"


def _validation_message(exc: RequestValidationError) -> str:
    for err in exc.errors():
        if err.get("type") == "json_invalid":  # FastAPI's "JSON decode error" + a position
            cause = exc.__cause__
            if isinstance(cause, json.JSONDecodeError):
                return json_error_message(cause)
            loc = err.get("loc", ())
            pos = loc[-1] if loc and isinstance(loc[-1], int) else None
            reason = (err.get("ctx") or {}).get("error", err.get("msg", "invalid"))
            return json_error_message(ValueError(reason), getattr(exc, "body", None), pos)
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts[:5])


class ErrorBody(BaseModel):
    """Every error response: ``{"error": "..."}``."""

    error: str


ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "Bad request: a malformed body, id or parameter",
    401: "Missing or invalid bearer token",
    403: "Forbidden: the admin API is disabled (no TMC_ADMIN_TOKEN)",
    404: "Not found",
    409: "Conflict with the registry's current state",
    413: "Body too large (TMC_MAX_BODY_BYTES / TMC_MAX_COMPONENT_BYTES)",
    422: "Invalid request: the body, parameters or inputs do not validate",
    503: "Not ready, overloaded, draining, or the registry is unavailable: retry later",
    504: "The request's deadline passed",
    507: "Insufficient storage: the registry's disk is full",
}
_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}},
    503: {"Retry-After": {"schema": {"type": "string"}, "description": "seconds"}},
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for a route: the given statuses with the ``{"error": str}``
    body (descriptions from ERROR_DESCRIPTIONS)."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in sorted(set(statuses)):
        entry: dict[str, Any] = {"model": ErrorBody, "description": ERROR_DESCRIPTIONS[status]}
        if status in _HEADERS:
            entry["headers"] = _HEADERS[status]
        out[status] = entry
    return out


def _client_gone(request: Request) -> JSONResponse:
    """The client disconnected before the request was read: a client event, not a server
    error. One line, no traceback; the answer (counted 499 by the metrics middleware) is
    sent to nobody."""
    log.info("client disconnected before %s %s was read", request.method, request.url.path,
             extra={"event": "client_disconnect"})
    return JSONResponse({"error": "client disconnected"}, status_code=CLIENT_CLOSED)


def install_error_handlers(app: FastAPI) -> None:
    async def domain(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, ClientDisconnect):
            return _client_gone(request)
        status = status_for(exc)
        reason = REJECTION_REASONS.get(type(exc))
        service = getattr(request.app.state, "service", None)
        if reason is not None and service is not None:  # refused before the device
            service.metrics.rejected.labels(reason=reason).inc()
        if status == 500:
            log.exception("internal error on %s", request.url.path, exc_info=exc)
            return error_response(500, "internal error; see the server log")
        if status == INSUFFICIENT_STORAGE:  # operators must hear of it: one line, no trace
            log.error("disk full on %s %s: %s", request.method, request.url.path, exc,
                      extra={"event": "disk_full"})
            return error_response(status, f"insufficient storage: {exc}")
        return error_response(status, str(exc))

    async def validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(422, _validation_message(exc))

    async def http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        cause = exc.__cause__
        if isinstance(cause, ClientDisconnect):  # FastAPI wraps it reading a JSON body
            return _client_gone(request)
        detail = str(exc.detail)
        if (exc.status_code == 400 and detail == "There was an error parsing the body"
                and isinstance(cause, ValueError | RecursionError)):
            detail = json_error_message(cause)  # bad UTF-8, 5,000-digit numbers, nesting
        response = error_response(exc.status_code, detail)
        for name, value in (exc.headers or {}).items():  # e.g. Allow on a 405
            response.headers[name] = value
        return response

    app.add_exception_handler(ClientDisconnect, domain)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http)
    for cls in (ServiceError, registry.RegistryError, tangent.TangentError,
                base_errors.BaseError):
        app.add_exception_handler(cls, domain)
    app.add_exception_handler(Exception, domain)  # last resort: 500, no stack trace
