"""Contract fake of ``hailo_platform.pyhailort.pyhailort`` (HailoRT's Python API). Test-only.

Every behaviour follows HailoRT's public source, ``hailo-ai/hailort`` branch ``hailo8`` (v4.23.0, commit 08f088d);
references below are ``py:L<n>`` = ``hailort/libhailort/bindings/python/platform/hailo_platform/pyhailort/pyhailort.py``
and ``cpp:<file>:L<n>`` = files under ``hailort/libhailort/``. Numbers are computed by ``_fake_hailo_core`` (see its
docstring): the fake "chip" runs the HEF's network with onnxruntime on dequantized raw inputs, its hidden layers
rounded to their 8/16-bit grids, and re-quantizes the outputs with the HEF's own quant infos, so a device run equals
SDK_BIT_EXACT emulation bit for bit (SDK_QUANTIZED differs from it by a few one-step roundings).
"""

from __future__ import annotations

import enum
import logging
import sys
import time
from pathlib import Path
from typing import Any

import _fake_hailo_core as core
import numpy as np

from hailo_platform._fake_system import SYSTEM

_LOG = logging.getLogger("pyhailort")  # py:default_logger() names its logger after "pyhailort.log"
# hailo_platform/common/logger/logger.py _create_logger: a console handler bound to the sys.stdout of its creation
# (the real one also adds a FileHandler on ./pyhailort.log; the fake writes no file)
for _handler in list(_LOG.handlers):
    if getattr(_handler, "fake_hailo", False):
        _LOG.removeHandler(_handler)
_console = logging.StreamHandler(sys.stdout)
_console.fake_hailo = True  # type: ignore[attr-defined]
_LOG.addHandler(_console)
_LOG.setLevel(logging.INFO)

DEFAULT_VSTREAM_TIMEOUT_MS = 10000  # py:L40
DEFAULT_VSTREAM_QUEUE_SIZE = 2  # py:L41


# -- exceptions: py:L55-110, messages from ExceptionWrapper.create_exception_from_status py:L127-168 ------------------
class HailoRTException(Exception):
    pass


class HailoRTTimeout(HailoRTException):
    pass


class HailoRTInvalidOperationException(HailoRTException):
    pass


class HailoRTInvalidArgumentException(HailoRTException):
    pass


class HailoRTNotFoundException(HailoRTException):
    pass


class HailoRTInvalidHEFException(HailoRTException):
    pass


class HailoRTHEFNotCompatibleWithDevice(HailoRTException):
    pass


class HailoRTDriverOperationFailedException(HailoRTException):
    pass


class HailoRTNetworkGroupNotActivatedException(HailoRTException):
    pass


# -- enums: cpp:bindings/python/src/pyhailort.cpp L561-566 (FormatType), L568-591 (FormatOrder, subset), ---------------
# L795-800 (StreamInterface), L861-864 (SchedulingAlgorithm); py:L1597-1607 (DeviceArchitectureTypes)
class FormatType(enum.Enum):
    AUTO = 0  # "Chosen automatically to match the format expected by the device, usually UINT8."
    UINT8 = 1
    UINT16 = 2
    FLOAT32 = 3


class FormatOrder(enum.Enum):
    AUTO = 0
    NHWC = 1
    NHW = 5
    NC = 6
    HAILO_NMS_BY_CLASS = 22


class HailoStreamInterface(enum.Enum):
    PCIe = 0
    INTEGRATED = 1
    ETH = 2
    MIPI = 3


class HailoSchedulingAlgorithm(enum.Enum):
    NONE = 0
    ROUND_ROBIN = 1


class DeviceArchitectureTypes(enum.IntEnum):
    HAILO8_A0 = 0
    HAILO8 = 1
    HAILO8L = 2
    HAILO15H = 3
    HAILO15L = 4
    HAILO15M = 5
    HAILO10H = 6


_BYTES = {FormatType.UINT8: 1, FormatType.UINT16: 2, FormatType.FLOAT32: 4}
_NUMPY = {FormatType.UINT8: np.uint8, FormatType.UINT16: np.uint16, FormatType.FLOAT32: np.float32}


def _device_type(bits: int) -> FormatType:
    return FormatType.UINT16 if bits == 16 else FormatType.UINT8


# -- small value types (pybind classes reject unknown attributes: __slots__) --------------------------------------------
class QuantInfo:
    """cpp:pyhailort.cpp L627-633: fields qp_zp, qp_scale, limvals_min, limvals_max; ctor (zp, scale, min, max)."""

    __slots__ = ("limvals_max", "limvals_min", "qp_scale", "qp_zp")

    def __init__(self, qp_zp: float = 0.0, qp_scale: float = 0.0, limvals_min: float = 0.0, limvals_max: float = 0.0):
        self.qp_zp, self.qp_scale, self.limvals_min, self.limvals_max = qp_zp, qp_scale, limvals_min, limvals_max

    def __repr__(self) -> str:
        return f"QuantInfo(qp_zp={self.qp_zp}, qp_scale={self.qp_scale}, limvals=[{self.limvals_min}, {self.limvals_max}])"


def _quant_info(qp: core.QP) -> QuantInfo:
    return QuantInfo(qp.zp, qp.scale, qp.lo, qp.hi)


INVALID_QUANT_INFO = (0.0, 0.0, 0.0, 0.0)  # cpp:include/hailo/quantization.hpp L19, is_qp_valid L255-259


class Format:
    __slots__ = ("flags", "order", "type")

    def __init__(self, type: FormatType, order: FormatOrder, flags: int = 0):
        self.type, self.order, self.flags = type, order, flags


class VStreamInfo:
    """cpp:pyhailort.cpp L1098-1124: shape (H, W, C) for NHWC, (C,) for NC; one quant_info (invalid when several)."""

    __slots__ = ("direction", "format", "name", "network_name", "quant_info", "shape")

    def __init__(self, name: str, shape: tuple[int, ...], fmt: Format, quant_info: QuantInfo, network_name: str, direction: str):
        self.name, self.shape, self.format, self.quant_info = name, shape, fmt, quant_info
        self.network_name, self.direction = network_name, direction

    def __repr__(self) -> str:
        return f'VStreamInfo("{self.name}")'


# -- HEF: py:L329-554 -----------------------------------------------------------------------------------------------------
class HEF:
    def __init__(self, hef_source: str | bytes):
        # py:L334-352: str is a path, bytes a buffer, anything else is a ValueError
        if isinstance(hef_source, str):
            data, self._path = Path(hef_source).read_bytes(), hef_source
        elif isinstance(hef_source, bytes):
            data, self._path = hef_source, None
        else:
            raise ValueError("HEF can only be created from a file path (str) or a buffer (bytes)")
        try:
            self._model = core.read_hef(data)
        except ValueError:
            raise HailoRTInvalidHEFException("Invalid HEF. See hailort.log for more information") from None

    @property
    def path(self) -> str | None:
        return self._path

    @property
    def _graph(self) -> core.Graph:
        return self._model.graph

    def get_network_group_names(self) -> list[str]:
        return [self._graph.net_name]

    def get_networks_names(self, network_group_name: str | None = None) -> list[str]:
        return [f"{self._graph.net_name}/{self._graph.net_name}"]

    def _input_info(self) -> VStreamInfo:
        q = self._model.quantization
        fmt = Format(_device_type(q.input_bits), FormatOrder.NHWC)
        return VStreamInfo(self._graph.input_layer, tuple(self._graph.input_shape), fmt, _quant_info(q.input_qp), self.get_networks_names()[0], "H2D")

    def _output_infos(self) -> list[VStreamInfo]:
        infos = []
        for route, oq in zip(self._graph.outputs, self._model.quantization.outputs, strict=True):
            fmt = Format(_device_type(oq.bits), FormatOrder[route.order])
            qi = _quant_info(oq.qps[0]) if len(oq.qps) == 1 else QuantInfo(*INVALID_QUANT_INFO)
            infos.append(VStreamInfo(route.producer, tuple(route.shape), fmt, qi, self.get_networks_names()[0], "D2H"))
        return infos

    def get_input_vstream_infos(self, name: str | None = None) -> list[VStreamInfo]:
        return [self._input_info()]

    def get_output_vstream_infos(self, name: str | None = None) -> list[VStreamInfo]:
        return self._output_infos()

    def get_all_vstream_infos(self, name: str | None = None) -> list[VStreamInfo]:
        return [self._input_info(), *self._output_infos()]

    def get_sorted_output_names(self, network_group_name: str | None = None) -> list[str]:
        return [r.producer for r in self._graph.outputs]

    def get_original_names_from_vstream_name(self, vstream_name: str, network_group_name: str | None = None) -> list[str]:
        for route in self._graph.outputs:  # py:L510-523
            if route.producer == vstream_name:
                return list(route.original_names)
        if vstream_name == self._graph.input_layer:
            return [self._graph.input_name]
        raise HailoRTNotFoundException("Item not found. See hailort.log for more information")

    def get_vstream_name_from_original_name(self, original_name: str, network_group_name: str | None = None) -> str:
        for route in self._graph.outputs:  # py:L495-508
            if original_name in route.original_names:
                return route.producer
        raise HailoRTNotFoundException("Item not found. See hailort.log for more information")


def _hef_model(hef_source: Any) -> core.HefModel:
    return HEF(hef_source)._model


# -- the fake chip ----------------------------------------------------------------------------------------------------------
def _check_compatible(device_ids: list[str], hef_arch: str) -> None:
    """cpp:src/device_common/device_internal.cpp L739-760 is_hef_compatible (hw_arch names instead of enum values)."""
    runs = {
        "HAILO8": {"hailo8", "hailo8r", "hailo8l"},
        "HAILO8_A0": {"hailo8", "hailo8r", "hailo8l"},
        "HAILO8L": {"hailo8l"},
        "HAILO10H": {"hailo10h", "hailo15h", "hailo15m"},
        "HAILO15H": {"hailo10h", "hailo15h", "hailo15m"},
    }
    for device_id in device_ids:
        arch = SYSTEM.devices[device_id]
        if hef_arch not in runs.get(arch, set()):
            _LOG.error("HEF format is not compatible with device. Device arch: %s, HEF arch: %s", arch, hef_arch)
            raise HailoRTHEFNotCompatibleWithDevice("HEF file is not compatible with device. See hailort.log for more information")
        if arch == "HAILO8" and hef_arch == "hailo8l":
            _LOG.warning("HEF was compiled for Hailo8L device, while the device itself is Hailo8. This will result in lower performance.")


def _maybe_fail() -> None:
    SYSTEM.inferences += 1
    if SYSTEM.timeouts_left > 0:  # intermittent: HAILO_TIMEOUT -> HailoRTTimeout (py:L139-140), then it recovers
        SYSTEM.timeouts_left -= 1
        raise HailoRTTimeout("Received a timeout - hailort has failed because a timeout had occurred")
    if SYSTEM.fail_on_infer == "timeout":
        raise HailoRTTimeout("Received a timeout - hailort has failed because a timeout had occurred")
    if SYSTEM.fail_on_infer == "driver":
        raise HailoRTDriverOperationFailedException("Failure in hailort driver ioctl. run 'dmesg | grep hailo' for more information")


def _check_conversion(direction: str, device: FormatType, user: FormatType) -> None:
    """cpp:src/transform/transform.cpp L35-64 should_quantize_by_type: the conversions HailoRT refuses."""
    if direction == "H2D" and device == FormatType.UINT8 and user == FormatType.UINT16:
        raise HailoRTInvalidArgumentException("src type is UINT16, while the model compiled for type UINT8. Input quantization is impossible with this src type.")
    if direction == "D2H" and device == FormatType.UINT16 and user == FormatType.UINT8:
        raise HailoRTInvalidArgumentException("The model compiled for type UINT16, while the dst type is UINT8. Output de-quantization is impossible to this dst type")


def _resolve(user: FormatType, device: FormatType) -> FormatType:
    return device if user == FormatType.AUTO else user  # "AUTO: same as the device type" (hailo-api.md §3.5)


def _chip(model: core.HefModel, frames: np.ndarray, in_type: FormatType, out_types: list[FormatType]) -> list[np.ndarray]:
    """Host transform in, the network on the fake chip, host transform out (cpp:src/transform/transform.cpp)."""
    q = model.quantization
    if in_type == FormatType.FLOAT32:  # HailoRT quantizes float input with the input QP, clipping to limvals
        raw_in = core.quantize(frames, [q.input_qp], q.input_bits, clip_limvals=True)
    else:  # raw input; UINT8 into a UINT16 model is type-cast
        raw_in = frames.astype(core.dtype_for(q.input_bits))
    raws = core.run_quantized(model.onnx_bytes, model.graph, q, raw_in)
    results = []
    for raw, oq, user in zip(raws, q.outputs, out_types, strict=True):
        if user == FormatType.FLOAT32:
            results.append(core.dequantize(raw, oq.qps))
        else:
            results.append(raw.astype(_NUMPY[user]))
    return results


# -- Device: py:L2534-2640; Control.identify py:L2154-2167 ----------------------------------------------------------------
class _BoardInformation:
    def __init__(self, arch: str):
        self.device_architecture = DeviceArchitectureTypes[arch]
        self.board_name = f"Fake {arch}"


class _Control:
    def __init__(self, device_id: str):
        self._device_id = device_id

    def identify(self) -> _BoardInformation:
        return _BoardInformation(SYSTEM.devices[self._device_id])


class Device:
    @classmethod
    def scan(cls) -> list[str]:
        return list(SYSTEM.devices)

    def __init__(self, device_id: str | None = None):
        if device_id is None:
            ids = Device.scan()
            if not ids:
                raise HailoRTException("HailoRT device not found in the system")
            device_id = ids[0]
        if device_id not in SYSTEM.devices:
            raise HailoRTNotFoundException("Item not found. See hailort.log for more information")
        self._device_id = device_id
        self._control = _Control(device_id)

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *args: Any) -> bool:
        self.release()
        return False

    def release(self) -> None:
        self._control = None  # type: ignore[assignment]

    @property
    def device_id(self) -> str:
        return self._device_id

    @property
    def control(self) -> _Control:
        # py:L2603-2612 in 4.23; a build without the control APIs has no such attribute (issue 11 reports exactly
        # "AttributeError: 'Device' object has no attribute 'control'")
        if not SYSTEM.control_api:
            raise AttributeError("'Device' object has no attribute 'control'")
        return self._control


# -- VDevice: py:L3506-3645; VDeviceParams cpp:pyhailort.cpp L866-928 -----------------------------------------------------
class VDeviceParams:
    __slots__ = ("device_count", "device_ids", "group_id", "multi_process_service", "scheduling_algorithm")

    def __init__(self) -> None:
        self.device_ids: list[str] = []
        self.device_count = 1
        self.scheduling_algorithm = HailoSchedulingAlgorithm.NONE  # VDeviceParams.default() sets NONE (L924-926)
        self.group_id = "UNIQUE"
        self.multi_process_service = False


class VDevice:
    def __init__(self, params: VDeviceParams | None = None, *, device_ids: list[str] | None = None):
        self._open = False
        if params is not None and device_ids is not None:  # docstring: params "Excludes 'device_ids'"
            raise HailoRTInvalidArgumentException("Invalid argument. See hailort.log for more information")
        self._params = params or VDevice.create_params()
        ids = list(device_ids or self._params.device_ids or Device.scan()[:1])
        if not ids:
            raise HailoRTException("HailoRT device not found in the system")
        for device_id in ids:
            if device_id not in SYSTEM.devices:
                raise HailoRTNotFoundException("Item not found. See hailort.log for more information")
            if device_id in SYSTEM.in_use:
                raise HailoRTException(f"libhailort failed with error: 74 (HAILO_OUT_OF_PHYSICAL_DEVICES): {device_id} is in use")
            if SYSTEM.busy_for.get(device_id, 0) > 0:
                # held by another process: status 73 HAILO_DEVICE_IN_USE (cpp:include/hailo/hailort.h L162), which
                # py:ExceptionWrapper.create_exception_from_status (L126-168) raises as a plain HailoRTException
                SYSTEM.busy_for[device_id] -= 1
                raise HailoRTException("libhailort failed with error: 73 (HAILO_DEVICE_IN_USE)")
        self._ids = ids
        SYSTEM.in_use.update(ids)
        SYSTEM.vdevices_opened += 1
        self._open = True

    @staticmethod
    def create_params() -> VDeviceParams:
        return VDeviceParams()

    def __enter__(self) -> VDevice:
        return self

    def __exit__(self, *args: Any) -> bool:
        self.release()
        return False

    def release(self) -> None:
        if self._open:
            SYSTEM.in_use.difference_update(self._ids)
            self._open = False

    def get_physical_devices_ids(self) -> list[str]:
        return list(self._ids)

    @property
    def _scheduled(self) -> bool:
        return self._params.scheduling_algorithm != HailoSchedulingAlgorithm.NONE

    def _need_open(self) -> None:
        if not self._open:
            raise HailoRTInvalidOperationException("Invalid operation. See hailort.log for more information")

    def configure(self, hef: HEF, configure_params_by_name: dict[str, Any] = {}) -> list[ConfiguredNetwork]:  # noqa: B006 - as in py:L3563
        self._need_open()
        _check_compatible(self._ids, hef._model.hw_arch)
        core.stage_delay("HAILO_FAKE_DEVICE_DELAY_S")
        return [ConfiguredNetwork(self, hef._model)]

    def create_infer_model(self, hef_source: str | bytes, name: str = "") -> InferModel:
        self._need_open()
        if not isinstance(hef_source, (str, bytes)):  # py:L3622-3626 passes non-bytes to create_from_file(std::string)
            raise TypeError(f"create_infer_model_from_file(): incompatible function arguments ({type(hef_source).__name__})")
        model = _hef_model(hef_source)
        _check_compatible(self._ids, model.hw_arch)
        return InferModel(self, model, hef_source)


# -- InferModel: py:L2662-2942 ---------------------------------------------------------------------------------------------
class _InferStream:
    """py:L2668-2806. The user format starts as the HEF's own (cpp:net_flow/pipeline/infer_model_internal.hpp L99)."""

    def __init__(self, info: VStreamInfo, quant_infos: list[QuantInfo]):
        self._info = info
        self._user = Format(info.format.type, info.format.order)
        self._quant_infos = quant_infos

    @property
    def name(self) -> str:
        return self._info.name

    @property
    def shape(self) -> list[int]:
        return list(self._info.shape)  # std::vector<size_t> -> list (cpp:bindings_common.hpp L41-63)

    @property
    def format(self) -> Format:
        return Format(self._user.type, self._user.order)

    def set_format_type(self, type: FormatType) -> None:
        if not isinstance(type, FormatType):
            raise TypeError(f"set_format_type(): incompatible function arguments ({type!r})")
        self._user.type = type

    def set_format_order(self, order: FormatOrder) -> None:
        if not isinstance(order, FormatOrder):
            raise TypeError(f"set_format_order(): incompatible function arguments ({order!r})")
        self._user.order = order

    @property
    def quant_infos(self) -> list[QuantInfo]:
        return list(self._quant_infos)

    @property
    def is_nms(self) -> bool:
        return False

    def _frame_bytes(self) -> int:
        fmt = _resolve(self._user.type, self._info.format.type)
        return int(np.prod(self._info.shape)) * _BYTES[fmt]


class InferModel:
    def __init__(self, vdevice: VDevice, model: core.HefModel, hef_source: str | bytes):
        self._vdevice = vdevice
        self._model = model
        self._hef_source = hef_source
        hef = HEF(hef_source)
        infos = hef._output_infos()
        self._inputs = {hef._input_info().name: _InferStream(hef._input_info(), [_quant_info(model.quantization.input_qp)])}
        self._outputs = {
            info.name: _InferStream(info, [_quant_info(qp) for qp in oq.qps]) for info, oq in zip(infos, model.quantization.outputs, strict=True)
        }
        self.batch_size = 0

    @property
    def hef(self) -> HEF:
        return HEF(self._hef_source)

    def set_batch_size(self, batch_size: int) -> None:
        self.batch_size = int(batch_size)

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    @property
    def inputs(self) -> list[_InferStream]:
        return list(self._inputs.values())

    @property
    def outputs(self) -> list[_InferStream]:
        return list(self._outputs.values())

    @staticmethod
    def _pick(streams: dict[str, _InferStream], name: str) -> _InferStream:
        if name == "" and len(streams) == 1:
            return next(iter(streams.values()))
        if name not in streams:  # "HailoRTNotFoundException in case a non-existing ... or no name is given but multiple"
            raise HailoRTNotFoundException("Item not found. See hailort.log for more information")
        return streams[name]

    def input(self, name: str = "") -> _InferStream:
        return self._pick(self._inputs, name)

    def output(self, name: str = "") -> _InferStream:
        return self._pick(self._outputs, name)

    def configure(self) -> ConfiguredInferModel:
        for stream in self._inputs.values():
            _check_conversion("H2D", stream._info.format.type, stream._user.type)
        for stream in self._outputs.values():
            _check_conversion("D2H", stream._info.format.type, stream._user.type)
        core.stage_delay("HAILO_FAKE_DEVICE_DELAY_S")
        return ConfiguredInferModel(self)


class _BoundStream:
    """py:L2985-3125 Bindings.InferStream: set_buffer refuses non-C-contiguous arrays (L3013-3031)."""

    def __init__(self, name: str):
        self.name = name
        self._buffer: np.ndarray | None = None

    def set_buffer(self, buffer: np.ndarray) -> None:
        if not isinstance(buffer, np.ndarray):
            raise TypeError("set_buffer(): incompatible function arguments (expected a numpy array)")
        if not buffer.flags.c_contiguous:
            raise HailoRTException("Buffer must be C_CONTIGUOUS")
        self._buffer = buffer

    def get_buffer(self, tf_format: bool = False) -> np.ndarray | None:
        return self._buffer


class Bindings:
    """py:L2979-3196 ConfiguredInferModel.Bindings: input(name="") / output(name="") per stream."""

    def __init__(self, input_names: list[str], output_names: list[str]):
        self._inputs = {n: _BoundStream(n) for n in input_names}
        self._outputs = {n: _BoundStream(n) for n in output_names}

    def input(self, name: str = "") -> _BoundStream:
        return InferModel._pick(self._inputs, name)  # type: ignore[arg-type]

    def output(self, name: str = "") -> _BoundStream:
        return InferModel._pick(self._outputs, name)  # type: ignore[arg-type]


class AsyncInferJob:
    """py:L3476-3504: wait(timeout_ms) raises the job's error (HailoRTTimeout on timeout)."""

    def __init__(self, error: HailoRTException | None):
        self._error = error

    def wait(self, timeout_ms: int) -> None:
        if self._error is not None:
            raise self._error


class ConfiguredInferModel:
    """py:L2944-3474."""

    def __init__(self, infer_model: InferModel):
        self._model = infer_model
        self._active = False
        self._shut = False

    def __enter__(self) -> ConfiguredInferModel:
        return self

    def __exit__(self, *args: Any) -> None:
        self._shut = True

    def activate(self) -> None:
        if self._model._vdevice._scheduled:  # py:L3216-3225: "invalid in case scheduler is enabled"
            raise HailoRTInvalidOperationException("Invalid operation. See hailort.log for more information")
        self._active = True

    def deactivate(self) -> None:
        if self._model._vdevice._scheduled:
            raise HailoRTInvalidOperationException("Invalid operation. See hailort.log for more information")
        self._active = False

    def create_bindings(self, input_buffers: dict[str, np.ndarray] | None = None, output_buffers: dict[str, np.ndarray] | None = None) -> Bindings:
        bindings = Bindings(self._model.input_names, self._model.output_names)
        for name, buffer in (input_buffers or {}).items():
            bindings.input(name).set_buffer(buffer)
        for name, buffer in (output_buffers or {}).items():
            bindings.output(name).set_buffer(buffer)
        return bindings

    def wait_for_async_ready(self, timeout_ms: int = 1000, frames_count: int = 1) -> None:
        self._need_usable()

    def get_async_queue_size(self) -> int:
        return 4

    def shutdown(self) -> None:
        self._shut = True

    def _need_usable(self) -> None:
        if self._shut or not self._model._vdevice._open:
            raise HailoRTInvalidOperationException("Invalid operation. See hailort.log for more information")
        if not self._model._vdevice._scheduled and not self._active:
            raise HailoRTNetworkGroupNotActivatedException("Network group is not activated")

    def _validate(self, bindings: Bindings) -> None:
        """cpp:src/net_flow/pipeline/infer_model.cpp L871-940 validate_bindings: byte sizes must match the frame."""
        for kind, streams, bound in (("input", self._model._inputs, bindings._inputs), ("output", self._model._outputs, bindings._outputs)):
            for name, stream in streams.items():
                buffer = bound[name].get_buffer()
                if buffer is None:
                    raise HailoRTNotFoundException("Item not found. See hailort.log for more information")
                expected = stream._frame_bytes()
                if buffer.nbytes != expected:
                    _LOG.error("%s buffer size %d is different than expected %d for %s '%s'", kind.capitalize(), buffer.nbytes, expected, kind, name)
                    raise HailoRTInvalidOperationException("Invalid operation. See hailort.log for more information")

    def _infer_one(self, bindings: Bindings) -> None:
        self._validate(bindings)
        _maybe_fail()
        (in_name, in_stream), = self._model._inputs.items()
        in_type = _resolve(in_stream._user.type, in_stream._info.format.type)
        buffer = bindings.input(in_name).get_buffer()
        # the device reads the buffer's bytes as the user format type (HailoRT takes a MemoryView of the bytes)
        frame = np.frombuffer(buffer.tobytes(), dtype=_NUMPY[in_type]).reshape(1, *in_stream._info.shape)
        names = self._model.output_names
        out_types = [_resolve(self._model._outputs[n]._user.type, self._model._outputs[n]._info.format.type) for n in names]
        results = _chip(self._model._model, frame, in_type, out_types)
        for name, result in zip(names, results, strict=True):
            out = bindings.output(name).get_buffer()
            out.reshape(-1).view(np.uint8)[:] = np.frombuffer(result.tobytes(), np.uint8)

    def run_async(self, bindings: list[Bindings], callback: Any = None) -> AsyncInferJob:
        self._need_usable()
        error: HailoRTException | None = None
        try:
            for b in bindings:
                self._infer_one(b)
        except (HailoRTTimeout, HailoRTDriverOperationFailedException) as exc:  # failures of the job, seen at wait()
            error = exc
        if callback is not None:
            callback(completion_info=error)
        return AsyncInferJob(error)

    def run(self, bindings: list[Bindings], timeout: int) -> None:
        self.run_async(bindings).wait(timeout)  # py:L3288-3303


# -- network groups and vstreams: py:L219-233, L556-860, L863-1119, L3647-3812 ---------------------------------------------
class ConfigureParams:
    @staticmethod
    def create_from_hef(hef: HEF, interface: HailoStreamInterface) -> dict[str, Any]:
        if not isinstance(interface, HailoStreamInterface):
            raise TypeError(f"create_configure_params(): incompatible function arguments ({interface!r})")
        return {name: _NetworkGroupParams() for name in hef.get_network_group_names()}


class _NetworkGroupParams:
    __slots__ = ("batch_size", "network_params_by_name", "power_mode", "stream_params_by_name")

    def __init__(self) -> None:
        self.batch_size = 0
        self.power_mode = "PERFORMANCE"
        self.stream_params_by_name: dict[str, Any] = {}
        self.network_params_by_name: dict[str, Any] = {}


class _Activated:
    def __init__(self, group: ConfiguredNetwork | None):
        self._group = group

    def __enter__(self) -> _Activated:
        if self._group is not None:
            self._group._active = True
        return self

    def __exit__(self, *args: Any) -> bool:
        if self._group is not None:
            self._group._active = False
        return False


class ConfiguredNetwork:
    def __init__(self, vdevice: VDevice, model: core.HefModel):
        self._vdevice = vdevice
        self._model = model
        self._hef = HEF(core.hef_bytes(model.hw_arch, model.graph, model.quantization, model.onnx_bytes))
        self._active = False

    @property
    def name(self) -> str:
        return self._model.graph.net_name

    def is_scheduled(self) -> bool:
        return self._vdevice._scheduled

    def activate(self, network_group_params: Any = None) -> _Activated:
        if self.is_scheduled():  # py:L580-583: deprecated no-op with a warning when the scheduler is on
            _LOG.warning("Calls to `activate()` when working with scheduler are deprecated! On future versions this call will raise an error.")
            return _Activated(None)
        return _Activated(self)

    @staticmethod
    def create_params() -> dict[str, Any]:
        return {}

    def get_networks_names(self) -> list[str]:
        return self._hef.get_networks_names()

    def get_input_vstream_infos(self, network_name: str | None = None) -> list[VStreamInfo]:
        return self._hef.get_input_vstream_infos()

    def get_output_vstream_infos(self, network_name: str | None = None) -> list[VStreamInfo]:
        return self._hef.get_output_vstream_infos()

    def get_all_vstream_infos(self, network_name: str | None = None) -> list[VStreamInfo]:
        return self._hef.get_all_vstream_infos()

    def get_sorted_output_names(self) -> list[str]:
        return self._hef.get_sorted_output_names()


class _VStreamParams:
    __slots__ = ("queue_size", "timeout_ms", "user_buffer_format")

    def __init__(self, fmt: Format, timeout_ms: int, queue_size: int):
        self.user_buffer_format, self.timeout_ms, self.queue_size = fmt, timeout_ms, queue_size


def _make(infos: list[VStreamInfo], format_type: FormatType | None, timeout_ms: int | None, queue_size: int | None) -> dict[str, _VStreamParams]:
    if format_type is not None and not isinstance(format_type, FormatType):
        raise TypeError(f"make(): format_type must be a FormatType, got {format_type!r}")
    params = {}
    for info in infos:
        fmt = Format(_resolve(format_type or FormatType.AUTO, info.format.type), info.format.order)
        params[info.name] = _VStreamParams(fmt, timeout_ms or DEFAULT_VSTREAM_TIMEOUT_MS, queue_size or DEFAULT_VSTREAM_QUEUE_SIZE)
    return params


class InputVStreamParams:
    @staticmethod
    def make(configured_network: ConfiguredNetwork, quantized: Any = None, format_type: FormatType | None = None,
             timeout_ms: int | None = None, queue_size: int | None = None, network_name: str | None = None) -> dict[str, _VStreamParams]:
        return _make(configured_network.get_input_vstream_infos(), format_type, timeout_ms, queue_size)  # quantized: "Unused" (py:L3651)


class OutputVStreamParams:
    @staticmethod
    def make(configured_network: ConfiguredNetwork, quantized: Any = None, format_type: FormatType | None = None,
             timeout_ms: int | None = None, queue_size: int | None = None, network_name: str | None = None) -> dict[str, _VStreamParams]:
        return _make(configured_network.get_output_vstream_infos(), format_type, timeout_ms, queue_size)


class InferVStreams:
    """py:L863-1119 (infer L943-1007; input checks L1025-1066); sizes: cpp:net_flow/pipeline/inference_pipeline.cpp L272-285."""

    def __init__(self, configured_net_group: ConfiguredNetwork, input_vstreams_params: dict[str, _VStreamParams],
                 output_vstreams_params: dict[str, _VStreamParams], tf_nms_format: bool = False):
        self._group = configured_net_group
        self._in = input_vstreams_params
        self._out = output_vstreams_params
        self._hw_time: float | None = None
        self._total_time: float | None = None
        self._open = False

    def __enter__(self) -> InferVStreams:
        # the C++ pipeline (and its transforms) is created here (py:L938-941), so unsupported conversions fail here
        infos = {i.name: i for i in self._group.get_all_vstream_infos()}
        for direction, params in (("H2D", self._in), ("D2H", self._out)):
            for name, p in params.items():
                if name not in infos:
                    raise HailoRTNotFoundException("Item not found. See hailort.log for more information")
                _check_conversion(direction, infos[name].format.type, p.user_buffer_format.type)
        self._open = True
        return self

    def __exit__(self, *args: Any) -> bool:
        self._open = False
        return False

    def infer(self, input_data: Any) -> dict[str, np.ndarray]:
        start_total = time.perf_counter()
        infos = {i.name: i for i in self._group.get_input_vstream_infos()}
        if not isinstance(input_data, dict):
            if len(infos) != 1:
                raise Exception("when there is more than one input, the input_data should be of type dict")
            input_data = {next(iter(infos)): input_data}
        data = dict(input_data)
        for name in data:
            if name not in self._in:
                raise HailoRTNotFoundException("Item not found. See hailort.log for more information")
            expected = _NUMPY[self._in[name].user_buffer_format.type]
            if data[name].dtype != expected:  # L1025-1034: cast with a warning
                _LOG.warning("Given input data dtype (%s) is different than inferred dtype (%s). conversion for every frame will reduce performance", data[name].dtype, np.dtype(expected))
                data[name] = data[name].astype(expected)
            if not data[name].flags.c_contiguous:  # L1062-1066
                _LOG.warning("Converting %s numpy array to be C_CONTIGUOUS", name)
                data[name] = np.asarray(data[name], order="C")
            frame = int(np.prod(infos[name].shape)) * _BYTES[self._in[name].user_buffer_format.type]
            if data[name].nbytes != len(data[name]) * frame:
                raise HailoRTInvalidArgumentException("Invalid argument. See hailort.log for more information")
        if not self._group.is_scheduled() and not self._group._active:
            raise HailoRTNetworkGroupNotActivatedException("Network group is not activated")
        (name, frames), = data.items()
        frames = frames.reshape(len(frames), *infos[name].shape)
        out_infos = self._group.get_output_vstream_infos()
        out_types = [self._out[i.name].user_buffer_format.type for i in out_infos]
        start = time.perf_counter()
        _maybe_fail()
        results = _chip(self._group._model, frames, self._in[name].user_buffer_format.type, out_types)
        self._hw_time = time.perf_counter() - start
        self._total_time = time.perf_counter() - start_total
        return {info.name: result for info, result in zip(out_infos, results, strict=True)}

    def get_hw_time(self) -> float | None:
        return self._hw_time

    def get_total_time(self) -> float | None:
        return self._total_time
