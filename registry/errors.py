"""Errors raised by the component registry.

RegistryError
 ├── NotFoundError          unknown component id, composition name or version digest
 ├── InvalidIdError         an id or name outside ``[a-z0-9][a-z0-9._-]{0,63}``
 ├── InvalidComponentError  the bytes are not a valid component for this base
 │                          (``.cause`` is the tangent.ComponentError that says why)
 ├── ConflictError          a compare-and-set lost, a composition names a missing component,
 │                          the bytes belong to another id, or the store belongs to another base
 ├── InvalidRequestError    a bad weight (non-finite, or |w| > MAX_WEIGHT), tag or
 │                          normalization
 └── StorageError           the backend is unreachable, busy or inconsistent
      └── BusyError         a digest's bytes are being written or deleted elsewhere

The service maps them to HTTP 404 / 400 / 422 / 409 / 422 / 503 (507 when the disk is
full), in app/errors.py's STATUS_TABLE; the registry never speaks HTTP.
"""

from __future__ import annotations

from tangent import ComponentError


class RegistryError(Exception):
    """Base of every error raised by the registry."""


class NotFoundError(RegistryError):
    """No component, composition or version by that name."""


class InvalidIdError(RegistryError):
    """An id or composition name that does not match the id pattern."""


class InvalidComponentError(RegistryError):
    """The bytes are not a valid component for this base.

    Raise it as ``raise InvalidComponentError(str(exc)) from exc``; ``cause`` is the original
    ``tangent.ComponentError`` so the service can tell a wrong base from a wrong shape.
    """

    def __init__(self, message: str, cause: ComponentError | None = None) -> None:
        super().__init__(message)
        self._cause = cause

    @property
    def cause(self) -> ComponentError | None:
        if self._cause is not None:
            return self._cause
        chained = self.__cause__
        return chained if isinstance(chained, ComponentError) else None


class ConflictError(RegistryError):
    """The change conflicts with the registry's current state."""


class InvalidRequestError(RegistryError):
    """A request argument (weight, tag, normalization) is invalid."""


class StorageError(RegistryError):
    """The storage backend failed: unreachable, busy, or returned inconsistent data."""


class BusyError(StorageError):
    """A digest's mutation lock is held by another process (an add or forget in flight)."""


class BlobMissingError(StorageError):
    """Internal: an add found its bytes gone from the blob store (raced a sweep); retried."""
