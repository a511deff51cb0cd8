"""A config without normalization on a model that expects normalized input: the float model's own accuracy tells."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hailo_sweep.config import load_config
from hailo_sweep.diagnose.input_checks import check_normalization_unset
from hailo_sweep.examples import digits
from hailo_sweep.pipeline import prepare_sweep
from tests.conftest import WriteConfig, base_config

HOST_ONLY = {"optimization_level": [0], "calibset_size": [64], "normalization_placement": ["host"], "output_16bit": ["none"]}


def _unset(data: dict[str, Path], **overrides: object) -> dict:
    raw = base_config(data, search=HOST_ONLY, **overrides)
    raw.pop("normalization")
    return raw


def test_raw_digits_fed_to_a_model_trained_on_normalized_ones_is_named_with_the_statistics(
    write_config: WriteConfig, digits_data: dict[str, Path], tmp_path: Path,
) -> None:
    cfg = load_config(write_config(_unset(digits_data)))
    found = [f for f in prepare_sweep(cfg, tmp_path / "work").findings if f.code == "normalization_unset"]
    assert len(found) == 1, [f.code for f in found]
    f = found[0]
    assert f.evidence["accuracy_as_fed"] < 0.3 and f.evidence["accuracy_standardized"] > 0.9
    mean = float(f.fix.split("mean: [")[1].split("]")[0])
    assert abs(mean - digits.MEAN) < 2.0  # the suggestion is the data's own mean, close to the training one


def test_no_finding_when_the_data_is_already_normalized_or_normalization_is_set(
    write_config: WriteConfig, digits_data: dict[str, Path], tmp_path: Path,
) -> None:
    with np.load(digits_data["evaluation"]) as ev:
        np.savez(tmp_path / "eval.npz", x=((ev["x"] - digits.MEAN) / digits.STD).astype(np.float32), y=ev["y"])
    np.save(tmp_path / "calib.npy", ((np.load(digits_data["calibration"]) - digits.MEAN) / digits.STD).astype(np.float32))
    normalized = {"calibration": tmp_path / "calib.npy", "evaluation": tmp_path / "eval.npz"}
    raw = _unset(normalized)
    raw["data"]["domain"] = [-1.0, 4.0]
    cfg = load_config(write_config(raw))
    assert "normalization_unset" not in [f.code for f in prepare_sweep(cfg, tmp_path / "work").findings]  # fed right
    cfg = load_config(write_config(base_config(digits_data, search=HOST_ONLY)))
    assert "normalization_unset" not in [f.code for f in prepare_sweep(cfg, tmp_path / "work2").findings]


def test_the_thresholds_stay_silent_on_weak_evidence() -> None:
    args = ((0.0,), (1.0,), "logits")
    assert check_normalization_unset(0.10, 0.95, 128, *args) is not None
    assert check_normalization_unset(0.10, 0.95, 16, *args) is None  # too few samples
    assert check_normalization_unset(0.10, 0.35, 128, *args) is None  # the model does not work either way
    assert check_normalization_unset(0.70, 0.90, 128, *args) is None  # a small gain: not evidence enough
