"""Tangent Model Composition math: pure torch, no I/O.

y(x) = f(x; θ0) + J_θ f(x; θ0) · Σ_k w_k Δ_k
"""

from tangent.component import FORMAT, Component, decode_component, encode_component, read_metadata
from tangent.delta import (
    NORMALIZATIONS,
    Delta,
    Normalize,
    Term,
    compose,
    composition_digest,
    delta_nbytes,
    effective_weights,
)
from tangent.errors import (
    ComponentError,
    ComponentTooLargeError,
    CompositionError,
    MissingMetadataError,
    NonFiniteError,
    NotSafetensorsError,
    TangentError,
    UnknownTensorError,
    UnsupportedOpError,
    WrongBaseError,
    WrongDtypeError,
    WrongShapeError,
)
from tangent.fingerprint import fingerprint
from tangent.linearize import (
    COMPILE_MODES,
    CompileMode,
    LinearizedNet,
    TangentParam,
    region_names,
)
from tangent.outputs import probabilities, top_k

__all__ = [
    "COMPILE_MODES", "FORMAT", "NORMALIZATIONS", "CompileMode", "Component", "ComponentError",
    "ComponentTooLargeError", "CompositionError", "Delta", "LinearizedNet", "MissingMetadataError",
    "NonFiniteError", "Normalize", "NotSafetensorsError", "TangentError", "TangentParam", "Term",
    "UnknownTensorError", "UnsupportedOpError", "WrongBaseError", "WrongDtypeError",
    "WrongShapeError", "compose", "composition_digest", "decode_component", "delta_nbytes",
    "effective_weights", "encode_component", "fingerprint", "probabilities", "read_metadata",
    "region_names", "top_k",
]
