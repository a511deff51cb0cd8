"""The shipped example: deterministic digits data and the committed ONNX model trained on it."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from hailo_sweep.examples import digits

MODEL = Path(__file__).resolve().parents[1] / "configs" / "models" / "digits_cnn.onnx"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return digits.build(tmp_path_factory.mktemp("first"))


@pytest.fixture(scope="module")
def eval_set(built: dict[str, Path]) -> tuple[np.ndarray, np.ndarray]:
    with np.load(built["evaluation"], allow_pickle=False) as data:
        return data["x"], data["y"]


def test_build_is_byte_identical_across_directories(built: dict[str, Path], tmp_path: Path) -> None:
    again = digits.build(tmp_path / "second")
    assert set(again) == {"calibration", "evaluation"}
    for role in ("calibration", "evaluation"):
        assert again[role] != built[role]
        assert _sha256(again[role]) == _sha256(built[role])


def test_build_shapes_dtypes_and_labels(built: dict[str, Path], eval_set: tuple[np.ndarray, np.ndarray]) -> None:
    calib = np.load(built["calibration"], allow_pickle=False)
    assert calib.dtype == np.uint8 and calib.shape == (1024, 96, 128, 1)
    x, y = eval_set
    assert x.dtype == np.uint8 and x.shape == (300, 96, 128, 1)
    assert y.dtype == np.int64 and y.shape == (300,)
    assert set(np.unique(y).tolist()) == set(range(10))


def test_build_respects_sizes_and_takes_prefixes(tmp_path: Path, built: dict[str, Path]) -> None:
    small = digits.build(tmp_path, n_calib=10, n_eval=7)
    full_calib = np.load(built["calibration"], allow_pickle=False)
    assert np.array_equal(np.load(small["calibration"], allow_pickle=False), full_calib[:10])
    with np.load(small["evaluation"]) as data, np.load(built["evaluation"]) as full:
        assert np.array_equal(data["x"], full["x"][:7]) and np.array_equal(data["y"], full["y"][:7])
    with pytest.raises(ValueError):
        digits.build(tmp_path, n_calib=digits.N_TRAIN + 1)
    with pytest.raises(ValueError):
        digits.build(tmp_path, n_eval=0)


def test_second_build_into_same_dir_does_not_rewrite(built: dict[str, Path]) -> None:
    before = {role: os.stat(path) for role, path in built.items()}
    digits.build(built["calibration"].parent)
    for role, path in built.items():
        after = os.stat(path)
        assert after.st_mtime_ns == before[role].st_mtime_ns
        assert after.st_ino == before[role].st_ino  # os.replace would have made a new inode
    assert sorted(p.name for p in built["calibration"].parent.iterdir()) == ["calib.npy", "eval.npz"]


def test_build_repairs_a_damaged_file(tmp_path: Path, built: dict[str, Path]) -> None:
    paths = digits.build(tmp_path)
    paths["evaluation"].write_bytes(b"truncated")
    digits.build(tmp_path)
    assert _sha256(paths["evaluation"]) == _sha256(built["evaluation"])


def test_bilinear_matrix_matches_numpy_interp() -> None:
    """Independent reference: np.interp at half-pixel-centre sample points, clamped at the edges."""
    matrix = digits._bilinear_matrix()
    assert matrix.shape == (80, 8) and np.all(matrix.sum(axis=1) == 20)
    row = np.array([0, 3, 16, 7, 1, 12, 5, 9], dtype=float)
    points = (np.arange(80) + 0.5) / 10 - 0.5
    np.testing.assert_allclose(matrix @ row / 20, np.interp(points, np.arange(8), row), atol=1e-12)


def test_frames_have_spec_levels(eval_set: tuple[np.ndarray, np.ndarray]) -> None:
    """Background about 20 with noise sigma 8, strokes up to about 220 (hand-derived from the spec)."""
    x, _ = eval_set
    frames = x[..., 0].astype(np.float64)
    top_left = frames[:, :4, :4]  # never inside a digit's inked area: load_digits' corners are blank
    assert abs(top_left.mean() - 20) < 1.0
    assert abs(top_left.std() - 8) < 1.0
    assert 200 <= np.percentile(frames, 99.9) <= 250


def test_mean_std_constants_match_train_split() -> None:
    train_frames, _ = digits.split()["train"]
    assert train_frames.shape == (digits.N_TRAIN, 96, 128)
    assert abs(float(train_frames.mean()) - digits.MEAN) < 0.5
    assert abs(float(train_frames.std()) - digits.STD) < 0.5


def test_cli_builds_and_prints_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert digits.main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert str(tmp_path / "calib.npy") in printed and str(tmp_path / "eval.npz") in printed
    assert digits.main([]) == 2


def test_shipped_onnx_is_plain_opset17_single_file() -> None:
    model = onnx.load(str(MODEL), load_external_data=False)
    onnx.checker.check_model(model)
    assert {entry.domain: entry.version for entry in model.opset_import}[""] == 17
    allowed = {"Conv", "Relu", "MaxPool", "GlobalAveragePool", "ReduceMean", "Gemm", "Flatten", "Reshape"}
    assert {node.op_type for node in model.graph.node} <= allowed
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert MODEL.stat().st_size < 400_000


def test_shipped_onnx_io_and_accuracy(eval_set: tuple[np.ndarray, np.ndarray]) -> None:
    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "input" and inp.type == "tensor(float)" and inp.shape[1:] == [1, 96, 128]
    assert [o.name for o in session.get_outputs()] == ["featmap", "logits"]

    x, y = eval_set
    batch = ((x.astype(np.float32) - digits.MEAN) / digits.STD).transpose(0, 3, 1, 2)
    featmap, logits = session.run(["featmap", "logits"], {"input": batch})
    assert featmap.shape == (300, 8, 12, 16)
    assert logits.shape == (300, 10)
    accuracy = float((logits.argmax(axis=1) == y).mean())
    assert accuracy >= 0.9


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed here")
def test_training_module_without_torch_says_how_to_install() -> None:
    with pytest.raises(ModuleNotFoundError, match=r"hailo-sweep\[train\]"):
        import hailo_sweep.examples.train_digits  # noqa: F401
