"""scripts/chart-check.py loaded as a module (``check``), for the tests of every tier that compare
the chart with the code (it is a script, not part of the package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def _load_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chart_check", ROOT / "scripts" / "chart-check.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["chart_check"] = module
    spec.loader.exec_module(module)
    return module


check: ModuleType = _load_check()
