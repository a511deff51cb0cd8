"""Shared fixtures: the example's data (built once per session) and sweep configs in temporary project roots."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from hailo_sweep.examples import digits
from tests.dask_cluster import dask_cluster  # noqa: F401  (a scheduler and workers on 127.0.0.1, for the --cluster tests)
from tests.hailo_fixtures import hailo_fakes, tiny_model  # noqa: F401  (fixtures of the hailo backend tests)

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "configs" / "models" / "digits_cnn.onnx"

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
for var in ("OPTUNA_STORAGE", "MLFLOW_TRACKING_URI"):  # tests choose their stores explicitly
    os.environ.pop(var, None)


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The example's calibration (1024) and evaluation (300, labelled) sets, built deterministically once."""
    return digits.build(tmp_path_factory.mktemp("digits-data"), n_calib=1024, n_eval=300)


def base_config(data: dict[str, Path], **overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "name": "digits-test",
        "model": str(MODEL),
        "target": "hailo8l",
        "backend": "onnxruntime",
        "data": {
            "calibration": str(data["calibration"]),
            "evaluation": str(data["evaluation"]),
            "inputs_key": "x",
            "labels_key": "y",
            "layout": "NHWC",
            "domain": [0, 255],
        },
        "normalization": {"mean": [digits.MEAN], "std": [digits.STD]},
        "outputs": {"featmap": {"weight": 1.0}, "logits": {"weight": 1.0, "kind": "logits"}},
        "search": {
            "optimization_level": [0, 1, 2, 3],
            "compression_level": [0, 1],
            "calibset_size": [64, 128],
            "normalization_placement": ["host", "model"],
            "output_16bit": ["none", "logits", "all"],
        },
        "objective": {"metric": "logits.softmax_mae", "stage": "device"},
        "constraints": [{"metric": "logits.accuracy_drop", "stage": "device", "max": 0.02}],
        "sampler": {"name": "tpe", "seed": 0},
        "trials": 4,
    }
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


WriteConfig = Callable[..., Path]


@pytest.fixture
def write_config(tmp_path: Path, digits_data: dict[str, Path]) -> WriteConfig:
    """Write a config into a fresh project root (stores under it); keyword arguments override top-level keys."""

    def write(raw: dict[str, Any] | None = None, **overrides: Any) -> Path:
        cfg = raw if raw is not None else base_config(digits_data, **overrides)
        cfg.setdefault("stores", {"root": str(tmp_path)}) if isinstance(cfg, dict) else None
        path = tmp_path / "sweep.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    return write


TRIALS = 6


def cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hailo_sweep.cli", *args], cwd=root, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.fixture(scope="session")
def sweep(tmp_path_factory: pytest.TempPathFactory, digits_data: dict[str, Path]) -> dict[str, object]:
    root = tmp_path_factory.mktemp("e2e")
    cfg = base_config(digits_data, trials=TRIALS)  # stores default to the working directory, like a user's project
    config = root / "digits.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = cli(root, "run", str(config))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    study = optuna.load_study(study_name=cfg["name"], storage=f"sqlite:///{root / 'sweeps' / 'optuna.db'}")
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    return {"root": root, "config": config, "cfg": cfg, "study": study, "client": client, "stdout": proc.stdout}


