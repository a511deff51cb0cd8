"""Tests for the embedded onnxruntime backend on the example model (configs/models/digits_cnn.onnx).

The backend is used directly (no pipeline): a ``BackendContext`` is built here, data is fed through
``hailo_sweep.data.feed`` in NCHW. Expected values come from ONNX Runtime run independently in this file (sessions
opened here on the backend's artifacts or on the original model), from the ONNX graphs themselves, or from the
model's structure counted by hand. Small sets (64 calibration, 64 evaluation frames) keep the file fast.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from hailo_sweep.backends.base import (
    BackendContext,
    CompiledModel,
    DeviceOutputs,
    EmulationContext,
    Normalization,
    OptimizedModel,
)
from hailo_sweep.backends.onnxruntime import graph
from hailo_sweep.backends.onnxruntime.backend import OnnxRuntimeBackend
from hailo_sweep.data import feed
from hailo_sweep.errors import UnsupportedSetting
from hailo_sweep.examples import digits
from hailo_sweep.model_io import read_model_io
from hailo_sweep.settings import Settings

MODEL = Path(__file__).resolve().parents[1] / "configs" / "models" / "digits_cnn.onnx"
NORM = Normalization(mean=(digits.MEAN,), std=(digits.STD,))
DOMAIN = (0.0, 255.0)
CALIB = 64
N_EVAL = 64
OUTPUTS = ("featmap", "logits")
ENABLE_ALL = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
DISABLE_ALL = ort.GraphOptimizationLevel.ORT_DISABLE_ALL

# Counted by hand from the model: Conv-Relu-MaxPool-Conv (twice) and Conv-Relu-Conv are equalizable chains; the last
# backbone Conv's output feeds two nodes (featmap head and ReduceMean), so it ends no chain.
EQUALIZABLE_PAIRS = 3
WEIGHT_LAYERS = 6  # 5 Conv + 1 Gemm, every one of them quantized, so every one gets its bias corrected


# -------------------------------------------------------------------------------------------------------------
# fixtures and helpers
# -------------------------------------------------------------------------------------------------------------


def make_context(work_dir: Path, model: Path = MODEL) -> BackendContext:
    return BackendContext(
        model_path=model,
        target="hailo8l",
        work_dir=work_dir,
        model_io=read_model_io(model),
        normalization=NORM,
        domain=DOMAIN,
    )


@dataclass
class Frames:
    calibration: np.ndarray  # (128, 1, 96, 128) uint8, raw
    evaluation: np.ndarray  # (64, 1, 96, 128) uint8, raw

    def calib(self, settings: Settings, start: int = 0) -> np.ndarray:
        raw = self.calibration[start : start + settings.calibset_size]
        return feed(raw, settings.normalization_placement, NORM, DOMAIN)

    def eval(self, placement: str) -> np.ndarray:
        return feed(self.evaluation, placement, NORM, DOMAIN)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def frames(digits_data: dict[str, Path]) -> Frames:
    calib = np.load(digits_data["calibration"])[: 2 * CALIB]
    with np.load(digits_data["evaluation"]) as npz:
        evaluation = npz["x"][:N_EVAL]
    return Frames(calib.transpose(0, 3, 1, 2).copy(), evaluation.transpose(0, 3, 1, 2).copy())


@dataclass
class Prepared:
    backend: OnnxRuntimeBackend
    facts: dict[str, str | float]
    optimize: Callable[[Settings], OptimizedModel]
    compile: Callable[[Settings], CompiledModel]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, frames: Frames) -> Iterator[Prepared]:
    """One prepared backend for the module; each settings value is optimized/compiled once and shared."""
    root = tmp_path_factory.mktemp("ort-backend")
    backend = OnnxRuntimeBackend(make_context(root / "work"))
    facts = backend.prepare()
    optimized: dict[Settings, OptimizedModel] = {}
    compiled: dict[Settings, CompiledModel] = {}

    def trial_dir(settings: Settings) -> Path:
        s = settings
        out16 = "+".join(s.output_16bit) or "none"
        return root / f"trial-o{s.optimization_level}-c{s.compression_level}-{s.normalization_placement}-{out16}-n{s.noisy_layers_16bit}-k{s.calibset_size}"

    def optimize(settings: Settings) -> OptimizedModel:
        if settings not in optimized:
            optimized[settings] = backend.optimize(settings, frames.calib(settings), trial_dir(settings))
        return optimized[settings]

    def compile_(settings: Settings) -> CompiledModel:
        if settings not in compiled:
            compiled[settings] = backend.compile(optimize(settings), trial_dir(settings))
        return compiled[settings]

    with backend:
        yield Prepared(backend, facts, optimize, compile_)


def settings(level: int = 0, compression: int = 0, placement: str = "host", out16: tuple[str, ...] = ()) -> Settings:
    return Settings(level, compression, CALIB, placement, out16)  # type: ignore[arg-type]


def run_onnx(path: Path, level: ort.GraphOptimizationLevel, x: np.ndarray) -> dict[str, np.ndarray]:
    """An independent ONNX Runtime session on ``path``; outputs by name."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: x}), strict=True))


def input_type(path: Path) -> str:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.get_inputs()[0].type


def run_device(prepared: Prepared, compiled: CompiledModel, x: np.ndarray) -> DeviceOutputs:
    with prepared.backend.device(compiled) as runner:
        return runner.run(x)


def float_reference(frames: Frames) -> dict[str, np.ndarray]:
    """The original model on host-normalized frames, no graph optimizations."""
    return run_onnx(MODEL, DISABLE_ALL, frames.eval("host"))


def output_dequantizers(model: onnx.ModelProto) -> dict[str, tuple[float, int, int]]:
    """Graph output -> (scale, zero point, zero-point element type) of the DequantizeLinear producing it."""
    inits = {i.name: i for i in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    found = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0] in outputs:
            scale = numpy_helper.to_array(inits[node.input[1]])
            zp = inits[node.input[2]]
            found[node.output[0]] = (float(scale), int(numpy_helper.to_array(zp)), zp.data_type)
    return found


def int4_weight_elements(model: onnx.ModelProto) -> int:
    """Elements of the INT4 tensors that DequantizeLinear nodes read as their data (weights, not zero points)."""
    int4 = {i.name: i for i in model.graph.initializer if i.data_type == TensorProto.INT4}
    dq_data = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return sum(int(np.prod(int4[name].dims)) for name in dq_data if name in int4)


def conv_gemm_weight_elements(model: onnx.ModelProto) -> int:
    inits = {i.name: i for i in model.graph.initializer}
    names = {n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm")}
    return sum(int(np.prod(inits[name].dims)) for name in names)


def initializer_arrays(path: Path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


# -------------------------------------------------------------------------------------------------------------
# 1. acceptance: our dequantization of the device's raw integers == ONNX Runtime's own QDQ model
# -------------------------------------------------------------------------------------------------------------

ACCEPTANCE = {
    "int8": (settings(), {"featmap": np.uint8, "logits": np.uint8}),
    "logits16": (settings(out16=("logits",)), {"featmap": np.uint8, "logits": np.uint16}),
    "in-model-normalization": (settings(placement="model"), {"featmap": np.uint8, "logits": np.uint8}),
    "int4-weights": (settings(level=1, compression=2), {"featmap": np.uint8, "logits": np.uint8}),
}


@pytest.mark.parametrize("case", list(ACCEPTANCE))
def test_device_outputs_equal_onnxruntime_dequantized_qdq_model(prepared: Prepared, frames: Frames, case: str) -> None:
    trial, raw_types = ACCEPTANCE[case]
    optimized = prepared.optimize(trial)
    compiled = prepared.compile(trial)
    x = frames.eval(trial.normalization_placement)
    if trial.normalization_placement == "model":
        assert x.dtype == np.uint8
        assert input_type(compiled.path) == "tensor(uint8)"
        assert input_type(optimized.handle["qdq"]) == "tensor(uint8)"
    else:
        assert input_type(compiled.path) == "tensor(float)"

    device = run_device(prepared, compiled, x)
    expected = run_onnx(optimized.handle["qdq"], ENABLE_ALL, x)
    for name in OUTPUTS:
        assert device.raw[name].dtype == raw_types[name], name
        assert device.outputs[name].dtype == np.float32
        assert np.array_equal(device.outputs[name], expected[name]), name
    # the quantized model still computes the digits network: classes agree with the float model
    agreement = np.mean(device.outputs["logits"].argmax(1) == float_reference(frames)["logits"].argmax(1))
    assert agreement >= 0.9


# -------------------------------------------------------------------------------------------------------------
# 2. emulation contexts
# -------------------------------------------------------------------------------------------------------------


def test_quantized_emulation_is_the_qdq_model_without_graph_optimizations(prepared: Prepared, frames: Frames) -> None:
    optimized = prepared.optimize(settings(level=2))
    x = frames.eval("host")
    quantized = prepared.backend.emulate(optimized, x, EmulationContext.QUANTIZED)
    fp = prepared.backend.emulate(optimized, x, EmulationContext.FP_OPTIMIZED)
    expected = run_onnx(optimized.handle["qdq"], DISABLE_ALL, x)
    for name in OUTPUTS:
        assert np.array_equal(quantized[name], expected[name]), name
        assert not np.array_equal(quantized[name], fp[name]), name
        assert np.abs(quantized[name] - fp[name]).max() > 1e-3, name  # fake quantization really changed values


def test_fp_optimized_at_level_0_is_the_preprocessed_float_model(prepared: Prepared, frames: Frames) -> None:
    optimized = prepared.optimize(settings(level=0))
    x = frames.eval("host")
    fp = prepared.backend.emulate(optimized, x, EmulationContext.FP_OPTIMIZED)
    preprocessed = prepared.backend.context.work_dir / "prepared" / str(prepared.facts["cache_key"]) / "float.pre.onnx"
    assert preprocessed.is_file()
    expected = run_onnx(preprocessed, ENABLE_ALL, x)
    original = float_reference(frames)
    for name in OUTPUTS:
        assert fp[name].shape == original[name].shape
        np.testing.assert_allclose(fp[name], expected[name], rtol=0, atol=1e-6)
        np.testing.assert_allclose(fp[name], original[name], rtol=0, atol=1e-4)


def test_an_unchanged_float_model_is_emulated_once_and_says_so(prepared: Prepared, frames: Frames) -> None:
    """No equalization, no bias correction: the float model is the prepared one; two such trials (other calibration
    sizes) share one run of it on the same inputs, the outputs are read-only, and the params say what happened."""
    first = prepared.optimize(settings(level=0))
    second = prepared.optimize(Settings(0, 0, CALIB // 2, "host", ()))
    preprocessed = prepared.backend.context.work_dir / "prepared" / str(prepared.facts["cache_key"]) / "float.pre.onnx"
    for optimized in (first, second):
        assert Path(optimized.handle["fp"]) == preprocessed  # no copy written per trial
        assert str(optimized.params["ort.fp_optimized"]).startswith("unchanged float model")
    x = frames.eval("host")
    a = prepared.backend.emulate(first, x, EmulationContext.FP_OPTIMIZED)
    b = prepared.backend.emulate(second, x.copy(), EmulationContext.FP_OPTIMIZED)  # equal content, another array
    expected = run_onnx(preprocessed, ENABLE_ALL, x)
    for name in OUTPUTS:
        assert b[name] is a[name]  # reused, not recomputed
        np.testing.assert_array_equal(a[name], expected[name])
        with pytest.raises(ValueError):
            a[name][...] = 0  # shared between trials: nobody may change it
    other = x[: N_EVAL // 2] + 0.25  # other inputs: computed for them, not served from the cache
    c = prepared.backend.emulate(first, other, EmulationContext.FP_OPTIMIZED)
    for name, values in run_onnx(preprocessed, ENABLE_ALL, other).items():
        np.testing.assert_array_equal(c[name], values)


def test_the_sweeps_read_only_inputs_are_found_by_identity_and_a_changed_view_is_not(prepared: Prepared, frames: Frames,
                                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The array a sweep feeds every trial is read-only: the second trial finds its float outputs without comparing
    26 MB of inputs. A read-only view of a writeable array is not trusted that way: its values can change."""
    from hailo_sweep.backends.onnxruntime import backend as backend_mod

    optimized = prepared.optimize(settings(level=0))
    frozen = frames.eval("host").copy()
    frozen.flags.writeable = False
    first = prepared.backend.emulate(optimized, frozen, EmulationContext.FP_OPTIMIZED)
    compared: list[int] = []
    real_equal = np.array_equal
    monkeypatch.setattr(backend_mod.np, "array_equal", lambda a, b: compared.append(1) or real_equal(a, b))
    again = prepared.backend.emulate(optimized, frozen, EmulationContext.FP_OPTIMIZED)
    assert compared == [] and all(again[k] is first[k] for k in OUTPUTS)

    base = frames.eval("host") + 0.25  # other values than above: the entry is now this view's
    view = base[:]
    view.flags.writeable = False
    before = prepared.backend.emulate(optimized, view, EmulationContext.FP_OPTIMIZED)
    before = {k: v.copy() for k, v in before.items()}
    base += 0.5  # the view's values change under it
    after = prepared.backend.emulate(optimized, view, EmulationContext.FP_OPTIMIZED)
    preprocessed = Path(optimized.handle["fp"])
    for name, values in run_onnx(preprocessed, ENABLE_ALL, np.array(view)).items():
        np.testing.assert_array_equal(after[name], values)
    assert any(not np.array_equal(after[k], before[k]) for k in OUTPUTS)


def test_bias_correction_changes_the_quantized_model_only(prepared: Prepared, frames: Frames) -> None:
    """Bias correction is a post-quantization step (the DFC's post_quantization_optimization): the fp_optimized stage
    stays the float model before it, so its effect is counted as quantization cost, never as a float optimization."""
    plain = prepared.optimize(settings(level=0))
    plain_qdq = Path(plain.handle["qdq"]).read_bytes()  # the helper's work dir does not name bias_correction
    corrected = prepared.optimize(Settings(0, 0, CALIB, "host", (), bias_correction="enabled"))
    assert int(corrected.params["ort.bias_corrected_layers"]) > 0
    assert corrected.handle["fp_unchanged"] and Path(corrected.handle["fp"]) == Path(plain.handle["fp"])
    assert Path(corrected.handle["qdq"]).read_bytes() != plain_qdq  # the biases moved
    x = frames.eval("host")
    fp = prepared.backend.emulate(corrected, x, EmulationContext.FP_OPTIMIZED)
    for name, values in run_onnx(Path(plain.handle["fp"]), ENABLE_ALL, x).items():
        np.testing.assert_array_equal(fp[name], values)


def test_a_rewritten_float_model_is_emulated_in_its_trial(prepared: Prepared, frames: Frames) -> None:
    optimized = prepared.optimize(settings(level=1))  # cross-layer equalization rewrites the float weights
    assert Path(optimized.handle["fp"]).name == "model.fp.onnx" and not optimized.handle["fp_unchanged"]
    assert str(optimized.params["ort.fp_optimized"]).startswith("rewritten float model")
    x = frames.eval("host")
    fp = prepared.backend.emulate(optimized, x, EmulationContext.FP_OPTIMIZED)
    for name, values in run_onnx(Path(optimized.handle["fp"]), ENABLE_ALL, x).items():
        np.testing.assert_array_equal(fp[name], values)


def test_bit_exact_emulation_is_refused(prepared: Prepared, frames: Frames) -> None:
    assert EmulationContext.BIT_EXACT not in prepared.backend.emulation_contexts()
    with pytest.raises(UnsupportedSetting, match="bit_exact"):
        prepared.backend.emulate(prepared.optimize(settings()), frames.eval("host"), EmulationContext.BIT_EXACT)


# -------------------------------------------------------------------------------------------------------------
# 3. normalization placement
# -------------------------------------------------------------------------------------------------------------


def test_in_model_normalization_matches_host_normalization(prepared: Prepared, frames: Frames) -> None:
    host = prepared.optimize(settings(placement="host"))
    in_model = prepared.optimize(settings(placement="model"))
    host_out = prepared.backend.emulate(host, frames.eval("host"), EmulationContext.FP_OPTIMIZED)
    model_out = prepared.backend.emulate(in_model, frames.eval("model"), EmulationContext.FP_OPTIMIZED)
    for name in OUTPUTS:
        np.testing.assert_allclose(model_out[name], host_out[name], rtol=0, atol=1e-4)
    assert "normalization_placement = model" in in_model.script
    assert "normalization: in the model" in in_model.script
    assert "normalization: in the model" not in host.script
    assert in_model.handle["uint8_input"] is True and host.handle["uint8_input"] is False


def test_in_model_normalization_needs_mean_and_std(tmp_path: Path) -> None:
    context = make_context(tmp_path / "work")
    backend = OnnxRuntimeBackend(
        BackendContext(context.model_path, context.target, context.work_dir, context.model_io, None, DOMAIN)
    )
    with pytest.raises(UnsupportedSetting, match="normalization"):
        backend.validate(settings(placement="model"))


# -------------------------------------------------------------------------------------------------------------
# 4. optimization levels
# -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_optimization_levels_are_cumulative(prepared: Prepared, level: int) -> None:
    optimized = prepared.optimize(settings(level=level))
    script, params = optimized.script, optimized.params
    assert optimized.script_name == "recipe.txt"
    assert f"optimization_level = {level}" in script

    assert ("cross_layer_equalization:" in script) == (level >= 1)
    assert params.get("ort.equalized_pairs") == (EQUALIZABLE_PAIRS if level >= 1 else None)
    assert ("bias_correction:" in script) == (level >= 2)
    assert params.get("ort.bias_corrected_layers") == (WEIGHT_LAYERS if level >= 2 else None)
    method = "Percentile" if level == 3 else "MinMax"
    assert params["ort.calibrate_method"] == method
    assert f"calibrate_method={method}" in script
    assert ("Percentile" in script) == (level == 3)

    # the float model the recipe quantized really was edited (CLE, bias correction) only from level 1 on
    preprocessed = prepared.backend.context.work_dir / "prepared" / str(prepared.facts["cache_key"]) / "float.pre.onnx"
    before, after = initializer_arrays(preprocessed), initializer_arrays(optimized.handle["fp"])
    changed = [n for n in before if n in after and not np.array_equal(before[n], after[n])]
    assert bool(changed) == (level >= 1)


def test_level_4_is_refused_as_adaround(prepared: Prepared, frames: Frames, tmp_path: Path) -> None:
    level4 = settings(level=4)
    with pytest.raises(UnsupportedSetting, match="AdaRound"):
        prepared.backend.validate(level4)
    with pytest.raises(UnsupportedSetting, match="AdaRound"):
        prepared.backend.optimize(level4, frames.calib(level4), tmp_path)
    for level in range(4):
        prepared.backend.validate(settings(level=level))  # 0-3 are accepted


def test_unknown_16bit_output_is_refused(prepared: Prepared) -> None:
    with pytest.raises(UnsupportedSetting, match="nope"):
        prepared.backend.validate(settings(out16=("nope",)))


# -------------------------------------------------------------------------------------------------------------
# 5. compression
# -------------------------------------------------------------------------------------------------------------


def test_compression_levels_put_weights_at_4_bit(prepared: Prepared) -> None:
    total = conv_gemm_weight_elements(onnx.load(str(MODEL)))
    shares = {}
    for compression in (0, 1, 2):
        optimized = prepared.optimize(settings(compression=compression))
        share = optimized.params["ort.weights_4bit_share"]
        qdq = onnx.load(str(optimized.handle["qdq"]))
        has_int4 = any(i.data_type == TensorProto.INT4 for i in qdq.graph.initializer)
        assert has_int4 == (compression >= 1), compression
        # the recorded share is the share of weight elements that really are INT4 in the QDQ model
        assert share == pytest.approx(int4_weight_elements(qdq) / total, abs=1e-4)
        assert share <= 0.2 * compression + 1e-9  # never above the level's target
        shares[compression] = share
    assert shares[0] == 0
    assert shares[1] > 0
    assert shares[2] >= shares[1]


# -------------------------------------------------------------------------------------------------------------
# 6. calibration cache (pitfall P9: ORT only checks the method of a cache file, so the key must hold the rest)
# -------------------------------------------------------------------------------------------------------------


def test_calibration_cache_is_keyed_on_model_data_and_method(tmp_path: Path, frames: Frames) -> None:
    backend = OnnxRuntimeBackend(make_context(tmp_path / "work"))
    backend.prepare()
    cache_dir = tmp_path / "work" / "calibration-cache"

    def count() -> int:  # MinMax tables (.json) and histograms (.npz) alike
        return len([p for p in cache_dir.iterdir() if p.is_file()])

    def qdq_bytes(trial: Settings, name: str, start: int = 0) -> bytes:
        optimized = backend.optimize(trial, frames.calib(trial, start), tmp_path / name)
        return Path(optimized.handle["qdq"]).read_bytes()

    first = qdq_bytes(settings(level=0), "a")
    after_first = count()  # the table, and those of the leading segments the pass crossed (Calibrator.minmax)
    assert after_first >= 1
    assert qdq_bytes(settings(level=0), "b") == first
    assert count() == after_first  # same settings: the cache files are reused, not duplicated

    other_data = qdq_bytes(settings(level=0), "c", start=CALIB)
    after_other = count()
    assert after_other > after_first  # another calibration set: new ranges
    assert other_data != first

    minmax = qdq_bytes(settings(level=2), "d")
    after_level2 = count()
    assert after_level2 > after_other
    percentile = qdq_bytes(settings(level=3), "e")
    assert count() > after_level2  # same models and data, other method: not served from the MinMax cache
    assert percentile != minmax
    after_level3 = count()
    assert qdq_bytes(settings(level=3), "f") == percentile
    assert count() == after_level3


# -------------------------------------------------------------------------------------------------------------
# 7. prepare() cache
# -------------------------------------------------------------------------------------------------------------


def test_prepare_is_cached_by_model_content(tmp_path: Path) -> None:
    work = tmp_path / "work"
    first = OnnxRuntimeBackend(make_context(work)).prepare()
    second = OnnxRuntimeBackend(make_context(work)).prepare()
    assert first["cache_hit"] == "false"
    assert second["cache_hit"] == "true"
    assert second["cache_key"] == first["cache_key"]

    changed = onnx.load(str(MODEL))
    changed.doc_string = "a different model file"
    copy = tmp_path / "changed.onnx"
    onnx.save(changed, str(copy))
    assert copy.read_bytes() != MODEL.read_bytes()
    miss = OnnxRuntimeBackend(make_context(work, copy)).prepare()
    assert miss["cache_hit"] == "false"
    assert miss["cache_key"] != first["cache_key"]
    assert OnnxRuntimeBackend(make_context(work, copy)).prepare()["cache_hit"] == "true"


def test_prepare_cache_honours_a_changed_normalization(tmp_path: Path, frames: Frames) -> None:
    """Same model, same work dir, other mean/std: the in-model normalization must use the new values."""
    work = tmp_path / "work"
    OnnxRuntimeBackend(make_context(work)).prepare()  # caches the model with NORM inside
    other = Normalization(mean=(10.0,), std=(100.0,))
    base = make_context(work)
    backend = OnnxRuntimeBackend(BackendContext(base.model_path, base.target, work, base.model_io, other, DOMAIN))
    assert backend.prepare()["cache_hit"] == "true"  # the pre-processed float model itself is reused
    trial = settings(placement="model")
    optimized = backend.optimize(trial, feed(frames.calibration[:CALIB], "model", other, DOMAIN), tmp_path / "t")
    got = backend.emulate(optimized, feed(frames.evaluation, "model", other, DOMAIN), EmulationContext.FP_OPTIMIZED)
    expected = run_onnx(MODEL, DISABLE_ALL, feed(frames.evaluation, "host", other, DOMAIN))
    for name in OUTPUTS:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-4)


def test_optimize_before_prepare_is_an_error(tmp_path: Path, frames: Frames) -> None:
    backend = OnnxRuntimeBackend(make_context(tmp_path / "work"))
    with pytest.raises(RuntimeError, match="prepare"):
        backend.optimize(settings(), frames.calib(settings()), tmp_path / "t")


# -------------------------------------------------------------------------------------------------------------
# 8. device runner facts and the compiled model's metadata
# -------------------------------------------------------------------------------------------------------------


def test_device_metrics_and_output_quant_metadata(prepared: Prepared, frames: Frames) -> None:
    trial = settings(out16=("logits",))
    optimized = prepared.optimize(trial)
    compiled = prepared.compile(trial)
    assert compiled.kind == "onnx-int8"
    assert compiled.size_bytes == compiled.path.stat().st_size > 0
    device = run_device(prepared, compiled, frames.eval("host"))
    assert device.metrics["throughput_fps"] > 0
    assert device.metrics["latency_ms"] > 0

    stored = graph.read_output_quant(onnx.load(str(compiled.path)))
    in_qdq = output_dequantizers(onnx.load(str(optimized.handle["qdq"])))  # what the QDQ model's last DQs used
    assert set(stored) == set(device.quant) == set(OUTPUTS)
    for name in OUTPUTS:
        q = device.quant[name]
        assert (stored[name].scale, stored[name].zero_point, stored[name].dtype) == (q.scale, q.zero_point, q.dtype)
        scale, zero_point, zp_type = in_qdq[name]
        assert (q.scale, q.zero_point) == (scale, zero_point)
        assert q.dtype == onnx.helper.tensor_dtype_to_np_dtype(zp_type).name
    assert device.quant["logits"].bits == 16 and device.quant["featmap"].bits == 8
    # the compiled model has no DequantizeLinear left at its outputs: they are raw integers
    assert output_dequantizers(onnx.load(str(compiled.path))) == {}


def test_a_second_run_of_one_activation_keeps_the_first_runs_latency(prepared: Prepared, frames: Frames) -> None:
    """The determinism re-run only compares bytes: it is not warmed up or latency-timed again."""
    x = frames.eval("host")
    runner = prepared.backend.device(prepared.compile(settings()))
    with runner:
        first = runner.run(x)
        again = runner.run(x[:8])
    assert first.metrics["latency_ms"] > 0 and again.metrics["latency_ms"] == first.metrics["latency_ms"]
    for name in OUTPUTS:
        np.testing.assert_array_equal(again.raw[name], first.raw[name][:8])
    with runner:  # a new activation measures afresh
        assert runner.run(x[:8]).metrics["latency_ms"] > 0


def test_device_runner_must_be_activated(prepared: Prepared, frames: Frames) -> None:
    runner = prepared.backend.device(prepared.compile(settings()))
    with pytest.raises(RuntimeError, match="with"):
        runner.run(frames.eval("host"))


# -------------------------------------------------------------------------------------------------------------
# 9. determinism
# -------------------------------------------------------------------------------------------------------------


def test_same_settings_in_fresh_work_dirs_compile_to_identical_bytes(tmp_path: Path, frames: Frames) -> None:
    trial = settings(level=3, compression=1, placement="model", out16=("logits",))  # every recipe step at once
    blobs = []
    for run in ("one", "two"):
        backend = OnnxRuntimeBackend(make_context(tmp_path / run / "work"))  # no shared prepare/calibration cache
        assert backend.prepare()["cache_hit"] == "false"
        optimized = backend.optimize(trial, frames.calib(trial), tmp_path / run / "trial")
        blobs.append(backend.compile(optimized, tmp_path / run / "trial").path.read_bytes())
    assert blobs[0] == blobs[1]


@pytest.mark.parametrize("compression", [0, 1])
def test_layer_noise_pairs_every_quantized_activation(prepared: Prepared, frames: Frames, compression: int) -> None:
    """4-bit weights put com.microsoft Q/DQ nodes in the model; layers must still pair (it once returned nothing)."""
    model = prepared.optimize(settings(level=1, compression=compression))
    noise = prepared.backend.layer_noise(model, frames.eval("host")[:16])
    names = {n.layer for n in noise}
    assert {"featmap", "logits"} <= names
    assert len([n for n in noise if n.kind == "activation"]) >= 4
    assert [n.snr_db for n in noise] == sorted(n.snr_db for n in noise)


def test_noisy_layers_are_promoted_to_16_bit_with_their_weights(prepared: Prepared, frames: Frames) -> None:
    base = Settings(0, 0, CALIB, "host", (), 0)
    promoted = Settings(0, 0, CALIB, "host", (), 2)
    model = prepared.optimize(promoted)
    layers = str(model.params["ort.noisy_layers"]).split(",")
    assert len(layers) == 2
    ranking = prepared.backend.layer_noise(prepared.optimize(base), frames.calib(base)[:32])
    activations = [n.layer for n in ranking if n.kind == "activation"]
    assert set(layers) <= set(activations[:4])  # among the noisiest (ranked on calibration data, here re-measured)
    qdq = onnx.load(str(model.handle["qdq"]))
    zero_point_types = {i.name: i.data_type for i in qdq.graph.initializer}
    uint16_q = {n.input[0] for n in qdq.graph.node if n.op_type == "QuantizeLinear" and zero_point_types.get(n.input[2]) == onnx.TensorProto.UINT16}
    for layer in layers:
        assert layer in uint16_q, f"{layer} was not quantized to 16 bit"
    int16_weights = [i.name for i in qdq.graph.initializer if i.data_type == onnx.TensorProto.INT16]
    assert int16_weights, "the promoted layers' conv weights stay 8-bit"


def test_the_unchanged_float_outputs_are_computed_before_the_first_trial(prepared: Prepared, frames: Frames,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """``expect_inputs`` runs the unchanged float model on the sweep's inputs once, before any trial: a trial without
    a float rewrite then opens no session for its fp_optimized stage, and gets the same outputs it would compute."""
    from hailo_sweep.backends.onnxruntime import backend as backend_mod

    x = frames.eval("host").copy()
    x.flags.writeable = False
    prepared.backend.expect_inputs("host", x)
    optimized = prepared.optimize(settings(level=0))
    assert optimized.handle["fp_unchanged"]
    opened: list[object] = []
    real_session = backend_mod.session
    monkeypatch.setattr(backend_mod, "session", lambda *a, **k: opened.append(a) or real_session(*a, **k))
    fp = prepared.backend.emulate(optimized, x, EmulationContext.FP_OPTIMIZED)
    assert opened == []
    for name, values in run_onnx(Path(optimized.handle["fp"]), ENABLE_ALL, np.array(x)).items():
        np.testing.assert_array_equal(fp[name], values)
