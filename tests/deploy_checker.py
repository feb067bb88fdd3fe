"""scripts/deploy_check.py (and its deploy_check_* modules) loaded as modules, once.

scripts/ is no package: its directory goes on sys.path, as it is when the script runs.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def load_script_module(name: str) -> ModuleType:
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    return importlib.import_module(name)


def load_deploy_checker() -> ModuleType:
    return load_script_module("deploy_check")
