"""Running a HEF on a Hailo device with HailoRT (``hailo_platform``), one device per worker process at a time.

What this module guarantees, and where each fact comes from (hailo-api.md §3; ``hailo-ai/hailort`` branch hailo8):

- The device is chosen, locked, waited for and checked against the HEF's target by ``device`` (see there).
- InferModel API with a ROUND_ROBIN VDevice (HRT_0 tutorial; pyhailort.py ``InferModel``/``ConfiguredInferModel``),
  falling back to ``InferVStreams`` where ``VDevice.create_infer_model`` is missing (HRT_2 tutorial, MZ
  ``hw_infer_utils.py``).
- Raw outputs: each output keeps its own device type (UINT8, or UINT16 for a16_w16 layers) and is dequantized here
  with its own ``qp_scale``/``qp_zp``: ``x = (q - qp_zp) * qp_scale`` (``quantization.hpp``). An output with several
  quant infos (``quant_infos`` longer than one, or the single ``quant_info`` all zeros = ``is_qp_valid`` false) asks
  HailoRT for FLOAT32 instead, and says so in the notes.
- Inputs in the type the HEF expects: raw integers (uint8 frames pass through when the input QP is the identity, as
  with on-chip normalization of 0..255 data); other data are quantized on the host exactly as HailoRT would
  (``q = bankers_round(clip(x, limvals) / qp_scale + qp_zp)``, float32 arithmetic).
- A runtime timeout (``HailoRTTimeout``) is raised as ``HailoDeviceTimeout``, a transient error the pipeline retries.
- Any failure releases the device and the lock before the error leaves ``run``/``activate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np

from hailo_sweep.backends.base import DeviceOutputs, DeviceRunner
from hailo_sweep.backends.hailo.device import (
    ENV_DEVICE_ID,
    DeviceLock,
    DeviceOptions,
    HailoDeviceError,
    HailoDeviceTimeout,
    Waiter,
    check_target,
    device_arch,
    is_busy,
    is_transient,
    select_device,
)
from hailo_sweep.backends.hailo.engines import Engine, InferModelEngine, VStreamsEngine, host_input, quiet
from hailo_sweep.backends.hailo.layout import to_nhwc, to_onnx_layout
from hailo_sweep.backends.hailo.naming import OnnxOutput, onnx_name_for
from hailo_sweep.errors import UserInputError

__all__ = ["ENV_DEVICE_ID", "DeviceLock", "DeviceOptions", "HailoDeviceError", "HailoDeviceRunner", "HailoDeviceTimeout", "OutputNaming"]


# -- the runner -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OutputNaming:
    """How to name HEF outputs: the ONNX outputs, and the HN's vstream -> ONNX mapping as the fallback."""

    onnx_outputs: tuple[OnnxOutput, ...]
    vstream_to_onnx: dict[str, str]

    def resolve(self, engine: Engine) -> dict[str, str]:
        """HEF output vstream name -> ONNX output name, for every output; refuse anything unmapped."""
        routes: dict[str, str] = {}
        for spec in engine.outputs:
            name = onnx_name_for(engine.original_names(spec.name), self.onnx_outputs) or self.vstream_to_onnx.get(spec.name)
            if name is None or name in routes.values():
                raise HailoDeviceError(
                    f"cannot map HEF output {spec.name!r} to an ONNX output ({', '.join(o.name for o in self.onnx_outputs)})"
                )
            routes[spec.name] = name
        missing = [o.name for o in self.onnx_outputs if o.name not in routes.values()]
        if missing:
            raise HailoDeviceError(f"the HEF has no output for ONNX output(s) {', '.join(missing)}")
        return routes


@dataclass
class HailoDeviceRunner(DeviceRunner):
    """Runs one HEF on one locked device. Use as a context manager; everything is released on exit or failure."""

    hrt: ModuleType
    hef_path: Path
    hef_target: str
    naming: OutputNaming
    options: DeviceOptions
    device_id: str | None = field(default=None, init=False)
    _lock: DeviceLock | None = field(default=None, init=False)
    _engine: Engine | None = field(default=None, init=False)
    _routes: dict[str, str] = field(default_factory=dict, init=False)
    _notes: list[str] = field(default_factory=list, init=False)

    def activate(self) -> None:
        if self._engine is not None:
            return
        waits: list[str] = []
        waiter = Waiter(self.options.wait_s, waits)
        try:
            self.device_id, self._lock = select_device(self.hrt, self.options, waiter)
            with quiet("HailoRT (open the device)"):  # HailoRT's console logger goes to the log, not the console
                arch, why = device_arch(self.hrt, self.device_id)
                self._notes = [*waits, *check_target(self.hef_target, arch, self.device_id, why)]
                self._engine = self._open(waiter)
            self._notes += [note for note in waits if note not in self._notes]
            self._notes += [self._engine.api, *self._engine.notes]
            self._routes = self.naming.resolve(self._engine)
        except self.hrt.HailoRTException as exc:
            self.deactivate()
            if type(exc).__name__ == "HailoRTHEFNotCompatibleWithDevice":
                raise UserInputError(
                    f"HailoRT refused the {self.hef_target} HEF on device {self.device_id}: {exc}",
                    key="target",
                    fix="set target to the device's architecture (hailortcli fw-control identify shows it)",
                ) from exc
            error = HailoDeviceTimeout if is_transient(exc) else HailoDeviceError
            raise error(f"device {self.device_id}: {type(exc).__name__}: {exc}") from exc
        except BaseException:
            self.deactivate()
            raise

    def _open(self, waiter: Waiter) -> Engine:
        """The engine on the locked device; while HailoRT says another process holds the device, wait (bounded)."""
        assert self.device_id is not None
        engine = InferModelEngine if hasattr(self.hrt.VDevice, "create_infer_model") else VStreamsEngine
        while True:
            try:
                return engine(self.hrt, self.hef_path, self.device_id, self.options.timeout_ms)
            except self.hrt.HailoRTException as exc:
                if not is_busy(exc) or not waiter.wait(f"device {self.device_id}, held by a process outside hailo-sweep ({exc})"):
                    raise

    def deactivate(self) -> None:
        engine, self._engine = self._engine, None
        lock, self._lock = self._lock, None
        try:
            if engine is not None:
                engine.close()
        finally:
            if lock is not None:
                lock.release()

    def run(self, inputs: np.ndarray) -> DeviceOutputs:
        engine = self._engine
        if engine is None:
            raise HailoDeviceError("the device runner is not active (use it as a context manager; a failed run releases it)")
        frames = to_nhwc(inputs)
        if tuple(frames.shape[1:]) != engine.input.shape:
            raise ValueError(f"inputs have frame shape {frames.shape[1:]} (NHWC), the HEF expects {engine.input.shape}")
        fed, note = host_input(frames, engine.input)
        try:
            with quiet("HailoRT (inference)"):
                results, metrics = engine.infer(fed)
        except BaseException as exc:
            self.deactivate()
            if isinstance(exc, self.hrt.HailoRTException):
                error = HailoDeviceTimeout if is_transient(exc) else HailoDeviceError
                raise error(
                    f"device {self.device_id}: inference failed ({type(exc).__name__}: {exc}); the device was released"
                ) from exc
            raise
        return self._outputs(results, metrics, [*self._notes, *([note] if note else [])], len(fed))

    def _outputs(self, results: dict[str, np.ndarray], metrics: dict[str, float], notes: list[str], n: int) -> DeviceOutputs:
        assert self._engine is not None
        ranks = {o.name: o.rank for o in self.naming.onnx_outputs}
        out = DeviceOutputs(raw={}, quant={}, outputs={}, metrics=metrics, notes=list(notes))
        for spec in self._engine.outputs:
            name = self._routes[spec.name]
            arranged = to_onnx_layout(results[spec.name], ranks.get(name), n)
            if spec.quant is None:
                out.outputs[name] = arranged.astype(np.float32)
                continue
            out.raw[name] = arranged
            out.quant[name] = spec.quant
            out.outputs[name] = spec.quant.dequantize(arranged)
        return out
