"""The checks of issue 11: the whole example sweep on the ``hailo`` backend, against the contract fakes.

``configs/digits.yaml`` is copied into a fresh temporary root with ``backend: hailo`` (its data built with
``hailo_sweep.examples.digits``, 1024 calibration entries) and run through the CLI with ``tests/fakes`` first on
``PYTHONPATH`` (so the CLI and its worker processes import the fakes of ``hailo_sdk_client`` / ``hailo_platform``):

1. ``hailo-sweep run CONFIG --jobs 2`` with one (fake) Hailo-8 device: every trial COMPLETE and measured on the device
   (device metrics present), the baseline trial (0: the DFC's defaults, level 2, calibset 64) feasible and its level
   honoured, no ``device_disagrees`` finding on any trial, how many trials waited for the device;
2. ``hailo-sweep best CONFIG --export DIR`` then ``hailo-sweep verify DIR``: exit 0;
3. the same config with ``target: hailo8`` on a (fake) Hailo-8L: refused with exit 2 before the first trial, nothing
   written to the stores.

Usage: ``python benchmarks/check_hailo_fakes.py [--trials 8] [--jobs 2]`` (about 2-4 minutes on 2 cores).
Prints one line per check and exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import optuna
import yaml

REPO = Path(__file__).resolve().parents[1]
FAKES = REPO / "tests" / "fakes"


def cli(root: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hailo_sweep.cli", *args], cwd=root, env=env, capture_output=True, text=True, timeout=1800, check=False)


def config(root: Path, data: dict[str, Path], trials: int, **overrides: Any) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "digits.yaml").read_text())
    cfg.update(
        backend="hailo",
        model=str(REPO / "configs" / "models" / "digits_cnn.onnx"),
        trials=trials,
        stores={"root": str(root)},
        **overrides,
    )
    cfg["data"].update(calibration=str(data["calibration"]), evaluation=str(data["evaluation"]))
    path = root / "digits.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    from hailo_sweep.examples import digits

    results: list[tuple[str, bool, str]] = []
    with tempfile.TemporaryDirectory(prefix="check-hailo-fakes-") as tmp:
        base = Path(tmp)
        data = digits.build(base / "data")
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FAKES), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        env.pop("HAILO_FAKE_DEVICES", None)

        # 1. the sweep, two workers, one device
        root = base / "sweep"
        root.mkdir()
        path = config(root, data, args.trials)
        proc = cli(root, env, "run", str(path), "--jobs", str(args.jobs))
        results.append((f"run --jobs {args.jobs} exit 0", proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]))
        cfg = yaml.safe_load(path.read_text())
        study = optuna.load_study(study_name=cfg["name"], storage=f"sqlite:///{root / 'sweeps' / 'optuna.db'}")
        trials = study.get_trials(deepcopy=False)
        complete = {t.number for t in trials if t.state == optuna.trial.TrialState.COMPLETE}
        reports = reports_of(root, cfg["name"])
        measured = {n for n, r in reports.items() if n in complete and "device.logits.softmax_mae" in r["metrics"] and "device.throughput_fps" in r["metrics"]}
        results.append((f"every trial COMPLETE and measured on the device ({len(measured)}/{len(trials)})", len(measured) == len(trials) > 0,
                        json.dumps({t.number: t.user_attrs.get("error") for t in trials if t.number not in measured})))
        baseline = next((r for r in reports.values() if r["baseline"]), {})
        feasible = bool(baseline.get("feasible"))
        honoured = baseline.get("backend_params", {}).get("effective_optimization_level") == baseline.get("settings", {}).get("optimization_level")
        results.append((f"baseline trial {baseline.get('trial')} feasible, level honoured ({baseline.get('settings')})", feasible and honoured, json.dumps(baseline.get("findings"))[:1000]))
        disagree = {n: [f["code"] for f in r.get("findings", [])] for n, r in reports.items() if any(f["code"] == "device_disagrees" for f in r.get("findings", []))}
        results.append((f"no device_disagrees finding on any of {len(reports)} trials", not disagree and len(reports) > 0, json.dumps(disagree)))
        waited = sum(any(n.startswith("waiting for") for n in r.get("notes", [])) for r in reports.values())
        results.append((f"trials that waited for the device: {waited} of {len(reports)} (informational)", True, ""))

        # 2. export and verify
        out = root / "out"
        proc = cli(root, env, "best", str(path), "--export", str(out))
        results.append(("best --export exit 0", proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[-1500:]))
        proc = cli(root, env, "verify", str(out))
        results.append(("verify exit 0", proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[-1500:]))

        # 3. a mismatched device
        other = base / "mismatch"
        other.mkdir()
        path = config(other, data, 2, target="hailo8", name="digits-mismatch")
        proc = cli(other, {**env, "HAILO_FAKE_DEVICES": "0000:01:00.0=HAILO8L"}, "run", str(path))
        text = " ".join((proc.stdout + proc.stderr).split())
        refused = proc.returncode == 2 and "is a Hailo-8L" in text and "no trial was started" in text
        untouched = not (other / "sweeps" / "optuna.db").exists() and not (other / "mlruns").exists()
        results.append(("mismatched device refused before the first trial, exit 2, stores untouched", refused and untouched, text[-1500:]))

    for name, ok, detail in results:
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
        if not ok and detail:
            print(f"      {detail}")
    return 0 if all(ok for _, ok, _ in results) else 1


def reports_of(root: Path, name: str) -> dict[int, dict[str, Any]]:
    """Each trial's report.json, read from the MLflow runs of the sweep."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return {}
    out: dict[int, dict[str, Any]] = {}
    for run in client.search_runs([experiment.experiment_id]):
        if "optuna.trial_number" not in run.data.tags or "report.json" not in {a.path for a in client.list_artifacts(run.info.run_id)}:
            continue  # the parent run, or a reused duplicate
        local = client.download_artifacts(run.info.run_id, "report.json", str(root / "reports" / run.info.run_id))
        report = json.loads(Path(local).read_text())
        report["baseline"] = run.data.tags.get("hailo_sweep.baseline") == "True"
        out[int(run.data.tags["optuna.trial_number"])] = report
    return out


if __name__ == "__main__":
    sys.exit(main())
