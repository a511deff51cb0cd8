"""Stores that cannot take a write, on real filesystems: a tiny tmpfs that fills up while a trial is recorded, a
read-only ``sweeps/``, and a tracking server that does not answer.

A full disk while recording fails that trial with the reason (both stores agree: Optuna FAIL with stage and reason,
MLflow FAILED with state FAIL and ``artifacts=partial``) and stops the sweep with exit 1 and one line: every later
trial would compute for nothing and fail the same way. Once space is back, ``run`` continues the sweep.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.fault_worker import SMALL_SPACE, hailo_sweep
from tests.test_faults import child_runs, evaluations, open_stores
from tests.test_faults import dead_port  # noqa: F401  (fixture)
from tests.test_interrupts import assert_consistent


@contextmanager
def mounted_tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A real tmpfs at ``path`` (needs root, or CAP_SYS_ADMIN); the test is skipped, with the reason, where it cannot."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def run(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(hailo_sweep(*args), cwd=root, capture_output=True, text=True, timeout=600, check=False, env={**os.environ, "COLUMNS": "200"})


def test_a_full_disk_while_recording_fails_the_trial_and_stops_the_sweep_cleanly(write_config, tmp_path) -> None:
    budget = 3
    config = write_config(name="disk-full", trials=budget, search=SMALL_SPACE)
    # the artifact store on a 32 KiB filesystem: the model script fits, the compiled model (about 70 KB) does not
    with mounted_tmpfs(tmp_path / "mlruns" / "artifacts", "size=32k"):
        proc = run(tmp_path, "run", str(config))
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1, out
        assert "Traceback" not in out
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, out
        assert "could not be recorded: No space left on device" in errors[0] and "the sweep stopped" in errors[0], errors

        study, client = open_stores(config)
        trials = study.get_trials(deepcopy=False)
        assert [t.state for t in trials] == [TrialState.FAIL], "the first trial failed; no other trial was started"
        trial = trials[0]
        assert trial.user_attrs["failed_stage"] == "record"
        assert "No space left on device" in trial.user_attrs["error"]
        run_record = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run_record.info.status == "FAILED"
        assert run_record.data.tags["hailo_sweep.state"] == "FAIL"
        assert run_record.data.tags["hailo_sweep.artifacts"] == "partial"
        assert "No space left on device" in run_record.data.tags["hailo_sweep.error"]
        assert not client.search_logged_models(experiment_ids=[study.user_attrs["mlflow_experiment_id"]]), "no model of a failed trial"
        assert_consistent(study, client)

    # space is back: the sweep continues where it stopped
    proc = run(tmp_path, "run", str(config))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    study, client = open_stores(config)
    trials = study.get_trials(deepcopy=False)
    assert len(evaluations(trials)) == budget
    assert trials[0].state == TrialState.FAIL and all(t.state == TrialState.COMPLETE for t in trials[1:])
    assert len(child_runs(client, study)) == len(trials)
    assert_consistent(study, client)


def test_a_read_only_sweeps_directory_is_named_with_the_fix_and_nothing_is_written(write_config, tmp_path) -> None:
    config = write_config(name="read-only", trials=1, search=SMALL_SPACE)
    with mounted_tmpfs(tmp_path / "sweeps", "ro,size=64k"):
        proc = run(tmp_path, "run", str(config))
        out = " ".join((proc.stdout + proc.stderr).split())
        assert proc.returncode == 2, out
        assert f"{tmp_path / 'sweeps'} is read-only (Read-only file system)" in out, out
        assert "fix: make" in out and "writable" in out, out
        assert "unable to open database file" not in out and "Traceback" not in out
        assert not list((tmp_path / "sweeps").iterdir())
    assert not (tmp_path / "mlruns").exists(), "the tracking store was not created either"


def test_an_unreachable_tracking_store_leaves_no_empty_study_behind(write_config, tmp_path, dead_port) -> None:
    config = write_config(name="no-tracking", trials=1, search=SMALL_SPACE, stores={"root": str(tmp_path), "mlflow": f"http://127.0.0.1:{dead_port}"})
    proc = subprocess.run(
        hailo_sweep("run", str(config)), cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"},
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    db = tmp_path / "sweeps" / "optuna.db"
    assert not db.exists() or optuna.get_all_study_names(storage=f"sqlite:///{db}") == [], "an empty study was left behind"
