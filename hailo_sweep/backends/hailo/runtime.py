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

import contextlib
import gc
import logging
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from hailo_sweep.backends.base import DeviceOutputs, DeviceRunner, QuantParams
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
from hailo_sweep.backends.hailo.compiler import captured_output
from hailo_sweep.backends.hailo.layout import to_nhwc, to_onnx_layout
from hailo_sweep.backends.hailo.naming import OnnxOutput, onnx_name_for
from hailo_sweep.errors import UserInputError

_LOG = logging.getLogger(__name__)
__all__ = ["ENV_DEVICE_ID", "DeviceLock", "DeviceOptions", "HailoDeviceError", "HailoDeviceRunner", "HailoDeviceTimeout", "OutputNaming"]

@contextlib.contextmanager
def quiet(what: str) -> Iterator[None]:
    """HailoRT's own messages (its ``pyhailort`` logger writes to the console) captured and sent to the log."""
    with captured_output() as captured:
        yield
    if captured.text:
        _LOG.debug("%s said:\n%s", what, captured.text.rstrip("\n"))


# -- formats and quantization -------------------------------------------------------------------------------------
_DTYPES: dict[str, np.dtype[Any]] = {"UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16), "FLOAT32": np.dtype(np.float32)}


def _type_name(format_type: Any) -> str:
    return str(getattr(format_type, "name", format_type)).rsplit(".", 1)[-1].upper()


def is_valid_qp(q: Any) -> bool:
    """False for the all-zero quant info HailoRT reports when a stream has several QPs (quantization.hpp)."""
    return not (q.qp_zp == 0 and q.qp_scale == 0 and q.limvals_min == 0 and q.limvals_max == 0)


@dataclass(frozen=True)
class StreamSpec:
    """One input or output stream as this runner uses it."""

    name: str
    shape: tuple[int, ...]  # host shape without batch: (H, W, C), (C,) for NC outputs
    dtype: np.dtype  # host buffer type requested from HailoRT
    quant: QuantParams | None  # None: HailoRT converts (FLOAT32 requested)
    limits: tuple[float, float] | None = None  # limvals of an input QP


def _choose(name: str, shape: Any, format_type: Any, quant_infos: list[Any]) -> tuple[StreamSpec, str | None]:
    """Raw device type with its single QP, or FLOAT32 (with the reason) when that is impossible."""
    kind = _type_name(format_type)
    valid = [q for q in quant_infos if is_valid_qp(q)]
    if kind in ("UINT8", "UINT16") and len(quant_infos) == 1 and len(valid) == 1:
        q = valid[0]
        lo, hi = float(q.limvals_min), float(q.limvals_max)
        quant = QuantParams(scale=float(q.qp_scale), zero_point=float(q.qp_zp), dtype=_DTYPES[kind].name)
        return StreamSpec(name, tuple(int(d) for d in shape), _DTYPES[kind], quant, (lo, hi) if lo < hi else None), None
    if kind in ("UINT8", "UINT16"):
        why = f"float32 fallback: {name!r} has {len(quant_infos)} quant infos; HailoRT dequantizes it (no raw integers)"
    else:
        why = f"{name!r} is {kind} on the host; no raw integers to dequantize"
    return StreamSpec(name, tuple(int(d) for d in shape), _DTYPES["FLOAT32"], None), why


def host_input(frames: np.ndarray, spec: StreamSpec) -> tuple[np.ndarray, str | None]:
    """Frames (NHWC) in the type the HEF input expects; quantized here, as HailoRT would, when needed."""
    if spec.quant is None:
        return np.ascontiguousarray(frames, dtype=np.float32), None
    q = spec.quant
    info = np.iinfo(spec.dtype)
    identity = q.scale == 1.0 and q.zero_point == 0.0
    if identity and np.issubdtype(frames.dtype, np.integer) and frames.min() >= info.min and frames.max() <= info.max:
        return np.ascontiguousarray(frames, dtype=spec.dtype), None
    x = frames.astype(np.float32)
    if spec.limits is not None:
        x = np.clip(x, np.float32(spec.limits[0]), np.float32(spec.limits[1]))
    raw = np.rint(x / np.float32(q.scale) + np.float32(q.zero_point))
    raw = np.clip(raw, info.min, info.max).astype(spec.dtype)
    note = f"input quantized on the host with the HEF's qp_scale={q.scale:g}, qp_zp={q.zero_point:g} ({spec.dtype.name})"
    return np.ascontiguousarray(raw), note


# -- engines: the two HailoRT APIs --------------------------------------------------------------------------------
class Engine(Protocol):
    api: str
    input: StreamSpec
    outputs: list[StreamSpec]
    notes: list[str]

    def infer(self, frames: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, float]]: ...

    def original_names(self, vstream: str) -> list[str]: ...

    def close(self) -> None: ...


def _hef_original_names(hef: Any, vstream: str) -> list[str]:
    try:
        return [str(n) for n in hef.get_original_names_from_vstream_name(vstream)]
    except Exception:  # older HEFs may lack the mapping; the HN mapping is the fallback
        return []


def _vdevice(hrt: ModuleType, device_id: str, *, round_robin: bool) -> Any:
    """A VDevice on exactly ``device_id``; with the round-robin scheduler for the InferModel API (HRT-nb0)."""
    params = hrt.VDevice.create_params()
    params.device_ids = [device_id]
    if round_robin:
        params.scheduling_algorithm = hrt.HailoSchedulingAlgorithm.ROUND_ROBIN
    return hrt.VDevice(params)


def _require_one_input(count: int) -> None:
    if count != 1:
        raise HailoDeviceError(f"the HEF has {count} inputs; hailo-sweep supports one")


class InferModelEngine:
    """``VDevice(ROUND_ROBIN).create_infer_model(hef)``: sync runs per frame (latency), async runs (throughput)."""

    api = "InferModel API (ROUND_ROBIN scheduler)"

    def __init__(self, hrt: ModuleType, hef_path: Path, device_id: str, timeout_ms: int):
        self.timeout_ms = timeout_ms
        self.notes: list[str] = []
        self._stack = contextlib.ExitStack()
        try:
            vdevice = self._stack.enter_context(_vdevice(hrt, device_id, round_robin=True))
            self._model = vdevice.create_infer_model(str(hef_path))
            self._model.set_batch_size(1)
            names = list(self._model.input_names)
            _require_one_input(len(names))
            stream = self._model.input(names[0])
            self.input, note = _choose(names[0], stream.shape, stream.format.type, list(stream.quant_infos))
            stream.set_format_type(hrt.FormatType.FLOAT32 if self.input.quant is None else stream.format.type)
            self.notes += [note] if note else []
            self.outputs = []
            for name in self._model.output_names:
                stream = self._model.output(name)
                spec, note = _choose(name, stream.shape, stream.format.type, list(stream.quant_infos))
                stream.set_format_type(hrt.FormatType.FLOAT32 if spec.quant is None else stream.format.type)
                self.outputs.append(spec)
                self.notes += [note] if note else []
            self._configured = self._stack.enter_context(self._model.configure())
        except BaseException:
            self._stack.close()
            raise

    def original_names(self, vstream: str) -> list[str]:
        return _hef_original_names(self._model.hef, vstream)

    def _bindings(self, frame: np.ndarray) -> Any:
        bindings = self._configured.create_bindings(
            output_buffers={o.name: np.empty(o.shape, o.dtype) for o in self.outputs}
        )
        bindings.input(self.input.name).set_buffer(np.ascontiguousarray(frame))
        return bindings

    def infer(self, frames: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        n = len(frames)
        results = {o.name: np.empty((n, *o.shape), o.dtype) for o in self.outputs}
        latencies = []
        for i in range(n):
            bindings = self._bindings(frames[i])
            start = time.perf_counter()
            self._configured.run([bindings], self.timeout_ms)
            latencies.append(time.perf_counter() - start)
            for o in self.outputs:
                results[o.name][i] = bindings.output(o.name).get_buffer()
        # throughput: keep the queue full with async jobs, as HailoRT's own benchmark does
        keep, job = [], None
        start = time.perf_counter()
        for i in range(n):
            self._configured.wait_for_async_ready(timeout_ms=self.timeout_ms, frames_count=1)
            keep.append(self._bindings(frames[i]))
            job = self._configured.run_async([keep[-1]])
        if job is not None:
            job.wait(self.timeout_ms)
        elapsed = time.perf_counter() - start
        return results, _timing(n, elapsed, latencies)

    def close(self) -> None:
        # "as long as the InferModel object is alive, the VDevice object is alive as well" (pyhailort.py L3617): drop
        # every reference and collect, so the device is really free when the lock is released
        self._stack.close()
        self._configured = self._model = None
        gc.collect()


class VStreamsEngine:
    """``InferVStreams`` on an activated network group (scheduler off): the 4.x synchronous path."""

    api = "InferVStreams (InferModel API not available in this HailoRT)"

    def __init__(self, hrt: ModuleType, hef_path: Path, device_id: str, timeout_ms: int):
        self.timeout_ms = timeout_ms
        self.notes: list[str] = []
        self._stack = contextlib.ExitStack()
        try:
            vdevice = self._stack.enter_context(_vdevice(hrt, device_id, round_robin=False))
            self._hef = hrt.HEF(str(hef_path))
            configure = hrt.ConfigureParams.create_from_hef(self._hef, interface=hrt.HailoStreamInterface.PCIe)
            group = vdevice.configure(self._hef, configure)[0]
            infos = list(self._hef.get_input_vstream_infos())
            _require_one_input(len(infos))
            info = infos[0]
            self.input, note = _choose(info.name, info.shape, info.format.type, [info.quant_info])
            self.notes += [note] if note else []
            in_type = hrt.FormatType.FLOAT32 if self.input.quant is None else info.format.type
            in_params = hrt.InputVStreamParams.make(group, format_type=in_type, timeout_ms=timeout_ms)
            out_params = {}
            self.outputs = []
            for info in self._hef.get_output_vstream_infos():
                spec, note = _choose(info.name, info.shape, info.format.type, [info.quant_info])
                out_type = hrt.FormatType.FLOAT32 if spec.quant is None else info.format.type
                out_params[info.name] = hrt.OutputVStreamParams.make(group, format_type=out_type, timeout_ms=timeout_ms)[info.name]
                self.outputs.append(spec)
                self.notes += [note] if note else []
            self._pipe = self._stack.enter_context(hrt.InferVStreams(group, in_params, out_params))
            self._stack.enter_context(group.activate(group.create_params()))
        except BaseException:
            self._stack.close()
            raise

    def original_names(self, vstream: str) -> list[str]:
        return _hef_original_names(self._hef, vstream)

    def infer(self, frames: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        n = len(frames)
        results = self._pipe.infer({self.input.name: np.ascontiguousarray(frames)})
        batch_seconds = float(self._pipe.get_hw_time())
        latencies = []
        for i in range(min(n, 16)):
            self._pipe.infer({self.input.name: np.ascontiguousarray(frames[i : i + 1])})
            latencies.append(float(self._pipe.get_total_time()))
        return {o.name: np.asarray(results[o.name]) for o in self.outputs}, _timing(n, batch_seconds, latencies)

    def close(self) -> None:
        self._stack.close()
        self._pipe = self._hef = None
        gc.collect()


def _timing(frames: int, seconds: float, latencies: list[float]) -> dict[str, float]:
    metrics = {"frames": float(frames)}
    if seconds > 0:
        metrics["throughput_fps"] = frames / seconds
    if latencies:
        metrics["latency_ms"] = 1000.0 * statistics.median(latencies)
        metrics["latency_max_ms"] = 1000.0 * max(latencies)
    return metrics


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
