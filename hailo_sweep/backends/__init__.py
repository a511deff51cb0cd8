"""Backends: the toolchains behind a trial's stages. ``select_backend`` resolves the config's choice.

Backend modules are imported lazily so that importing hailo-sweep never imports a toolchain it doesn't use.
"""

from __future__ import annotations

import importlib

from hailo_sweep.backends.base import Backend
from hailo_sweep.errors import BackendUnavailable

_REGISTRY: dict[str, tuple[str, str]] = {
    "onnxruntime": ("hailo_sweep.backends.onnxruntime.backend", "OnnxRuntimeBackend"),
    "hailo": ("hailo_sweep.backends.hailo.backend", "HailoBackend"),
}


def backend_class(name: str) -> type[Backend]:
    module_name, class_name = _REGISTRY[name]
    return getattr(importlib.import_module(module_name), class_name)  # type: ignore[no-any-return]


def select_backend(requested: str) -> tuple[type[Backend], str | None]:
    """The backend class for the config's ``backend`` value, and a note to show the user when ``auto`` fell back."""
    if requested == "auto":
        try:
            hailo: type[Backend] | None = backend_class("hailo")
        except ImportError:
            hailo = None
        if hailo is not None and getattr(hailo, "is_complete", hailo.is_available)():
            return hailo, None
        return backend_class("onnxruntime"), (
            "backend auto: the Hailo SDK (hailo_sdk_client and hailo_platform) is not fully installed; using the embedded onnxruntime backend"
        )
    cls = backend_class(requested)
    if not cls.is_available():
        raise BackendUnavailable(f"the {requested} backend is not available on this machine", key="backend")
    return cls, None
