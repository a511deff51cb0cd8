"""The two HailoRT Python APIs a HEF runs through, behind one ``Engine`` interface; stream formats and quantization.

InferModel with a ROUND_ROBIN VDevice (HailoRT's HRT_0 tutorial), and InferVStreams where ``create_infer_model`` is
missing (HRT_2 tutorial); see ``runtime`` for what the runner built on them guarantees.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from hailo_sweep.backends.base import QuantParams
from hailo_sweep.backends.hailo.device import (
    HailoDeviceError,
)
from hailo_sweep.backends.hailo.compiler import captured_output

_LOG = logging.getLogger(__name__)


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
