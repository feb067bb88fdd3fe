"""`tmc base init` and `tmc base show`: create or inspect a base model directory.

Both default to ``app.settings.default_base_dir()`` ($TMC_BASE_DIR, else $TMC_HOME/base,
else .tmc/base). A preset or spec the bases package refuses exits 2; a base that cannot be
loaded (missing, tampered) exits 4.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cli.errors import CliError, Subparsers, no_subcommand


def add_base_parsers(sub: Subparsers) -> None:
    b = sub.add_parser("base", help="create or inspect a base model directory")
    b.set_defaults(func=lambda _args: no_subcommand(b, "init or show"))
    bsub = b.add_subparsers(title="base commands")
    i = bsub.add_parser("init", help="create a base directory from a preset")
    i.add_argument("--preset", default="minilm",
                   help="minilm | effnet-lite0 | tiny-mlp | generic")
    i.add_argument("--out", type=Path, default=None, help="default: $TMC_BASE_DIR or .tmc/base")
    i.add_argument("--name")
    i.add_argument("--labels", help="comma-separated label names (default: the preset's)")
    i.add_argument("--option", action="append", default=[], metavar="KEY=JSON",
                   help="preset option, e.g. image_size=64, tangent_layers=2, "
                   "factory='\"pkg.mod:make\"'")
    i.add_argument("--tangent", action="append", help="tangent-region parameter glob")
    i.add_argument("--head-seed", type=int, default=0)
    i.add_argument("--force", action="store_true", help="overwrite an existing directory")
    i.set_defaults(func=cmd_base_init)
    s = bsub.add_parser("show", help="print a base's spec, fingerprint and tangent region")
    s.add_argument("--base", type=Path, default=None)
    s.set_defaults(func=cmd_base_show)


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """--option KEY=VALUE pairs; VALUE is JSON where it parses, else the plain string."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise CliError(f"--option {pair!r} must be KEY=VALUE")
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options


def cmd_base_init(args: argparse.Namespace) -> int:
    from app.settings import default_base_dir
    from bases import BaseError, init_base, make_spec

    out = args.out or default_base_dir()
    try:
        spec = make_spec(args.preset, name=args.name, head_seed=args.head_seed,
                         labels=args.labels.split(",") if args.labels else None,
                         options=parse_options(args.option), tangent=args.tangent)
        fp = init_base(out, spec, force=args.force)
    except BaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"base {spec.name} ({spec.preset}) written to {out}\nfingerprint {fp}")
    return 0


def cmd_base_show(args: argparse.Namespace) -> int:
    from app.settings import default_base_dir
    from bases import BaseError, load_base

    try:
        base = load_base(args.base or default_base_dir(), check_forward_ad=False)
    except BaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4
    region = [{"name": p.name, "shape": list(p.shape), "dtype": p.dtype}
              for p in base.region.values()]
    print(json.dumps({"name": base.spec.name, "preset": base.spec.preset,
                      "fingerprint": base.fingerprint, "input_kind": base.spec.input_kind,
                      "labels": base.labels, "tangent_region": region}, indent=2))
    return 0
