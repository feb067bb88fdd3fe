"""Argument checks: ids, composition names, digests, weights, tags, normalization, metadata.

Ids and names never become filesystem paths; only validated hex digests do.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

from registry.errors import (
    InvalidComponentError,
    InvalidIdError,
    InvalidRequestError,
    NotFoundError,
)
from tangent import NORMALIZATIONS, CompositionError, Normalize, effective_weights

ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
TAG_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:=/+-]{0,63}")
DIGEST_PATTERN = re.compile(r"[0-9a-f]{64}")
MAX_TAGS = 64
# |weight| ≤ MAX_WEIGHT: a larger weight overflows float32 (3.4e38) once it scales a Δ and
# its Jacobian-vector product, so the answer would be inf/NaN rather than a composition.
MAX_WEIGHT = 1e6
WEIGHT_BOUND = f"|weight| ≤ {MAX_WEIGHT:.0e} (MAX_WEIGHT)".replace("e+0", "e")
# A component's safetensors ``__metadata__`` is kept in the index (never its tensors): bound
# it so the index stays small. Sizes are UTF-8 bytes; the total counts keys and values.
MAX_METADATA_BYTES = 64 * 1024
MAX_METADATA_VALUE_BYTES = 16 * 1024
METADATA_BOUND = (f"at most {MAX_METADATA_BYTES // 1024} KiB of metadata in total "
                  f"(MAX_METADATA_BYTES) and {MAX_METADATA_VALUE_BYTES // 1024} KiB per key or "
                  "value (MAX_METADATA_VALUE_BYTES)")


def check_id(value: object, what: str = "component id") -> str:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise InvalidIdError(
            f"{what} {value!r} is invalid: use 1-64 characters from [a-z0-9._-], "
            "starting with a letter or digit")
    return value


def check_digest(value: object) -> str:
    """A sha256 hex digest; anything else cannot name a version (so: not found)."""
    if not isinstance(value, str) or not DIGEST_PATTERN.fullmatch(value):
        raise NotFoundError(f"{value!r} is not a version digest (64 lowercase hex characters)")
    return value


def check_weight(value: object, what: str = "weight") -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(f"{what} must be a number, got {value!r}")
    try:
        weight = float(value)
    except OverflowError:  # an int beyond float's range
        weight = math.inf
    if not math.isfinite(weight):
        raise InvalidRequestError(f"{what} must be a finite number, got {value!r}")
    if abs(weight) > MAX_WEIGHT:
        raise InvalidRequestError(f"{what} is {weight:g}: weights must satisfy {WEIGHT_BOUND}")
    return weight


def check_tags(values: Iterable[str]) -> tuple[str, ...]:
    """Tags, deduplicated and sorted."""
    if isinstance(values, str):
        raise InvalidRequestError(f"tags must be a list of strings, got the string {values!r}")
    tags = sorted(set(values))
    for tag in tags:
        if not isinstance(tag, str) or not TAG_PATTERN.fullmatch(tag):
            raise InvalidRequestError(
                f"tag {tag!r} is invalid: use 1-64 characters from [A-Za-z0-9._:=/+-]")
    if len(tags) > MAX_TAGS:
        raise InvalidRequestError(f"{len(tags)} tags, at most {MAX_TAGS} allowed")
    return tuple(tags)


def check_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """A component's safetensors metadata within the bounds (else InvalidComponentError)."""
    total = 0
    for key, value in metadata.items():
        for what, text in (("key", key), (f"value of {key[:64]!r}", value)):
            size = len(text.encode())
            if size > MAX_METADATA_VALUE_BYTES:
                raise InvalidComponentError(
                    f"component metadata {what} is {size} bytes: components may carry "
                    f"{METADATA_BOUND}")
            total += size
    if total > MAX_METADATA_BYTES:
        raise InvalidComponentError(
            f"component metadata is {total} bytes: components may carry {METADATA_BOUND}")
    return dict(metadata)


def check_normalize(value: object) -> Normalize:
    if value not in NORMALIZATIONS:
        raise InvalidRequestError(f"normalize must be one of {list(NORMALIZATIONS)}, got {value!r}")
    return value


def check_weights(weights: Mapping[str, float], normalize: Normalize) -> dict[str, float]:
    """An id → weight map whose weights make a valid composition under ``normalize``."""
    if not isinstance(weights, Mapping):
        raise InvalidRequestError(f"weights must map component ids to numbers, got {weights!r}")
    checked = {check_id(i): check_weight(w, f"weight of {i!r}") for i, w in weights.items()}
    check_composable(list(checked.values()), normalize)
    return checked


def check_composable(weights: list[float], normalize: Normalize) -> None:
    try:
        effective_weights(weights, normalize)
    except CompositionError as exc:
        raise InvalidRequestError(str(exc)) from exc
