"""The `tmc` command line: serve, base init, train, and a client for the HTTP API.

Exit codes: 0 ok; 1 server unreachable, server error, or `tmc serve` could not start (the
reason is logged above the final error line); 2 bad usage or input refused (4xx);
3 missing dataset; 4 base not found or tampered. Every failure ends with one
``error: ...`` line on stderr, never a traceback (``TMC_DEBUG=1`` re-raises unexpected
errors so their traceback shows).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from pathlib import Path
from typing import Any

from app.client import ClientError, TmcClient

DEFAULT_SERVER = os.environ.get("TMC_SERVER", "http://127.0.0.1:8000")


class CliError(Exception):
    """A failure the user can fix: ``main`` prints ``error: <message>`` and exits ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse, but its usage errors end with the same ``error: ...`` line (exit 2)."""

    def error(self, message: str) -> Any:  # argparse's signature is NoReturn
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {self.prog}: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return _fail("no command given")
    try:
        code: int = args.func(args)
        return code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        code, message = _classify(exc)
        if code == 1 and not isinstance(exc, ClientError) and os.environ.get("TMC_DEBUG"):
            raise
        print(f"error: {_one_line(message)}", file=sys.stderr)
        return code


def _classify(exc: Exception) -> tuple[int, str]:
    """The exit code and message for an error that reached ``main``."""
    if isinstance(exc, CliError):
        return exc.code, str(exc)
    if isinstance(exc, ClientError):
        return (2 if exc.status and 400 <= exc.status < 500 else 1), str(exc)
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return 2, f"invalid settings: {_validation_summary(exc)}"
    from bases import BaseError, BaseNotFoundError, TamperedBaseError

    if isinstance(exc, (BaseNotFoundError, TamperedBaseError)):
        return 4, str(exc)
    if isinstance(exc, BaseError):
        return 2, str(exc)
    if isinstance(exc, OSError):
        return 2, str(exc)
    return 1, f"unexpected {type(exc).__name__}: {exc} (set TMC_DEBUG=1 for the traceback)"


def _one_line(message: str) -> str:
    return " ".join(message.split()) or "failed"


def _validation_summary(exc: Any) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())) or 'settings'}: "
                     f"{e.get('msg', 'invalid')}" for e in exc.errors())


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tmc", description="Tangent Model Composition serving")
    sub = p.add_subparsers(title="commands")
    _serve_parsers(sub)
    _base_parsers(sub)
    _train_parser(sub)
    _client_parsers(sub)
    return p


# -- server side -----------------------------------------------------------------------------
def _serve_parsers(sub: Any) -> None:
    s = sub.add_parser("serve", help="serve the HTTP API (uvicorn, one worker)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.set_defaults(func=cmd_serve)
    d = sub.add_parser("demo", help="`make run`: base + example components, then serve")
    d.add_argument("--host")
    d.add_argument("--port", type=int)
    d.set_defaults(func=cmd_demo)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.main import create_app

    settings = _load_settings(_overrides(args))
    service = _build_service(settings)
    try:
        uvicorn.run(create_app(settings, service), **uvicorn_options(settings))
    except SystemExit as exc:  # uvicorn exits (code 3) when the app's startup failed
        if exc.code in (0, None):
            return 0
        print("error: the server did not start; the reason is logged above", file=sys.stderr)
        return 1
    return 0


# Slow clients: an idle keep-alive connection is closed after KEEP_ALIVE_S; one whose request
# head is incomplete after HEAD_TIMEOUT_S is closed (408) by app/http_protocol.py; a request
# head over MAX_HEAD_BYTES is refused by h11 (uvicorn answers 400). Slow bodies: a proxy.
KEEP_ALIVE_S = 5
HEAD_TIMEOUT_S = 10.0
MAX_HEAD_BYTES = 16 * 1024


def uvicorn_options(settings: Any, head_timeout_s: float = HEAD_TIMEOUT_S) -> dict[str, Any]:
    """The keyword arguments `tmc serve` gives uvicorn.run (tests serve with the same)."""
    from app.http_protocol import head_timeout_protocol

    return dict(host=settings.host, port=settings.port, workers=1,
                log_config=None,  # app/logs.py owns logging: every line in one format
                log_level=settings.log_level,
                timeout_graceful_shutdown=int(settings.drain_timeout_s) + 1,
                timeout_keep_alive=KEEP_ALIVE_S, h11_max_incomplete_event_size=MAX_HEAD_BYTES,
                http=head_timeout_protocol(head_timeout_s))


def _load_settings(overrides: dict[str, Any]) -> Any:
    from pydantic import ValidationError

    from app.settings import load_settings

    try:
        return load_settings(**overrides)
    except ValidationError as exc:
        raise CliError(f"invalid settings: {_validation_summary(exc)}", 2) from exc
    except (OSError, ValueError) as exc:  # $TMC_CONFIG_FILE missing or not JSON
        raise CliError(f"cannot read the settings file "
                       f"{os.environ.get('TMC_CONFIG_FILE')}: {exc}", 2) from exc


def _build_service(settings: Any) -> Any:
    """Base and registry, opened once before uvicorn starts (the app's startup uses this
    service): a missing or tampered base ends with one error line and exit code 4, an
    unreachable registry with exit code 1, instead of a failed startup."""
    from app.service import Service
    from bases import BaseError
    from registry import RegistryError

    try:
        return Service.build(settings)
    except BaseError as exc:
        raise CliError(str(exc), 4) from exc
    except RegistryError as exc:
        raise CliError(f"cannot open the registry: {exc}", 1) from exc
    except (OSError, ValueError, RuntimeError) as exc:
        raise CliError(f"cannot load the base at {settings.base_dir}: {exc}", 4) from exc


def cmd_demo(args: argparse.Namespace) -> int:
    from app.demo import run_demo

    return run_demo(_overrides(args))


def _base_parsers(sub: Any) -> None:
    b = sub.add_parser("base", help="create or inspect a base model directory")
    b.set_defaults(func=lambda _args: _no_subcommand(b, "init or show"))
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


def _default_base_dir() -> Path:
    return Path(os.environ.get("TMC_BASE_DIR") or Path(os.environ.get("TMC_HOME", ".tmc"))
                / "base")


def _parse_options(pairs: list[str]) -> dict[str, Any]:
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
    from bases import BaseError, init_base, make_spec

    out = args.out or _default_base_dir()
    try:
        spec = make_spec(args.preset, name=args.name, head_seed=args.head_seed,
                         labels=args.labels.split(",") if args.labels else None,
                         options=_parse_options(args.option), tangent=args.tangent)
        fp = init_base(out, spec, force=args.force)
    except BaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"base {spec.name} ({spec.preset}) written to {out}\nfingerprint {fp}")
    return 0


def cmd_base_show(args: argparse.Namespace) -> int:
    from bases import BaseError, load_base

    try:
        base = load_base(args.base or _default_base_dir(), check_forward_ad=False)
    except BaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4
    region = [{"name": p.name, "shape": list(p.shape), "dtype": p.dtype}
              for p in base.region.values()]
    print(json.dumps({"name": base.spec.name, "preset": base.spec.preset,
                      "fingerprint": base.fingerprint, "input_kind": base.spec.input_kind,
                      "labels": base.labels, "tangent_region": region}, indent=2))
    return 0


def _train_parser(sub: Any) -> None:
    try:
        from training.cli import add_train_parser, run_train
    except ImportError:  # training package unavailable: the command says so
        t = sub.add_parser("train", help="train one component (unavailable)")
        t.set_defaults(func=lambda a: _fail("the training package is not installed"))
        return
    t = add_train_parser(sub)
    t.set_defaults(func=run_train)


def _no_subcommand(parser: argparse.ArgumentParser, choices: str) -> int:
    parser.print_help()
    return _fail(f"choose a {parser.prog.removeprefix('tmc ')} command: {choices}")


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


# -- client side -----------------------------------------------------------------------------
def _client_parsers(sub: Any) -> None:
    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        c: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
        c.add_argument("--server", default=DEFAULT_SERVER, help="default: $TMC_SERVER")
        c.add_argument("--json", action="store_true", help="machine-readable output")
        return c

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
    pr = add("predict", "predict with a composition")
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


def _emit(args: argparse.Namespace, payload: Any, text: str) -> int:
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
                 f"generation {r['generation']}{_unfinished_purges(r)}")


def _unfinished_purges(receipt: dict[str, Any]) -> str:
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
    body: dict[str, Any] = {"inputs": [_input(kind, i) for i in args.inputs],
                            "top_k": args.top_k}
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
    if kind == "image":
        return base64.b64encode(_read_file(Path(value), "input file")).decode()
    if kind == "tensor":
        try:
            return json.loads(value)
        except ValueError:
            raise CliError(f"input {value!r} is not a JSON array (this base takes tensor "
                           "inputs such as '[0.1, 0.2]')") from None
    return value


def _predict_table(inputs: list[str], result: dict[str, Any]) -> str:
    lines = []
    for text, out in zip(inputs, result["outputs"], strict=True):
        top = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in out["top_k"])
        lines.append(f"{text[:48]!r:<50} {top}")
    prov = result["provenance"]
    comps = ", ".join(f"{c['id']}@{c['digest'][:8]}×{c['weight']:g}" for c in prov["components"])
    lines.append(f"composition: {comps or '(base only)'}; generation {prov['generation']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
