"""The `tmc` command: its parser and dispatch, the one place a command's failure becomes
an exit code (cli/errors.py says which).

Commands live by concept: cli/serve.py (serve, demo), cli/base.py (base init/show),
cli/train.py (train), cli/client_cmds.py (push, ls, reweight, forget, compose, predict over
the HTTP client in cli/client.py). Building the parser imports only the standard library and
the HTTP client; torch and the rest load when a command runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from cli.base import add_base_parsers
from cli.client import ClientError
from cli.client_cmds import add_client_parsers
from cli.errors import Subparsers, UsageParser, classify, fail, one_line
from cli.serve import add_serve_parsers
from cli.train_args import add_train_parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return fail("no command given")
    try:
        code: int = args.func(args)
        return code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        code, message = classify(exc)
        if code == 1 and not isinstance(exc, ClientError) and os.environ.get("TMC_DEBUG"):
            raise
        print(f"error: {one_line(message)}", file=sys.stderr)
        return code


def build_parser() -> argparse.ArgumentParser:
    p = UsageParser(prog="tmc", description="Tangent Model Composition serving")
    sub = p.add_subparsers(title="commands")
    add_serve_parsers(sub)
    add_base_parsers(sub)
    _add_train_or_stub(sub)
    add_client_parsers(sub)
    return p


def _add_train_or_stub(sub: Subparsers) -> None:
    """`tmc train`, or where the training package is not installed, a stub that says so."""
    if importlib.util.find_spec("training") is None:
        t = sub.add_parser("train", help="train one component (unavailable)")
        t.set_defaults(func=lambda a: fail("the training package is not installed"))
        return
    add_train_parser(sub)


if __name__ == "__main__":
    sys.exit(main())
