"""Typed dependencies: the Service from app state, and the two bearer-token checks."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from app.errors import ForbiddenError, NotReadyError, UnauthorizedError
from app.service import Service


def get_service(request: Request) -> Service:
    service: Service | None = getattr(request.app.state, "service", None)
    if service is None:
        raise NotReadyError("service is starting")
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _check(expected: str, request: Request, what: str) -> None:
    given = _bearer(request)
    if given is None:
        raise UnauthorizedError(f"{what} needs 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise UnauthorizedError(f"invalid {what} token")


def require_admin(request: Request, service: ServiceDep) -> None:
    """Default-deny: with no TMC_ADMIN_TOKEN configured, the admin API is closed."""
    token = service.settings.admin_token
    if not token:
        raise ForbiddenError("the admin API is disabled: set TMC_ADMIN_TOKEN to enable it")
    _check(token, request, "admin")


def require_inference(request: Request, service: ServiceDep) -> None:
    token = service.settings.inference_token
    if token:
        _check(token, request, "inference")


AdminDep = Depends(require_admin)
InferenceDep = Depends(require_inference)
