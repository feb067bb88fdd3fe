"""Base models (θ0): presets, base directories with fingerprints, input preprocessing."""

from bases.contracts import ModelInput, Preprocessor, Preset
from bases.errors import BaseError, BaseNotFoundError, BaseSpecError, InputError, TamperedBaseError
from bases.spec import BaseSpec, JSONValue
from bases.store import Base, init_base, load_base, make_spec

__all__ = ["Base", "BaseError", "BaseNotFoundError", "BaseSpec", "BaseSpecError", "InputError",
           "JSONValue", "ModelInput", "Preprocessor", "Preset", "TamperedBaseError",
           "init_base", "load_base", "make_spec"]
