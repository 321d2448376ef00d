"""Which compiled twins this process uses (setup.py builds them at ``pip install``).

``BOTWARDEN_PURE_PYTHON=1`` in the environment runs every pure-Python reference instead, as it
does for appliance.hotpath (how the suite runs the fallback); a module that was not built (no
compiler, no Cython) also leaves the reference in charge."""

from __future__ import annotations

import importlib
import os
from types import ModuleType


def load(name: str) -> ModuleType | None:
    """``analytics.<name>`` (e.g. ``_chain``), or None: forced pure, or not built."""
    if os.environ.get("BOTWARDEN_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        return importlib.import_module(f"analytics.{name}")
    except ImportError:
        return None
