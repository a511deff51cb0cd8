"""``hailo-sweep run CONFIG --cluster ADDRESS`` against a real Dask scheduler and workers on 127.0.0.1.

A compile worker (``--resources compile=1``) and a device worker named after the target (``hailo8l=1``), started as a
user starts them (``tests/dask_cluster.py``). On the embedded backend the device worker runs the integer model; on the
``hailo`` backend both workers import the contract fakes of the SDK (``tests/fakes``) and the driver imports neither.
Everything is asserted from the two stores, as a user would read them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
from mlflow.tracking import MlflowClient

from hailo_sweep.config import load_config
from hailo_sweep.stores import resolve_stores
from tests.conftest import REPO
from tests.dask_cluster import DaskCluster, StartCluster, WorkerSpec, fake_hailo_env

pytestmark = pytest.mark.slow

SEARCH = {"optimization_level": [0, 1], "calibset_size": [64, 128], "normalization_placement": ["host", "model"]}
HAILO_SEARCH = {"optimization_level": [1, 2], "compression_level": [0], "calibset_size": [64], "normalization_placement": ["host", "model"],
                "output_16bit": ["logits"]}
PI = "0000:01:00.0=HAILO8L"
#: what a device task must never import: the compiler, the trackers, the sampler, the embedded backend's runtime
FORBIDDEN = ("hailo_sdk_client", "mlflow", "optuna", "onnxruntime")


def driver(config: Path, address: str, *extra: str) -> subprocess.Popen[str]:
    """The driver as a user runs it; the fakes are NOT on its path: it must not need the SDK."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.Popen([sys.executable, "-m", "hailo_sweep.cli", "run", str(config), "--cluster", address, *extra],
                            cwd=config.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**env, "PYTHONPATH": str(REPO)})


def finished(proc: subprocess.Popen[str], timeout: float = 400) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def stores_of(config: Path) -> tuple[list[optuna.trial.FrozenTrial], MlflowClient, Any]:
    cfg = load_config(config)
    stores = resolve_stores(cfg)
    trials = optuna.load_study(study_name=cfg.name, storage=stores.optuna_url).get_trials(deepcopy=False)
    client = MlflowClient(stores.mlflow_uri)
    experiment = client.get_experiment_by_name(cfg.name)
    return trials, client, experiment


def child_runs(client: MlflowClient, experiment: Any) -> list[Any]:
    runs = client.search_runs([experiment.experiment_id], max_results=500)
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def until(predicate: Callable[[], Any], what: str, timeout: float = 120) -> Any:
    """Poll a condition of the system under test (the scheduler's task table); never a blind sleep."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def processing_on(cluster: DaskCluster, prefix: str) -> Callable[[], tuple[str, str] | None]:
    """(worker name, task key) of a running task whose key starts with ``prefix``, or None."""
    from distributed import Client

    def probe() -> tuple[str, str] | None:
        with Client(cluster.address, timeout=30) as client:
            names = {a: w.get("name") for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}
            for address, keys in client.processing().items():
                for key in keys:
                    if str(key).startswith(prefix):
                        return str(names[address]), str(key)
        return None

    return probe


def watched(env: dict[str, str], log: Path) -> dict[str, str]:
    """``env`` with the import watch of tests/footprint (see its sitecustomize) writing to ``log``."""
    return {**env, "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "footprint"), env.get("PYTHONPATH", "")]), "HAILO_SWEEP_IMPORT_LOG": str(log)}


def worker_modules(cluster: DaskCluster, name: str) -> set[str]:
    from distributed import Client

    with Client(cluster.address, timeout=30) as client:
        address = next(a for a, w in client.scheduler_info(n_workers=-1)["workers"].items() if w.get("name") == name)
        return set(client.run(lambda: sorted(sys.modules), workers=[address])[address])


def assert_consistent(trials: list[optuna.trial.FrozenTrial], runs: list[Any]) -> None:
    """One MLflow run per trial that started one, and no run left RUNNING."""
    by_trial = [r.data.tags.get("optuna.trial_number") for r in runs]
    assert len(by_trial) == len(set(by_trial)), f"a trial was recorded twice: {sorted(by_trial)}"
    assert {t.user_attrs["mlflow_run_id"] for t in trials if "mlflow_run_id" in t.user_attrs} == {r.info.run_id for r in runs}
    assert all(r.info.status != "RUNNING" for r in runs)


# -- whole sweeps ---------------------------------------------------------------------------------------------------
def test_an_embedded_sweep_runs_its_stages_on_the_workers(dask_cluster: StartCluster, write_config: Callable[..., Path]) -> None:
    cluster = dask_cluster([WorkerSpec("compile-0", {"compile": 1}), WorkerSpec("pi-0", {"hailo8l": 1})])
    config = write_config(trials=4, search=SEARCH, diagnostics={"layer_noise": "off"})
    code, out = finished(driver(config, cluster.address))
    assert code == 0, out
    trials, client, experiment = stores_of(config)
    evaluated = [t for t in trials if "duplicate_of" not in t.user_attrs]
    assert len(evaluated) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), [t.user_attrs.get("error") for t in trials]
    runs = child_runs(client, experiment)
    assert_consistent(trials, runs)
    for run in (r for r in runs if "hailo_sweep.duplicate_of" not in r.data.tags):
        assert run.data.params["cluster.compile_host"] and run.data.params["cluster.device_host"]
        assert run.data.metrics["device.logits.softmax_mae"] >= 0 and run.data.metrics["device.throughput_fps"] > 0
        assert run.data.metrics["time.driver_s"] >= 0
        assert run.data.tags["hailo_sweep.state"] == "COMPLETE"
    parent = client.get_run(trials[0].user_attrs["mlflow_run_id"]).data.tags["mlflow.parentRunId"]
    metrics = client.get_run(parent).data.metrics
    # the data went to each of the two workers once: the scattered bytes do not grow with the trials
    assert metrics["cluster.scattered_bytes"] > 0
    assert "model and data sent once per worker" in out


def test_a_hailo_sweep_compiles_on_one_worker_and_runs_on_the_other(
    dask_cluster: StartCluster, write_config: Callable[..., Path], tmp_path: Path,
) -> None:
    imports = tmp_path / "pi-imports.log"
    cluster = dask_cluster([WorkerSpec("compile-0", {"compile": 1}, env=fake_hailo_env()),
                            WorkerSpec("pi-0", {"hailo8l": 1}, env=watched(fake_hailo_env(devices=PI), imports))])
    config = write_config(backend="hailo", trials=3, search=HAILO_SEARCH, diagnostics={"layer_noise": "off"})
    code, out = finished(driver(config, cluster.address))
    assert code == 0, out
    trials, client, experiment = stores_of(config)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), [t.user_attrs.get("error") for t in trials]
    runs = child_runs(client, experiment)
    assert_consistent(trials, runs)
    run = client.get_run(trials[0].user_attrs["mlflow_run_id"])
    # the HEF came back through Dask: compared bit-exactly with the emulation run on the compile host
    assert run.data.params["agreement_reference"] == "bit_exact"
    assert run.data.metrics["agreement.total.identical_share"] == 1.0
    assert {a.path for a in client.list_artifacts(run.info.run_id, "logs")} == {"logs/compile.log", "logs/optimize.log"}
    assert trials[0].user_attrs["compiled_name"] == "model.hef"
    # the device worker ran the device check and device tasks, and hailo-sweep's code there never imported the
    # compiler, the trackers, Optuna or ONNX Runtime (the fake HailoRT's own use of ONNX Runtime is not ours)
    loaded = worker_modules(cluster, "pi-0")
    assert "hailo_sweep.cluster.device_task" in loaded and "hailo_platform" in loaded
    assert not loaded & {"hailo_sdk_client", "mlflow", "optuna"}
    lines = imports.read_text().splitlines()
    assert lines[0].startswith("active") and lines[1:] == [], lines


def test_the_device_task_imports_only_the_runtime() -> None:
    """The import footprint itself, in a fresh interpreter with the fakes' HailoRT (a Pi without the compiler)."""
    code = ("import sys, hailo_sweep.cluster.device_task, hailo_sweep.backends.hailo.device_spec, hailo_sweep.cluster.payloads; "
            "print(sorted({m.split('.')[0] for m in sys.modules}))")
    env = {**os.environ, **fake_hailo_env()}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    top = set(json.loads(out.replace("'", '"')))
    assert not top & set(FORBIDDEN), top & set(FORBIDDEN)


# -- faults ---------------------------------------------------------------------------------------------------------
def test_a_device_worker_killed_mid_trial_is_replaced_by_another(dask_cluster: StartCluster, write_config: Callable[..., Path]) -> None:
    slow = fake_hailo_env(devices=PI, device_delay_s=3)
    cluster = dask_cluster([WorkerSpec("compile-0", {"compile": 1}, env=fake_hailo_env()),
                            WorkerSpec("pi-0", {"hailo8l": 1}, env=slow), WorkerSpec("pi-1", {"hailo8l": 1}, env=slow)])
    config = write_config(backend="hailo", trials=2, search=HAILO_SEARCH, diagnostics={"layer_noise": "off"})
    proc = driver(config, cluster.address)
    victim, key = until(processing_on(cluster, "device-"), "a device task to start")
    cluster.kill(victim)
    code, out = finished(proc)
    assert code == 0, out
    trials, client, experiment = stores_of(config)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), [t.user_attrs.get("error") for t in trials]
    assert_consistent(trials, child_runs(client, experiment))
    # the trial whose device run was cut off ran again, on the other device worker, and was recorded once
    number = int(key.split("-")[1])
    hit = next(t for t in trials if t.number == number)
    survivor = "pi-1" if victim == "pi-0" else "pi-0"
    assert client.get_run(hit.user_attrs["mlflow_run_id"]).data.params["cluster.device_host"].endswith(f"({survivor})")


def test_the_last_device_worker_lost_stops_the_sweep_and_the_next_start_finishes_it(
    dask_cluster: StartCluster, write_config: Callable[..., Path],
) -> None:
    cluster = dask_cluster([WorkerSpec("compile-0", {"compile": 1}, env=fake_hailo_env()),
                            WorkerSpec("pi-0", {"hailo8l": 1}, env=fake_hailo_env(devices=PI, device_delay_s=3))])
    config = write_config(backend="hailo", trials=2, search=HAILO_SEARCH, diagnostics={"layer_noise": "off"}, cluster={"resource_timeout_s": 3})
    proc = driver(config, cluster.address)
    until(processing_on(cluster, "device-"), "a device task to start")
    cluster.kill("pi-0")
    code, out = finished(proc)
    assert code == 1, out
    assert "'hailo8l'" in out and "dask worker" in out  # which resource, and the line that brings one back
    trials, client, experiment = stores_of(config)
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    assert_consistent(trials, child_runs(client, experiment))
    # a device host comes back: the next start runs the interrupted trials again and finishes the budget
    cluster.start_worker(WorkerSpec("pi-1", {"hailo8l": 1}, env=fake_hailo_env(devices=PI)))
    cluster.wait_for_workers(2)
    code, out = finished(driver(config, cluster.address))
    assert code == 0, out
    trials, client, experiment = stores_of(config)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and "duplicate_of" not in t.user_attrs]
    assert len(complete) == 2
    assert_consistent(trials, child_runs(client, experiment))


def test_a_missing_resource_is_named_and_nothing_is_written(dask_cluster: StartCluster, write_config: Callable[..., Path]) -> None:
    cluster = dask_cluster([WorkerSpec("compile-0", {"compile": 1})])
    config = write_config(trials=2, search=SEARCH, cluster={"resource_timeout_s": 2})
    code, out = finished(driver(config, cluster.address))
    assert code == 1, out
    assert "'hailo8l'" in out and 'dask worker' in out and "hailo8l=1" in out
    stores = resolve_stores(load_config(config))
    assert not Path(stores.optuna_url.removeprefix("sqlite:///")).exists() or not optuna.get_all_study_names(stores.optuna_url)


def test_a_device_that_cannot_run_the_target_is_refused_before_any_trial(dask_cluster: StartCluster, write_config: Callable[..., Path]) -> None:
    cluster = dask_cluster([WorkerSpec("compile-0", {"compile": 1}, env=fake_hailo_env()),
                            WorkerSpec("pi-0", {"hailo8l": 1}, env=fake_hailo_env(devices="0000:01:00.0=HAILO10H"))])  # a Hailo-10H cannot run a Hailo-8L HEF
    config = write_config(backend="hailo", trials=2, search=HAILO_SEARCH)
    code, out = finished(driver(config, cluster.address))
    assert code == 2, out
    assert "device worker" in out and "hailo8l" in out.lower()
    stores = resolve_stores(load_config(config))
    assert not Path(stores.optuna_url.removeprefix("sqlite:///")).exists() or not optuna.get_all_study_names(stores.optuna_url)


def test_ctrl_c_cancels_the_tasks_and_the_next_start_retries_the_trial(dask_cluster: StartCluster, write_config: Callable[..., Path]) -> None:
    cluster = dask_cluster([WorkerSpec("compile-0", {"compile": 1}, env=fake_hailo_env(compile_delay_s=3)),
                            WorkerSpec("pi-0", {"hailo8l": 1}, env=fake_hailo_env(devices=PI))])
    config = write_config(backend="hailo", trials=2, search=HAILO_SEARCH, diagnostics={"layer_noise": "off"})
    proc = driver(config, cluster.address)
    until(processing_on(cluster, "build-"), "a compile task to start")
    proc.send_signal(signal.SIGINT)
    code, out = finished(proc)
    assert code == 130, out
    trials, client, experiment = stores_of(config)
    interrupted = [t for t in trials if t.user_attrs.get("interrupted")]
    assert interrupted and all(t.state == optuna.trial.TrialState.FAIL for t in interrupted)
    assert_consistent(trials, child_runs(client, experiment))
    code, out = finished(driver(config, cluster.address))
    assert code == 0, out
    trials, client, experiment = stores_of(config)
    states = [(t.number, t.state.name, t.user_attrs.get("interrupted"), t.system_attrs.get("retry_history"), t.user_attrs.get("duplicate_of")) for t in trials]
    assert len([t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and "duplicate_of" not in t.user_attrs]) == 2, (states, out)
    assert_consistent(trials, child_runs(client, experiment))
