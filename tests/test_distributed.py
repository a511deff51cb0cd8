"""Many workers, one study: real worker processes on sqlite (``run --jobs N``) and on PostgreSQL with an MLflow
tracking server (``init``, N x ``worker``, ``finalize``), checked on the stores themselves.

The PostgreSQL/MLflow tests need the services of ``.ci/services.sh`` (HAILO_SWEEP_TEST_POSTGRES and
HAILO_SWEEP_TEST_MLFLOW) and skip without them. Each test uses its own Optuna database and its own sweep name,
because the tracking server is shared by the whole session.
"""

from __future__ import annotations

import collections
import os
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from hailo_sweep.sweep import budget_used
from tests.conftest import base_config
from tests.fault_worker import SMALL_SPACE, Processes, assert_artifacts_whole, hailo_sweep

PG = os.environ.get("HAILO_SWEEP_TEST_POSTGRES")
MLFLOW = os.environ.get("HAILO_SWEEP_TEST_MLFLOW")
needs_services = pytest.mark.skipif(
    not (PG and MLFLOW),
    reason="HAILO_SWEEP_TEST_POSTGRES / HAILO_SWEEP_TEST_MLFLOW not set: run under `bash .ci/services.sh` (PostgreSQL + MLflow server)",
)
pytestmark = pytest.mark.slow

WORKER_TIMEOUT_S = 240


def write_sweep(root: Path, data: dict[str, Path], name: str, trials: int, stores: dict[str, str] | None = None) -> Path:
    cfg = base_config(data, name=name, trials=trials, search=SMALL_SPACE, stores={"root": str(root), **(stores or {})})
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def run_all(procs: Processes, root: Path, commands: dict[str, list[str]]) -> None:
    """Start all commands at once, then require every one to exit 0 (with its output in the failure message)."""
    started = [procs.start(name, cmd, root) for name, cmd in commands.items()]
    for proc in started:
        code = proc.wait(timeout=WORKER_TIMEOUT_S)
        assert code == 0, f"{proc.name} exited {code}:\n{proc.output()[-4000:]}"


def check_one_study(study: optuna.Study, client: MlflowClient, budget: int) -> dict[str, Any]:
    """What every multi-worker sweep must satisfy, whatever its stores; returns the pieces for further checks."""
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(len(trials))), "trial numbers are unique and contiguous"
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in trials), "nothing left running or waiting"
    # the budget counts evaluations: a trial that reused an identical earlier trial's result is free
    evaluated = [t for t in trials if "duplicate_of" not in t.user_attrs]
    assert len(evaluated) == budget, [(t.number, t.state.name, t.user_attrs.get("duplicate_of")) for t in trials]
    assert budget_used(study, count_running=False) == budget

    experiment = study.user_attrs["mlflow_experiment_id"]
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    parents = client.search_runs([experiment], filter_string="tags.hailo_sweep.role = 'sweep'", max_results=100)
    assert [p.info.run_id for p in parents] == [parent_id], "exactly one parent run, the one the study points to"
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=1000)
    all_trial_runs = client.search_runs([experiment], filter_string="tags.hailo_sweep.role = 'trial'", max_results=1000)
    assert {r.info.run_id for r in all_trial_runs} == {r.info.run_id for r in children}, "no trial run outside the parent"
    per_number = collections.Counter(r.data.tags["optuna.trial_number"] for r in children)
    assert per_number == collections.Counter(str(t.number) for t in trials), "exactly one run per trial"
    runs = {r.info.run_id: r for r in children}
    expected_status = {TrialState.COMPLETE: "FINISHED", TrialState.FAIL: "FAILED"}
    for t in trials:
        run = runs[t.user_attrs["mlflow_run_id"]]
        assert run.data.tags["optuna.trial_number"] == str(t.number)
        assert run.info.status == expected_status[t.state], t.number

    baseline = [t for t in trials if t.user_attrs.get("baseline")]
    assert len(baseline) == 1, "the enqueued baseline was claimed by exactly one worker"
    assert baseline[0].state == TrialState.COMPLETE
    tagged = [r for r in children if r.data.tags.get("hailo_sweep.baseline") == "True"]
    assert [r.info.run_id for r in tagged] == [baseline[0].user_attrs["mlflow_run_id"]]

    workers = {r.data.tags["hailo_sweep.worker"] for r in children}
    assert len(workers) > 1, f"the trials were shared between worker processes: {workers}"
    return {"trials": trials, "runs": runs, "workers": workers, "parent": client.get_run(parent_id)}


# -- sqlite, one machine ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("jobs", "budget"), [(2, 6), (4, 8)])
def test_local_workers_share_one_sqlite_study(jobs: int, budget: int, tmp_path: Path, digits_data) -> None:
    config = write_sweep(tmp_path, digits_data, unique_name(f"jobs{jobs}"), budget)
    with Processes(tmp_path / "logs") as procs:
        run_all(procs, tmp_path, {"run": hailo_sweep("run", str(config), "--jobs", str(jobs))})
    name = yaml.safe_load(config.read_text())["name"]
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'sweeps' / 'optuna.db'}")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    found = check_one_study(study, client, budget)
    assert len(found["workers"]) <= jobs
    logs = sorted(p.name for p in (tmp_path / "sweeps" / name / "logs").iterdir())
    assert logs == [f"worker-{i}.log" for i in range(jobs)]
    assert found["parent"].info.status == "FINISHED", "the last worker to stop closes the parent run"


# -- PostgreSQL + MLflow tracking server ------------------------------------------------------------------------------
@pytest.fixture
def pg_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test's Optuna study; dropped afterwards."""
    psycopg = pytest.importorskip("psycopg", reason="the PostgreSQL driver (psycopg) is not installed")
    assert PG is not None
    name = f"optuna_{uuid.uuid4().hex[:10]}"
    admin = PG.replace("postgresql+psycopg://", "postgresql://", 1) + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def redacted(url: str) -> str:
    """``url`` with its password replaced by ***, built with urllib (independently of the code under test)."""
    parts = urllib.parse.urlsplit(url)
    assert parts.password
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{parts.hostname}:{parts.port}"))


@needs_services
@pytest.mark.parametrize(("workers", "budget"), [(2, 6), (4, 8)])
def test_workers_on_postgresql_and_a_tracking_server(workers: int, budget: int, tmp_path: Path, digits_data, pg_database: str) -> None:
    assert MLFLOW is not None
    name = unique_name(f"pg{workers}")
    config = write_sweep(tmp_path, digits_data, name, budget, stores={"optuna": pg_database, "mlflow": MLFLOW})
    with Processes(tmp_path / "logs") as procs:
        run_all(procs, tmp_path, {"init": hailo_sweep("init", str(config))})
        run_all(procs, tmp_path, {f"worker-{i}": hailo_sweep("worker", str(config), "--worker-index", str(i)) for i in range(workers)})
        run_all(procs, tmp_path, {"finalize": hailo_sweep("finalize", str(config))})
        outputs = "".join(p.output() for p in procs.procs)
    study = optuna.load_study(study_name=name, storage=pg_database)
    client = MlflowClient(MLFLOW)
    found = check_one_study(study, client, budget)
    trials, runs = found["trials"], found["runs"]
    assert len(found["workers"]) <= workers

    # artifacts, through the server (proxied): whole files for every computed trial
    computed = [t for t in trials if t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs]
    assert computed
    assert_artifacts_whole(client, study, computed, runs)

    # finalize: the best feasible trial (computed here from the trials) is registered under the alias `best`
    feasible = [t for t in trials if t.state == TrialState.COMPLETE and all(v <= 0 for v in t.constraints.values())]
    assert feasible
    best_value = min(t.value for t in feasible)
    version = client.get_model_version_by_alias(name, "best")
    model_id = version.source.removeprefix("models:/")
    source_run = client.get_run(client.get_logged_model(model_id).source_run_id)
    assert source_run.data.metrics["_objective"] == pytest.approx(best_value, rel=1e-9)
    assert source_run.data.tags["hailo_sweep.best"] == "true"

    # the Optuna URL is on record with its password redacted, and no output printed the password
    params = found["parent"].data.params
    assert params["optuna_storage"] == redacted(pg_database)
    assert params["mlflow_tracking_uri"] == MLFLOW
    secret = f"{urllib.parse.urlsplit(pg_database).username}:{urllib.parse.urlsplit(pg_database).password}@"
    assert not any(secret in str(v) for v in params.values())
    assert secret not in outputs


@needs_services
def test_concurrent_init_creates_one_parent_and_one_baseline(tmp_path: Path, digits_data, pg_database: str) -> None:
    assert MLFLOW is not None
    name = unique_name("initrace")
    config = write_sweep(tmp_path, digits_data, name, 4, stores={"optuna": pg_database, "mlflow": MLFLOW})
    with Processes(tmp_path / "logs") as procs:
        run_all(procs, tmp_path, {f"init-{i}": hailo_sweep("init", str(config)) for i in range(3)})
    study = optuna.load_study(study_name=name, storage=pg_database)
    trials = study.get_trials(deepcopy=False)
    assert [(t.state, t.user_attrs.get("baseline")) for t in trials] == [(TrialState.WAITING, True)], "one baseline, enqueued once"
    client = MlflowClient(MLFLOW)
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None and experiment.experiment_id == study.user_attrs["mlflow_experiment_id"]
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.hailo_sweep.role = 'sweep'", max_results=100)
    assert [p.info.run_id for p in parents] == [study.user_attrs["mlflow_parent_run_id"]], "one parent run, the one the study points to"
