"""Errors raised by the tangent math package.

TangentError
 ├── UnsupportedOpError        the network uses an op with no forward-mode AD
 ├── CompositionError          weights or normalization make no valid composition
 └── ComponentError            a component file does not fit its base
      ├── NotSafetensorsError   the bytes are not a (complete) safetensors file
      ├── ComponentTooLargeError
      ├── MissingMetadataError
      ├── WrongBaseError        metadata names another base fingerprint
      ├── UnknownTensorError    a tensor name outside the tangent region
      ├── WrongShapeError
      ├── WrongDtypeError
      └── NonFiniteError        NaN or Inf values
"""


class TangentError(Exception):
    """Base of every error raised by the math package."""


class UnsupportedOpError(TangentError):
    """The network uses an op that has no forward-mode AD rule."""


class CompositionError(TangentError):
    """The requested weights or normalization do not define a composition."""


class ComponentError(TangentError):
    """A component file does not fit the base it is checked against."""


class NotSafetensorsError(ComponentError):
    pass


class ComponentTooLargeError(ComponentError):
    pass


class MissingMetadataError(ComponentError):
    pass


class WrongBaseError(ComponentError):
    pass


class UnknownTensorError(ComponentError):
    pass


class WrongShapeError(ComponentError):
    pass


class WrongDtypeError(ComponentError):
    pass


class NonFiniteError(ComponentError):
    pass
