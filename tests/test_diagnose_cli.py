"""`hailo-sweep diagnose`: on a trial of a sweep, and on a compiled model plus the outputs of a user's own code."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from hailo_sweep.backends.onnxruntime.graph import read_output_quant
from hailo_sweep.examples import digits
from tests.conftest import cli

pytestmark = pytest.mark.slow


def test_diagnose_a_trial_writes_and_logs_a_self_contained_report(sweep) -> None:
    root, config, study, client = sweep["root"], sweep["config"], sweep["study"], sweep["client"]
    number = study.best_trial.number
    report = root / "diag.html"
    proc = cli(root, "diagnose", str(config), "--trial", str(number), "--report", str(report))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    html = report.read_text()
    assert "Where the error comes from" in html and "data:image/png;base64," in html
    assert "http://" not in html and "https://" not in html
    run_id = study.best_trial.user_attrs["mlflow_run_id"]
    assert "diagnosis/diag.html" in {a.path for a in client.list_artifacts(run_id, "diagnosis")}
    assert "comes from" in proc.stdout  # one explanation sentence per output


def test_diagnose_names_raw_outputs_compared_without_dequantization(sweep, digits_data, tmp_path) -> None:
    root, config = sweep["root"], sweep["config"]
    out = root / "export-for-diagnose"
    assert cli(root, "best", str(config), "--export", str(out)).returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    compiled = out / manifest["files"]["compiled"]["name"]
    placement = manifest["settings"]["normalization_placement"]
    x = np.load(digits_data["evaluation"])["x"].transpose(0, 3, 1, 2)
    sess = ort.InferenceSession(str(compiled), providers=["CPUExecutionProvider"])
    fed = x.astype(np.uint8) if placement == "model" else ((x - digits.MEAN) / digits.STD).astype(np.float32)
    raw = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: fed})))
    mistaken = tmp_path / "raw.npz"
    np.savez(mistaken, **raw)  # the user-story mistake: device integers compared as if they were floats
    proc = cli(root, "diagnose", str(config), "--compiled", str(compiled), "--outputs", str(mistaken), "--placement", placement)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "not_dequantized" in proc.stdout and "featmap" in proc.stdout and "logits" in proc.stdout

    quant = read_output_quant(onnx.load(str(compiled)))
    fixed = tmp_path / "dequantized.npz"
    np.savez(fixed, **{n: ((v.astype(np.float32) - quant[n].zero_point) * quant[n].scale) for n, v in raw.items()})
    proc = cli(root, "diagnose", str(config), "--compiled", str(compiled), "--outputs", str(fixed), "--placement", placement)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "not_dequantized" not in proc.stdout
