"""Errors raised by the training package, each with the CLI exit code it maps to.

TrainingError
 ├── UsageError            bad arguments or input: labels outside the base, empty shard (2)
 │    ├── EmptyShardError
 │    └── DivergedError     the loss became NaN/inf (learning rate or κ too large)
 ├── DatasetMissingError   the dataset is not installed / not at the path (3)
 └── BaseUnavailableError  the base directory is missing or tampered (4)
"""

from __future__ import annotations


class TrainingError(Exception):
    """Base of every error raised by the training package."""

    exit_code = 1


class UsageError(TrainingError):
    exit_code = 2


class EmptyShardError(UsageError):
    pass


class DivergedError(UsageError):
    pass


class DatasetMissingError(TrainingError):
    exit_code = 3


class BaseUnavailableError(TrainingError):
    exit_code = 4
