"""`python -m training train ...`: the `tmc train` command without the rest of the CLI."""

from __future__ import annotations

import argparse
import sys

from training.cli import add_train_parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training",
                                     description="Train tmc components (same as `tmc train`).")
    sub = parser.add_subparsers(title="commands", dest="command", required=True)
    add_train_parser(sub)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
