"""Ctrl-C and SIGTERM through real signals sent to a real ``hailo-sweep run``: the interrupted trial is on record in
both stores (Optuna FAIL with its stage and reason, MLflow KILLED with state INTERRUPTED), the process exits 130/143,
and the next ``run`` retries it first, so that no budget is lost and the baseline is evaluated whoever was interrupted.

Each test waits on an observable event (a compile announcing itself through a marker file), never on a delay.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from optuna.trial import TrialState

from tests.fault_worker import SMALL_SPACE, Processes, hailo_sweep, hanging_workers_env, launcher, wait_until
from tests.test_faults import child_runs, evaluations, open_stores


def assert_consistent(study, client) -> None:
    """No trial and no run is left RUNNING, and every trial's run says what the trial is."""
    trials = study.get_trials(deepcopy=False)
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    runs = {r.info.run_id: r for r in child_runs(client, study)}
    assert not [r.info.run_id for r in runs.values() if r.info.status == "RUNNING" or r.data.tags.get("hailo_sweep.state") == "RUNNING"]
    for t in trials:
        run_id = t.user_attrs.get("mlflow_run_id")
        if t.state == TrialState.WAITING or run_id is None:
            continue
        run = runs[run_id]
        if t.user_attrs.get("interrupted"):
            assert (run.info.status, run.data.tags["hailo_sweep.state"]) == ("KILLED", "INTERRUPTED"), t.number
            assert run.data.tags["hailo_sweep.failed_stage"] == t.user_attrs["failed_stage"]
        elif t.state == TrialState.FAIL:
            assert (run.info.status, run.data.tags["hailo_sweep.state"]) == ("FAILED", "FAIL"), t.number
        elif t.state == TrialState.COMPLETE:
            assert (run.info.status, run.data.tags["hailo_sweep.state"]) == ("FINISHED", "COMPLETE"), t.number


def assert_resumed_without_loss(config: Path, budget: int, interrupted: list[int]) -> None:
    study, client = open_stores(config)
    trials = study.get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    assert len(evaluations(trials)) == budget, "the interrupted trials cost no budget"
    for n in interrupted:
        retries = [t for t in trials if t.system_attrs.get("failed_trial") == n]
        assert len(retries) == 1, f"trial {n} retried once"
        assert retries[0].params == by_number[n].params
        assert retries[0].state == TrialState.COMPLETE
    baseline = [t for t in trials if t.user_attrs.get("baseline") and t.state == TrialState.COMPLETE]
    assert len(baseline) == 1, "the baseline was evaluated once"
    assert_consistent(study, client)


def test_ctrl_c_during_a_trial_records_it_as_interrupted_and_the_next_run_retries_it(write_config, tmp_path) -> None:
    budget = 3
    config = write_config(name="ctrl-c", trials=budget, search=SMALL_SPACE)
    marker = tmp_path / "compile-entered"
    with Processes(tmp_path / "logs") as procs:
        run = procs.start("run", launcher("hang-compile", str(marker), "--", "run", str(config)), tmp_path)
        wait_until(lambda: marker.exists() or run.popen.poll() is not None, timeout=120, what="the first trial to enter compile")
        assert marker.exists(), run.output()[-4000:]
        os.killpg(run.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground process group
        assert run.wait(timeout=60) == 130, run.output()[-4000:]
    out = " ".join(run.output().split())
    number = int(marker.read_text().split("-", 1)[0])
    assert f"trial {number} interrupted (SIGINT) in stage compile: the next `hailo-sweep run` retries it" in out, out
    assert "Traceback" not in out

    study, client = open_stores(config)
    trial = study.get_trials(deepcopy=False)[number]
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["interrupted"] == "SIGINT"
    assert trial.user_attrs["failed_stage"] == "compile"
    assert "interrupted by SIGINT during stage compile" in trial.user_attrs["error"]
    assert trial.user_attrs.get("baseline") is True, "the first trial is the baseline"
    run_record = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert "interrupted by SIGINT" in run_record.data.tags["hailo_sweep.error"]
    assert_consistent(study, client)
    assert client.get_run(study.user_attrs["mlflow_parent_run_id"]).info.status != "RUNNING"

    with Processes(tmp_path / "logs") as procs:
        again = procs.start("resume", hailo_sweep("run", str(config)), tmp_path)
        assert again.wait(timeout=300) == 0, again.output()[-4000:]
    out = " ".join(again.output().split())
    assert f"resuming: trial {number} was interrupted in stage compile; it runs again first" in out, out
    assert_resumed_without_loss(config, budget, [number])


def test_sigterm_to_run_jobs_is_forwarded_to_its_workers_and_nothing_is_lost(write_config, tmp_path) -> None:
    budget = 4
    config = write_config(name="sigterm-jobs", trials=budget, search=SMALL_SPACE)
    markers = tmp_path / "markers"
    env = hanging_workers_env(tmp_path / "site", markers)
    with Processes(tmp_path / "logs", env=env) as procs:
        run = procs.start("run-jobs", hailo_sweep("run", str(config), "--jobs", "2"), tmp_path)
        wait_until(lambda: len(list(markers.glob("[0-9]*"))) == 2 or run.popen.poll() is not None, timeout=180, what="both workers to enter compile")
        workers = sorted(int(p.name) for p in markers.glob("[0-9]*"))
        assert len(workers) == 2, run.output()[-4000:]
        os.kill(run.pid, signal.SIGTERM)  # the parent only: it forwards the signal and waits for its workers
        assert run.wait(timeout=90) == 143, run.output()[-4000:]
        for pid in workers:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower(), f"worker {pid} still runs"
    out = " ".join(run.output().split())
    assert "interrupted: 2 workers stopped" in out, out

    study, client = open_stores(config)
    trials = study.get_trials(deepcopy=False)
    interrupted = [t for t in trials if t.user_attrs.get("interrupted")]
    assert len(interrupted) == 2 and {t.user_attrs["interrupted"] for t in interrupted} == {"SIGTERM"}
    assert {t.user_attrs["failed_stage"] for t in interrupted} == {"compile"}
    assert any(t.user_attrs.get("baseline") for t in interrupted), "one of the interrupted trials is the baseline"
    for t in interrupted:
        assert f"trial {t.number} interrupted (SIGTERM) in stage compile: the next `hailo-sweep run` retries it" in out, out
    assert_consistent(study, client)

    with Processes(tmp_path / "logs") as procs:
        again = procs.start("resume", hailo_sweep("run", str(config), "--jobs", "2"), tmp_path)
        assert again.wait(timeout=300) == 0, again.output()[-4000:]
    out = " ".join(again.output().split())
    for t in interrupted:
        assert f"resuming: trial {t.number} was interrupted in stage compile; it runs again first" in out, out
    assert_resumed_without_loss(config, budget, [t.number for t in interrupted])


def test_a_signal_while_the_workers_start_reaches_every_worker_already_started(write_config, monkeypatch) -> None:
    """The workers run in their own process group (a terminal's Ctrl-C reaches the parent only): a signal that arrives
    between two worker starts must still be forwarded to the first, never leave it running on its own."""
    import subprocess
    import sys

    import pytest

    from hailo_sweep.commands import run as run_cmd
    from hailo_sweep.config import load_config

    path = write_config(name="sigint-start", trials=2, search=SMALL_SPACE)
    started: list[subprocess.Popen[bytes]] = []
    real_popen = subprocess.Popen

    def popen(cmd, **kwargs):  # type: ignore[no-untyped-def]
        if started:  # the second start: the signal arrives now, as interrupts_end_trials turns it into
            raise KeyboardInterrupt("SIGINT")
        # a stand-in worker that only a forwarded signal ends (SIGINT's default is ignored in background groups)
        proc = real_popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, lambda *a: exit(130)); time.sleep(120)"], **kwargs)
        started.append(proc)
        return proc

    monkeypatch.setattr(run_cmd.subprocess, "Popen", popen)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_cmd.run_jobs(load_config(path), path, 2, 2)
        assert len(started) == 1
        # ended by the forwarded SIGINT (its handler's exit, or the signal itself if it came before the handler)
        assert started[0].poll() in (130, -signal.SIGINT), "the started worker got the signal and was waited for"
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
