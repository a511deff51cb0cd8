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

``--amm both`` adds a second cluster case whose scheduler runs with Dask's Active Memory Manager off
(``DASK_DISTRIBUTED__SCHEDULER__ACTIVE_MEMORY_MANAGER__START=False``): by default its ReduceReplicas policy drops, every
2 s, the broadcast copies of a key that no waiting task needs, and the next trial on that worker fetches it again.

Usage: ``python benchmarks/bench_cluster.py [--trials 12] [--compile-workers 2] [--amm on|off|both] [--json out.json]``
(about 6 minutes on 2 cores with the defaults, 8 with ``--amm both``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import optuna
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_workers import run_command  # noqa: E402  (one way to time a CLI run in its own process group)
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
    """A WorkerPlugin recording every key that enters a worker's memory: how it got there and its pickled size (Dask's
    own ``sizeof`` counts a dataclass as its shell, which would hide the model and the compiled HEF)."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class ByteCounter(WorkerPlugin):
        name = PLUGIN

        def setup(self, worker: Any) -> None:
            self.worker = worker
            self.arrivals: list[tuple[str, str, int]] = []

        def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
            if finish != "memory" or start == "memory":
                return
            import pickle

            how = {"released": "whole", "flight": "fetched", "executing": "computed"}.get(start, start)
            try:
                size = len(pickle.dumps(self.worker.data[key], protocol=pickle.HIGHEST_PROTOCOL))
            except Exception:  # spilled, or not picklable here: unknown
                size = -1
            self.arrivals.append((str(key), how, size))

    return ByteCounter()


def worker_arrivals(dask_worker: Any) -> dict[str, Any]:
    plugin = dask_worker.plugins.get(PLUGIN)
    return {"name": dask_worker.name, "arrivals": list(plugin.arrivals) if plugin is not None else [],
            "outgoing_bytes": int(dask_worker.transfer_outgoing_bytes_total)}


def classify(workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per worker: the scattered keys (those that arrived whole somewhere) and how often each arrived there, by scatter
    or fetched again from a peer; and the other keys fetched from peers (the compiled models, on a device worker)."""
    scattered = {key for w in workers for key, how, _ in w["arrivals"] if how == "whole"}
    out = []
    for w in workers:
        mine = [(k, how, size) for k, how, size in w["arrivals"] if how in ("whole", "fetched")]
        per_key: dict[str, int] = {}
        for key, _, _ in mine:
            if key in scattered:
                per_key[key] = per_key.get(key, 0) + 1
        out.append({
            "name": w["name"],
            "scattered_keys": len(per_key),
            "scattered_arrivals": sum(per_key.values()),
            "scattered_bytes": sum(size for k, _, size in mine if k in scattered),
            "scattered_max_arrivals": max(per_key.values(), default=0),
            "other_fetched": sum(k not in scattered for k, _, _ in mine),
            "other_fetched_bytes": sum(size for k, _, size in mine if k not in scattered),
            "outgoing_bytes": w["outgoing_bytes"],
        })
    return out


AMM_OFF = {"DASK_DISTRIBUTED__SCHEDULER__ACTIVE_MEMORY_MANAGER__START": "False"}


def run_cluster(base: Path, data: dict[str, Path], trials: int, compile_workers: int, env: dict[str, str], delays: dict[str, float],
                amm: bool = True, compile_threads: int = 1) -> dict[str, Any]:
    from distributed import Client

    case = "cluster" if amm else "cluster-amm-off"
    root = base / case
    config = write_config(root, data, f"bench-{case}", trials)
    specs = [WorkerSpec(f"compile-{i}", {"compile": 1}, env=fake_hailo_env(**delays), nthreads=compile_threads) for i in range(compile_workers)]
    specs.append(WorkerSpec("pi-0", {"hailo8l": 1}, env=fake_hailo_env(DEVICE, **delays)))
    with DaskCluster(base / f"dask-{case}", specs, scheduler_env=None if amm else AMM_OFF) as cluster, Client(cluster.address) as client:
        client.register_plugin(byte_counter(), name=PLUGIN)
        cmd = [sys.executable, "-m", "hailo_sweep.cli", "run", str(config), "--cluster", cluster.address]
        print(f"[{case}] {compile_workers} compile + 1 device workers at {cluster.address}: hailo-sweep run {config.name} --cluster ...", flush=True)
        wall = run_command(cmd, root, base / f"{case}.log", env, RUN_TIMEOUT_S)
        workers = classify(list(client.run(worker_arrivals).values()))
    result = measure(root, f"bench-{case}", wall)
    result["case"] = case
    result["workers"] = sorted(workers, key=lambda w: str(w["name"]))
    return result


def run_local(base: Path, data: dict[str, Path], trials: int, env: dict[str, str]) -> dict[str, Any]:
    root = base / "local"
    config = write_config(root, data, "bench-local", trials)
    print(f"[local] hailo-sweep run {config.name}", flush=True)
    wall = run_command([sys.executable, "-m", "hailo_sweep.cli", "run", str(config)], root, base / "local.log", {**env, "HAILO_FAKE_DEVICES": DEVICE}, RUN_TIMEOUT_S)
    return measure(root, "bench-local", wall)


def report(local: dict[str, Any], clusters: list[dict[str, Any]], data_bytes: int, args: argparse.Namespace) -> dict[str, Any]:
    print()
    print(f"{args.trials} trials each; compile {args.compile_delay:g} s + device {args.device_delay:g} s of sleep in the fakes; {os.cpu_count()} CPUs")
    print(f"{'case':<16} {'evaluated':>9} {'wall s':>8} {'span s':>8} {'evals/min (wall)':>17} {'evals/min (span)':>17}  ratio (wall, span)")
    print(f"{'local':<16} {local['evaluated']:>9} {local['wall_s']:>8.1f} {local['span_s']:>8.1f} {local['per_min_wall']:>17.2f} {local['per_min_span']:>17.2f}")
    verdict: dict[str, Any] = {}
    for r in clusters:
        wall, span = r["per_min_wall"] / local["per_min_wall"], r["per_min_span"] / local["per_min_span"]
        print(f"{r['case']:<16} {r['evaluated']:>9} {r['wall_s']:>8.1f} {r['span_s']:>8.1f} {r['per_min_wall']:>17.2f} {r['per_min_span']:>17.2f}  {wall:.2f}x, {span:.2f}x")
        verdict[r["case"]] = {"ratio_wall": wall, "ratio_span": span}
    print("target: >= 1.7x the trials per minute of one local worker")
    print(f"calibration + evaluation files: {data_bytes} bytes")
    for r in clusters:
        mean, worst = r.get("driver_s_mean"), r.get("driver_s_max")
        print(f"[{r['case']}]")
        if mean is None:
            print("  driver overhead: no time.driver_s metric on the trials")
        else:
            print(f"  driver overhead per trial (time.driver_s, {r['driver_s_trials']} trials): mean {mean:.3f} s, max {worst:.3f} s (target < 0.3 s)")
        print(f"  the driver says it scattered {r.get('scattered_bytes_driver')} bytes (cluster.scattered_bytes)")
        for w in r["workers"]:
            print(f"  {w['name']:<10} scattered keys: {w['scattered_keys']}, arrived {w['scattered_arrivals']}x ({w['scattered_bytes']} bytes pickled, "
                  f"each key at most {w['scattered_max_arrivals']}x); other keys fetched from peers: {w['other_fetched']} ({w['other_fetched_bytes']} bytes); "
                  f"sent to peers {w['outgoing_bytes']} bytes (Dask's count)")
        once = all(w["scattered_max_arrivals"] <= 1 for w in r["workers"])
        total = sum(w["scattered_bytes"] for w in r["workers"])
        print(f"  scattered data arrived once per worker, not per trial: {'yes' if once else 'NO'} ({total} bytes of scattered keys arrived in all)")
        verdict[r["case"]]["scattered_once_per_worker"] = once
    return verdict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--compile-workers", type=int, default=2)
    parser.add_argument("--compile-delay", type=float, default=10.0)
    parser.add_argument("--device-delay", type=float, default=2.0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--work", type=Path, default=None, help="work (and keep stores and logs) here instead of a temporary directory")
    parser.add_argument("--only", choices=("local", "cluster"), default=None, help="run one case (no ratio)")
    parser.add_argument("--compile-threads", type=int, default=1, help="--nthreads of each compile worker (its compile=1 resource still "
                        "allows one build at a time; a second thread runs the light tasks that need the build's data)")
    parser.add_argument("--amm", choices=("on", "off", "both"), default="on", help="the scheduler's Active Memory Manager: on (Dask's "
                        "default: its ReduceReplicas policy drops broadcast copies no waiting task needs), off, or both, one cluster case each")
    args = parser.parse_args(argv)
    from hailo_sweep.examples import digits

    delays = {"compile_delay_s": args.compile_delay, "device_delay_s": args.device_delay}
    env = {k: v for k, v in os.environ.items() if k not in ("OPTUNA_STORAGE", "MLFLOW_TRACKING_URI", "HAILO_FAKE_DEVICES")}
    env.update(fake_hailo_env(**delays), MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        base = args.work or Path(tmp)
        data = digits.build(base / "data", n_calib=256, n_eval=100)
        data_bytes = sum(p.stat().st_size for p in data.values())
        local = run_local(base, data, args.trials, env) if args.only != "cluster" else None
        clusters = [] if args.only == "local" else [
            run_cluster(base, data, args.trials, args.compile_workers, env, delays, amm=amm, compile_threads=args.compile_threads)
            for amm in {"on": [True], "off": [False], "both": [True, False]}[args.amm]
        ]
    if local is None or not clusters:
        print(json.dumps(local or clusters, indent=2, default=str))
        return 0
    verdict = report(local, clusters, data_bytes, args)
    if args.json is not None:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json), "work": str(args.work)}, "local": local, "clusters": clusters,
                                         "verdict": verdict}, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
