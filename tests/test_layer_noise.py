"""Per-layer noise of the embedded backend (``hailo_sweep.backends.onnxruntime.noise``) on the digits example.

Expected layers are counted by hand from the model: Conv-Relu-MaxPool twice, Conv-Relu twice, the featmap Conv,
ReduceMean and the logits Gemm. Each Conv feeding a Relu shares the Relu's range (pitfall P10) and is left out, so
a host-normalized model has 4 Relu + 2 MaxPool + ReduceMean + 2 outputs = 9 layers; the in-model normalization adds
its Mul and Add outputs. The SNR of an output is recomputed here from two independent ONNX Runtime sessions.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from hailo_sweep.backends.base import BackendContext, Normalization, OptimizedModel
from hailo_sweep.backends.onnxruntime.backend import OnnxRuntimeBackend
from hailo_sweep.backends.onnxruntime.noise import layer_noise, noisiest
from hailo_sweep.data import feed
from hailo_sweep.examples import digits
from hailo_sweep.model_io import read_model_io
from hailo_sweep.settings import Settings

MODEL = Path(__file__).resolve().parents[1] / "configs" / "models" / "digits_cnn.onnx"
NORM = Normalization(mean=(digits.MEAN,), std=(digits.STD,))
DOMAIN = (0.0, 255.0)
SAMPLES = 32
HOST_LAYERS = Counter({"Relu": 4, "MaxPool": 2, "ReduceMean": 1, "Conv": 1, "Gemm": 1})  # Conv: featmap, Gemm: logits


@pytest.fixture(scope="module")
def frames(digits_data: dict[str, Path]) -> tuple[np.ndarray, np.ndarray]:
    calib = np.load(digits_data["calibration"])[:64].transpose(0, 3, 1, 2).copy()
    with np.load(digits_data["evaluation"]) as npz:
        evaluation = npz["x"][:SAMPLES].transpose(0, 3, 1, 2).copy()
    return calib, evaluation


@pytest.fixture(scope="module")
def optimized(tmp_path_factory: pytest.TempPathFactory, frames: tuple[np.ndarray, np.ndarray]) -> dict[str, OptimizedModel]:
    root = tmp_path_factory.mktemp("layer-noise")
    backend = OnnxRuntimeBackend(BackendContext(MODEL, "hailo8l", root / "work", read_model_io(MODEL), NORM, DOMAIN))
    backend.prepare()
    calib = frames[0]
    return {
        placement: backend.optimize(Settings(0, 0, 64, placement, ()), feed(calib, placement, NORM, DOMAIN), root / placement)  # type: ignore[arg-type]
        for placement in ("host", "model")
    }


def _producers(path: Path) -> dict[str, str]:
    return {out: node.op_type for node in onnx.load(str(path)).graph.node for out in node.output}


def test_host_model_layers_sorted_and_complete(optimized: dict[str, OptimizedModel], frames: tuple[np.ndarray, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = optimized["host"]
    inputs = feed(frames[1], "host", NORM, DOMAIN)
    start = time.perf_counter()
    noise = layer_noise(model.handle["fp"], model.handle["qdq"], inputs, tmp_path)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0
    assert capsys.readouterr().out == ""  # the quantization tools' prints are kept off the terminal
    snrs = [n.snr_db for n in noise]
    assert snrs == sorted(snrs) and all(np.isfinite(snrs))
    producers = _producers(model.handle["fp"])
    assert Counter(producers[n.layer] for n in noise) == HOST_LAYERS
    kinds = {n.layer: n.kind for n in noise}
    assert kinds["featmap"] == kinds["logits"] == "output"
    assert sum(k == "output" for k in kinds.values()) == 2
    assert "input" not in kinds  # graph input: skipped
    assert noisiest(noise, 2) == [noise[0].layer, noise[1].layer]


def test_output_snr_matches_an_independent_computation(optimized: dict[str, OptimizedModel], frames: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    model = optimized["host"]
    inputs = feed(frames[1], "host", NORM, DOMAIN)
    noise = {n.layer: n.snr_db for n in layer_noise(model.handle["fp"], model.handle["qdq"], inputs, tmp_path, max_samples=16)}
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    fp = ort.InferenceSession(str(model.handle["fp"]), providers=["CPUExecutionProvider"])
    qdq = ort.InferenceSession(str(model.handle["qdq"]), opts, providers=["CPUExecutionProvider"])
    for name in ("featmap", "logits"):
        f = fp.run([name], {"input": inputs[:16]})[0].astype(np.float64)
        q = qdq.run([name], {"input": inputs[:16]})[0].astype(np.float64)
        expected = 20 * np.log10(np.linalg.norm(f) / np.linalg.norm(f - q))
        assert noise[name] == pytest.approx(expected, abs=1e-3)
        assert 10.0 < noise[name] < 80.0  # 8-bit quantization: tens of dB, neither perfect nor broken


def test_uint8_qdq_input_with_float_model_input(optimized: dict[str, OptimizedModel], frames: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    """Normalization in the model: the QDQ model takes uint8, the float model the same values as float."""
    model = optimized["model"]
    assert model.handle["uint8_input"]
    inputs = feed(frames[1], "model", NORM, DOMAIN)
    assert inputs.dtype == np.uint8
    noise = layer_noise(model.handle["fp"], model.handle["qdq"], inputs, tmp_path)
    producers = _producers(model.handle["fp"])
    assert Counter(producers[n.layer] for n in noise) == HOST_LAYERS + Counter({"Mul": 1, "Add": 1})
    assert all(np.isfinite(n.snr_db) for n in noise)


def test_rejects_values_the_qdq_input_cannot_hold(optimized: dict[str, OptimizedModel], frames: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    model = optimized["model"]
    with pytest.raises(ValueError, match="non-integral"):
        layer_noise(model.handle["fp"], model.handle["qdq"], frames[1].astype(np.float32) / 255.0, tmp_path)
    with pytest.raises(ValueError, match="at least one"):
        layer_noise(model.handle["fp"], model.handle["qdq"], frames[1][:0], tmp_path)


@pytest.mark.parametrize("per_call", [1, 5, SAMPLES])
def test_streamed_energies_equal_ort_all_at_once(optimized: dict[str, OptimizedModel], frames: tuple[np.ndarray, np.ndarray], tmp_path: Path, per_call: int) -> None:
    """Summing each layer's energies over calls (bounded memory) gives ORT's own SNR of every sample's tensors at once."""
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    model = optimized["host"]
    inputs = feed(frames[1], "host", NORM, DOMAIN)

    class Once(CalibrationDataReader):
        def __init__(self) -> None:
            self.fed = False

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.fed:
                return None
            self.fed = True
            return {"input": inputs}

    acts = {}
    for role in ("fp", "qdq"):
        modify_model_output_intermediate_tensors(str(model.handle[role]), str(tmp_path / f"{role}.aug.onnx"))
        acts[role] = collect_activations(str(tmp_path / f"{role}.aug.onnx"), Once())
    expected = {name: e["xmodel_err"] for name, e in compute_activation_error(create_activation_matching(acts["qdq"], acts["fp"])).items() if "xmodel_err" in e}
    noise = layer_noise(model.handle["fp"], model.handle["qdq"], inputs, tmp_path / "ours", max_samples=SAMPLES, samples_per_call=per_call)
    assert len(noise) == sum(HOST_LAYERS.values()) == 9  # as counted in the module docstring
    for n in noise:
        assert n.snr_db == pytest.approx(expected[n.layer], abs=1e-3), n.layer


def test_ranking_samples_shrink_for_large_inputs_but_keep_a_floor():
    from hailo_sweep.backends.onnxruntime.noise import RANKING_SAMPLES, ranking_samples

    assert ranking_samples(np.zeros((64, 3, 224, 224), np.uint8)) == RANKING_SAMPLES
    detector = ranking_samples(np.zeros((2, 3, 480, 640), np.uint8))
    assert 4 <= detector < RANKING_SAMPLES
    assert ranking_samples(np.zeros((2, 3, 4000, 4000), np.uint8)) == 4
