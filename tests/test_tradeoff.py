"""Accuracy versus speed (Pareto front, fastest within a budget) and reproducibility (lock file, verify)."""

from __future__ import annotations

import json
import shutil

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from hailo_sweep.config import load_config
from hailo_sweep.selection import chosen_trial, is_feasible
from hailo_sweep.stores import resolve_stores
from hailo_sweep.sweep import Sweep
from tests.conftest import cli

SMALL = {"optimization_level": [0, 1], "compression_level": [0, 1], "calibset_size": [64], "normalization_placement": ["host"], "output_16bit": ["none", "all"]}


def stores_of(path):
    cfg = load_config(path)
    stores = resolve_stores(cfg)
    return optuna.load_study(study_name=cfg.name, storage=stores.optuna_url), MlflowClient(stores.mlflow_uri)


def test_pareto_front_of_error_and_throughput(write_config, tmp_path) -> None:
    path = write_config(trials=6, search=SMALL, objective={"mode": "pareto", "metric": "logits.softmax_mae", "stage": "device"})
    Sweep(load_config(path)).run()
    study, client = stores_of(path)
    assert len(study.directions) == 2
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if is_feasible(t)]
    front = {t.number for t in study.best_trials}

    def dominates(a, b) -> bool:  # lower error and higher throughput, at least one strictly
        return a.values[0] <= b.values[0] and a.values[1] >= b.values[1] and a.values != b.values

    # checked independently of Optuna: the front is exactly the non-dominated feasible set
    assert front == {t.number for t in done if not any(dominates(o, t) for o in done)}
    proc = cli(tmp_path, "best", str(path), "--export", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Pareto front" in proc.stdout
    parent = study.user_attrs["mlflow_parent_run_id"]
    assert {a.path for a in client.list_artifacts(parent, "pareto")} == {"pareto/pareto_front.png", "pareto/pareto_front.json"}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    chosen = chosen_trial(study)
    assert manifest["trial"] == chosen.number and chosen.number in front
    assert chosen.values[0] == min(study.trials[n].values[0] for n in front)


def test_fastest_within_an_error_budget(write_config) -> None:
    budget = 0.0006  # between the 8-bit trials (~5e-4) and the 4-bit ones (~2e-2) of the example
    path = write_config(trials=6, search=SMALL, constraints=[], objective={"mode": "fastest_within", "metric": "logits.softmax_mae", "budget": budget})
    Sweep(load_config(path)).run()
    study, _ = stores_of(path)
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    within = [t for t in done if t.user_attrs["metrics"]["device.logits.softmax_mae"] <= budget]
    assert within and len(within) < len(done), "the space has trials on both sides of the budget"
    for t in done:
        assert is_feasible(t) == (t in within)
    best = study.best_trial
    assert best.value == max(t.user_attrs["metrics"]["device.throughput_fps"] for t in within)


@pytest.mark.slow
def test_verify_rebuilds_the_export_and_refuses_changed_inputs(sweep, tmp_path) -> None:
    root, config = sweep["root"], sweep["config"]
    out = tmp_path / "export"
    assert cli(root, "best", str(config), "--export", str(out)).returncode == 0
    lock = json.loads((out / "lock.json").read_text())
    assert lock["settings"] and lock["model"]["sha256"] and lock["data"]["calibration"]["sha256"] and lock["seed"] == 0
    proc = cli(root, "verify", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "compiled bytes identical: yes" in proc.stdout and "verified" in proc.stdout

    changed = tmp_path / "changed"
    shutil.copytree(out, changed)
    model_copy = tmp_path / "model.onnx"
    model_copy.write_bytes(open(lock["model"]["path"], "rb").read() + b"\0")
    lock["model"]["path"] = str(model_copy)
    (changed / "lock.json").write_text(json.dumps(lock))
    proc = cli(root, "verify", str(changed))
    assert proc.returncode == 2 and "has changed since the export" in proc.stderr
