"""The data that crosses machines in a cluster sweep: plain dataclasses of NumPy arrays, bytes and light project types.

Dask moves them (the scheduler pickles by reference to these classes); nothing here imports the compiler, the
trackers, Optuna or ONNX Runtime, so a device host can read what a compile host built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hailo_sweep.backends.base import BackendContext, DeviceOutputs, DeviceSpec, EmulationContext
from hailo_sweep.settings import Settings
from hailo_sweep.trial_result import TrialResult


@dataclass(frozen=True)
class SweepPayload:
    """What a compile host needs once per sweep besides the data: the model file and how to build a backend for it."""

    key: str  # the sweep's identity (name, model and data digests): a worker's cache key
    backend: str  # backend name, e.g. "hailo"
    context: BackendContext  # model_path and work_dir are replaced by the worker's own copies
    model_name: str
    model_bytes: bytes


@dataclass(frozen=True)
class BuildJob:
    trial: int
    settings: Settings
    layer_noise_samples: int = 0


@dataclass(frozen=True)
class DevicePart:
    """The part of a build a device host needs: the compiled file and how to open it (nothing else travels there)."""

    compiled_name: str
    compiled_bytes: bytes
    device_spec: DeviceSpec


@dataclass
class Built:
    """What a compile host produced for one trial; the compiled file travels as bytes."""

    result: TrialResult  # timings, script, params, flags, a failure's stage and reason; compiled.path is a bare name
    emulations: dict[EmulationContext, dict[str, np.ndarray]]
    device: DevicePart | None = None
    logs: dict[str, str] = field(default_factory=dict)  # the toolchain's own logs by file name
    host: str = ""
    facts: dict[str, str | float] = field(default_factory=dict)  # the backend's prepare facts on that host


@dataclass(frozen=True)
class DeviceJob:
    trial: int
    placement: str  # normalization_placement: which fed evaluation set
    determinism_samples: int = 0


@dataclass
class DeviceRun:
    """What a device host measured, or why it could not."""

    outputs: DeviceOutputs | None
    repeat: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None
    notes: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None
    traceback: str | None = None
    host: str = ""


@dataclass
class DeviceCheck:
    """A device host's answer before the first trial: notes, or why its device cannot run the target."""

    notes: list[str] = field(default_factory=list)
    refused: str | None = None
    fix: str | None = None

