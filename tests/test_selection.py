"""`best --pick`: an infeasible trial is refused unless asked for, never gets the alias `best`, and exporting a
registered trial again reuses its version. Also what the sweep records for a user to read in MLflow."""

from __future__ import annotations

import json

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from hailo_sweep.cli import app
from hailo_sweep.config import load_config
from hailo_sweep.errors import UserInputError
from hailo_sweep.selection import export_best, load_study
from hailo_sweep.sweep import Sweep

SMALL = {
    "optimization_level": [0], "compression_level": [0], "calibset_size": [64],
    "normalization_placement": ["host", "model"], "output_16bit": ["all"],
}


@pytest.fixture(scope="module")
def infeasible_sweep(tmp_path_factory, digits_data):  # type: ignore[no-untyped-def]
    """Two trials that both miss a constraint no trial can meet (an accuracy drop below -1)."""
    import yaml

    from tests.conftest import base_config

    root = tmp_path_factory.mktemp("infeasible")
    cfg = base_config(digits_data, search=SMALL, trials=2, constraints=[{"metric": "logits.accuracy_drop", "stage": "device", "max": -1.0}])
    cfg["stores"] = {"root": str(root)}
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    config = load_config(path)
    Sweep(config).run()
    study, stores = load_study(config)
    return {"root": root, "path": path, "config": config, "study": study, "client": MlflowClient(stores.mlflow_uri, registry_uri=stores.mlflow_uri)}


def test_an_infeasible_pick_is_refused_unless_allowed_and_never_aliased_best(infeasible_sweep) -> None:
    s = infeasible_sweep
    name, client = s["config"].name, s["client"]
    trial = s["study"].get_trials(deepcopy=False)[0]
    with pytest.raises(UserInputError, match="--allow-infeasible"):
        export_best(s["config"], s["root"] / "out", pick=trial.number)
    assert client.search_model_versions(f"name = '{name}'") == []  # nothing registered for a refused pick
    result = CliRunner().invoke(app, ["best", str(s["path"]), "--pick", str(trial.number), "--export", str(s["root"] / "out")])
    assert result.exit_code == 2 and "misses the sweep's constraints" in result.output

    manifest = export_best(s["config"], s["root"] / "out", pick=trial.number, allow_infeasible=True)
    assert manifest["mlflow"]["alias"] is None and manifest["feasible"] is False
    versions = client.search_model_versions(f"name = '{name}'")
    assert [str(v.version) for v in versions] == [manifest["mlflow"]["version"]]
    version = versions[0]
    assert version.tags["trial"] == str(trial.number) and version.tags["feasible"] == "False"
    assert version.tags["target"] == "hailo8l" and version.tags["backend"] == "onnxruntime"
    assert version.tags["objective"] == "device.logits.softmax_mae" and "INFEASIBLE" in version.description
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias(name, "best")
    # the Models tab's "Registered models" column reads this link on the LoggedModel
    links = json.loads(client.get_logged_model(trial.user_attrs["mlflow_model_id"]).tags["mlflow.modelVersions"])
    assert [(link["name"], str(link["version"])) for link in links] == [(name, manifest["mlflow"]["version"])]

    again = export_best(s["config"], s["root"] / "out2", pick=trial.number, allow_infeasible=True)
    assert again["mlflow"]["version"] == manifest["mlflow"]["version"]
    assert len(client.search_model_versions(f"name = '{name}'")) == 1


def test_trial_records_read_as_the_config_does(infeasible_sweep) -> None:
    s = infeasible_sweep
    client, study = s["client"], s["study"]
    experiment = client.get_experiment(study.user_attrs["mlflow_experiment_id"])
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    for t in study.get_trials(deepcopy=False):
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.params["output_16bit"] == "all"  # as in the config, not "featmap,logits"
        assert run.data.metrics["_objective"] == pytest.approx(t.value)
        assert run.data.metrics["_feasible"] == 0.0
        assert run.data.metrics["_device_error"] == pytest.approx(run.data.metrics["device.logits.softmax_mae"])
        assert run.data.metrics["_fps"] == run.data.metrics["device.throughput_fps"]
        drop = run.data.metrics["device.logits.accuracy_drop"]
        assert run.data.metrics["device.logits.accuracy_drop.over_limit"] == pytest.approx(drop + 1.0)
        assert not any(k.startswith("constraint.") for k in run.data.metrics)
        model = client.get_logged_model(t.user_attrs["mlflow_model_id"])
        made_by = t.user_attrs.get("duplicate_of", t.number)  # a reused trial points at the model of the trial it repeats
        assert model.name == f"{s['config'].name}-trial-{made_by:04d}"
        assert {m.key for m in model.metrics} >= {"_objective", "_feasible", "_device_error", "_fps", "device.logits.softmax_mae"}
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    note = parent.data.tags["mlflow.note.content"]
    assert "No feasible completed trial yet" in note and "| trial | value | feasible |" in note
    summary = {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    assert {"summary/top_trials.md", "summary/trials.csv", "summary/optimization_history.png", "summary/param_importances.png"} <= summary
