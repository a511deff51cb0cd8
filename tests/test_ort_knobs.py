"""The algorithm knobs on the embedded onnxruntime backend, and its calibration, on a small MobileNet-like model.

Expected values come from ONNX Runtime run independently here: plain ``quantize_static`` for the level-0 parity,
ORT's own all-in-memory calibrators for the bounded-memory calibration, and the QDQ graphs the backend wrote.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import create_calibrator, load_tensors_data

from hailo_sweep.backends.base import BackendContext, Normalization
from hailo_sweep.backends.onnxruntime import quantize
from hailo_sweep.backends.onnxruntime.backend import OnnxRuntimeBackend
from hailo_sweep.backends.onnxruntime.calibration import SEGMENT, Calibrator
from hailo_sweep.backends.onnxruntime.recipe import Recipe
from hailo_sweep.errors import UnsupportedSetting
from hailo_sweep.examples.synthetic_cnn import MEAN, STD, CnnSpec, build_model, normalize, photos
from hailo_sweep.model_io import read_model_io
from hailo_sweep.settings import Settings

SIZE = 32
SPEC = CnnSpec(size=SIZE, width=0.35, last_channels=64, classes=10)
N = 32
DISABLE_ALL = ort.GraphOptimizationLevel.ORT_DISABLE_ALL


class _Reader(CalibrationDataReader):
    def __init__(self, data: np.ndarray, batch: int = 8):
        self.data, self.batch, self.i = data, batch, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.data):
            return None
        self.i += self.batch
        return {"input": self.data[self.i - self.batch : self.i]}


@dataclass
class Setup:
    backend: OnnxRuntimeBackend
    model_path: Path
    calib: np.ndarray
    evaluation: np.ndarray
    root: Path
    trials: int = 0

    def optimize(self, settings: Settings) -> Path:
        self.trials += 1
        return Path(self.backend.optimize(settings, self.calib, self.root / f"trial{self.trials}").handle["qdq"])

    def ranges(self, qdq: Path) -> dict[str, tuple[float, float]]:
        table = load_tensors_data(qdq.parent / "q1.ranges.json")
        return {k: (float(np.ravel(v.range_value[0])[0]), float(np.ravel(v.range_value[1])[0])) for k, v in table.data.items()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("ort-knobs")
    path = root / "mobilenet_like.onnx"
    onnx.save(build_model(SPEC), str(path))
    context = BackendContext(
        model_path=path, target="hailo8l", work_dir=root / "work", model_io=read_model_io(path),
        normalization=Normalization(mean=MEAN, std=STD), domain=(0.0, 255.0),
    )
    backend = OnnxRuntimeBackend(context)
    backend.prepare()
    yield Setup(backend, path, normalize(photos(N, SIZE, seed=1)), normalize(photos(N, SIZE, seed=2)), root)


def run(path: Path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = DISABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def sqnr(reference: np.ndarray, y: np.ndarray) -> float:
    return float(10 * np.log10((reference**2).sum() / ((y - reference) ** 2).sum()))


def weight_scales(qdq: Path) -> list[np.ndarray]:
    model = onnx.load(str(qdq))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weight_names = {i.name for i in model.graph.initializer if i.data_type in (TensorProto.INT8, TensorProto.INT16, TensorProto.INT4)}
    return [inits[n.input[1]] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weight_names]


def zero_point_types(qdq: Path) -> set[int]:
    model = onnx.load(str(qdq))
    inits = {i.name: i for i in model.graph.initializer}
    return {inits[n.input[2]].data_type for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2}


# -- level 0 = plain quantize_static ---------------------------------------------------------------------------


def test_level_0_equals_plain_quantize_static(setup: Setup, tmp_path: Path) -> None:
    plain = tmp_path / "plain.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_static(str(setup.model_path), str(plain), _Reader(setup.calib), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    reference = run(setup.model_path, setup.evaluation)
    ours = setup.optimize(Settings(0, 0, N, "host"))
    assert abs(sqnr(reference, run(ours, setup.evaluation)) - sqnr(reference, run(plain, setup.evaluation))) < 0.05


# -- each knob honoured ----------------------------------------------------------------------------------------


def test_per_tensor_weights_have_scalar_scales(setup: Setup) -> None:
    per_channel = weight_scales(setup.optimize(Settings(0, 0, N, "host")))
    per_tensor = weight_scales(setup.optimize(Settings(0, 0, N, "host", weights_granularity="per_tensor")))
    assert len(per_tensor) == len(per_channel) > 0
    assert all(s.size == 1 for s in per_tensor)
    assert sum(s.size > 1 for s in per_channel) > len(per_channel) // 2


def test_all_16bit_leaves_no_8bit_qdq(setup: Setup) -> None:
    assert TensorProto.UINT8 in zero_point_types(setup.optimize(Settings(0, 0, N, "host")))
    sixteen = zero_point_types(setup.optimize(Settings(0, 0, N, "host", all_16bit="all"))) - {TensorProto.INT32}  # biases are int32 anyway
    assert sixteen == {TensorProto.UINT16, TensorProto.INT16}


def test_percentile_ranges_are_narrower_than_minmax(setup: Setup) -> None:
    minmax = setup.ranges(setup.optimize(Settings(0, 0, N, "host")))
    narrower = {}
    tables = {}
    for p in (99.99, 99.9):
        clipped = tables[p] = setup.ranges(setup.optimize(Settings(0, 0, N, "host", calibration_method="percentile", clipping_percentile=p)))
        assert clipped.keys() == minmax.keys()
        assert all(clipped[k][0] >= minmax[k][0] - 1e-6 and clipped[k][1] <= minmax[k][1] + 1e-6 for k in minmax)
        narrower[p] = sum(clipped[k][1] - clipped[k][0] < 0.99 * (minmax[k][1] - minmax[k][0]) for k in minmax)
    assert narrower[99.99] > len(minmax) // 4
    assert narrower[99.9] >= narrower[99.99]
    assert all(tables[99.9][k][1] <= tables[99.99][k][1] + 1e-6 for k in minmax)  # a lower percentile clips at least as much


@pytest.mark.parametrize("scope", ["first", "outputs"])
def test_clipping_scope_applies_only_to_the_named_tensors(setup: Setup, scope: str) -> None:
    minmax = setup.ranges(setup.optimize(Settings(0, 0, N, "host")))
    everywhere = setup.ranges(setup.optimize(Settings(0, 0, N, "host", calibration_method="percentile", clipping_percentile=99.9)))
    scoped = setup.ranges(setup.optimize(Settings(0, 0, N, "host", calibration_method="percentile", clipping_percentile=99.9, clipping_scope=scope)))
    named = {"first": {"conv1.out", "conv1.relu6"}, "outputs": {"logits"}}[scope]  # from the model's structure
    for name in minmax:
        assert scoped[name] == (everywhere[name] if name in named else minmax[name]), name
    assert any(everywhere[n] != minmax[n] for n in named)


def test_equalization_and_bias_correction_override_the_level(setup: Setup) -> None:
    def steps(settings: Settings) -> tuple[bool, bool]:
        script = setup.backend.optimize(settings, setup.calib, setup.root / f"s{id(settings)}").script
        return "cross_layer_equalization:" in script, "bias_correction:" in script

    assert steps(Settings(0, 0, N, "host", equalization="enabled")) == (True, False)
    assert steps(Settings(0, 0, N, "host", bias_correction="enabled")) == (False, True)
    assert steps(Settings(2, 0, N, "host", equalization="disabled", bias_correction="disabled")) == (False, False)
    recipe = Recipe.for_settings(Settings(3, 0, N, "host", calibration_method="minmax"))
    assert recipe.calibrate_method == "MinMax" and recipe.equalize and recipe.bias_correction


def test_finetune_enabled_is_refused_up_front(setup: Setup) -> None:
    with pytest.raises(UnsupportedSetting) as info:
        setup.backend.validate(Settings(0, 0, N, "host", finetune="enabled"))
    assert info.value.key == "search.finetune"
    setup.backend.validate(Settings(0, 0, N, "host", finetune="disabled"))  # what this backend always does


# -- calibration: bounded memory, one pass per method, cached --------------------------------------------------


def ort_single_pass(model: Path, data: np.ndarray, method: CalibrationMethod, tmp: Path, **options: object) -> dict[str, tuple[float, float]]:
    """ORT's own calibrator with every sample in memory at once, as quantize_static runs it."""
    with contextlib.redirect_stdout(io.StringIO()):
        calibrator = create_calibrator(model, augmented_model_path=str(tmp / "aug.onnx"), calibrate_method=method, extra_options=options)
        calibrator.collect_data(_Reader(data, batch=len(data)))
        table = calibrator.compute_data()
    return {k: (float(np.ravel(v.range_value[0])[0]), float(np.ravel(v.range_value[1])[0])) for k, v in table.data.items()}


def test_bounded_memory_percentile_matches_ort_single_pass(setup: Setup, tmp_path: Path) -> None:
    model = onnx.load(str(setup.model_path))
    ours = Calibrator(model, setup.calib, "input", tmp_path / "cache").percentile(99.99)
    theirs = ort_single_pass(setup.model_path, setup.calib, CalibrationMethod.Percentile, tmp_path, percentile=99.99)
    assert ours.data.keys() == theirs.keys()
    for name, (low, high) in theirs.items():
        width = max(abs(low), abs(high)) / 2048 * 1.01  # one histogram bin: ORT bins over [min|x|, max|x|], we over [0, max|x|]
        assert abs(float(ours[name].range_value[1]) - high) <= width, name
        assert abs(float(ours[name].range_value[0]) - low) <= width, name


def test_minmax_equals_ort_and_max_intermediate_outputs_is_not_used(setup: Setup, tmp_path: Path) -> None:
    model = onnx.load(str(setup.model_path))
    ours = {k: (float(v.range_value[0][0]), float(v.range_value[1][0])) for k, v in Calibrator(model, setup.calib, "input", tmp_path / "c").minmax().data.items()}
    theirs = ort_single_pass(setup.model_path, setup.calib, CalibrationMethod.MinMax, tmp_path)
    assert ours == theirs  # the same calibrator and data: the same ranges, bit for bit
    # why not CalibMaxIntermediateOutputs: in the installed onnxruntime it drops every full chunk unmerged
    with contextlib.redirect_stdout(io.StringIO()):
        chunked = create_calibrator(setup.model_path, augmented_model_path=str(tmp_path / "aug2.onnx"), extra_options={"max_intermediate_outputs": 3})
        chunked.collect_data(_Reader(setup.calib[:28], batch=4))  # 7 runs: the first 6 are cleared, only the last counts
        last_only = {k: (float(v.range_value[0][0]), float(v.range_value[1][0])) for k, v in chunked.compute_data().data.items()}
    expected_last = ort_single_pass(setup.model_path, setup.calib[24:28], CalibrationMethod.MinMax, tmp_path)
    assert last_only == expected_last  # if ORT fixes this, the assertion fails and the doc can be updated


def test_calibration_runs_once_per_method_and_is_cached(setup: Setup, tmp_path: Path) -> None:
    model = onnx.load(str(setup.model_path))
    first = Calibrator(model, setup.calib, "input", tmp_path / "cache")
    first.percentile(99.9)
    first.percentile(99.999)
    assert first.passes == ["minmax", "percentile"]  # every percentile from one histogram pass
    second = Calibrator(model, setup.calib, "input", tmp_path / "cache")
    second.percentile(99.99)
    second.minmax()
    assert second.passes == []
    other_data = Calibrator(model, setup.calib[:16], "input", tmp_path / "cache")
    other_data.minmax()
    assert other_data.passes == ["minmax"]


def test_a_minmax_table_extends_the_cached_table_of_a_leading_part_and_equals_one_pass(setup: Setup, tmp_path: Path) -> None:
    """A trial with more calibration rows runs MinMax only over the rows after the largest cached leading segment, a
    trial with fewer reads the boundary an earlier pass cached; both tables are ORT's single pass, bit for bit."""
    model = onnx.load(str(setup.model_path))
    rng = np.random.default_rng(3)
    # 128 rows; the widest values in the first segment (a table that dropped the cached part would be narrower) and
    # rows in each later segment that widen the range again for some tensors
    parts = [setup.calib * 3.0] + [setup.calib * 0.5 + rng.normal(0, 0.5 * k, setup.calib.shape).astype(np.float32) for k in (1, 2, 3)]
    pool = np.concatenate(parts).astype(np.float32)
    assert len(pool) == 4 * SEGMENT

    def table(c: Calibrator) -> dict[str, tuple[float, float]]:
        return {k: (float(v.range_value[0][0]), float(v.range_value[1][0])) for k, v in c.minmax().data.items()}

    small = Calibrator(model, pool[:40], "input", tmp_path / "cache")  # one full segment and 8 more rows
    assert table(small) == ort_single_pass(setup.model_path, pool[:40], CalibrationMethod.MinMax, tmp_path)
    assert small.passes == ["minmax"]
    large = Calibrator(model, pool, "input", tmp_path / "cache")
    assert table(large) == ort_single_pass(setup.model_path, pool, CalibrationMethod.MinMax, tmp_path)
    assert large.passes == [f"minmax from row {SEGMENT}"]  # the first segment was cached by the smaller trial
    for n in (2 * SEGMENT, 3 * SEGMENT):  # boundaries the larger pass crossed: no pass at all
        middle = Calibrator(model, pool[:n], "input", tmp_path / "cache")
        assert table(middle) == ort_single_pass(setup.model_path, pool[:n], CalibrationMethod.MinMax, tmp_path)
        assert middle.passes == []
    other = Calibrator(model, pool[1:65], "input", tmp_path / "cache")  # other rows: nothing of the above applies
    other.minmax()
    assert other.passes == ["minmax"]


def test_trials_that_change_only_non_calibration_knobs_do_not_recalibrate(setup: Setup) -> None:
    first = setup.backend.optimize(Settings(0, 0, N, "host", calibration_method="entropy"), setup.calib, setup.root / "e1")
    again = setup.backend.optimize(Settings(0, 1, N, "host", calibration_method="entropy", clipping_scope="outputs", bias_correction="enabled"), setup.calib, setup.root / "e2")
    assert "entropy" in str(first.params["ort.calibration_passes"]) or first.params["ort.calibration_passes"] == "cached"
    assert again.params["ort.calibration_passes"] == "cached"
    table = json.loads((setup.root / "e2" / "q1.ranges.json").read_text())
    assert table["data"]  # the merged table quantize_static read


@pytest.mark.parametrize("kind", ["percentile", "entropy"])
def test_binning_counts_like_numpy_histogram(kind: str) -> None:
    """The histogram pass's binning: np.histogram's counts over the same range, but for elements on a bin edge."""
    from hailo_sweep.backends.onnxruntime.calibration import _bin, _edges

    x = np.random.default_rng(3).standard_normal(200_000).astype(np.float32) * 3.0
    top = float(np.abs(x).max())
    lo = 0.0 if kind == "percentile" else -top
    expected, edges = np.histogram(np.abs(x) if kind == "percentile" else x, bins=512, range=(lo, top))
    counts = _bin(x.copy(), kind, top, 512)
    assert counts.sum() == x.size  # the extreme value lands in the last bin, nothing falls out
    assert np.abs(counts - expected).sum() <= 10  # at most a handful moved across an edge by float rounding
    assert np.array_equal(_edges(kind, top, 512), edges.astype(np.float32))
