"""Optional, lazy imports of Hailo's two wheels, in the manner of Optuna's ``try_import``.

Why: neither wheel is on PyPI (both come from Hailo's Developer Zone), the DFC pulls in TensorFlow, and HailoRT needs
a compiled extension matching the Python version. Importing hailo-sweep must work without them, and when the
``hailo`` backend is asked for, the user must learn exactly which package is missing and where to get it.

Nothing here imports a Hailo package at module import time: ``import_dfc()`` / ``import_hailort()`` do, on call.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass
from types import ModuleType, TracebackType

from hailo_sweep.errors import BackendUnavailable

DEVELOPER_ZONE = "https://hailo.ai/developer-zone/"


@dataclass(frozen=True)
class HailoPackage:
    """One of Hailo's wheels: its import name, distribution name and what to tell a user who lacks it."""

    module: str  # import name
    distribution: str  # name in importlib.metadata
    title: str
    wheel: str  # file name pattern of the wheel
    needed_for: str


# Distribution and wheel names: hailo-api.md §5 (MZ setup.py checks "hailo-dataflow-compiler"; HailoRT setup.py
# names the package "hailort", import "hailo_platform").
DFC = HailoPackage(
    module="hailo_sdk_client",
    distribution="hailo-dataflow-compiler",
    title="Hailo Dataflow Compiler",
    wheel="hailo_dataflow_compiler-<version>-py3-none-linux_x86_64.whl",
    needed_for="translate, optimize, emulate and compile",
)
HAILORT = HailoPackage(
    module="hailo_platform",
    distribution="hailort",
    title="HailoRT Python API",
    wheel="hailort-<version>-cp3XY-cp3XY-linux_<x86_64|aarch64>.whl",
    needed_for="running the HEF on a Hailo device",
)

_PAIRING = (
    "install matching versions: DFC 3.x with HailoRT 4.x for Hailo-8/8L, DFC 5.x with HailoRT 5.x for Hailo-10H"
)


class try_import:
    """Context manager that records a failed import instead of raising it; ``check()`` raises it, explained.

    Any exception is recorded, not only ``ImportError``: HailoRT raises ``MissingPyHRTLib`` (an ``Exception``) when
    its compiled extension is absent, and ``ImportError`` when the extension's version differs from the package's
    (``hailo_platform/__init__.py``).
    """

    def __init__(self, package: HailoPackage):
        self.package = package
        self.error: BaseException | None = None

    def __enter__(self) -> try_import:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        if exc is not None and isinstance(exc, Exception):
            self.error = exc
            return True
        return False

    def is_successful(self) -> bool:
        return self.error is None

    def check(self) -> None:
        if self.error is None:
            return
        pkg = self.package
        if isinstance(self.error, ModuleNotFoundError) and self.error.name == pkg.module:
            state = f"is not installed (no module named {pkg.module!r})"
        else:
            state = f"is installed but failed to import ({type(self.error).__name__}: {self.error})"
        raise BackendUnavailable(
            f"the hailo backend needs the {pkg.title} (Python package {pkg.module!r}, distribution {pkg.distribution!r}) "
            f"for {pkg.needed_for}, and it {state}",
            key="backend",
            fix=(
                f"it is not on PyPI: download {pkg.wheel} from Hailo's Developer Zone ({DEVELOPER_ZONE}, free "
                f"registration) or use the Hailo AI Software Suite docker, then `pip install` it into this environment; "
                f"{_PAIRING}. Or set backend: onnxruntime to use the embedded backend"
            ),
        ) from self.error


def _import(package: HailoPackage) -> ModuleType:
    with try_import(package) as attempt:
        module = importlib.import_module(package.module)
    attempt.check()
    return module


def import_dfc() -> ModuleType:
    """``hailo_sdk_client``, or ``BackendUnavailable`` saying how to install the Dataflow Compiler."""
    return _import(DFC)


def import_hailort() -> ModuleType:
    """``hailo_platform``, or ``BackendUnavailable`` saying how to install HailoRT."""
    return _import(HAILORT)


def importable(package: HailoPackage) -> bool:
    with try_import(package) as attempt:
        importlib.import_module(package.module)
    return attempt.is_successful()


def version_of(package: HailoPackage) -> str:
    """The package's version for the record: its ``__version__``, else the distribution's metadata, else 'unknown'.

    Imports the package; returns 'not installed' when it doesn't import.
    """
    with try_import(package) as attempt:
        module = importlib.import_module(package.module)
    if not attempt.is_successful():
        return "not installed"
    version = getattr(module, "__version__", None)
    if version:
        return str(version)
    try:
        return importlib.metadata.version(package.distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
