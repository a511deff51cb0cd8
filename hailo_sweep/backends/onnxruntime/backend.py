"""The embedded backend: ONNX Runtime static quantization stands in for the Dataflow Compiler.

- prepare: ``quant_pre_process`` once per sweep (cached by content hash), plus the in-model normalization variant.
- optimize: the recipe of ``recipe.py`` (CLE, bias correction, calibration method, 4-bit and 16-bit overrides).
- emulate: the float-optimized model, and the QDQ model with graph optimizations off (fake-quant in float). A float
  model that no optimization changed (no equalization, no bias correction) is the prepared float model itself: its
  outputs are computed once per sweep and input set and reused (param ``ort.fp_optimized`` says so).
- compile: the QDQ model with each output's DequantizeLinear stripped, so outputs are raw uint8/uint16 like a HEF's;
  the output scale/zero-point travel inside the model's metadata.
- device: ONNX Runtime's integer kernels (``ORT_ENABLE_ALL``); raw outputs are dequantized by our code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import platform
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization.shape_inference import quant_pre_process

from hailo_sweep.atomic import atomic_write, atomic_write_text
from hailo_sweep.backends.base import (
    Backend,
    CompiledModel,
    DeviceOutputs,
    DeviceRunner,
    DeviceSpec,
    EmulationContext,
    LayerNoise,
    OptimizedModel,
    QuantParams,
)
from hailo_sweep.backends.onnxruntime import graph, quantize
from hailo_sweep.backends.onnxruntime.calibration import Calibrator
from hailo_sweep.backends.onnxruntime.equalize import (
    bias_correction,
    cross_layer_equalize,
)
from hailo_sweep.backends.onnxruntime.noise import layer_noise, ranking_samples
from hailo_sweep.backends.onnxruntime.quiet import quiet_quantizer
from hailo_sweep.backends.onnxruntime.recipe import Recipe, check
from hailo_sweep.data import is_frozen, is_uint8_domain
from hailo_sweep.errors import UnsupportedSetting
from hailo_sweep.onnx_runner import batches, declared_batch, run_chunked, session
from hailo_sweep.reference import model_digest
from hailo_sweep.settings import Settings

log = logging.getLogger(__name__)

RAW_INPUT_SUFFIX = "_raw"
OPSET_MIN = 13  # per-channel QDQ needs opset >= 13 (pitfall P5)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    compiled_kind = "onnx-int8"

    def __init__(self, context: Any):
        super().__init__(context)
        self._float_path: Path | None = None  # pre-processed float model, input as in the original
        self._float_norm_path: Path | None = None  # same with Mul/Add normalization prepended (raw input)
        self._noise_ranking: dict[str, list[str]] = {}  # placement -> activation tensors, noisiest first
        # unchanged float model's path -> (the inputs it ran on, its outputs on them)
        self._float_outputs: dict[str, tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]] = {}  # (copy, outputs, the array given)

    # -- facts ---------------------------------------------------------------------------------------------
    @classmethod
    def is_available(cls) -> bool:
        return True

    def versions(self) -> dict[str, str]:
        return {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "cpu": _cpu_description()}

    def default_settings(self, calibset_size: int, output_names: tuple[str, ...]) -> Settings:
        # quantize_static's own defaults (MinMax, per-channel weights, no extras) on a 64-sample calibration set,
        # normalization on the host. Each algorithm knob is named, so that the baseline stays this point when the
        # search declares the knob (an unset knob would be projected onto its first declared choice).
        return Settings(
            optimization_level=0,
            compression_level=0,
            calibset_size=min(64, calibset_size),
            normalization_placement="host",
            output_16bit=(),
            equalization="disabled",
            bias_correction="disabled",
            calibration_method="minmax",
            weights_granularity="per_channel",
            all_16bit="none",
        )

    def emulation_contexts(self) -> tuple[EmulationContext, ...]:
        return (EmulationContext.FP_OPTIMIZED, EmulationContext.QUANTIZED)

    def validate(self, settings: Settings) -> None:
        check(settings)
        if settings.normalization_placement == "model" and self.context.normalization is None:
            raise UnsupportedSetting(
                "normalization_placement 'model' needs the input normalization (mean/std)",
                fix="add normalization: {mean: [...], std: [...]} to the config",
            )
        unknown = [o for o in settings.output_16bit if o not in self.context.model_io.output_names]
        if unknown:
            raise UnsupportedSetting(f"16-bit output {unknown[0]!r} is not a model output")

    # -- prepare -------------------------------------------------------------------------------------------
    def prepare(self) -> dict[str, str | float]:
        key = _sha((model_digest(self.context.model_path) + "|pre-process-v2").encode())[:16]
        cache = self.context.work_dir / "prepared" / key
        float_path = cache / "float.pre.onnx"
        hit = float_path.is_file()
        if not hit:
            atomic_write(float_path, lambda tmp: _pre_process(self.context.model_path, tmp))
        self._float_path = float_path
        if self.context.normalization is not None:
            # keyed on mean/std too: the same model with another normalization must not reuse a stale variant
            norm = self.context.normalization
            norm_key = _sha(repr((tuple(map(float, norm.mean)), tuple(map(float, norm.std)))).encode())[:12]
            norm_path = cache / f"float.pre.norm-{norm_key}.onnx"
            if not norm_path.is_file():
                model = graph.prepend_normalization(
                    onnx.load(str(float_path)),
                    self.context.model_io.input_name,
                    self.context.normalization.mean,
                    self.context.normalization.std,
                    self.raw_input_name,
                )
                atomic_write(norm_path, lambda tmp: onnx.save(model, str(tmp)))
            self._float_norm_path = norm_path
        return {"cache_hit": "true" if hit else "false", "cache_key": key}

    def expect_inputs(self, placement: str, evaluation: np.ndarray) -> None:
        # the unchanged float model's outputs, found again by identity in every trial without a float rewrite; a
        # search whose every point equalizes pays one float run per placement for nothing
        path = self._float_norm_path if placement == "model" else self._float_path
        if path is not None:
            self._unchanged_float_outputs(path, evaluation)

    @property
    def raw_input_name(self) -> str:
        return self.context.model_io.input_name + RAW_INPUT_SUFFIX

    # -- optimize ------------------------------------------------------------------------------------------
    def optimize(self, settings: Settings, calibration: np.ndarray, work_dir: Path) -> OptimizedModel:
        self.validate(settings)
        calibration = calibration[: settings.calibset_size]  # the whole set is given; calibrate on the first N entries
        if self._float_path is None:
            raise RuntimeError("prepare() must run before optimize()")
        recipe = Recipe.for_settings(settings)
        in_model = settings.normalization_placement == "model"
        base_path = self._float_norm_path if in_model else self._float_path
        assert base_path is not None
        input_name = self.raw_input_name if in_model else self.context.model_io.input_name
        uint8_input = in_model and is_uint8_domain(self.context.domain, calibration)
        details: list[str] = []
        params: dict[str, str | int | float] = {}

        model = onnx.load(str(base_path))
        float_changed = False  # whether a full-precision optimization below rewrote the float model (equalization)
        if in_model:
            details.append("normalization: in the model (Mul 1/std, Add -mean/std)" + ("; uint8 input, scale 1, zero point 0" if uint8_input else ""))
        if recipe.equalize:
            model, pairs = cross_layer_equalize(model)
            float_changed = True
            details.append(f"cross_layer_equalization: {pairs} Conv pairs")
            params["ort.equalized_pairs"] = pairs

        noisy: list[str] = []
        if settings.noisy_layers_16bit:
            ranking = self._ranking(settings.normalization_placement, base_path, calibration, input_name, work_dir)
            noisy = [t for t in ranking if t not in settings.output_16bit][: settings.noisy_layers_16bit]
            details.append(f"noisy_layers_16bit: {', '.join(noisy) or 'none found'} (lowest per-layer SNR at level 0, ranked once per sweep)")
            params["ort.noisy_layers"] = ",".join(noisy)
        overrides, chosen_4bit, share = quantize.overrides(model, settings, recipe, input_name if uint8_input else None, noisy)
        params["ort.weights_4bit_share"] = round(share, 4)
        if chosen_4bit:
            details.append(f"weights_4bit: {', '.join(w.name for w in chosen_4bit)} (share {share:.1%})")
        if recipe.all_16bit and recipe.share_4bit > 0:
            details.append("compression_level: no 4-bit weights, all_16bit puts every weight at 16 bit")
        for out in settings.output_16bit:
            details.append(f"output_16bit: {out} activation QUInt16, producer weights QInt16")

        calibrator = Calibrator(model, calibration, input_name, self.context.work_dir / "calibration-cache", self.fixed_batch)
        table = quantize.ranges(model, calibrator, recipe)
        qdq = quantize.quantize(model, table, recipe, overrides, work_dir / "q1.onnx")
        # the fp_optimized stage is the float model after the full-precision optimizations (equalization), as the DFC's
        # SDK_FP_OPTIMIZED: bias correction is a post-quantization step, its biases belong to the quantized model only
        fp_model = model
        if recipe.bias_correction:
            model, corrected = bias_correction(model, qdq, calibration.astype(np.float32, copy=False), input_name)
            details.append(f"bias_correction: {corrected} layers (re-quantized with the same activation ranges)")
            params["ort.bias_corrected_layers"] = corrected
            qdq = quantize.quantize(model, table, recipe, overrides, work_dir / "q2.onnx")
        if uint8_input:
            qdq = graph.make_input_uint8(qdq, input_name)
        details.append(f"calibration: {recipe.clipping}, {len(calibration)} samples" + (f" (passes run now: {', '.join(calibrator.passes)})" if calibrator.passes else " (cached ranges)"))
        params["ort.calibration_passes"] = ",".join(calibrator.passes) or "cached"

        qdq_path = work_dir / "model.qdq.onnx"
        if float_changed:
            fp_path = work_dir / "model.fp.onnx"
            atomic_write(fp_path, lambda tmp: onnx.save(fp_model, str(tmp)))
            params["ort.fp_optimized"] = "rewritten float model: emulated in this trial"
        else:  # nothing rewrote the float model: it is the prepared one, whose outputs every such trial shares
            fp_path = base_path
            params["ort.fp_optimized"] = "unchanged float model: the prepared model's outputs, run once per sweep and reused"
        atomic_write(qdq_path, lambda tmp: onnx.save(qdq, str(tmp)))
        params["ort.calibrate_method"] = recipe.calibrate_method
        return OptimizedModel(
            settings=settings,
            script=recipe.render(details),
            script_name="recipe.txt",
            handle={"fp": fp_path, "qdq": qdq_path, "uint8_input": uint8_input, "fp_unchanged": not float_changed},
            params=params,
        )

    def _ranking(self, placement: str, base_path: Path, calibration: np.ndarray, input_name: str, work_dir: Path) -> list[str]:
        """Activation tensors ranked by per-layer SNR of the level-0 quantized model, computed once per sweep and placement."""
        if placement not in self._noise_ranking:
            key = _sha(base_path.read_bytes() + placement.encode())[:16]
            cache = self.context.work_dir / f"noise-ranking-{key}.json"
            if cache.is_file():
                self._noise_ranking[placement] = json.loads(cache.read_text())
            else:
                probe = Recipe.for_settings(Settings(0, 0, len(calibration), placement))  # type: ignore[arg-type]
                uint8 = placement == "model" and is_uint8_domain(self.context.domain, calibration)
                overrides = quantize.uint8_input_override(input_name) if uint8 else {}
                scratch = work_dir / "noise-ranking"
                base = onnx.load(str(base_path))
                table = Calibrator(base, calibration, input_name, self.context.work_dir / "calibration-cache", self.fixed_batch).minmax()
                qdq = quantize.quantize(base, table, probe, overrides, scratch / "q.onnx")
                if uint8:
                    qdq = graph.make_input_uint8(qdq, input_name)
                onnx.save(qdq, str(scratch / "q.onnx"))
                ranked = layer_noise(base_path, scratch / "q.onnx", calibration, scratch, max_samples=ranking_samples(calibration))
                names = [n.layer for n in ranked if n.kind == "activation"]
                atomic_write_text(cache, json.dumps(names))
                self._noise_ranking[placement] = names
        return self._noise_ranking[placement]

    def layer_noise(self, model: OptimizedModel, inputs: np.ndarray) -> list[LayerNoise]:
        scratch = Path(model.handle["qdq"]).parent / "layer-noise"
        return layer_noise(Path(model.handle["fp"]), Path(model.handle["qdq"]), inputs, scratch, max_samples=len(inputs))

    # -- emulate / compile / device ------------------------------------------------------------------------
    def emulate(self, model: OptimizedModel, inputs: np.ndarray, context: EmulationContext) -> dict[str, np.ndarray]:
        outputs = self.context.model_io.output_names
        axes = self.context.output_batch_axes
        if context is EmulationContext.FP_OPTIMIZED:
            if not model.handle.get("fp_unchanged"):
                sess = session(model.handle["fp"], ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
                return run_chunked(sess, inputs.astype(np.float32, copy=False), outputs, axes)
            return dict(self._unchanged_float_outputs(Path(model.handle["fp"]), inputs))
        if context is EmulationContext.QUANTIZED:
            sess = session(model.handle["qdq"], ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
            return run_chunked(sess, inputs if model.handle["uint8_input"] else inputs.astype(np.float32, copy=False), outputs, axes)
        raise UnsupportedSetting(f"emulation context {context.value} is not available on the onnxruntime backend")

    def _unchanged_float_outputs(self, path: Path, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """The prepared float model's outputs on ``inputs``, computed once per (model, inputs) and kept read-only.

        The sweep feeds every trial the same read-only array (``trial.fed_for``), found again by identity; other
        inputs are compared by content with a copy (equal shape, dtype and values: a memory comparison, cheaper than
        hashing them); other inputs replace the entry."""
        key = str(path)
        kept = self._float_outputs.get(key)
        same = kept is not None and (
            (kept[2] is inputs and is_frozen(inputs))
            or (kept[0].shape == inputs.shape and kept[0].dtype == inputs.dtype and np.array_equal(kept[0], inputs)))
        if kept is None or not same:
            sess = session(path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
            outs = run_chunked(sess, inputs.astype(np.float32, copy=False), self.context.model_io.output_names, self.context.output_batch_axes)
            for arr in outs.values():
                arr.flags.writeable = False  # shared by every trial that reuses it
            kept = (inputs.copy(), outs, inputs)
            self._float_outputs[key] = kept
        return kept[1]

    def compile(self, model: OptimizedModel, work_dir: Path) -> CompiledModel:
        qdq = graph.dequantize_pass_through_outputs(onnx.load(str(model.handle["qdq"])))
        stripped, _ = graph.strip_output_dequantize(qdq)
        path = atomic_write(work_dir / "model.int8.onnx", lambda tmp: onnx.save(stripped, str(tmp)))
        return CompiledModel(path=path, size_bytes=path.stat().st_size, kind=self.compiled_kind)

    @classmethod
    def describe_compiled(cls, path: Path) -> dict[str, Any]:
        return graph.describe_io(onnx.load(str(path)))

    def device_spec(self, compiled: CompiledModel) -> OrtDeviceSpec:
        return OrtDeviceSpec(self.context.model_io.output_names, dict(self.context.output_batch_axes or {}))

    @property
    def fixed_batch(self) -> int | None:
        """The model's fixed batch size (every run and calibration batch has exactly this many samples), or None."""
        return declared_batch(self.context.model_io.input_shape)


@dataclass
class OrtDeviceSpec(DeviceSpec):
    """The integer model's outputs and their batch axes: all a host with ONNX Runtime needs to run it."""

    output_names: tuple[str, ...]
    batch_axes: dict[str, int]

    def open(self, compiled_path: Path) -> DeviceRunner:
        return OrtDeviceRunner(Path(compiled_path), self.output_names, self.batch_axes)


class OrtDeviceRunner(DeviceRunner):
    """Integer kernels of ONNX Runtime's CPU provider, returning raw integers like a Hailo device."""

    LATENCY_RUNS = 20

    def __init__(self, path: Path, output_names: tuple[str, ...], batch_axes: Mapping[str, int] | None = None):
        self.path = path
        self.output_names = output_names
        self.batch_axes = dict(batch_axes or {})
        self._session: ort.InferenceSession | None = None
        self._quant: dict[str, QuantParams] = {}
        self._latency_ms: float | None = None  # measured by the first run of an activation

    def activate(self) -> None:
        model = onnx.load(str(self.path))
        self._quant = {
            name: QuantParams(scale=q.scale, zero_point=q.zero_point, dtype=q.dtype) for name, q in graph.read_output_quant(model).items()
        }
        self._session = session(self.path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        self._latency_ms = None

    def deactivate(self) -> None:
        self._session = None

    def run(self, inputs: np.ndarray) -> DeviceOutputs:
        if self._session is None:
            raise RuntimeError("device runner used outside its 'with' block")
        expected = self._session.get_inputs()[0].type
        feed = inputs if expected == "tensor(uint8)" else inputs.astype(np.float32, copy=False)
        input_name = self._session.get_inputs()[0].name
        fixed = declared_batch(self._session.get_inputs()[0].shape)
        first = self._latency_ms is None
        if first:
            warm, _ = next(batches(feed[:8], fixed))
            self._session.run(None, {input_name: warm})  # warm-up: the first call allocates
        start = time.perf_counter()
        outs = run_chunked(self._session, feed, self.output_names, self.batch_axes)
        elapsed = time.perf_counter() - start
        if first:  # later runs of the activation (e.g. the determinism re-run) keep the first run's latency
            latencies = []
            for i in range(min(self.LATENCY_RUNS, len(feed))):
                single, _ = next(batches(feed[i : i + 1], fixed))
                t0 = time.perf_counter()
                self._session.run(None, {input_name: single})
                latencies.append(time.perf_counter() - t0)
            self._latency_ms = float(np.median(latencies) * 1e3)
        # an output the integer model returns as float (no quantization recorded) is compared as float only
        raw = {name: arr for name, arr in outs.items() if name in self._quant}
        notes = []
        for name, q in self._quant.items():
            if q.bits > 8:
                notes.append(f"{name}: 16-bit output runs through float kernels on the CPU (no int16 kernels)")
        return DeviceOutputs(
            raw=raw,
            quant=dict(self._quant),
            outputs={name: self._quant[name].dequantize(arr) if name in self._quant else arr for name, arr in outs.items()},
            metrics={"throughput_fps": len(feed) / elapsed if elapsed > 0 else 0.0, "latency_ms": self._latency_ms},
            notes=notes,
        )


def _pre_process(model_path: Path, out: Path) -> None:
    """``quant_pre_process`` of a working copy (opset raised to ``OPSET_MIN``, external data inlined), from a file.

    Always from a file path: given a ``ModelProto`` with external data, ``quant_pre_process`` fails. It runs in a
    scratch directory next to ``out`` as the working directory, because ONNX Runtime's symbolic shape inference saves
    ``sym_shape_infer_temp.onnx`` and a ``<uuid>.data`` file into the current directory when it gives up; the
    scratch directory is removed afterwards. The user's model file is only read.
    """
    model_path, out = model_path.resolve(), out.resolve()  # the working directory changes below
    scratch = Path(tempfile.mkdtemp(prefix="pre-process-", dir=out.parent))
    try:
        model = onnx.load(str(model_path))  # with its external data, read from beside the model
        opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=OPSET_MIN)
        if opset < OPSET_MIN:
            model = onnx.version_converter.convert_version(model, OPSET_MIN)
        working = scratch / "working.onnx"
        onnx.save(model, str(working))
        del model
        with quiet_quantizer(), contextlib.chdir(scratch):
            try:
                quant_pre_process(str(working), str(out))
            except Exception as exc:  # symbolic shape inference fails on some models (pitfalls P6/P16): retry without it
                log.warning("quant_pre_process failed (%s); retrying with skip_symbolic_shape=True", exc)
                quant_pre_process(str(working), str(out), skip_symbolic_shape=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _cpu_description() -> str:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = ",".join(f for f in ("avx512_vnni", "avx_vnni", "avx512f", "avx2") if f in have)
                break
    except OSError:
        pass
    return f"{platform.machine()} {flags}".strip()
