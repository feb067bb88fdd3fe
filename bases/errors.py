"""Errors raised while creating, loading or feeding a base model.

BaseError
 ├── BaseNotFoundError     no base directory / files at the path
 ├── TamperedBaseError     fingerprint or file digests do not match the contents
 ├── BaseSpecError         the spec asks for something impossible (unknown preset, bad option)
 └── InputError            an input does not fit the base's input kind (4xx material)
"""


class BaseError(Exception):
    """Base of every error raised by the bases package."""


class BaseNotFoundError(BaseError):
    pass


class TamperedBaseError(BaseError):
    pass


class BaseSpecError(BaseError):
    pass


class InputError(BaseError):
    pass
