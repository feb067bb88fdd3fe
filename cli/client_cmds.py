"""The HTTP API's client commands: push, ls, reweight, forget, compose, predict.

Each talks to ``--server`` (default $TMC_SERVER, else http://127.0.0.1:8000) through
cli.client.TmcClient, which reads the tokens from $TMC_ADMIN_TOKEN / $TMC_INFERENCE_TOKEN,
and prints a table, or the server's JSON with ``--json``. A 4xx exits 2, an unreachable
server or a 5xx exits 1 (cli/errors.py).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cli.client import ClientError, TmcClient
from cli.errors import CliError, Subparsers

DEFAULT_SERVER = os.environ.get("TMC_SERVER", "http://127.0.0.1:8000")

Json = dict[str, Any]  # a JSON object as the server sent it


def add_client_parsers(sub: Subparsers) -> None:
    add = _client_parser_factory(sub)
    p = add("push", "upload a component file (admin)")
    p.add_argument("file", type=Path)
    p.add_argument("--id", required=True)
    p.add_argument("--weight", type=float, default=1.0)
    p.add_argument("--tag", action="append", default=[])
    p.add_argument("--inactive", action="store_true")
    p.set_defaults(func=cmd_push)
    ls = add("ls", "list components (admin)")
    ls.add_argument("--tag")
    ls.set_defaults(func=cmd_ls)
    r = add("reweight", "set a component's default weight (admin)")
    r.add_argument("id")
    r.add_argument("weight", type=float)
    r.set_defaults(func=cmd_reweight)
    f = add("forget", "forget a component exactly (admin)")
    f.add_argument("id")
    f.set_defaults(func=cmd_forget)
    c = add("compose", "create or replace a named composition (admin)")
    c.add_argument("name")
    c.add_argument("components", help="id:weight,id:weight")
    c.add_argument("--normalize", default="none", choices=["none", "sum", "mean"])
    c.set_defaults(func=cmd_compose)
    _add_predict_parser(add("predict", "predict with a composition"))


def _client_parser_factory(sub: Subparsers) -> Callable[[str, str], argparse.ArgumentParser]:
    """A function that adds one client command with the flags they all take."""
    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_text)
        c.add_argument("--server", default=DEFAULT_SERVER, help="default: $TMC_SERVER")
        c.add_argument("--json", action="store_true", help="machine-readable output")
        return c
    return add


def _add_predict_parser(pr: argparse.ArgumentParser) -> None:
    group = pr.add_mutually_exclusive_group()
    group.add_argument("--components", help="id:weight,id:weight")
    group.add_argument("--all", action="store_true", help="all active components")
    group.add_argument("--composition", help="a named composition")
    pr.add_argument("--normalize", choices=["none", "sum", "mean"])
    pr.add_argument("--top-k", type=int, default=3)
    pr.add_argument("inputs", nargs="+", help="texts, image files, or JSON arrays")
    pr.set_defaults(func=cmd_predict)


def _client(args: argparse.Namespace) -> TmcClient:
    try:
        return TmcClient(args.server)
    except ClientError as exc:  # a malformed --server / $TMC_SERVER: bad usage
        raise CliError(str(exc)) from exc


def _emit(args: argparse.Namespace, payload: Json, text: str) -> int:
    print(json.dumps(payload, indent=2) if args.json else text)
    return 0


def _read_file(path: Path, what: str) -> bytes:
    if not path.exists():
        raise CliError(f"{what} {path} does not exist")
    if not path.is_file():
        raise CliError(f"{what} {path} is not a file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def _components_param(text: str) -> dict[str, float]:
    from app.composition import Explicit, parse_components_param
    from app.errors import BadRequestError

    try:
        spec = parse_components_param(text)
    except BadRequestError as exc:
        raise CliError(str(exc).removeprefix("tmc_components: ")) from exc
    return spec.weights if isinstance(spec, Explicit) else {}


def cmd_push(args: argparse.Namespace) -> int:
    data = _read_file(args.file, "component file")
    result = _client(args).push(args.id, data, args.weight, args.tag, not args.inactive)
    return _emit(args, result, f"pushed {result['id']} version {result['digest'][:12]} "
                 f"(generation {result['generation']})")


def cmd_ls(args: argparse.Namespace) -> int:
    body = _client(args).list(args.tag)
    rows = [f"{'ID':<24} {'VERSION':<13} {'WEIGHT':>8} {'ACTIVE':<6} TAGS"]
    for c in body["components"]:
        rows.append(f"{c['id']:<24} {c['digest'][:12]:<13} {c['weight']:>8g} "
                    f"{str(c['active']).lower():<6} {','.join(c['tags'])}")
    rows.append(f"generation {body['generation']}")
    return _emit(args, body, "\n".join(rows))


def cmd_reweight(args: argparse.Namespace) -> int:
    body = _client(args).patch(args.id, weight=args.weight)
    return _emit(args, body, f"{body['id']} weight {body['weight']:g}")


def cmd_forget(args: argparse.Namespace) -> int:
    r = _client(args).forget(args.id)
    return _emit(args, r, f"forgot {r['id']}: {len(r['digests_removed'])} version(s) removed, "
                 f"generation {r['generation']}{unfinished_purges(r)}")


def unfinished_purges(receipt: Json) -> str:
    """One line per store the forget has not (yet) purged for sure: a Redis rewrite still
    running, failed, or a store that cannot tell; with what to do."""
    lines = [f"\n  {p['store']} ({p['kind']}): {p['state']}"
             + (f" — {p['detail']}" if p.get("detail") else "")
             + (f"; check: {p['check']}" if p.get("check") else "")
             for p in receipt.get("purged", [])
             if p.get("state") not in ("purged", "not-persisted")]
    return "".join(lines)


def cmd_compose(args: argparse.Namespace) -> int:
    weights = _components_param(args.components)
    body = _client(args).put_composition(args.name, weights, args.normalize)
    return _emit(args, body, f"composition {body['name']} = {body['weights']} "
                 f"({body['normalize']})")


def cmd_predict(args: argparse.Namespace) -> int:
    client = _client(args)
    kind = client.base()["input_kind"]
    body: Json = {"inputs": [_input(kind, i) for i in args.inputs], "top_k": args.top_k}
    if args.all:
        body["components"] = "*"
    elif args.composition:
        body["composition"] = args.composition
    elif args.components:
        body["components"] = _components_param(args.components)
    if args.normalize:
        body["normalize"] = args.normalize
    result = client.predict(body)
    return _emit(args, result, _predict_table(args.inputs, result))


def _input(kind: str, value: str) -> Any:
    """One input as the API takes it: image files base64, tensors JSON, text as given."""
    if kind == "image":
        return base64.b64encode(_read_file(Path(value), "input file")).decode()
    if kind == "tensor":
        try:
            return json.loads(value)
        except ValueError:
            raise CliError(f"input {value!r} is not a JSON array (this base takes tensor "
                           "inputs such as '[0.1, 0.2]')") from None
    return value


def _predict_table(inputs: list[str], result: Json) -> str:
    lines = []
    for text, out in zip(inputs, result["outputs"], strict=True):
        top = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in out["top_k"])
        lines.append(f"{text[:48]!r:<50} {top}")
    prov = result["provenance"]
    comps = ", ".join(f"{c['id']}@{c['digest'][:8]}×{c['weight']:g}" for c in prov["components"])
    lines.append(f"composition: {comps or '(base only)'}; generation {prov['generation']}")
    return "\n".join(lines)
