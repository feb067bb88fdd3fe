"""How the command line fails: one ``error: ...`` line on stderr and an exit code.

Exit codes: 0 ok; 1 server unreachable, server error, or `tmc serve` could not start (the
reason is logged above the final error line); 2 bad usage or input refused (4xx);
3 missing dataset; 4 base not found or tampered. ``classify`` maps any exception that
reaches ``cli.main.main`` to its code and message.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, NoReturn, TypeAlias

from cli.client import ClientError

if TYPE_CHECKING:
    from pydantic import ValidationError



class UsageParser(argparse.ArgumentParser):
    """argparse, but its usage errors end with the same ``error: ...`` line (exit 2); the
    sub-commands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {self.prog}: {message}\n")


# what ``UsageParser.add_subparsers`` returns: each command module registers its own there
Subparsers: TypeAlias = "argparse._SubParsersAction[UsageParser]"


class CliError(Exception):
    """A failure the user can fix: ``main`` prints ``error: <message>`` and exits ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def fail(message: str) -> int:
    """Print the error line of a usage failure; return its exit code (2)."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def no_subcommand(parser: argparse.ArgumentParser, choices: str) -> int:
    """A command group called without its sub-command: its help, then a usage failure."""
    parser.print_help()
    return fail(f"choose a {parser.prog.removeprefix('tmc ')} command: {choices}")


def one_line(message: str) -> str:
    return " ".join(message.split()) or "failed"


def validation_summary(exc: ValidationError) -> str:
    """pydantic's errors as ``field: message; ...`` (the settings' own words)."""
    return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())) or 'settings'}: "
                     f"{e.get('msg', 'invalid')}" for e in exc.errors())


def classify(exc: Exception) -> tuple[int, str]:
    """The exit code and message for an error that reached ``main``."""
    if isinstance(exc, CliError):
        return exc.code, str(exc)
    if isinstance(exc, ClientError):
        return (2 if exc.status and 400 <= exc.status < 500 else 1), str(exc)
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return 2, f"invalid settings: {validation_summary(exc)}"
    from bases import BaseError, BaseNotFoundError, TamperedBaseError

    if isinstance(exc, (BaseNotFoundError, TamperedBaseError)):
        return 4, str(exc)
    if isinstance(exc, BaseError):
        return 2, str(exc)
    if isinstance(exc, OSError):
        return 2, str(exc)
    return 1, f"unexpected {type(exc).__name__}: {exc} (set TMC_DEBUG=1 for the traceback)"
