"""Every module of the package imports when it is the first one imported (no import cycle hides behind an order)."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import pytest

import hailo_sweep

MODULES = sorted(m.name for m in pkgutil.walk_packages(hailo_sweep.__path__, "hailo_sweep."))


@pytest.mark.parametrize("name", MODULES)
def test_module_imports_first(name: str) -> None:
    saved = {k: v for k, v in sys.modules.items() if k == "hailo_sweep" or k.startswith("hailo_sweep.")}
    for k in saved:
        del sys.modules[k]
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if (exc.name or "").startswith("hailo_sweep"):
            raise
        pytest.skip(f"optional dependency {exc.name} not installed")  # e.g. torch for the training example
    finally:
        for k in [k for k in sys.modules if k == "hailo_sweep" or k.startswith("hailo_sweep.")]:
            del sys.modules[k]
        sys.modules.update(saved)
