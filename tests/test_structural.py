"""Exports as users bring them run unmodified: fixed batch 1, Identity outputs, external data, failed shape
inference, time-major outputs, softmax heads, numeric output names; and task metrics from a user's file.

Each case is a small model built in tests/structural_models.py; a case either runs through every stage (asserted from
the stores or the trial's result) or is refused before any store is written, exit 2, with a fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import optuna
import pytest
import yaml
from typer.testing import CliRunner

from hailo_sweep import metrics as m
from hailo_sweep.backends.onnxruntime.backend import OnnxRuntimeBackend
from hailo_sweep.cli import app
from hailo_sweep.config import DiagnosticsConfig, load_config
from hailo_sweep.errors import UserInputError
from hailo_sweep.onnx_runner import run_chunked, session
from hailo_sweep.pipeline import Prepared, prepare_sweep
from hailo_sweep.trial import TrialResult, run_trial
from hailo_sweep.settings import Settings
from hailo_sweep.task_metrics import TaskMetric
from tests import structural_models as sm

runner = CliRunner()


def project(tmp_path: Path, spec: sm.Spec, *, external_data: bool = False, labels: np.ndarray | None = None, n_eval: int = 12, **overrides: Any) -> Path:
    model = sm.save(sm.build(spec), tmp_path / "model" / "m.onnx", external_data=external_data)
    data = sm.write_data(tmp_path, n_eval=n_eval, labels=labels)
    return sm.write_config(tmp_path, sm.config(tmp_path, model, data, **overrides))


def prepare(config_path: Path) -> tuple[Prepared, OnnxRuntimeBackend]:
    config = load_config(config_path)
    work = config_path.parent / "work"
    prepared = prepare_sweep(config, work)
    backend = OnnxRuntimeBackend(prepared.backend_context())
    prepared.facts.update(backend.prepare())
    return prepared, backend


def trial(prepared: Prepared, backend: OnnxRuntimeBackend, level: int = 0) -> TrialResult:
    work = prepared.work_dir / f"trial-{level}"
    work.mkdir(parents=True, exist_ok=True)
    # per-layer noise in every trial, as a config asks with diagnostics.layer_noise: per_trial
    result = run_trial(prepared, backend, Settings(level, 0, 16, "host"), work, diagnostics=DiagnosticsConfig(layer_noise="per_trial"))
    assert result.ok, f"{result.failed_stage}: {result.error}\n{result.traceback}"
    return result


def run_cli(config: Path) -> tuple[int, str]:
    result = runner.invoke(app, ["run", str(config)])
    return result.exit_code, " ".join(result.output.split())


def assert_refused(config: Path, *fragments: str) -> str:
    code, out = run_cli(config)
    assert code == 2, out
    for fragment in fragments:
        assert fragment in out, f"{fragment!r} not in:\n{out}"
    assert not (config.parent / "sweeps" / "optuna.db").exists(), "the study store was written"
    assert not (config.parent / "mlruns").exists(), "the tracking store was written"
    return out


def completed_trials(config: Path) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name="structural", storage=f"sqlite:///{config.parent / 'sweeps' / 'optuna.db'}")
    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and "duplicate_of" not in t.user_attrs]  # evaluations, not reuses


# -- fixed batch --------------------------------------------------------------------------------------------------
def test_fixed_batch_1_model_measures_exactly_like_its_dynamic_batch_twin(tmp_path: Path) -> None:
    """Same weights, batch fixed to 1 vs dynamic: the same reference and the same metrics at every stage, level 2
    included (bias correction and equalization run the model on batches too)."""
    results = {}
    for name, batch in (("fixed", 1), ("dynamic", None)):
        prepared, backend = prepare(project(tmp_path / name, sm.Spec(batch=batch)))
        assert prepared.model_io.input_shape[0] == (1 if batch else "N")
        results[name] = (prepared, trial(prepared, backend, level=2))
    (fixed, fixed_result), (dynamic, dynamic_result) = results["fixed"], results["dynamic"]
    np.testing.assert_allclose(fixed.reference["logits"], dynamic.reference["logits"], rtol=1e-6, atol=1e-6)
    assert fixed.reference["logits"].shape == (12, sm.CLASSES)
    for key in ("emulated.total.nmae", "device.total.nmae", "device.logits.snr_db"):
        assert fixed_result.metrics[key] == pytest.approx(dynamic_result.metrics[key], rel=1e-5), key
    assert fixed_result.layer_noise, "the per-layer noise analysis ran on the fixed-batch model"


def test_a_fixed_batch_larger_than_one_is_padded_and_trimmed(tmp_path: Path) -> None:
    fixed = sm.build(sm.Spec(batch=4))
    dynamic = sm.build(sm.Spec())
    x = np.random.default_rng(3).normal(size=(7, sm.CHANNELS, sm.SIZE, sm.SIZE)).astype(np.float32)
    outs = {}
    for name, model in (("fixed", fixed), ("dynamic", dynamic)):
        path = sm.save(model, tmp_path / f"{name}.onnx")
        outs[name] = run_chunked(session(path, ort.GraphOptimizationLevel.ORT_DISABLE_ALL), x, ("logits",))["logits"]
    assert outs["fixed"].shape == (7, sm.CLASSES)
    np.testing.assert_allclose(outs["fixed"], outs["dynamic"], rtol=1e-5, atol=1e-6)


# -- Identity outputs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec",
    [
        sm.Spec(opset=11, constant_weights=True, identity_output=True, output_name="save_infer_model/scale_0.tmp_0"),
        sm.Spec(identity_output=True, identity_of_output=True, output_name="out"),  # the Identity survives pre-processing
    ],
    ids=["paddle", "identity-kept"],
)
def test_identity_outputs_keep_their_names_and_raw_integers_at_every_stage(tmp_path: Path, spec: sm.Spec) -> None:
    prepared, backend = prepare(project(tmp_path, spec))
    result = trial(prepared, backend)
    name = spec.output_name
    for stage in ("fp_optimized", "emulated", "device"):
        assert f"{stage}.{name}.nmae" in result.metrics
    # the device returned raw integers under the user's name: emulation vs device is measured in LSB
    assert result.metrics[f"agreement.{name}.lsb_max"] <= 1.0
    assert result.metrics[f"device.{name}.snr_db"] > 20.0


# -- external data, failed shape inference, the working directory ------------------------------------------------
def test_external_data_and_failed_shape_inference_run_and_write_nothing_into_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model keeps its weights in m.onnx.data and has a com.microsoft FusedConv, on which ONNX Runtime's symbolic
    shape inference gives up (and would save sym_shape_infer_temp.onnx and a <uuid>.data into the cwd)."""
    config = project(tmp_path / "p", sm.Spec(fused_conv=True), external_data=True)
    model_dir = config.parent / "model"
    before = sorted(os.listdir(model_dir))
    assert before == ["m.onnx", "m.onnx.data"]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    prepared, backend = prepare(config)
    result = trial(prepared, backend)
    assert os.listdir(cwd) == [], "something was written into the current directory"
    assert sorted(os.listdir(model_dir)) == before, "the user's model directory changed"
    leftovers = [p for p in (prepared.work_dir / "backend").rglob("*") if p.name.startswith("pre-process-")]
    assert leftovers == [], "the pre-processing scratch directory was left behind"
    assert result.metrics["device.total.snr_db"] > 20.0


def test_missing_external_data_is_refused_with_the_fix(tmp_path: Path) -> None:
    config = project(tmp_path, sm.Spec(), external_data=True)
    (config.parent / "model" / "m.onnx.data").unlink()
    assert_refused(config, "m.onnx", "external data")


@pytest.mark.parametrize("variant", ["unknown_op", "bad_attribute"])
def test_a_model_onnxruntime_cannot_run_is_refused_naming_the_node(tmp_path: Path, variant: str) -> None:
    model = sm.build(sm.Spec())
    if variant == "unknown_op":
        model.graph.node[1].op_type, model.graph.node[1].domain = "Frobnicate", "com.example"
        model.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
        expected = "operator com.example:Frobnicate"
    else:
        model.graph.node[0].attribute.append(onnx.helper.make_attribute("group", 3))
        expected = "node 'conv1', Conv"
    path = sm.save(model, tmp_path / "model" / "m.onnx")
    config = sm.write_config(tmp_path, sm.config(tmp_path, path, sm.write_data(tmp_path)))
    assert_refused(config, "the model m.onnx does not run in ONNX Runtime", expected, "standard ONNX operators")


# -- batch axis ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [None, 1], ids=["dynamic", "fixed-1"])
def test_a_time_major_output_with_its_batch_axis_is_measured_per_sample(tmp_path: Path, batch: int | None) -> None:
    spec = sm.Spec(batch=batch, time_major=True)
    outputs = {"logits": {"kind": "logits"}, "seq": {"kind": "logits", "batch_axis": 1}}
    config = project(tmp_path, spec, outputs=outputs)
    prepared, backend = prepare(config)
    # independently: the float model run sample by sample, the time axis first, moved behind the sample axis
    sess = ort.InferenceSession(str(config.parent / "model" / "m.onnx"), providers=["CPUExecutionProvider"])
    x = np.load(config.parent / "eval.npz")["x"]
    native = np.concatenate([sess.run(["seq"], {"x": ((x[i : i + 1] - 127.0) / 64.0).astype(np.float32)})[0] for i in range(len(x))], axis=1)
    assert native.shape == (sm.SIZE, 12, sm.CLASSES)
    np.testing.assert_allclose(prepared.reference["seq"], native.transpose(1, 0, 2), rtol=1e-5, atol=1e-5)
    result = trial(prepared, backend)
    assert 0.5 <= result.metrics["device.seq.top1_agreement"] <= 1.0
    assert prepared.per_sample("seq.softmax_mae", prepared.reference).shape == (12,)


@pytest.mark.parametrize("batch", [None, 1], ids=["dynamic", "fixed-1"])
def test_a_time_major_output_without_its_batch_axis_is_refused(tmp_path: Path, batch: int | None) -> None:
    config = project(tmp_path, sm.Spec(batch=batch, time_major=True))
    assert_refused(config, "outputs.seq.batch_axis", "batch_axis: 1")


# -- probabilities ------------------------------------------------------------------------------------------------
def test_probabilities_are_compared_as_given() -> None:
    ref = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    cand = np.array([[0.6, 0.3, 0.1], [0.5, 0.3, 0.2]])
    got = m.output_metrics(ref, cand, kind="probabilities", labels=np.array([0, 1]))
    assert got["top1_agreement"] == pytest.approx(0.5)
    assert got["prob_mae"] == pytest.approx((0.1 + 0.1 + 0.0 + 0.4 + 0.0 + 0.4) / 6)
    # |p - onehot| summed: sample 0 (label 0): 0.4 + 0.3 + 0.1; sample 1 (label 1): 0.5 + 0.7 + 0.2
    assert got["prob_label_mae"] == pytest.approx((0.8 + 1.4) / 6)
    assert got["accuracy"] == pytest.approx(0.5) and got["accuracy_ref"] == pytest.approx(0.5)
    assert "softmax_mae" not in got
    assert m.output_metrics(ref, cand, kind="logits")["softmax_mae"] != pytest.approx(got["prob_mae"])


def test_a_softmax_head_declared_logits_gets_a_finding_and_probabilities_run(tmp_path: Path) -> None:
    declared_logits = project(tmp_path / "logits", sm.Spec(softmax=True), outputs={"logits": {"kind": "logits"}})
    prepared, _ = prepare(declared_logits)
    assert [(f.code, f.output) for f in prepared.findings if f.code == "softmax_as_logits"] == [("softmax_as_logits", "logits")]
    assert "kind: probabilities" in prepared.findings[-1].fix
    code, out = run_cli(declared_logits)
    assert code == 0 and "note: the model computes 'logits' with a Softmax" in out, out

    config = project(
        tmp_path / "probs", sm.Spec(softmax=True), outputs={"logits": {"kind": "probabilities"}},
        objective={"metric": "logits.prob_mae", "stage": "device"},
    )
    code, out = run_cli(config)
    assert code == 0, out
    (done,) = completed_trials(config)
    assert 0.0 < done.value < 0.05
    prepared, _ = prepare(config)
    assert not [f for f in prepared.findings if f.code == "softmax_as_logits"]


# -- numeric output names -----------------------------------------------------------------------------------------
def test_an_unquoted_numeric_output_name_is_taken_as_text(tmp_path: Path) -> None:
    model = sm.save(sm.build(sm.Spec(output_name="123")), tmp_path / "model" / "m.onnx")
    cfg = sm.config(tmp_path, model, sm.write_data(tmp_path), objective={"metric": "123.nmae", "stage": "device"})
    text = yaml.safe_dump(cfg, sort_keys=False) + "outputs:\n  123: {weight: 1.0}\n"
    config = sm.write_config(tmp_path, cfg, text)
    assert list(load_config(config).outputs) == ["123"]
    code, out = run_cli(config)
    assert code == 0, out
    (done,) = completed_trials(config)
    assert done.user_attrs["metrics"]["device.123.nmae"] == done.value


def test_an_output_name_yaml_reads_as_another_type_is_refused_with_the_quoting_fix(tmp_path: Path) -> None:
    model = sm.save(sm.build(sm.Spec(output_name="1.50")), tmp_path / "model" / "m.onnx")
    cfg = sm.config(tmp_path, model, sm.write_data(tmp_path))
    config = sm.write_config(tmp_path, cfg, yaml.safe_dump(cfg, sort_keys=False) + "outputs:\n  1.50: {weight: 1.0}\n")
    assert_refused(config, "outputs", "quote")
    with pytest.raises(UserInputError, match="quote"):
        load_config(config)


# -- task metrics -------------------------------------------------------------------------------------------------
METRICS_PY = '''
import numpy as np

def exact_match(reference, outputs, labels):
    """1 where the stage's decoded row (argmax of each time step) equals the label row exactly."""
    decoded = outputs["seq"].argmax(axis=-1)
    return (decoded == labels).all(axis=1).astype(float)

def reference_match(reference, outputs, labels):
    return float((reference["seq"].argmax(axis=-1) == labels).all(axis=1).mean())

def broken(reference, outputs, labels):
    return {}["missing_key"]
'''


def test_task_metric_value_by_hand() -> None:
    namespace: dict[str, Any] = {}
    exec(METRICS_PY, namespace)  # noqa: S102 - the test's own code
    metric = TaskMetric("seq_match", "maximize", "metrics.py:exact_match", namespace["exact_match"])
    # 3 samples, 2 steps, 3 classes: decoded rows [0, 2], [1, 1], [2, 0]
    outputs = {"seq": np.array([[[9, 0, 0], [0, 0, 9]], [[0, 9, 0], [0, 9, 0]], [[0, 0, 9], [9, 0, 0]]], float)}
    labels = np.array([[0, 2], [1, 0], [2, 0]])
    assert metric.per_sample(outputs, outputs, labels).tolist() == [1.0, 0.0, 1.0]
    assert metric.value(outputs, outputs, labels) == pytest.approx(2 / 3)


def _task_project(tmp_path: Path, **overrides: Any) -> Path:
    (tmp_path / "metrics.py").write_text(METRICS_PY)
    spec = sm.Spec(time_major=True)
    # labels: the float model's own decoded rows, with the first two samples' rows altered (a sequence, not a class)
    probe_config = project(tmp_path, spec, outputs={"seq": {"batch_axis": 1}})
    prepared, _ = prepare(probe_config)
    labels = prepared.reference["seq"].argmax(axis=-1)
    labels[:2, 0] = (labels[:2, 0] + 1) % sm.CLASSES
    sm.write_data(tmp_path, labels=labels)
    cfg = sm.config(
        tmp_path, tmp_path / "model" / "m.onnx", {"calibration": tmp_path / "calib.npz", "evaluation": tmp_path / "eval.npz"},
        outputs={"logits": {"kind": "logits"}, "seq": {"batch_axis": 1}},
        metrics={
            "seq_match": {"function": "metrics.py:exact_match", "direction": "maximize"},
            "ref_match": {"function": "metrics.py:reference_match", "direction": "maximize"},
        },
        objective={"metric": "task.seq_match", "stage": "device"},
        constraints=[{"metric": "task.ref_match", "stage": "emulated", "min": 0.5}],
        **overrides,
    )
    cfg["data"]["labels_key"] = "y"
    return sm.write_config(tmp_path, cfg)


def test_task_metrics_are_the_objective_and_a_constraint_at_every_stage(tmp_path: Path) -> None:
    config = _task_project(tmp_path, trials=2, search={"optimization_level": [0, 1], "calibset_size": [16], "normalization_placement": ["host"]})
    code, out = run_cli(config)
    assert code == 0, out
    done = completed_trials(config)
    assert len(done) == 2
    for t in done:
        metrics = t.user_attrs["metrics"]
        assert metrics["device.task.seq_match"] == t.value
        assert metrics["emulated.task.ref_match"] == pytest.approx(10 / 12)  # the constraint's metric, on record
        assert 0.0 <= t.value <= 10 / 12  # two of twelve label rows never match the float model's decoding
    # the reference's own match is known by construction: 10 of 12 rows
    prepared, backend = prepare(config)
    result = trial(prepared, backend)
    for stage in ("fp_optimized", "emulated", "device"):
        assert result.metrics[f"{stage}.task.ref_match"] == pytest.approx(10 / 12)
        assert f"{stage}.task.seq_match" in result.metrics
    assert result.metrics["fp_optimized.task.seq_match"] == pytest.approx(10 / 12)
    assert prepared.per_sample("task.seq_match", prepared.reference).tolist() == [0.0, 0.0] + [1.0] * 10


def test_an_error_inside_a_task_metric_fails_the_trial_with_its_traceback(tmp_path: Path) -> None:
    config = _task_project(tmp_path)
    text = config.read_text().replace("metrics.py:reference_match", "metrics.py:broken")
    config.write_text(text)
    prepared, backend = prepare(config)
    work = prepared.work_dir / "t"
    work.mkdir()
    result = run_trial(prepared, backend, Settings(0, 0, 16, "host"), work)
    assert result.failed_stage == "emulate"
    assert "task metric 'ref_match' (metrics.py:broken) raised KeyError" in (result.error or "")
    assert "def broken" not in (result.traceback or "") and "in broken" in (result.traceback or "")


@pytest.mark.parametrize(
    ("function", "fragment"), [("metrics.py:nope", "has no function 'nope'"), ("absent.py:exact_match", "not found")]
)
def test_a_missing_task_metric_file_or_function_is_refused(tmp_path: Path, function: str, fragment: str) -> None:
    config = _task_project(tmp_path)
    config.write_text(config.read_text().replace("metrics.py:exact_match", function))
    assert_refused(config, "metrics.seq_match.function", fragment)


def test_an_unknown_task_metric_in_the_objective_is_refused(tmp_path: Path) -> None:
    config = _task_project(tmp_path)
    config.write_text(config.read_text().replace("metric: task.seq_match", "metric: task.seq_mach"))
    assert_refused(config, "unknown task metric 'seq_mach'", "task.seq_match")


def test_labels_that_are_not_class_ids_need_a_task_metric(tmp_path: Path) -> None:
    config = _task_project(tmp_path)
    cfg = yaml.safe_load(config.read_text())
    for key in ("metrics", "constraints"):
        del cfg[key]
    cfg["objective"] = {"metric": "total.nmae", "stage": "device"}
    sm.write_config(tmp_path, cfg)
    assert_refused(config, "1-D integer array of class indices", "task metric")


def test_a_task_metric_objective_prunes_on_its_per_sample_values(tmp_path: Path) -> None:
    config = _task_project(
        tmp_path, trials=3, pruning={"enabled": True, "p_threshold": 0.5, "groups": 5},
        search={"optimization_level": [0, 1], "calibset_size": [8, 16], "normalization_placement": ["host"]},
    )
    code, out = run_cli(config)
    assert code == 0, out
    study = optuna.load_study(study_name="structural", storage=f"sqlite:///{config.parent / 'sweeps' / 'optuna.db'}")
    states = [t.state for t in study.trials if "duplicate_of" not in t.user_attrs]  # evaluations; a reuse costs no budget
    assert len(states) == 3 and all(s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for s in states), states
    # the pruner saw the task metric's per-sample values, grouped: 12 samples in 5 groups of sample means
    reported = [t.intermediate_values for t in study.trials if t.intermediate_values]
    assert reported and all(len(v) == 5 and all(0.0 <= x <= 1.0 for x in v.values()) for v in reported)
