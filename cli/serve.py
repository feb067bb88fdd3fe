"""`tmc serve` and `tmc demo`: the server side of the command line.

`tmc serve` loads the settings, opens the base and the registry before uvicorn starts (so a
missing or tampered base ends with exit code 4 and an unreachable registry with 1, instead
of a failed startup), then serves with ``uvicorn_options``. `tmc demo` is cli/demo.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from cli.errors import CliError, Subparsers, validation_summary

if TYPE_CHECKING:
    from app.service import Service
    from app.settings import Settings

# Slow clients: an idle keep-alive connection is closed after KEEP_ALIVE_S; one whose request
# head is incomplete after HEAD_TIMEOUT_S is closed (408) by app/http_protocol.py; a request
# head over MAX_HEAD_BYTES is refused by h11 (uvicorn answers 400). Slow bodies: a proxy.
KEEP_ALIVE_S = 5
HEAD_TIMEOUT_S = 10.0
MAX_HEAD_BYTES = 16 * 1024


def add_serve_parsers(sub: Subparsers) -> None:
    s = sub.add_parser("serve", help="serve the HTTP API (uvicorn, one worker)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.set_defaults(func=cmd_serve)
    d = sub.add_parser("demo", help="`make run`: base + example components, then serve")
    d.add_argument("--host")
    d.add_argument("--port", type=int)
    d.set_defaults(func=cmd_demo)


def listen_overrides(args: argparse.Namespace) -> dict[str, str | int]:
    """--host / --port where given: they override $TMC_HOST / $TMC_PORT."""
    return {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _load_settings(listen_overrides(args))
    return run_server(settings, open_service(settings))


def run_server(settings: Settings, service: Service | None = None) -> int:
    """uvicorn with `tmc serve`'s options (slow-client limits, drain) until it stops; the
    exit code. ``service``: opened beforehand (None: the app's startup opens it)."""
    import uvicorn

    from app.main import create_app

    try:
        uvicorn.run(create_app(settings, service), **uvicorn_options(settings))
    except SystemExit as exc:  # uvicorn exits (code 3) when the app's startup failed
        if exc.code in (0, None):
            return 0
        print("error: the server did not start; the reason is logged above", file=sys.stderr)
        return 1
    return 0


def uvicorn_options(settings: Settings, head_timeout_s: float = HEAD_TIMEOUT_S
                    ) -> dict[str, Any]:
    """The keyword arguments `tmc serve` gives uvicorn.run (tests serve with the same)."""
    from app.http_protocol import head_timeout_protocol

    return dict(host=settings.host, port=settings.port, workers=1,
                log_config=None,  # app/logs.py owns logging: every line in one format
                log_level=settings.log_level,
                timeout_graceful_shutdown=int(settings.drain_timeout_s) + 1,
                timeout_keep_alive=KEEP_ALIVE_S, h11_max_incomplete_event_size=MAX_HEAD_BYTES,
                http=head_timeout_protocol(head_timeout_s))


def _load_settings(overrides: dict[str, str | int]) -> Settings:
    from pydantic import ValidationError

    from app.settings import load_settings

    try:
        return load_settings(**overrides)
    except ValidationError as exc:
        raise CliError(f"invalid settings: {validation_summary(exc)}", 2) from exc
    except (OSError, ValueError) as exc:  # $TMC_CONFIG_FILE missing or not JSON
        raise CliError(f"cannot read the settings file "
                       f"{os.environ.get('TMC_CONFIG_FILE')}: {exc}", 2) from exc


def open_service(settings: Settings) -> Service:
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
    from cli.demo import run_demo

    return run_demo(listen_overrides(args))
