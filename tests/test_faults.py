"""Faults on one machine (sqlite stores): a worker killed mid-trial, stages that hang or run out of disk, a crash
inside a write, the tracking store going away, and passwords that must not leak into error messages.

Every process a test starts runs in its own process group and is killed in a ``finally`` (``Processes``); tests wait
on conditions (a marker file, a process exit) with deadlines, never on fixed delays.
"""

from __future__ import annotations

import collections
import errno
import functools
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import onnx
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from hailo_sweep import atomic
from hailo_sweep.backends.onnxruntime.backend import OnnxRuntimeBackend
from hailo_sweep.config import load_config
from hailo_sweep.pipeline import prepare_sweep
from hailo_sweep.trial import run_trial
from hailo_sweep.settings import Settings
from hailo_sweep.stores import resolve_stores
from hailo_sweep.sweep import Sweep, budget_used, open_storage
from hailo_sweep.sweep import orchestrate as sweep_module
from hailo_sweep.sweep.recording import ArtifactUploader
from hailo_sweep.tracking import Tracker, TrackingUnavailable
from tests.conftest import cli
from tests.fault_worker import SMALL_SPACE, Processes, assert_artifacts_whole, hailo_sweep, launcher, wait_until

FAST_HEARTBEAT = {"heartbeat_interval": 1, "grace_period": 3, "max_retry": 1}


def open_stores(config_path: Path) -> tuple[optuna.Study, MlflowClient]:
    cfg = load_config(config_path)
    stores = resolve_stores(cfg)
    return optuna.load_study(study_name=cfg.name, storage=stores.optuna_url), MlflowClient(stores.mlflow_uri)


def evaluations(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The trials that spend the budget: finished ones, except reused duplicates (free) and failures that were retried
    (their retry counts instead)."""
    retried = {t.system_attrs["failed_trial"] for t in trials if "failed_trial" in t.system_attrs}
    return [
        t for t in trials
        if t.state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
        and "duplicate_of" not in t.user_attrs and not (t.state == TrialState.FAIL and t.number in retried)
    ]


def child_runs(client: MlflowClient, study: optuna.Study) -> list:
    parent = study.user_attrs["mlflow_parent_run_id"]
    return client.search_runs([study.user_attrs["mlflow_experiment_id"]], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=1000)


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A local TCP port that is bound but never listens: every connection to it is refused at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


# -- 1. a worker killed with SIGKILL in the middle of a trial -------------------------------------------------------
def test_a_worker_killed_mid_trial_is_detected_failed_and_retried_once(write_config, tmp_path) -> None:
    budget = 5
    config = write_config(name="killed-worker", trials=budget, search=SMALL_SPACE, workers=FAST_HEARTBEAT)
    init = cli(tmp_path, "init", str(config))
    assert init.returncode == 0, init.stdout + init.stderr
    marker = tmp_path / "compile-entered"
    with Processes(tmp_path / "logs") as procs:
        worker_a = procs.start("worker-a", launcher("hang-compile", str(marker), "--", "worker", str(config), "--worker-index", "0"), tmp_path)
        wait_until(lambda: marker.exists() or worker_a.popen.poll() is not None, timeout=120, what="worker A to enter compile")
        assert marker.exists(), f"worker A exited before compiling:\n{worker_a.output()[-4000:]}"

        study, client = open_stores(config)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        assert len(running) == 1, "only worker A is running"
        killed = running[0]
        scratch_name = marker.read_text()  # the trial's scratch directory: NNNN-<host>-<pid>
        number, pid = scratch_name.split("-", 1)[0], scratch_name.rsplit("-", 1)[-1]
        assert (int(number), int(pid)) == (killed.number, worker_a.pid), "the RUNNING trial is the one worker A is compiling"
        scratch = resolve_stores(load_config(config)).work_dir / "trials" / scratch_name
        assert scratch.is_dir()
        killed_run = killed.user_attrs["mlflow_run_id"]
        assert client.get_run(killed_run).info.status == "RUNNING"

        worker_a.kill()
        assert worker_a.popen.returncode == -9

        worker_b = procs.start("worker-b-restarted", hailo_sweep("worker", str(config), "--worker-index", "1"), tmp_path)
        worker_c = procs.start("worker-c", hailo_sweep("worker", str(config), "--worker-index", "2"), tmp_path)
        assert worker_b.wait(timeout=180) == 0, worker_b.output()[-4000:]
        assert worker_c.wait(timeout=180) == 0, worker_c.output()[-4000:]
    assert not scratch.exists(), "the killed worker's scratch directory is removed by the workers that came after"

    study, client = open_stores(config)
    trials = study.get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    assert sorted(by_number) == list(range(len(trials))), "trial numbers are unique and contiguous"

    # the killed trial: failed by a surviving worker after its heartbeat stopped, its run ended FAILED with the reason
    assert by_number[killed.number].state == TrialState.FAIL
    assert "worker lost" in by_number[killed.number].user_attrs["error"], "the Optuna trial carries the reason too"
    assert by_number[killed.number].user_attrs["failed_stage"] == "unknown"
    run = client.get_run(killed_run)
    assert run.info.status == "FAILED"
    assert "worker lost" in run.data.tags["hailo_sweep.error"]
    assert run.data.tags["hailo_sweep.state"] == "FAIL"

    # retried exactly once, with the same settings, and the retry completed
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1
    assert retries[0].params == killed.params
    assert retries[0].state == TrialState.COMPLETE
    assert retries[0].user_attrs["mlflow_run_id"] != killed_run

    # the budget is spent exactly: the killed trial is replaced by its retry, nothing else failed
    others = [t for t in trials if t.number != killed.number]
    assert all(t.state == TrialState.COMPLETE for t in others)
    assert len(evaluations(trials)) == budget
    assert budget_used(study, count_running=False) == budget
    reused = [t for t in others if "duplicate_of" in t.user_attrs]
    assert len(trials) == budget + 1 + len(reused)

    # one run per trial under the one parent; every completed trial's run FINISHED, by the surviving workers
    runs = child_runs(client, study)
    per_number = collections.Counter(r.data.tags["optuna.trial_number"] for r in runs)
    assert per_number == collections.Counter(str(t.number) for t in trials), "exactly one run per trial, none extra"
    runs_by_id = {r.info.run_id: r for r in runs}
    survivors = {f"{socket.gethostname()}:{worker_b.pid}", f"{socket.gethostname()}:{worker_c.pid}"}
    for t in others:
        r = runs_by_id[t.user_attrs["mlflow_run_id"]]
        assert r.info.status == "FINISHED"
        assert r.data.tags["optuna.trial_number"] == str(t.number)
        assert r.data.tags["hailo_sweep.worker"] in survivors

    # artifacts complete for every computed (non-duplicate) trial, and one LoggedModel each, no more
    computed = [t for t in others if "duplicate_of" not in t.user_attrs]
    assert computed
    models = assert_artifacts_whole(client, study, computed, runs_by_id)
    assert client.get_run(study.user_attrs["mlflow_parent_run_id"]).info.status == "FINISHED", "the last worker closed the parent"
    assert all(lm.source_run_id == by_number[int(lm.tags["optuna.trial_number"])].user_attrs["mlflow_run_id"] for lm in models)


def test_workers_noticing_the_same_dead_worker_retry_its_trial_once(tmp_path) -> None:
    """Several live workers find the same stale trials at the same instant: each stale trial is failed once and
    retried once (on sqlite, Optuna's ``SELECT ... FOR UPDATE`` is a no-op, so this needs hailo-sweep's lock)."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    n_stale, n_workers = 6, 4
    storage = open_storage(url, heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(study_name="stale-race", storage=storage)
    for _ in range(n_stale):
        trial = study.ask()
        storage.record_heartbeat(trial._trial_id)
    from sqlalchemy import text

    with storage.engine.begin() as conn:  # every heartbeat an hour old: all trials are stale, without waiting
        conn.execute(text("UPDATE trial_heartbeats SET heartbeat = :h"), {"h": "2000-01-01 00:00:00"})
    go = tmp_path / "go"
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # never contacted: these trials have no runs
    with Processes(tmp_path / "logs") as procs:
        workers = [
            procs.start(f"failer-{i}", launcher("fail-stale", str(tmp_path / f"ready-{i}"), str(go), url, mlflow_uri, "stale-race"), tmp_path)
            for i in range(n_workers)
        ]
        wait_until(lambda: all((tmp_path / f"ready-{i}").exists() for i in range(n_workers)) or any(w.popen.poll() is not None for w in workers),
                   timeout=120, what="every worker at the start line")
        go.touch()
        for w in workers:
            assert w.wait(timeout=60) == 0, w.output()[-4000:]
    trials = optuna.load_study(study_name="stale-race", storage=url).get_trials(deepcopy=False)
    assert [t.state for t in trials[:n_stale]] == [TrialState.FAIL] * n_stale
    retried = collections.Counter(t.system_attrs.get("failed_trial") for t in trials[n_stale:])
    assert retried == collections.Counter(range(n_stale)), "each stale trial retried exactly once"
    assert all(t.state == TrialState.WAITING for t in trials[n_stale:])


# -- 2./3. a stage that hangs past its timeout, or runs out of disk --------------------------------------------------
def test_a_stage_that_hangs_past_its_timeout_fails_its_trial_only(write_config, monkeypatch) -> None:
    real_compile = OnnxRuntimeBackend.compile
    hung: list[float] = []

    def hanging_compile(self, model, work_dir):
        if model.settings.compression_level == 1:
            start = time.monotonic()
            try:
                threading.Event().wait()  # never returns by itself: only the stage's time limit ends it
            finally:
                hung.append(time.monotonic() - start)
        return real_compile(self, model, work_dir)

    monkeypatch.setattr(OnnxRuntimeBackend, "compile", hanging_compile)
    space = {"compression_level": [0, 1], "calibset_size": [64], "optimization_level": [0], "output_16bit": ["none", "logits"]}
    path = write_config(trials=4, search=space, timeouts={"compile": 1})
    Sweep(load_config(path)).run()
    study, client = open_stores(path)
    trials = study.get_trials(deepcopy=False)
    assert len(evaluations(trials)) == 4
    failed = [t for t in trials if t.state == TrialState.FAIL]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert failed and complete and len(failed) + len(complete) == len(trials)
    assert {t.params["compression_level"] for t in failed} == {1}
    assert {t.params["compression_level"] for t in complete} == {0}
    assert len(hung) == len(failed) and all(1.0 <= s < 10.0 for s in hung), f"each hang was cut off at its 1 s limit: {hung}"
    for t in failed:
        assert t.user_attrs["failed_stage"] == "compile"
        assert "exceeded its time limit" in t.user_attrs["error"]
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "FAILED"
        assert "exceeded its time limit" in run.data.tags["hailo_sweep.error"]
        assert 1.0 <= run.data.metrics["time.compile_s"] < 10.0
    for t in complete:
        assert client.get_run(t.user_attrs["mlflow_run_id"]).info.status == "FINISHED"


def test_running_out_of_disk_fails_the_trial_with_the_reason_and_the_worker_carries_on(write_config, monkeypatch) -> None:
    real_compile = OnnxRuntimeBackend.compile

    def full_disk_compile(self, model, work_dir):
        if model.settings.normalization_placement == "model":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_compile(self, model, work_dir)

    monkeypatch.setattr(OnnxRuntimeBackend, "compile", full_disk_compile)
    space = {"optimization_level": [0, 1], "calibset_size": [64, 128], "normalization_placement": ["host", "model"]}
    path = write_config(trials=4, search=space)
    Sweep(load_config(path)).run()
    study, client = open_stores(path)
    trials = study.get_trials(deepcopy=False)
    assert len(evaluations(trials)) == 4
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed, "the seeded sampler visits normalization_placement 'model'"
    assert all(t.params["normalization_placement"] == "model" for t in failed)
    for t in failed:
        assert t.user_attrs["failed_stage"] == "compile"
        assert "No space left on device" in t.user_attrs["error"]
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "FAILED" and "No space left on device" in run.data.tags["hailo_sweep.error"]
    later = [t for t in trials if t.number > failed[0].number and t.state == TrialState.COMPLETE]
    assert later, "trials after the out-of-disk failure still ran to completion"
    assert all(t.state == TrialState.COMPLETE for t in trials if t.params["normalization_placement"] == "host")


# -- 4. atomic writes ------------------------------------------------------------------------------------------------
def _crash_halfway(data: bytes) -> object:
    def write(tmp: Path) -> None:
        with tmp.open("wb") as fh:
            fh.write(data[: len(data) // 2])
        raise OSError(errno.EIO, "crash in the middle of the write")

    return write


def test_an_interrupted_atomic_write_leaves_no_file_and_no_temp_files(tmp_path) -> None:
    target = tmp_path / "out" / "model.hef"
    data = bytes(range(256)) * 64
    with pytest.raises(OSError, match="crash in the middle"):
        atomic.atomic_write(target, _crash_halfway(data))
    assert not target.exists()
    assert list(target.parent.iterdir()) == []

    atomic.atomic_write_bytes(target, b"the complete previous version")
    with pytest.raises(OSError, match="crash in the middle"):
        atomic.atomic_write(target, _crash_halfway(data))
    assert target.read_bytes() == b"the complete previous version"
    assert [p.name for p in target.parent.iterdir()] == ["model.hef"]

    atomic.atomic_write_bytes(target, data)  # and a write that completes replaces it whole
    assert target.read_bytes() == data
    assert [p.name for p in target.parent.iterdir()] == ["model.hef"]


def test_a_crash_while_writing_the_compiled_model_leaves_nothing_that_passes_as_complete(write_config, tmp_path, monkeypatch) -> None:
    cfg = load_config(write_config(trials=1))
    sweep = Sweep(cfg)
    backend, _, _ = sweep.preflight()
    settings = Settings(optimization_level=0, compression_level=0, calibset_size=64, normalization_placement="host", output_16bit=())
    work_dir = tmp_path / "trial"
    work_dir.mkdir()
    real_save = onnx.save

    def save_that_dies_on_the_compiled_model(proto, f, *args, **kwargs):
        if Path(str(f)).name.startswith(".model.int8.onnx."):  # the temp file of the compiled model only
            blob = proto.SerializeToString()
            Path(str(f)).write_bytes(blob[: len(blob) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(proto, f, *args, **kwargs)

    with backend:
        prepared = prepare_sweep(cfg, sweep.stores.work_dir, backend)
        monkeypatch.setattr(onnx, "save", save_that_dies_on_the_compiled_model)
        result = run_trial(prepared, backend, settings, work_dir)
        assert result.failed_stage == "compile" and "No space left on device" in (result.error or "")
        left = sorted(p.name for p in work_dir.iterdir())
        assert "model.int8.onnx" not in left
        assert not [n for n in left if n.endswith(".tmp")], f"temp files left behind: {left}"

        monkeypatch.setattr(onnx, "save", real_save)
        result = run_trial(prepared, backend, settings, work_dir)  # the same trial once the disk has room again
    assert result.ok, result.error
    assert result.compiled is not None and result.compiled.path == work_dir / "model.int8.onnx"
    onnx.checker.check_model(onnx.load(str(result.compiled.path)))  # whole, and a valid model


# -- 5. the tracking store unreachable ---------------------------------------------------------------------------------
def test_an_unreachable_tracking_server_gives_a_clear_error_after_bounded_retries(write_config, tmp_path, dead_port) -> None:
    """hailo-sweep retries a failing tracking call a bounded number of times, then exits 3 naming the store.

    MLflow's own HTTP retries are turned off here (a user's setting, which hailo-sweep honours) to keep the test short;
    with the defaults (3 HTTP retries, backoff factor 1) the same command gave up after about 27 s on this machine.
    """
    uri = f"http://tracker:pw-not-for-logs@127.0.0.1:{dead_port}"
    config = write_config(trials=2, search=SMALL_SPACE, stores={"root": str(tmp_path), "mlflow": uri})
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    start = time.monotonic()
    proc = subprocess.run(hailo_sweep("run", str(config)), cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False, env=env)
    elapsed = time.monotonic() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out
    assert f"http://tracker:***@127.0.0.1:{dead_port}" in out, out
    assert re.search(r"after \d+ attempts", out), out
    assert "pw-not-for-logs" not in out
    assert "Traceback" not in out
    assert elapsed < 120


class Outage:
    """The tracking store goes down at the 2nd trial's final record and stays down until ``undo``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.down = False
        self.run_id: str | None = None
        self.calls = 0
        real_log_to = Tracker.log_to
        # uploads in the calling thread: the outage hits the 2nd trial's record and nothing else in flight
        monkeypatch.setattr(sweep_module, "ArtifactUploader", functools.partial(ArtifactUploader, background=False))

        def log_to(tracker: Tracker, run_id: str, record) -> None:
            if "time.record_s" in record.metrics:  # a trial's final, synchronous record
                self.calls += 1
                if self.calls == 2:
                    self.down, self.run_id = True, run_id
            if self.down:
                raise TrackingUnavailable("the MLflow tracking store did not answer log_batch() after 3 attempts: simulated outage")
            return real_log_to(tracker, run_id, record)

        monkeypatch.setattr(Tracker, "log_to", log_to)
        for name in ("finish", "end_child", "set_tags", "start_child", "log_model", "create_model", "upload_model", "reopen"):
            monkeypatch.setattr(Tracker, name, self._down_or(getattr(Tracker, name)))

    def _down_or(self, real):
        def call(*args, **kwargs):
            if self.down:
                raise TrackingUnavailable("the MLflow tracking store did not answer after 3 attempts: simulated outage")
            return real(*args, **kwargs)

        return call


def test_a_tracking_outage_mid_record_fails_the_trial_and_a_later_run_reconciles_it(write_config, monkeypatch) -> None:
    budget = 4
    path = write_config(trials=budget, search=SMALL_SPACE)
    outage = Outage(monkeypatch)
    with pytest.raises(TrackingUnavailable, match="simulated outage"):
        Sweep(load_config(path)).run()
    assert outage.run_id is not None

    study, client = open_stores(path)
    lost = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("mlflow_run_id") == outage.run_id]
    assert len(lost) == 1
    assert lost[0].state == TrialState.FAIL, "Optuna records the trial whose record could not be written as failed"
    assert lost[0].user_attrs["failed_stage"] == "record"
    assert "simulated outage" in lost[0].user_attrs["error"]
    assert client.get_run(outage.run_id).info.status == "RUNNING", "the run could not be ended while tracking was down"

    monkeypatch.undo()  # tracking is back
    Sweep(load_config(path)).run()
    study, client = open_stores(path)
    run = client.get_run(outage.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["hailo_sweep.reconciled"] == "true"
    trials = study.get_trials(deepcopy=False)
    assert len(evaluations(trials)) == budget and budget_used(study, count_running=False) == budget
    expected = {TrialState.COMPLETE: "FINISHED", TrialState.FAIL: "FAILED"}
    for t in trials:  # the two records agree on every trial
        assert client.get_run(t.user_attrs["mlflow_run_id"]).info.status == expected[t.state], t.number


# -- 6. passwords in storage URLs ---------------------------------------------------------------------------------------
def test_a_storage_password_never_reaches_the_error_output(write_config, tmp_path, dead_port) -> None:
    pytest.importorskip("psycopg", reason="the PostgreSQL driver (psycopg) is not installed")
    url = f"postgresql+psycopg://sweeper:s3cret@127.0.0.1:{dead_port}/optuna"
    config = write_config(trials=1, search=SMALL_SPACE, stores={"root": str(tmp_path), "optuna": url})
    for command in ("init", "worker"):
        proc = subprocess.run(hailo_sweep(command, str(config)), cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 3, (command, out)
        assert "s3cret" not in out, (command, out)
        assert f"sweeper:***@127.0.0.1:{dead_port}" in out, (command, out)
