"""scripts/deploy_check.py loaded as a module (it is a script, not a package), once."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def load_deploy_checker() -> Any:
    if "deploy_check" in sys.modules:
        return sys.modules["deploy_check"]
    spec = importlib.util.spec_from_file_location("deploy_check",
                                                  ROOT / "scripts" / "deploy_check.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["deploy_check"] = module
    spec.loader.exec_module(module)
    return module
