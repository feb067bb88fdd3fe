"""The processes the launchers start: where their binary is, how they stop, how they fail.

Policy: a binary is looked up on PATH (and, for a binary a Python package installs, beside
this interpreter: the virtual environment's bin/); when it is missing the error says the
command that installs it. A process is stopped with SIGTERM and, after a grace period,
SIGKILL, and always reaped.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

LOG_TAIL_CHARS = 3000  # of a server's log, quoted when it did not start


class LoopbackError(RuntimeError):
    """A server of ours could not be started; the message says why and what to do."""


class MissingBinary(LoopbackError):
    """The server's binary is not installed; the message is the command that installs it."""


class ServerDidNotStart(LoopbackError):
    """The server exited or did not serve in time; the message quotes its log."""


def find_binary(name: str, install_hint: str, *, label: str = "",
                beside_python: bool = False) -> str:
    """``name`` on PATH, else (``beside_python``) the one installed next to this interpreter.

    Raises MissingBinary: "<label or name> is not installed: <install_hint>"."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    if beside_python and beside.is_file():
        return str(beside)
    raise MissingBinary(f"{label or name} is not installed: {install_hint}")


def log_tail(log: Path) -> str:
    """The end of a server's log ('' when it has none yet)."""
    try:
        return log.read_text(errors="replace")[-LOG_TAIL_CHARS:]
    except FileNotFoundError:
        return ""


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``grace_s``; reaped either way."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
