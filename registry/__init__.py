"""The component registry: ids, immutable versions, named compositions, exact forgetting.

Two backends behind the same ports (``Index`` + ``BlobStore``): embedded (SQLite + files,
the default) and shared (Redis, for replicas). ``open_registry`` picks one from settings.
"""

from registry.core import Registry
from registry.errors import (
    ConflictError,
    InvalidComponentError,
    InvalidIdError,
    InvalidRequestError,
    NotFoundError,
    RegistryError,
    StorageError,
)
from registry.factory import DEFAULT_MAX_COMPONENT_BYTES, open_registry
from registry.types import (
    AddResult,
    ComponentInfo,
    ForgetReceipt,
    NamedComposition,
    Resolved,
    ResolvedItem,
    StorePurge,
)
from registry.validate import ID_PATTERN

__all__ = [
    "DEFAULT_MAX_COMPONENT_BYTES", "ID_PATTERN", "AddResult", "ComponentInfo", "ConflictError",
    "ForgetReceipt", "InvalidComponentError", "InvalidIdError", "InvalidRequestError",
    "NamedComposition", "NotFoundError", "Registry", "RegistryError", "Resolved",
    "ResolvedItem", "StorageError", "StorePurge", "open_registry",
]
