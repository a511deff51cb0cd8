"""End to end: a short sweep of the example through the CLI, then checks made on the stores themselves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from hailo_sweep import metrics as m
from hailo_sweep.backends.onnxruntime.graph import read_output_quant
from hailo_sweep.sweep.best_noise import best_trials
from hailo_sweep.sweep import budget_used
from tests.conftest import MODEL, TRIALS, cli

pytestmark = pytest.mark.slow


def child_runs(client: MlflowClient, study: optuna.Study) -> list:
    parent = study.user_attrs["mlflow_parent_run_id"]
    exp = study.user_attrs["mlflow_experiment_id"]
    return client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=1000)


def test_every_trial_has_its_child_run_under_the_parent(sweep) -> None:
    study, client = sweep["study"], sweep["client"]
    trials = study.get_trials(deepcopy=False)
    assert budget_used(study, count_running=False) == TRIALS
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in trials)
    runs = {r.info.run_id: r for r in child_runs(client, study)}
    assert len(runs) == len(trials)
    for t in trials:
        run = runs[t.user_attrs["mlflow_run_id"]]
        assert run.data.tags["optuna.trial_number"] == str(t.number)
        assert run.data.tags["hailo_sweep.role"] == "trial"
        assert run.info.status == ("FINISHED" if t.state == TrialState.COMPLETE else "FAILED")
        assert run.data.params["optimization_level"] == str(t.params["optimization_level"])
        for key in ("version.onnxruntime", "version.mlflow", "version.optuna", "hailo_sweep.backend", "hailo_sweep.target"):
            assert run.data.tags[key]
        if t.state == TrialState.COMPLETE:
            assert run.data.metrics["device.logits.softmax_mae"] == pytest.approx(t.value)
            assert run.data.tags["hailo_sweep.feasible"] == str(all(v <= 0 for v in t.constraints.values()))
            if "duplicate_of" in t.user_attrs:  # same params as an earlier trial: its result was reused, not recomputed
                assert run.data.tags["hailo_sweep.duplicate_of"] == str(t.user_attrs["duplicate_of"])
                assert run.data.tags["hailo_sweep.duplicate_of_run_id"] == trials[t.user_attrs["duplicate_of"]].user_attrs["mlflow_run_id"]
                assert run.data.metrics["_objective"] == pytest.approx(t.value)
                continue
            for stage in ("optimize", "emulate", "compile", "device", "record", "upload"):  # record: its synchronous part
                assert run.data.metrics[f"time.{stage}_s"] > 0
            assert t.user_attrs["timing"]["record_s"] >= run.data.metrics["time.record_s"]
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.data.tags["hailo_sweep.role"] == "sweep"
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trials_complete"] == sum(t.state == TrialState.COMPLETE for t in trials)


def test_artifacts_and_logged_models_exist(sweep) -> None:
    study, client = sweep["study"], sweep["client"]
    model_ids = set()
    # per-layer noise (diagnostics.layer_noise: best by default): the best trials only, once, at the end of the sweep
    analysed = set(study.user_attrs.get("layer_noise_done", []))
    assert analysed and analysed == {t.number for t in best_trials(study, 3)}
    # the error-ladder and LSB plots (diagnostics.plots: best): the 3 best trials (plots_best), at the end of the sweep
    drawn = {t.number for t in best_trials(study, 3)}
    assert study.best_trial.number in drawn and len(drawn) == 3
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if "duplicate_of" in t.user_attrs:  # a reused result: its run says where the plots and files are
            tag = client.get_run(t.user_attrs["mlflow_run_id"]).data.tags["hailo_sweep.plots"]
            assert tag.startswith(f"see the run of trial {t.user_attrs['duplicate_of']}"), tag
            continue
        run_id = t.user_attrs["mlflow_run_id"]
        top = {a.path for a in client.list_artifacts(run_id)}
        assert {"report.json", "recipe.txt", "compiled", "diagnosis"} <= top
        assert [a.path for a in client.list_artifacts(run_id, "compiled")] == ["compiled/model.int8.onnx"]
        plots = {a.path for a in client.list_artifacts(run_id, "plots")}
        with_noise = t.number in analysed
        expected = ({"plots/error_ladder.png", "plots/lsb_histogram.png"} if t.number in drawn else set()) | ({"plots/layer_noise.png"} if with_noise else set())
        assert plots == expected, (t.number, drawn)
        assert client.get_run(run_id).data.tags["hailo_sweep.plots"].startswith("drawn" if t.number in drawn else "not drawn")
        diagnosis = {a.path for a in client.list_artifacts(run_id, "diagnosis")}
        assert diagnosis >= {"diagnosis/findings.json"}  # `diagnose` may add its report
        assert ("diagnosis/layer_noise.json" in diagnosis) == with_noise
        if with_noise:
            noise = json.loads(Path(client.download_artifacts(run_id, "diagnosis/layer_noise.json")).read_text())
            assert noise and [n["snr_db"] for n in noise] == sorted(n["snr_db"] for n in noise)
            assert client.get_run(run_id).data.metrics["layer_noise.worst1_snr_db"] == pytest.approx(noise[0]["snr_db"])
        report = json.loads(Path(client.download_artifacts(run_id, "report.json")).read_text())
        assert report["trial"] == t.number and report["objective"]["value"] == pytest.approx(t.value)
        assert len(report["explanation"]) == 2  # one sentence per output: where its error comes from
        model = client.get_logged_model(t.user_attrs["mlflow_model_id"])
        assert model.source_run_id == run_id and str(model.status).endswith("READY")
        model_ids.add(model.model_id)
    found = client.search_logged_models(experiment_ids=[study.user_attrs["mlflow_experiment_id"]])
    assert {lm.model_id for lm in found} == model_ids


def test_baseline_enqueued_once(sweep) -> None:
    baseline = [t for t in sweep["study"].get_trials(deepcopy=False) if t.user_attrs.get("baseline")]
    assert len(baseline) == 1 and baseline[0].number == 0
    # the embedded backend's defaults: level 0, no compression, 64 samples, host normalization, no 16-bit outputs
    assert baseline[0].params == {
        "optimization_level": 0, "compression_level": 0, "calibset_size": 64,
        "normalization_placement": "host", "output_16bit": "none", "noisy_layers_16bit": 0,
    }


def test_both_sqlite_stores_were_written_in_wal_mode(sweep) -> None:
    import sqlite3

    for db in (sweep["root"] / "sweeps" / "optuna.db", sweep["root"] / "mlruns" / "mlflow.db"):
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal", db


def test_best_export_loads_and_reproduces_its_device_metric(sweep, digits_data) -> None:
    root, config, study = sweep["root"], sweep["config"], sweep["study"]
    out = root / "out"
    proc = cli(root, "best", str(config), "--export", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    said = " ".join(proc.stdout.split())
    written = sorted(p.name for p in out.iterdir())
    assert "lock.json" in written and "manifest.json" in written
    assert all(f"{name} (" in said for name in written), (written, said)  # the message names every file written
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["trial"] == study.best_trial.number
    compiled = out / manifest["files"]["compiled"]["name"]
    assert manifest["files"]["compiled"]["sha256"] == __import__("hashlib").sha256(compiled.read_bytes()).hexdigest()
    assert (out / manifest["files"]["script"]["name"]).read_text().startswith("# hailo-sweep onnxruntime")

    # run the exported model ourselves, the way a deployment would
    with np.load(digits_data["evaluation"]) as ev:
        x_raw, labels = ev["x"].transpose(0, 3, 1, 2), ev["y"]
    norm = manifest["input"]["normalization"]
    x_norm = ((x_raw.astype(np.float32) - norm["mean"][0]) / norm["std"][0]).astype(np.float32)
    sess = ort.InferenceSession(str(compiled), providers=["CPUExecutionProvider"])
    feed = x_raw.astype(np.uint8) if sess.get_inputs()[0].type == "tensor(uint8)" else x_norm
    assert (sess.get_inputs()[0].type == "tensor(uint8)") == (manifest["settings"]["normalization_placement"] == "model")
    raw = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: feed})))
    # the manifest says how: the input's name and dtype, each output's dtype, scale and zero point
    io = manifest["io"]
    assert [(i["name"], i["dtype"]) for i in io["inputs"]] == [(sess.get_inputs()[0].name, str(feed.dtype))]
    outputs = {o["name"]: o for o in io["outputs"]}
    assert {n: outputs[n]["dtype"] for n in raw} == {n: str(v.dtype) for n, v in raw.items()} and all(o["raw_integers"] for o in outputs.values())
    quant = read_output_quant(onnx.load(str(compiled)))
    assert {n: (o["scale"], o["zero_point"]) for n, o in outputs.items()} == {n: (q.scale, q.zero_point) for n, q in quant.items()}
    device = {n: (raw[n].astype(np.float32) - np.float32(outputs[n]["zero_point"])) * np.float32(outputs[n]["scale"]) for n in raw}
    assert all(c["satisfied"] == (c["over_limit"] <= 0) for c in manifest["constraints"].values())
    ref_sess = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    reference = dict(zip(["featmap", "logits"], ref_sess.run(None, {"input": x_norm})))
    measured = m.output_metrics(reference["logits"], device["logits"], kind="logits", labels=labels)
    assert measured["softmax_mae"] == pytest.approx(manifest["metrics"]["device.logits.softmax_mae"], rel=1e-5)
    assert measured["softmax_mae"] == pytest.approx(study.best_trial.value, rel=1e-5)

    client = sweep["client"]
    version = client.get_model_version_by_alias(sweep["cfg"]["name"], "best")
    assert version.source == f"models:/{manifest['mlflow']['model_id']}"
    assert manifest["mlflow"]["model_id"] == study.best_trial.user_attrs["mlflow_model_id"]
    # exporting again re-uses the registration instead of adding versions
    assert cli(root, "best", str(config), "--export", str(out)).returncode == 0
    assert len(client.search_model_versions(f"name = '{sweep['cfg']['name']}'")) == 1
    # picking another feasible trial moves the alias there, and says so; exporting the best again moves it back
    other = next(t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                 if t.number != study.best_trial.number and all(v <= 0 for v in (t.constraints or {}).values()) and "duplicate_of" not in t.user_attrs)
    proc = cli(root, "best", str(config), "--export", str(root / "out-pick"), "--pick", str(other.number))
    said = " ".join(proc.stdout.split())
    assert proc.returncode == 0 and f"alias best moved to this picked trial (the best by the objective is trial {study.best_trial.number})" in said, said
    assert cli(root, "best", str(config), "--export", str(out)).returncode == 0
    assert client.get_model_version_by_alias(sweep["cfg"]["name"], "best").version == version.version


def test_resume_does_no_duplicate_work_and_extends_the_budget(sweep) -> None:
    root, config, client = sweep["root"], sweep["config"], sweep["client"]
    before = len(sweep["study"].get_trials(deepcopy=False))
    proc = cli(root, "run", str(config))
    assert proc.returncode == 0, proc.stderr
    study = optuna.load_study(study_name=sweep["cfg"]["name"], storage=f"sqlite:///{root / 'sweeps' / 'optuna.db'}")
    assert len(study.get_trials(deepcopy=False)) == before
    assert len(child_runs(client, study)) == before

    proc = cli(root, "run", str(config), "--trials", str(TRIALS + 2))
    assert proc.returncode == 0, proc.stderr
    study = optuna.load_study(study_name=sweep["cfg"]["name"], storage=f"sqlite:///{root / 'sweeps' / 'optuna.db'}")
    trials = study.get_trials(deepcopy=False)
    assert budget_used(study, count_running=False) == TRIALS + 2  # evaluations; reused duplicates are free
    assert len(trials) >= TRIALS + 2
    assert sum(bool(t.user_attrs.get("baseline")) for t in trials) == 1
    assert len(child_runs(client, study)) == len(trials)
    parents = client.search_runs([study.user_attrs["mlflow_experiment_id"]], filter_string="tags.hailo_sweep.role = 'sweep'")
    assert len(parents) == 1
