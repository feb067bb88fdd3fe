"""Process logging: one stderr handler (JSON or text) for tmc.* and uvicorn, request ids.

``setup_logging`` is idempotent: the app calls it when it is created and again at startup
(uvicorn's own ``dictConfig`` runs in between and replaces its loggers' handlers). Every line
emitted while a request is handled carries that request's ``request_id`` (a context variable
read by a filter; threads started by ``run_in_threadpool`` copy it). Lines never carry a
tensor, a token or a request body: lifecycle lines name the admin by ``actor`` (a hash
prefix of the token).
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import re
import sys
import uuid
from typing import TextIO

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("tmc_request_id",
                                                                        default=None)
REQUEST_ID_HEADER = "x-request-id"
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
# The loggers TMC_LOG_LEVEL sets; all of them write through the one root handler.
SERVER_LOGGERS = ("tmc", "uvicorn", "uvicorn.error", "uvicorn.access")
_NOT_EXTRA = frozenset(RESERVED_ATTRS) | {"taskName", "color_message"}
_MARK = "_tmc_handler"


def current_request_id() -> str | None:
    return REQUEST_ID.get()


def accept_request_id(given: str | None) -> str:
    """The client's X-Request-ID when it is 1-128 chars of [A-Za-z0-9._-], else a new one."""
    if given is not None and _VALID_REQUEST_ID.fullmatch(given):
        return given
    return uuid.uuid4().hex


def actor(authorization: str | None) -> str:
    """Who made an admin call, for logs: a sha256 prefix of the bearer token, never the token."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return "anonymous"
    return "token-sha256:" + hashlib.sha256(token.encode()).hexdigest()[:8]


class ContextFilter(logging.Filter):
    """Adds the current request id (unless the line names its own, as the device worker's
    do), drops uvicorn's ANSI ``color_message``, and splits access lines into fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            rid = REQUEST_ID.get()
            if rid is not None:
                record.request_id = rid
        record.__dict__.pop("color_message", None)
        if (record.name == "uvicorn.access" and isinstance(record.args, tuple)
                and len(record.args) == 5):
            client, method, path, http_version, status = record.args
            record.__dict__.update(client=client, method=method, path=path,
                                   http_version=http_version, status=status)
        return True


class TextFormatter(logging.Formatter):
    """One line for a terminal: time, level, logger, message, then the extra fields as k=v."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        extras = {k: v for k, v in record.__dict__.items()
                  if k not in _NOT_EXTRA and not k.startswith("_")}
        return line + "".join(f" {k}={v}" for k, v in extras.items())


def json_formatter() -> logging.Formatter:
    return JsonFormatter("%(levelname)s %(name)s %(message)s", timestamp="time",
                         rename_fields={"levelname": "level", "name": "logger"})


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (test runners swap it)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> TextIO:
        return sys.stderr


def resolve_format(setting: str, stream: TextIO | None = None) -> str:
    """``auto``: JSON unless the stream is a terminal (in a container it is not)."""
    if setting != "auto":
        return setting
    stream = sys.stderr if stream is None else stream
    try:
        tty = bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        tty = False
    return "text" if tty else "json"


def setup_logging(level: str = "info", fmt: str = "auto") -> logging.Handler:
    """Install the process's one handler on the root logger (replacing the one a previous
    call installed); set ``level`` on tmc.* and uvicorn's loggers and route them to it."""
    handler = StderrHandler()
    setattr(handler, _MARK, True)
    handler.setFormatter(json_formatter() if resolve_format(fmt) == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    numeric = getattr(logging, level.upper())
    for name in SERVER_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(numeric)
        if name != "tmc":  # uvicorn's dictConfig gives these handlers of their own
            for h in list(logger.handlers):
                logger.removeHandler(h)
        logger.propagate = True
    return handler
