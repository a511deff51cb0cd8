"""The sweep through its Python API: stage failures, prepare-once, duplicate settings, store resolution."""

from __future__ import annotations

import os
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from hailo_sweep import pipeline
from hailo_sweep.backends.onnxruntime.backend import OnnxRuntimeBackend
from hailo_sweep.config import load_config
from hailo_sweep.stores import resolve_stores
from hailo_sweep.sweep import Sweep, budget_used
from hailo_sweep.tracking import redact_url


def open_stores(config_path: Path) -> tuple[optuna.Study, MlflowClient]:
    cfg = load_config(config_path)
    stores = resolve_stores(cfg)
    return optuna.load_study(study_name=cfg.name, storage=stores.optuna_url), MlflowClient(stores.mlflow_uri)


def test_a_failing_stage_fails_only_its_trial(write_config, monkeypatch) -> None:
    real_compile = OnnxRuntimeBackend.compile

    def flaky_compile(self, model, work_dir):
        if model.settings.compression_level == 1:
            raise RuntimeError("compiler crashed: out of resources")
        return real_compile(self, model, work_dir)

    monkeypatch.setattr(OnnxRuntimeBackend, "compile", flaky_compile)
    path = write_config(trials=4, search={"compression_level": [0, 1], "calibset_size": [64, 128], "optimization_level": [0]})
    summary = Sweep(load_config(path)).run()
    study, client = open_stores(path)
    trials = study.get_trials(deepcopy=False)
    assert budget_used(study, count_running=False) == 4
    failed = [t for t in trials if t.state == TrialState.FAIL]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert failed and complete, "the space has both kinds of trial"
    assert all(t.params["compression_level"] == 1 for t in failed)
    assert all(t.params["compression_level"] == 0 for t in complete)
    assert all("duplicate_of" not in t.user_attrs for t in failed)  # a failed point is not reused as a result
    for t in failed:
        assert t.user_attrs["failed_stage"] == "compile"
        assert "out of resources" in t.user_attrs["error"]
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "FAILED"
        assert run.data.tags["hailo_sweep.failed_stage"] == "compile"
        assert "out of resources" in run.data.tags["hailo_sweep.error"]
        assert run.data.metrics["time.optimize_s"] > 0  # the stages that ran are on record
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"report.json", "recipe.txt"}
    assert summary.best_number in {t.number for t in complete}


def test_prepare_runs_once_per_sweep(write_config, monkeypatch) -> None:
    calls = {"prepare": 0, "reference": 0}
    real_prepare = OnnxRuntimeBackend.prepare
    real_reference = pipeline.reference_outputs

    def counting_prepare(self):
        calls["prepare"] += 1
        return real_prepare(self)

    def counting_reference(*args, **kwargs):
        calls["reference"] += 1
        return real_reference(*args, **kwargs)

    monkeypatch.setattr(OnnxRuntimeBackend, "prepare", counting_prepare)
    monkeypatch.setattr(pipeline, "reference_outputs", counting_reference)
    path = write_config(trials=4)
    summary = Sweep(load_config(path)).run()
    assert summary.trials_run == 4
    assert calls == {"prepare": 1, "reference": 1}
    assert summary.prepare_runs == 1


def test_identical_settings_are_not_recomputed_and_cost_no_budget(write_config, monkeypatch) -> None:
    optimize_calls = []
    real_optimize = OnnxRuntimeBackend.optimize

    def counting_optimize(self, settings, calibration, work_dir):
        optimize_calls.append(settings)
        return real_optimize(self, settings, calibration, work_dir)

    monkeypatch.setattr(OnnxRuntimeBackend, "optimize", counting_optimize)
    one_point = {"optimization_level": [1], "compression_level": [0], "calibset_size": [64], "normalization_placement": ["host"], "output_16bit": ["none"]}
    # layer noise off: the end-of-sweep analysis of the best trials optimizes again, on purpose, and is counted elsewhere
    path = write_config(trials=3, search=one_point, diagnostics={"layer_noise": "off"})
    Sweep(load_config(path)).run()
    study, client = open_stores(path)
    assert len(study.trials) == 1, "a one-point space is exhausted after one evaluation, whatever the budget"
    first = study.trials[0]
    for _ in range(2):  # the same point asked for again (e.g. by a sampler that converged)
        study.enqueue_trial(dict(first.params))
    Sweep(load_config(path)).run()
    study, client = open_stores(path)
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert len(optimize_calls) == 1
    for t in trials[1:]:
        assert t.user_attrs["duplicate_of"] == 0
        assert t.value == first.value
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.tags["hailo_sweep.duplicate_of"] == str(first.number)  # a trial number, as the CLI shows it
        assert run.data.tags["hailo_sweep.duplicate_of_run_id"] == first.user_attrs["mlflow_run_id"]
        assert run.data.metrics["_objective"] == pytest.approx(first.value)  # a reused result is on record in MLflow too
        assert run.data.tags["mlflow.parentRunId"] == study.user_attrs["mlflow_parent_run_id"]
    assert budget_used(study, count_running=False) == 1  # reused results cost no budget


def test_changed_objective_on_an_existing_study_is_refused(write_config) -> None:
    from hailo_sweep.errors import UserInputError

    path = write_config(trials=1)
    Sweep(load_config(path)).run()
    path.write_text(path.read_text().replace("metric: logits.softmax_mae", "metric: total.snr_db"))
    with pytest.raises(UserInputError, match="objective"):
        Sweep(load_config(path)).run()


def test_store_resolution_and_redaction(write_config, monkeypatch, tmp_path) -> None:
    path = write_config()
    cfg = load_config(path)
    stores = resolve_stores(cfg)
    assert stores.optuna_url == f"sqlite:///{tmp_path / 'sweeps' / 'optuna.db'}"
    assert stores.mlflow_uri == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert stores.artifact_location == (tmp_path / "mlruns" / "artifacts" / cfg.name).as_uri()

    monkeypatch.setenv("OPTUNA_STORAGE", "postgresql+psycopg://sweeper:s3cret@db.lan:5432/optuna")
    env_stores = resolve_stores(cfg)
    assert env_stores.optuna_url.endswith("@db.lan:5432/optuna")
    described = env_stores.describe()
    assert "s3cret" not in str(described)
    assert described["optuna_storage"] == "postgresql+psycopg://sweeper:***@db.lan:5432/optuna"
    assert redact_url("http://u:p@h/x") == "http://u:***@h/x"
    assert redact_url("sqlite:////abs/optuna.db") == "sqlite:////abs/optuna.db"


def test_pruning_stops_hopeless_trials_before_the_compile(write_config, monkeypatch) -> None:
    compiled_settings = []
    real_compile = OnnxRuntimeBackend.compile

    def counting_compile(self, model, work_dir):
        compiled_settings.append(model.settings)
        return real_compile(self, model, work_dir)

    monkeypatch.setattr(OnnxRuntimeBackend, "compile", counting_compile)
    search = {"optimization_level": [0, 1], "compression_level": [0, 3], "calibset_size": [64, 128], "normalization_placement": ["host"], "output_16bit": ["none"]}
    path = write_config(trials=10, search=search, pruning={"enabled": True}, sampler={"name": "random", "seed": 1})
    Sweep(load_config(path)).run()
    study, client = open_stores(path)
    trials = study.get_trials(deepcopy=False)
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, "4-bit weights on most layers are clearly worse: some trial must be pruned"
    assert all(t.params["compression_level"] == 3 for t in pruned)
    assert len(compiled_settings) == sum(1 for t in trials if t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs)
    for t in pruned:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.tags["hailo_sweep.state"] == "PRUNED"
        assert t.user_attrs["pruned_at"] == "emulate" and t.user_attrs["reason"] == run.data.tags["hailo_sweep.reason"] == "pruned after emulate"
        assert run.data.metrics["emulated.logits.softmax_mae"] > 0  # the emulated metrics it did reach
        assert "device.logits.softmax_mae" not in run.data.metrics
        assert "compiled" not in {a.path for a in client.list_artifacts(run.info.run_id)}
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"]).data.metrics
    assert parent["compiles_avoided"] == len(pruned)
    assert parent["compiles_performed"] == len(compiled_settings)
    assert parent["compile_time_saved_s_est"] > 0


def test_a_finding_can_be_a_constraint(write_config) -> None:
    """Zero tolerance for device/emulation differences: every trial whose device differs by >0 LSB is infeasible."""
    path = write_config(
        trials=3, search={"optimization_level": [0], "compression_level": [0], "calibset_size": [64, 128], "output_16bit": ["none"]},
        diagnostics={"lsb_tolerance": 0.0, "identical_min": 1.0, "layer_noise": False},
        constraints=[{"metric": "findings.device_disagrees", "stage": "device", "max": 0}],
    )
    Sweep(load_config(path)).run()
    study, client = open_stores(path)
    evaluated = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "duplicate_of" not in t.user_attrs]
    assert len(evaluated) == 2  # both points of the space
    for t in evaluated:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        disagrees = run.data.metrics["findings.device_disagrees"]
        assert disagrees == sum(run.data.metrics[f"agreement.{o}.identical_share"] < 1.0 for o in ("featmap", "logits"))
        assert t.constraints["device.findings.device_disagrees.max"] == disagrees
        assert ("device_disagrees" in run.data.tags.get("hailo_sweep.findings", "")) == (disagrees > 0)


def test_scratch_of_dead_workers_on_this_host_is_removed(tmp_path) -> None:
    import socket
    import subprocess
    import sys

    from hailo_sweep.sweep import remove_dead_scratch

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(finished.stdout)  # that process has exited
    host = socket.gethostname()
    dead = tmp_path / f"0003-{host}-{dead_pid}"
    alive = tmp_path / f"0004-{host}-{os.getpid()}"
    elsewhere = tmp_path / f"0005-another-host-{dead_pid}"  # another host's worker: its pids mean nothing here
    for d in (dead, alive, elsewhere):
        (d / "sub").mkdir(parents=True)
    assert remove_dead_scratch(tmp_path) == 1
    assert not dead.exists() and alive.exists() and elsewhere.exists()


def test_a_model_that_wants_normalization_left_unset_is_said_before_the_trials(write_config, digits_data) -> None:
    from hailo_sweep.sweep.observer import NullObserver
    from tests.conftest import base_config

    class Messages(NullObserver):
        def __init__(self) -> None:
            self.lines: list[str] = []

        def message(self, text: str) -> None:
            self.lines.append(text)

    raw = base_config(digits_data, trials=1, search={"optimization_level": [0], "calibset_size": [64], "normalization_placement": ["host"]})
    raw.pop("normalization")
    observer = Messages()
    Sweep(load_config(write_config(raw)), observer=observer).run()
    said = [line for line in observer.lines if "normaliz" in line]
    assert said and said[0].startswith("note:") and "mean" in said[0], observer.lines
