"""The backend interface: the stages of a trial that differ between Hailo's toolchain and the embedded backend.

A backend is a context manager (``with backend: ...``) that activates its resources on enter and releases them
on exit, in the manner of Polygraphy's runners. It knows nothing about Optuna or MLflow: it takes typed inputs
(``BackendContext``, ``Settings``, numpy arrays) and returns typed results. Comparing outputs is not its job
either; ``hailo_sweep.metrics`` does that.

Input convention for every stage: arrays are batches in the ONNX model's own layout (NCHW for images) and in the
*feed domain* chosen by the pipeline (``hailo_sweep.data.feed``): normalized float32 when normalization runs on
the host, the raw data domain (e.g. uint8 0-255) when it runs inside the model. Backends that need another layout
(Hailo: NHWC) convert internally.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

import numpy as np

from hailo_sweep.settings import Settings


class EmulationContext(str, enum.Enum):
    """Emulation flavours, named after Hailo's ``InferenceContext`` members they correspond to."""

    FP_OPTIMIZED = "fp_optimized"  # float model after full-precision optimizations (SDK_FP_OPTIMIZED)
    QUANTIZED = "quantized"  # quantized emulation (SDK_QUANTIZED)
    BIT_EXACT = "bit_exact"  # bit-exact emulation of the hardware arithmetic (SDK_BIT_EXACT), where available


@dataclass(frozen=True)
class Normalization:
    """Input normalization ``(x - mean) / std`` per channel, in the raw data domain."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def apply(self, x: np.ndarray, channel_axis: int = 1) -> np.ndarray:
        shape = [1] * x.ndim
        shape[channel_axis] = -1
        mean = np.asarray(self.mean, np.float32).reshape(shape)
        std = np.asarray(self.std, np.float32).reshape(shape)
        return ((x.astype(np.float32) - mean) / std).astype(np.float32)


@dataclass(frozen=True)
class ModelIO:
    """What the pipeline knows about the ONNX model's interface."""

    input_name: str
    input_shape: tuple[int | str, ...]  # as declared, NCHW for images; the batch dimension may be symbolic
    output_names: tuple[str, ...]


@dataclass(frozen=True)
class BackendContext:
    """Everything a backend is constructed with, once per sweep."""

    model_path: Path
    target: str  # hailo8 | hailo8l | hailo10h
    work_dir: Path  # per-sweep cache directory, owned by the backend
    model_io: ModelIO
    normalization: Normalization | None
    domain: tuple[float, float]  # value range of the raw data
    options: dict[str, Any] = field(default_factory=dict)  # backend-specific options from the config
    # outputs whose samples are not on axis 0 (time-major (T, N, C)): stages return them batch-first all the same
    output_batch_axes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class QuantParams:
    """Affine quantization of one output: ``x = (q - zero_point) * scale``."""

    scale: float
    zero_point: float
    dtype: str  # numpy dtype name of the raw integers, e.g. "uint8", "uint16"

    @property
    def bits(self) -> int:
        return int(np.dtype(self.dtype).itemsize * 8)

    def dequantize(self, raw: np.ndarray) -> np.ndarray:
        return ((raw.astype(np.float32) - np.float32(self.zero_point)) * np.float32(self.scale)).astype(np.float32)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        info = np.iinfo(np.dtype(self.dtype))
        q = np.rint(x.astype(np.float64) / self.scale + self.zero_point)  # round half to even, as HailoRT does
        return np.clip(q, info.min, info.max).astype(self.dtype)


@dataclass
class OptimizedModel:
    """Result of the optimize stage: a quantized model plus the script/recipe that produced it."""

    settings: Settings
    script: str  # the model script (.alls) or quantization recipe text, logged as an artifact
    script_name: str  # artifact file name, e.g. "model_script.alls" or "recipe.txt"
    handle: Any  # backend-private state (paths, runner)
    params: dict[str, str | int | float] = field(default_factory=dict)  # extra facts to record as params
    flags: list[str] = field(default_factory=list)  # named warnings, e.g. "optimization_level_lowered"


@dataclass
class CompiledModel:
    """Result of the compile stage: one self-contained file (HEF, or the embedded backend's integer ONNX)."""

    path: Path
    size_bytes: int
    kind: str  # "hef" | "onnx-int8"
    params: dict[str, str | int | float] = field(default_factory=dict)


@dataclass
class DeviceOutputs:
    """What the device returned: raw integers, their quantization, and floats dequantized by our code."""

    raw: dict[str, np.ndarray]
    quant: dict[str, QuantParams]
    outputs: dict[str, np.ndarray]
    metrics: dict[str, float] = field(default_factory=dict)  # throughput_fps, latency_ms, ...
    notes: list[str] = field(default_factory=list)  # e.g. "float32 fallback: multiple quant infos for 'x'"


@dataclass(frozen=True)
class LayerNoise:
    """Per-layer noise of the quantized model: SNR of a layer's quantized output against the float model's."""

    layer: str
    snr_db: float
    kind: str = "activation"  # "activation" | "weight" | "output"


class TransientDeviceError(RuntimeError):
    """A device failure worth another attempt (e.g. a runtime timeout): the pipeline retries the device stage a
    bounded number of times (``DeviceSpec.retries``) before failing the trial. Backends raise it only for errors
    their runtime documents as transient; everything else fails the trial at once."""


class DeviceRunner(abc.ABC):
    """Runs one compiled model on one device; a context manager that owns the device while active."""

    def __enter__(self) -> DeviceRunner:
        self.activate()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.deactivate()

    def activate(self) -> None:  # noqa: B027 - optional hook
        """Acquire the device and load the model."""

    def deactivate(self) -> None:  # noqa: B027 - optional hook
        """Release everything ``activate`` acquired. Must be safe to call after a failed ``activate``."""

    @abc.abstractmethod
    def run(self, inputs: np.ndarray) -> DeviceOutputs:
        """Run the batch; return raw outputs, their quantization and our dequantization, keyed by ONNX output name."""


class DeviceSpec(abc.ABC):
    """How to run a compiled model on a device, as plain data: made where the model was compiled (``Backend.device_spec``),
    opened where the device is, which may be another machine. Subclasses live in modules that import neither the
    compiler nor anything of the sweep, so a device host needs only the runtime.
    """

    #: further attempts of the device stage after a ``TransientDeviceError`` (0: none)
    retries: int = 0

    @abc.abstractmethod
    def open(self, compiled_path: Path) -> DeviceRunner:
        """A runner for the compiled file at ``compiled_path`` (use it as a context manager)."""


class Backend(abc.ABC):
    """One toolchain behind the trial's stages. Subclasses set ``name`` and implement the abstract stages."""

    name: ClassVar[str]
    #: file kind of the compiled model, e.g. "hef" or "onnx-int8"
    compiled_kind: ClassVar[str]
    def __init__(self, context: BackendContext):
        self.context = context

    # -- resources -----------------------------------------------------------------------------------------
    def __enter__(self) -> Backend:
        self.activate()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.deactivate()

    def activate(self) -> None:  # noqa: B027 - optional hook
        """Acquire long-lived resources (sessions, SDK objects)."""

    def deactivate(self) -> None:  # noqa: B027 - optional hook
        """Release what ``activate`` acquired."""

    # -- facts ---------------------------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def is_available(cls) -> bool:
        """True when the backend's packages import on this machine."""

    @abc.abstractmethod
    def versions(self) -> dict[str, str]:
        """Versions of the toolchain packages in use, for the record."""

    @abc.abstractmethod
    def default_settings(self, calibset_size: int, output_names: tuple[str, ...]) -> Settings:
        """The settings the toolchain would use if the user changed nothing (the sweep's baseline trial)."""

    @abc.abstractmethod
    def emulation_contexts(self) -> tuple[EmulationContext, ...]:
        """The emulation flavours this backend (and installed toolchain version) can run, cheapest first."""

    @abc.abstractmethod
    def validate(self, settings: Settings) -> None:
        """Raise ``UnsupportedSetting`` for any knob value this backend cannot honour."""

    def check_device(self) -> list[str]:
        """Once per sweep, before the first trial: is the device there, free, and able to run the target?

        Raise ``UserInputError`` (with the fix) when the device can certainly not run what the sweep compiles; return
        notes for what could not be checked or is worth saying (busy, unidentified). A backend without a device
        (the embedded one) has nothing to check.
        """
        return []

    def calibration_advice(self, entries: int, optimization_levels: Sequence[int]) -> str | None:
        """Once per sweep: what the toolchain will do differently with ``entries`` calibration entries at these levels
        (e.g. lower them), or None when nothing needs saying."""
        return None

    # -- stages --------------------------------------------------------------------------------------------
    def expect_inputs(self, placement: str, evaluation: np.ndarray) -> None:  # noqa: B027 - optional hook
        """Once per sweep and normalization placement, after ``prepare`` and before the first trial: the read-only
        evaluation set every trial of that placement will be emulated on (the same array object each time).

        A backend may compute here what depends on these inputs only, never on a trial's settings (the embedded one:
        the unchanged float model's outputs, which every trial without a float rewrite shares), so that the first
        trial does not carry a cost of the whole sweep. The caller counts the time as the sweep's preparation; an
        exception here is a note, and the trial then computes what it needs itself. The default does nothing.
        """

    @abc.abstractmethod
    def prepare(self) -> dict[str, str | float]:
        """Once per sweep: translate or pre-process the model, cached under ``context.work_dir`` by content hash.

        Returns facts to record (e.g. ``{"cache_hit": "true"}``).
        """

    @abc.abstractmethod
    def optimize(self, settings: Settings, calibration: np.ndarray, work_dir: Path) -> OptimizedModel:
        """Quantize with ``settings``.

        ``calibration`` is the WHOLE calibration set the pipeline fed; ``settings.calibset_size`` says how many entries
        to calibrate on. A backend that calibrates on a slice takes it itself; a toolchain that uses the dataset for more
        than statistics (the DFC: fine-tuning, AdaRound, its own level decisions) gets all of it.
        Log files a stage writes directly under ``work_dir`` as ``*.log`` are kept as the trial's logs.
        """

    @abc.abstractmethod
    def emulate(self, model: OptimizedModel, inputs: np.ndarray, context: EmulationContext) -> dict[str, np.ndarray]:
        """Float outputs of the emulated model, keyed by ONNX output name."""

    @abc.abstractmethod
    def compile(self, model: OptimizedModel, work_dir: Path) -> CompiledModel:
        """Build the deployable file, written atomically under ``work_dir``."""

    @abc.abstractmethod
    def device_spec(self, compiled: CompiledModel) -> DeviceSpec:
        """What a device host needs to run ``compiled`` (its file travels apart), see ``DeviceSpec``."""

    def device(self, compiled: CompiledModel) -> DeviceRunner:
        """A runner for the compiled model on this backend's device (use it as a context manager)."""
        return self.device_spec(compiled).open(Path(compiled.path))

    @classmethod
    def describe_compiled(cls, path: Path) -> dict[str, Any]:
        """How a deployment feeds the compiled file at ``path`` and reads its outputs (names, dtypes, shapes, how to
        dequantize), for the export's manifest; empty when this backend cannot read its own file here."""
        return {}

    def layer_noise(self, model: OptimizedModel, inputs: np.ndarray) -> list[LayerNoise]:
        """Per-layer SNR of the quantized model against float on ``inputs`` (feed domain), noisiest first.

        Optional: a backend without a per-layer analysis raises ``NotImplementedError``.
        """
        raise NotImplementedError(f"the {self.name} backend has no per-layer noise analysis")
