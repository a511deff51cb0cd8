"""A model whose input height/width is dynamic (Paddle exports: [-1, 3, '?', '?']) takes the data's size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hailo_sweep.config import load_config
from hailo_sweep.errors import UserInputError
from hailo_sweep.pipeline import load_inputs
from tests import structural_models as sm
from tests.conftest import cli


def dynamic_model(root: Path) -> Path:
    model = sm.build(sm.Spec(softmax=True))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].Clear()
    dims[2].dim_param = "?"
    dims[3].Clear()
    dims[3].dim_value = -1  # Paddle writes -1 for a dynamic size as often as a name
    return sm.save(model, root / "dynamic.onnx")


def test_the_data_fixes_a_dynamic_height_and_width(tmp_path: Path) -> None:
    model = dynamic_model(tmp_path)
    data = sm.write_data(tmp_path)
    config = load_config(sm.write_config(tmp_path, sm.config(tmp_path, model, data)))
    model_io, _, dataset, _ = load_inputs(config)
    assert model_io.input_shape[1:] == (sm.CHANNELS, sm.SIZE, sm.SIZE)
    assert dataset.calibration.shape[1:] == (sm.CHANNELS, sm.SIZE, sm.SIZE)


def test_calibration_and_evaluation_of_different_sizes_are_refused(tmp_path: Path) -> None:
    model = dynamic_model(tmp_path)
    data = sm.write_data(tmp_path)
    np.savez(data["evaluation"], x=np.random.default_rng(2).integers(0, 256, (4, sm.CHANNELS, sm.SIZE + 4, sm.SIZE), dtype=np.uint8))
    path = sm.write_config(tmp_path, sm.config(tmp_path, model, data))
    with pytest.raises(UserInputError, match="dynamic") as info:
        load_inputs(load_config(path))
    assert info.value.key == "data.evaluation"
    proc = cli(tmp_path, "run", str(path))
    assert proc.returncode == 2 and not (tmp_path / "sweeps" / "optuna.db").exists()
