"""Benchmark of issue 13 (compile here, run there): one local worker vs a Dask cluster, side by side in one run.

Both cases run the example (``configs/digits.yaml`` with ``backend: hailo``, target ``hailo8l``) on the contract fakes
of the Hailo SDK (``tests/fakes`` on ``PYTHONPATH``), with the fake's compile slowed to ``--compile-delay`` seconds
(default 10) and each device stage to ``--device-delay`` seconds (default 2): sleeps (``HAILO_FAKE_COMPILE_DELAY_S``,
``HAILO_FAKE_DEVICE_DELAY_S``), so the ratio measures the scheduling rather than this machine's CPU.

- ``local``: ``hailo-sweep run CONFIG``, one process, one (fake) Hailo-8L;
- ``cluster``: a ``dask scheduler`` and ``dask worker`` processes on 127.0.0.1 (``--compile-workers`` with
  ``--resources "compile=1"``, one with ``--resources "hailo8l=1"`` and the fake device), then
  ``hailo-sweep run CONFIG --cluster tcp://127.0.0.1:PORT``.

Reported: evaluations (reused duplicates are free and not counted) per minute over the command's wall time and over
the span from the first trial's start to the last trial's end, and the cluster/local ratio (target: >= 1.7x); the
driver's overhead per trial from the trials' ``time.driver_s`` metric (target: < 0.3 s); the bytes the driver says it
scattered (``cluster.scattered_bytes`` on the parent run), cross-checked with what each worker itself received, counted
by a Dask ``WorkerPlugin`` (keys that arrived whole, by scatter or replication; keys fetched from a peer, e.g. the
compiled model; ``transfer_outgoing_bytes_total``). "Scattered once per worker" means each scattered key arrived once
on each worker, however many trials ran.

Usage: ``python benchmarks/bench_cluster.py [--trials 12] [--compile-workers 2] [--json out.json]`` (about 6-8 minutes
on 2 cores with the defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.dask_cluster import DaskCluster, WorkerSpec, fake_hailo_env  # noqa: E402  (the same harness as the tests)

RUN_TIMEOUT_S = 1800
DEVICE = "0000:01:00.0=HAILO8L"
PLUGIN = "bench-bytes"


def write_config(root: Path, data: dict[str, Path], name: str, trials: int) -> Path:
    """The example on the hailo backend, target hailo8l; knobs the fake DFC refuses (entropy) left out."""
    cfg = yaml.safe_load((REPO / "configs" / "digits.yaml").read_text())
    cfg.update(name=name, backend="hailo", target="hailo8l", model=str(REPO / "configs" / "models" / "digits_cnn.onnx"), trials=trials,
               stores={"root": str(root)}, diagnostics={"layer_noise": "off"})
    cfg["data"].update(calibration=str(data["calibration"]), evaluation=str(data["evaluation"]))
    cfg["search"]["calibration_method"] = ["percentile", "minmax"]
    cfg["search"]["calibset_size"] = [64, 128]
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_command(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> float:
    """Run ``cmd`` in its own process group (killed with it on timeout); returns the wall seconds."""
    start = time.perf_counter()
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, env={**env, "COLUMNS": "200"}, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            code = proc.wait(timeout=RUN_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {code}; see {log}:\n{log.read_text(errors='replace')[-3000:]}")
    return wall


def measure(root: Path, name: str, wall: float) -> dict[str, Any]:
    """Evaluations, throughput, and the driver's numbers from the stores of one case."""
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{root / 'sweeps' / 'optuna.db'}")
    trials = study.get_trials(deepcopy=False)
    evaluated = [t for t in trials if "duplicate_of" not in t.user_attrs]
    starts = [t.datetime_start for t in evaluated if t.datetime_start]
    ends = [t.datetime_complete for t in evaluated if t.datetime_complete]
    span = (max(ends) - min(starts)).total_seconds() if starts and ends else float("nan")
    n = len(evaluated)
    out: dict[str, Any] = {
        "trials": len(trials), "evaluated": n, "complete": sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials),
        "wall_s": wall, "span_s": span, "per_min_wall": 60 * n / wall, "per_min_span": 60 * n / span if span > 0 else float("nan"),
    }
    out.update(_tracking(root, name))
    return out


def _tracking(root: Path, name: str) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return {}
    driver_s: list[float] = []
    scattered: float | None = None
    for run in client.search_runs([experiment.experiment_id], max_results=10_000):
        if "optuna.trial_number" in run.data.tags:
            if "time.driver_s" in run.data.metrics:
                driver_s.append(run.data.metrics["time.driver_s"])
        else:  # the sweep's parent run
            value = run.data.metrics.get("cluster.scattered_bytes", run.data.params.get("cluster.scattered_bytes"))
            scattered = float(value) if value is not None else scattered
    return {
        "driver_s_mean": statistics.mean(driver_s) if driver_s else None,
        "driver_s_max": max(driver_s) if driver_s else None,
        "driver_s_trials": len(driver_s),
        "scattered_bytes_driver": scattered,
    }


# -- what each worker received, counted on the worker -------------------------------------------------------------------
def byte_counter() -> Any:
    """A WorkerPlugin recording every key that enters a worker's memory: how it arrived and its size."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class ByteCounter(WorkerPlugin):
        name = PLUGIN

        def setup(self, worker: Any) -> None:
            self.worker = worker
            self.arrivals: list[tuple[str, str, int]] = []

        def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
            if finish != "memory":
                return
            from dask.sizeof import sizeof

            how = {"released": "whole", "flight": "fetched", "executing": "computed"}.get(start, start)
            self.arrivals.append((str(key), how, int(sizeof(self.worker.data[key])) if key in self.worker.data else -1))

    return ByteCounter()


def worker_counts(dask_worker: Any) -> dict[str, Any]:
    plugin = dask_worker.plugins.get(PLUGIN)
    arrivals = plugin.arrivals if plugin is not None else []
    whole: dict[str, list[int]] = {}
    for key, how, size in arrivals:
        if how == "whole":
            whole.setdefault(key, []).append(size)
    return {
        "name": dask_worker.name,
        "whole_keys": len(whole),
        "whole_max_arrivals": max((len(v) for v in whole.values()), default=0),
        "whole_bytes": sum(sum(v) for v in whole.values()),
        "fetched_bytes": sum(size for _, how, size in arrivals if how == "fetched"),
        "fetched_count": sum(how == "fetched" for _, how, _ in arrivals),
        "outgoing_bytes": int(dask_worker.transfer_outgoing_bytes_total),
    }


def run_cluster(base: Path, data: dict[str, Path], trials: int, compile_workers: int, env: dict[str, str], delays: dict[str, float]) -> dict[str, Any]:
    from distributed import Client

    root = base / "cluster"
    config = write_config(root, data, "bench-cluster", trials)
    specs = [WorkerSpec(f"compile-{i}", {"compile": 1}, env=fake_hailo_env(**delays)) for i in range(compile_workers)]
    specs.append(WorkerSpec("pi-0", {"hailo8l": 1}, env=fake_hailo_env(DEVICE, **delays)))
    with DaskCluster(base / "dask", specs) as cluster, Client(cluster.address) as client:
        client.register_plugin(byte_counter(), name=PLUGIN)
        cmd = [sys.executable, "-m", "hailo_sweep.cli", "run", str(config), "--cluster", cluster.address]
        print(f"[cluster] {compile_workers} compile + 1 device workers at {cluster.address}: hailo-sweep run {config.name} --cluster ...", flush=True)
        wall = run_command(cmd, root, env, base / "cluster.log")
        workers = list(client.run(worker_counts).values())
    result = measure(root, "bench-cluster", wall)
    result["workers"] = sorted(workers, key=lambda w: str(w["name"]))
    return result


def run_local(base: Path, data: dict[str, Path], trials: int, env: dict[str, str]) -> dict[str, Any]:
    root = base / "local"
    config = write_config(root, data, "bench-local", trials)
    print(f"[local] hailo-sweep run {config.name}", flush=True)
    wall = run_command([sys.executable, "-m", "hailo_sweep.cli", "run", str(config)], root, {**env, "HAILO_FAKE_DEVICES": DEVICE}, base / "local.log")
    return measure(root, "bench-local", wall)


def report(local: dict[str, Any], cluster: dict[str, Any], data_bytes: int, args: argparse.Namespace) -> dict[str, Any]:
    ratio_wall = cluster["per_min_wall"] / local["per_min_wall"]
    ratio_span = cluster["per_min_span"] / local["per_min_span"]
    print()
    print(f"{args.trials} trials each; compile {args.compile_delay:g} s + device {args.device_delay:g} s of sleep in the fakes; {os.cpu_count()} CPUs")
    print(f"{'case':<8} {'evaluated':>9} {'wall s':>8} {'span s':>8} {'evals/min (wall)':>17} {'evals/min (span)':>17}")
    for case, r in (("local", local), ("cluster", cluster)):
        print(f"{case:<8} {r['evaluated']:>9} {r['wall_s']:>8.1f} {r['span_s']:>8.1f} {r['per_min_wall']:>17.2f} {r['per_min_span']:>17.2f}")
    print(f"ratio cluster/local: {ratio_wall:.2f}x over wall time, {ratio_span:.2f}x over the trials' span (target >= 1.7x)")
    mean, worst = cluster.get("driver_s_mean"), cluster.get("driver_s_max")
    if mean is None:
        print("driver overhead: no time.driver_s metric on the cluster's trials")
    else:
        print(f"driver overhead per trial (time.driver_s, {cluster['driver_s_trials']} trials): mean {mean:.3f} s, max {worst:.3f} s (target < 0.3 s)")
    print(f"calibration + evaluation files: {data_bytes} bytes; the driver says it scattered {cluster.get('scattered_bytes_driver')} bytes")
    for w in cluster["workers"]:
        print(f"  {w['name']:<10} received whole {w['whole_bytes']:>10} bytes in {w['whole_keys']} keys (each at most {w['whole_max_arrivals']}x), "
              f"fetched {w['fetched_bytes']:>9} bytes in {w['fetched_count']} keys, sent to peers {w['outgoing_bytes']:>10} bytes")
    once = all(w["whole_max_arrivals"] <= 1 for w in cluster["workers"])
    print(f"scattered data sent once per worker, not per trial: {'yes' if once else 'NO'}")
    return {"ratio_wall": ratio_wall, "ratio_span": ratio_span, "scattered_once_per_worker": once}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--compile-workers", type=int, default=2)
    parser.add_argument("--compile-delay", type=float, default=10.0)
    parser.add_argument("--device-delay", type=float, default=2.0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    from hailo_sweep.examples import digits

    delays = {"compile_delay_s": args.compile_delay, "device_delay_s": args.device_delay}
    env = {k: v for k, v in os.environ.items() if k not in ("OPTUNA_STORAGE", "MLFLOW_TRACKING_URI", "HAILO_FAKE_DEVICES")}
    env.update(fake_hailo_env(**delays), MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        base = Path(tmp)
        data = digits.build(base / "data", n_calib=256, n_eval=100)
        data_bytes = sum(p.stat().st_size for p in data.values())
        local = run_local(base, data, args.trials, env)
        cluster = run_cluster(base, data, args.trials, args.compile_workers, env, delays)
    verdict = report(local, cluster, data_bytes, args)
    if args.json is not None:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "local": local, "cluster": cluster, **verdict}, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
