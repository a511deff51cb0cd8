"""Contract fake of ``hailo_sdk_client.ClientRunner`` and ``InferenceContext`` (test-only).

The DFC is closed source; every signature here follows a public call site (hailo-api.md §1, which cites them):
``ClientRunner(hw_arch=..., har=...)`` (MZ main_driver.py L207/L222), ``translate_onnx_model(model, net_name,
start_node_names=, end_node_names=, net_input_shapes=)`` (LUX exporter.py; ``net_input_format`` from issue
ankandrew/fast-plate-ocr#44), ``get_hn``/``get_hn_dict`` (LUX), ``save_har``/``load_har`` (MZ main_utils.py),
``load_model_script(script, append=False)`` (MZ main_utils.py L608-612), ``optimize(calib)`` and
``optimize_full_precision(calib_data=)`` (MZ main_utils.py), ``infer_context(target, device_ids=None,
nms_score_threshold=None, custom_infer_config=None)`` (MZ main_driver.py L395-400), ``infer(context, dataset,
batch_size=, data_count=)`` (MZ core/infer/runner_infer.py L25), ``compile() -> bytes`` (MZ main_utils.py L613-616),
``analyze_noise(dataset, data_count=, batch_size=, analyze_mode=)`` and ``get_params_statistics()`` (hailo-api.md
§1.8: third-party call sites and ACE diag ``high_precision_inspector.py``; details at the methods).
Unknown keyword arguments raise ``TypeError`` because the signatures are plain Python signatures.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import logging
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import _fake_hailo_core as core
import numpy as np

from hailo_sdk_client.exposed_definitions import States

# hailo-api.md §1.1 "hw_arch values" (MZ base_parsers.py on both branches, ACE diag README)
HW_ARCHS = {"hailo8", "hailo8r", "hailo8l", "hailo15h", "hailo15m", "hailo15l", "hailo10h", "hailo10p", "hailo12l"}
DEFAULT_CALIBSET_SIZE = 64  # "Using dataset with 64 entries for calibration" (hailo-api.md §2)
DEFAULT_OPTIMIZATION_LEVEL = 2  # "[info] Using default optimization level of 2" (hailo-api.md §2)
DEFAULT_COMPRESSION_LEVEL = 1  # not public (hailo-api.md: UNVERIFIED); the fake assumes 1
RECOMMENDED_CALIBSET = 1024  # "less data than the recommended amount (1024)" (hailo-api.md §2)
# The two downgrade messages quoted in hailo-api.md §2 (from third-party code that greps the DFC's log); the level
# the DFC lowers to with a GPU is 1, without one 0. The fake keys the downgrade on the number of entries passed to
# optimize() (the dataset the DFC is given; issue 11: it lowered the level although calibset_size was in the script).
REDUCE_WITH_GPU = (
    "Reducing optimization level to 1 (the accuracy won't be optimized and compression won't be used) because "
    "there's less data than the recommended amount (1024)"
)
REDUCE_WITHOUT_GPU = (
    "Reducing optimization level to 0 (the accuracy won't be optimized and compression won't be used) because "
    "there's less data than the recommended amount (1024), and there's no available GPU"
)
# The statistics keys ACE diag high_precision_inspector.py reads: 'snr' after the advanced analysis, 'partial_snr'
# after the simple one (it falls back to partial_snr and warns "Missing data from layer_noise_analysis").
SNR_KEY = "layer_noise_analysis/snr"
PARTIAL_SNR_KEY = "layer_noise_analysis/partial_snr"
ANALYZE_MODES = {"simple": PARTIAL_SNR_KEY, "advanced": SNR_KEY}  # CLI --analyze-mode simple|advanced (hailo-api.md §4)
DEFAULT_ANALYZE_MODE = "simple"  # not public (hailo-api.md: UNVERIFIED); the fake assumes simple


class InferenceContext(enum.Enum):
    """Members seen in public code (hailo-api.md §1.7 table: MZ hw_utils.py / model_infer.py, forum t/4962, t/13760)."""

    SDK_NATIVE = "sdk_native"
    SDK_FP_OPTIMIZED = "sdk_fp_optimized"
    SDK_QUANTIZED = "sdk_quantized"
    SDK_BIT_EXACT = "sdk_bit_exact"  # third-party evidence only; the fake computes it as the chip does
    SDK_HAILO_HW = "sdk_hailo_hw"


class _ConsoleFormatter(logging.Formatter):
    """The SDK prints its log as "[info] ..." / "[warning] ..." lines on the console (quoted in hailo-api.md §2)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"[{record.levelname.lower()}] {record.getMessage()}"


# A named, non-propagating logger with its own console handler, like HailoRT's default_logger()
# (hailo_platform/common/logger/logger.py: ``logging.StreamHandler(sys.stdout)``, which keeps the stream object it was
# created with, so redirecting sys.stdout later does not silence it); the DFC's own logger setup is not public.
_LOG = logging.getLogger("hailo_sdk_client.fake")
_LOG.propagate = False
_LOG.setLevel(logging.INFO)
for _handler in list(_LOG.handlers):
    if getattr(_handler, "fake_hailo", False):
        _LOG.removeHandler(_handler)
_console = logging.StreamHandler(sys.stdout)
_console.setFormatter(_ConsoleFormatter())
_console.fake_hailo = True  # type: ignore[attr-defined]
_LOG.addHandler(_console)


class _InferContext:
    def __init__(self, target: InferenceContext):
        self.target = target
        self.active = True


class ParamsStatistics(Mapping[str, np.ndarray]):
    """What ``get_params_statistics()`` returns, in the two access forms public code uses.

    - ``stats[layer.name].get('layer_noise_analysis/snr')``: indexing by a scoped layer name gives that layer's
      statistics (ACE diag high_precision_inspector.py indexes every non-input/output layer this way);
    - ``stats.get(f"{layer.name}/layer_noise_analysis/...")``: flat keys (a commented-out call in ACE's
      PointPillars example).
    Values are 1-element float32 arrays (the inspector calls ``np.concatenate`` on them and ``float()`` on each).
    The fake holds only the noise-analysis statistics; the real object holds many more (ranges etc.).
    """

    def __init__(self, flat: dict[str, np.ndarray], layers: list[str]):
        self._flat = {k: np.array(v, np.float32) for k, v in flat.items()}
        self._layers = set(layers)

    def __getitem__(self, key: str) -> Any:
        if key in self._flat:
            return self._flat[key]
        if key in self._layers:
            prefix = key + "/"
            return {k[len(prefix) :]: v for k, v in self._flat.items() if k.startswith(prefix)}
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._flat)

    def __len__(self) -> int:
        return len(self._flat)


class ClientRunner:
    #: fake-only: whether the simulated machine has a GPU (decides which downgrade message, and level, applies)
    gpu_available = False
    #: fake-only: how many entries the last optimize() call was given (tests assert the whole set is passed)
    last_optimize_entries: int | None = None
    #: fake-only: how many times translate_onnx_model ran in this process (tests assert cache hits with it)
    translate_calls = 0
    #: fake-only: how many times analyze_noise ran in this process (tests assert the noise ranking is cached)
    analyze_noise_calls = 0

    def __init__(self, hw_arch: str | None = None, har: str | Path | None = None):
        self._hw_arch = hw_arch
        self._state = States.UNINITIALIZED
        self._graph: core.Graph | None = None
        self._onnx = b""
        self._script = core.Script()
        self._quant: core.Quantization | None = None
        self._stats: dict[str, list[float]] = {}  # flat "<layer>/<statistic>" keys (see ParamsStatistics)
        if har is not None:
            self.load_har(har)
        if self._hw_arch is None:
            self._hw_arch = "hailo8"
        if self._hw_arch not in HW_ARCHS:
            raise ValueError(f"hw_arch {self._hw_arch!r} is not one of {sorted(HW_ARCHS)}")

    # -- attributes (hailo-api.md §1.1 "Other attributes") ------------------------------------------------------
    @property
    def state(self) -> States:
        return self._state

    @property
    def hw_arch(self) -> str:
        return str(self._hw_arch)

    @property
    def model_script(self) -> str:
        return self._script.text

    # -- HAR ------------------------------------------------------------------------------------------------------
    def translate_onnx_model(
        self,
        model: str,
        net_name: str | None = None,
        start_node_names: list[str] | None = None,
        end_node_names: list[str] | None = None,
        net_input_shapes: dict[str, list[int]] | None = None,
        net_input_format: dict[str, Any] | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        if self._state is not States.UNINITIALIZED:
            raise RuntimeError(f"translate_onnx_model needs an empty runner, this one is {self._state.name}")
        ClientRunner.translate_calls += 1
        _LOG.info("Translation started on ONNX model %s", Path(model).stem)
        self._graph, self._onnx = core.translate(str(model), net_name or Path(model).stem, start_node_names, end_node_names, net_input_shapes)
        self._state = States.HAILO_MODEL
        return self.get_hn(), {}  # (hn, npz) as in hailo-api.md §1.2

    def _need_graph(self) -> core.Graph:
        if self._graph is None:
            raise RuntimeError("the runner has no model: translate a model or load a HAR first")
        return self._graph

    def get_hn(self) -> dict[str, Any]:
        return copy.deepcopy(core.hn_dict(self._need_graph()))

    def get_hn_dict(self) -> dict[str, Any]:
        return self.get_hn()

    def save_har(self, har_path: str | Path) -> None:
        graph = self._need_graph()
        state = {
            "hw_arch": self._hw_arch,
            "state": self._state.value,
            "graph": graph.to_json(),
            "script": self._script.text,
            "quantization": self._quant.to_json() if self._quant else None,
            "statistics": self._stats,  # analysis results are stored in the HAR (hailo-api.md §1.8)
        }
        core.write_har(str(har_path), state, self._onnx)

    def load_har(self, har: str | Path) -> None:
        state, self._onnx = core.read_har(str(har))
        self._hw_arch = self._hw_arch or state["hw_arch"]
        self._state = States(state["state"])
        self._graph = core.Graph.from_json(state["graph"])
        self._script = core.parse_script(state["script"], self._graph)
        self._quant = core.Quantization.from_json(state["quantization"]) if state["quantization"] else None
        self._stats = {k: list(v) for k, v in (state.get("statistics") or {}).items()}

    # -- optimization -----------------------------------------------------------------------------------------------
    def load_model_script(self, model_script: str | Path, append: bool = False) -> None:
        graph = self._need_graph()
        text = str(model_script)
        if isinstance(model_script, Path) or (text.endswith(".alls") and "\n" not in text and Path(text).is_file()):
            text = Path(model_script).read_text()
        if append and self._script.text:
            text = self._script.text.rstrip("\n") + "\n" + text
        self._script = core.parse_script(text, graph)

    def _frames(self, data: Any, what: str) -> np.ndarray:
        """An NHWC float batch: an ndarray (N,H,W,C) or {input layer: ndarray} (hailo-api.md §1.4 table)."""
        graph = self._need_graph()
        if isinstance(data, dict):
            keys = {graph.resolve(k) for k in data}
            if keys != {graph.input_layer}:
                raise KeyError(f"{what} keys {sorted(data)} do not name the input layer {graph.input_layer!r}")
            data = next(iter(data.values()))
        if not isinstance(data, np.ndarray):
            raise TypeError(f"the fake accepts {what} as a numpy array or a dict of arrays, got {type(data).__name__}")
        if data.ndim != 4 or list(data.shape[1:]) != graph.input_shape:
            raise ValueError(f"{what} must be NHWC with frames of shape {tuple(graph.input_shape)}, got {data.shape}")
        x = data.astype(np.float32)
        if not np.isfinite(x).all():
            raise ValueError(f"{what} contains NaN or inf")
        return x

    def optimize_full_precision(self, calib_data: Any = None) -> None:
        self._need_graph()

    def optimize(self, calib_data: Any) -> None:
        if self._state is not States.HAILO_MODEL:
            raise RuntimeError(f"optimize needs a runner in state HAILO_MODEL, this one is {self._state.name}")
        graph = self._need_graph()
        data = self._frames(calib_data, "calibration data")
        ClientRunner.last_optimize_entries = len(data)
        # calibset_size comes from the model script (model_optimization_config(calibration, calibset_size=N),
        # hailo-api.md §2), 64 without one; the statistics use that many of the entries given
        n = min(self._script.calibset_size or DEFAULT_CALIBSET_SIZE, len(data))
        _LOG.info("Using dataset with %d entries for calibration", n)
        level = self._script.optimization_level
        if level is None:
            level = DEFAULT_OPTIMIZATION_LEVEL
            _LOG.info("Using default optimization level of %d", level)
        compression = self._script.compression_level
        compression = DEFAULT_COMPRESSION_LEVEL if compression is None else compression
        if len(data) < RECOMMENDED_CALIBSET and level >= 2:
            # keyed on the entries GIVEN (the DFC fine-tunes / runs AdaRound on the whole dataset), not on calibset_size
            lowered = 1 if ClientRunner.gpu_available else 0
            _LOG.warning(REDUCE_WITH_GPU if ClientRunner.gpu_available else REDUCE_WITHOUT_GPU)
            level, compression = lowered, 0
        print("Calibration: 100%|##########| done")
        self._quant = core.calibrate(self._onnx, graph, self._script, data[:n], level, compression)
        self._stats = {}  # statistics of an earlier quantization no longer apply
        self._state = States.QUANTIZED_MODEL
        _LOG.info("Model Optimization is done")

    # -- emulation ----------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def infer_context(
        self,
        target: InferenceContext,
        device_ids: Any = None,
        nms_score_threshold: float | None = None,
        custom_infer_config: Any = None,
    ) -> Iterator[_InferContext]:
        if not isinstance(target, InferenceContext):
            raise TypeError(f"target must be an InferenceContext member, got {target!r}")
        context = _InferContext(target)
        try:
            yield context
        finally:
            context.active = False

    def infer(self, context: _InferContext, dataset: Any, batch_size: int | None = None, data_count: int | None = None) -> Any:
        """float32 outputs in HN layout; one array for one output, else a list in output order (forum t/13760)."""
        if not isinstance(context, _InferContext) or not context.active:
            raise RuntimeError("infer() needs the context object of an active runner.infer_context(...) block")
        graph = self._need_graph()
        x = self._frames(dataset, "dataset")
        if data_count is not None:
            x = x[:data_count]
        target = context.target
        if target is InferenceContext.SDK_NATIVE:
            outs = core.run_float(self._onnx, graph, x, None)
        elif target is InferenceContext.SDK_FP_OPTIMIZED:
            outs = core.run_float(self._onnx, graph, x, self._script.normalization)
        elif target in (InferenceContext.SDK_QUANTIZED, InferenceContext.SDK_BIT_EXACT):
            if self._quant is None:
                raise RuntimeError(f"{target.name} needs an optimized (quantized) model")
            # SDK_BIT_EXACT equals the HEF on the device bit for bit; SDK_QUANTIZED "is not claimed to be bit-exact"
            # and differs from it by normal rounding (hailo-api.md §4 item 8; issue 11: 92-95 % identical at 8 bit)
            drift = target is InferenceContext.SDK_QUANTIZED
            outs = core.emulate_quantized(self._onnx, graph, self._quant, x, rounding_drift=drift)
        else:
            raise NotImplementedError("the fake has no hardware target; use hailo_platform")
        outs = [np.asarray(o, np.float32) for o in outs]
        return outs[0] if len(outs) == 1 else outs

    # -- layer noise analysis (hailo-api.md §1.8, §4 step 3) --------------------------------------------------------
    def analyze_noise(
        self,
        dataset: Any,
        data_count: int | None = None,
        batch_size: int = 1,
        analyze_mode: str = DEFAULT_ANALYZE_MODE,
    ) -> None:
        """Per-layer SNR of the quantized model against float on ``dataset``, stored for ``get_params_statistics()``.

        Keyword names: ``batch_size``/``data_count`` (forum t/10895 and third-party scripts: ``analyze_noise(calib,
        batch_size=2, data_count=64)``, "Batch size is 1 by default"), ``dataset=`` and ``analyze_mode="advanced"``
        (a third-party MiDaS script). A ``.npy`` path is accepted (a third-party script passes ``data_path``).
        Needs quantized parameters: a quantized or compiled runner (a third-party script analyzes a
        ``*_compiled_model.har``). Returns None (a third-party report: "analyze_noise() returned None"). The data are
        in the calibration domain: the model script's normalization runs inside, as in emulation.
        The SNR numbers are the fake's own (``core.layer_noise``); Hailo's algorithm is not public.
        """
        if self._state not in (States.QUANTIZED_MODEL, States.COMPILED_MODEL) or self._quant is None:
            raise RuntimeError(f"analyze_noise needs a quantized model (run optimize or load a quantized HAR), this runner is {self._state.name}")
        if analyze_mode not in ANALYZE_MODES:
            raise ValueError(f"analyze_mode must be one of {sorted(ANALYZE_MODES)}, got {analyze_mode!r}")
        if int(batch_size) < 1 or (data_count is not None and int(data_count) < 1):
            raise ValueError(f"batch_size and data_count must be >= 1, got {batch_size} and {data_count}")
        if isinstance(dataset, (str, Path)):
            dataset = np.load(str(dataset))
        x = self._frames(dataset, "dataset")
        if data_count is not None:
            x = x[: int(data_count)]
        ClientRunner.analyze_noise_calls += 1
        key = ANALYZE_MODES[analyze_mode]
        for layer, values in core.layer_noise(self._onnx, self._need_graph(), self._quant, x).items():
            self._stats[f"{layer}/{key}"] = [values["snr" if key == SNR_KEY else "partial_snr"]]

    def get_params_statistics(self) -> ParamsStatistics:
        """Statistics of the model's layers (ACE diag inspectors; hailo-api.md §1.6, §1.8)."""
        return ParamsStatistics({k: np.asarray(v) for k, v in self._stats.items()}, self._need_graph().layer_names())

    # -- compilation ------------------------------------------------------------------------------------------------
    def compile(self) -> bytes:
        if self._state not in (States.QUANTIZED_MODEL, States.COMPILED_MODEL) or self._quant is None:
            raise RuntimeError(f"compile needs a quantized model (hailo-api.md §1.5), this runner is {self._state.name}")
        _LOG.info("Compiling network")
        core.stage_delay("HAILO_FAKE_COMPILE_DELAY_S")
        self._state = States.COMPILED_MODEL
        return core.hef_bytes(str(self._hw_arch), self._need_graph(), self._quant, self._onnx)
