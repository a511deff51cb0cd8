"""Benchmark of scale-out (issue 5): trials per minute with 1, 2 and 4 local workers, and what distributed stores cost.

Each case runs the example (``configs/digits.yaml``, copied into a fresh temporary root, its data built with
``python -m hailo_sweep.examples.digits``) for a fixed number of trials:
- ``sqlite-1``, ``sqlite-2``, ``sqlite-4``: ``hailo-sweep run CONFIG --jobs N`` with the default sqlite stores;
- ``postgres-2``: the same with 2 workers on PostgreSQL (Optuna, its own database) and an MLflow tracking server
  (proxied artifacts), when HAILO_SWEEP_TEST_POSTGRES and HAILO_SWEEP_TEST_MLFLOW are set, i.e. under
  ``bash .ci/services.sh``.

Reported per case: wall time of the command (process start to exit: imports, prepare and the idle tail included),
evaluated trials per minute (reused duplicates are free and not counted) over that wall time and over the span from
the first trial's start to the last trial's end, and
the tool's own cost per trial from each trial's ``timing`` user attribute: overhead (trial wall time minus its stages)
and the time spent writing the records (``record_s``). The store overhead is postgres-2 minus sqlite-2.

Usage: ``[bash .ci/services.sh] python benchmarks/bench_workers.py [--trials 12] [--workers 1 2 4] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 3600


@dataclass
class CaseResult:
    case: str
    workers: int
    stores: str
    trials: int
    evaluated: int  # trials that were computed (a reused duplicate is not: it costs nothing and spends no budget)
    complete: int
    wall_s: float
    span_s: float
    trials_per_min_wall: float
    trials_per_min_span: float
    overhead_mean_s: float
    record_mean_s: float
    trial_wall_mean_s: float
    timed_trials: int  # trials with a timing record (reused duplicates have none)


def build_data(dst: Path) -> None:
    subprocess.run([sys.executable, "-m", "hailo_sweep.examples.digits", str(dst)], check=True, capture_output=True, text=True)


def make_root(base: Path, case: str, data: Path, trials: int, stores: dict[str, str]) -> tuple[Path, str]:
    """A fresh project root: the example config and model, the data, and a unique sweep name."""
    root = base / case
    shutil.copytree(REPO / "configs", root / "configs")
    shutil.copytree(data, root / "sweeps" / "data" / "digits")
    config = root / "configs" / "digits.yaml"
    cfg = yaml.safe_load(config.read_text())
    name = f"bench-{case}-{uuid.uuid4().hex[:6]}"
    cfg.update({"name": name, "trials": trials, "stores": {"root": str(root), **stores}})
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return config, name


def run_command(cmd: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None, timeout_s: float = RUN_TIMEOUT_S) -> float:
    """Run ``cmd`` in its own process group (killed with it on timeout or interrupt); returns the wall seconds."""
    start = time.perf_counter()
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**(os.environ if env is None else env), "COLUMNS": "200"})
        try:
            code = proc.wait(timeout=timeout_s)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {code}; see {log}:\n{log.read_text(errors='replace')[-3000:]}")
    return wall


def measure(case: str, workers: int, stores_label: str, optuna_url: str, name: str, wall: float) -> CaseResult:
    study = optuna.load_study(study_name=name, storage=optuna_url)
    trials = study.get_trials(deepcopy=False)
    started = [t.datetime_start for t in trials if t.datetime_start is not None]
    ended = [t.datetime_complete for t in trials if t.datetime_complete is not None]
    span = (max(ended) - min(started)).total_seconds() if started and ended else float("nan")
    timings = [t.user_attrs["timing"] for t in trials if "timing" in t.user_attrs]
    mean = lambda key: statistics.mean(x[key] for x in timings) if timings else float("nan")
    n = sum("duplicate_of" not in t.user_attrs for t in trials)
    return CaseResult(
        case=case, workers=workers, stores=stores_label, trials=len(trials), evaluated=n,
        complete=sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials),
        wall_s=wall, span_s=span, trials_per_min_wall=60.0 * n / wall, trials_per_min_span=60.0 * n / span if span > 0 else float("nan"),
        overhead_mean_s=mean("overhead_s"), record_mean_s=mean("record_s"), trial_wall_mean_s=mean("wall_s"), timed_trials=len(timings),
    )


def run_case(base: Path, data: Path, case: str, workers: int, trials: int, stores: dict[str, str], stores_label: str) -> CaseResult:
    config, name = make_root(base, case, data, trials, stores)
    root = config.parents[1]
    cmd = [sys.executable, "-m", "hailo_sweep.cli", "run", str(config)]
    if workers > 1:
        cmd += ["--jobs", str(workers)]
    print(f"[{case}] {' '.join(cmd[1:])}", flush=True)
    wall = run_command(cmd, root, base / f"{case}.log")
    optuna_url = stores.get("optuna") or f"sqlite:///{root / 'sweeps' / 'optuna.db'}"
    result = measure(case, workers, stores_label, optuna_url, name, wall)
    print(f"[{case}] {result.evaluated} evaluated ({result.trials} trials) in {wall:.1f} s", flush=True)
    return result


def create_database(admin_url: str) -> str:
    """A fresh PostgreSQL database for the benchmark's study; returns its SQLAlchemy URL."""
    import psycopg

    db = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url.replace("postgresql+psycopg://", "postgresql://", 1) + "/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    return f"{admin_url}/{db}"


def table(results: list[CaseResult]) -> str:
    head = ("case", "workers", "evaluated/all", "complete", "wall s", "trials/min (wall)", "trials/min (span)", "overhead s/trial", "record s/trial", "trial s (mean)")
    rows = [
        (r.case, str(r.workers), f"{r.evaluated}/{r.trials}", str(r.complete), f"{r.wall_s:.1f}", f"{r.trials_per_min_wall:.1f}", f"{r.trials_per_min_span:.1f}",
         f"{r.overhead_mean_s:.3f}", f"{r.record_mean_s:.3f}", f"{r.trial_wall_mean_s:.2f}")
        for r in results
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)])


def store_overhead(results: list[CaseResult]) -> dict[str, float] | None:
    by_case = {r.case: r for r in results}
    if "sqlite-2" not in by_case or "postgres-2" not in by_case:
        return None
    local, remote = by_case["sqlite-2"], by_case["postgres-2"]
    return {
        "overhead_s_per_trial": remote.overhead_mean_s - local.overhead_mean_s,
        "record_s_per_trial": remote.record_mean_s - local.record_mean_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    for var in ("OPTUNA_STORAGE", "MLFLOW_TRACKING_URI"):  # every case chooses its stores explicitly
        os.environ.pop(var, None)
    pg, mlflow_server = os.environ.get("HAILO_SWEEP_TEST_POSTGRES"), os.environ.get("HAILO_SWEEP_TEST_MLFLOW")
    results: list[CaseResult] = []
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        base = Path(tmp)
        data = base / "data" / "digits"
        build_data(data)
        for n in args.workers:
            results.append(run_case(base, data, f"sqlite-{n}", n, args.trials, {}, "sqlite"))
        if pg and mlflow_server:
            stores = {"optuna": create_database(pg), "mlflow": mlflow_server}
            results.append(run_case(base, data, "postgres-2", 2, args.trials, stores, "postgresql + mlflow server"))
        else:
            print("PostgreSQL/MLflow server case skipped: HAILO_SWEEP_TEST_POSTGRES / HAILO_SWEEP_TEST_MLFLOW not set (run under bash .ci/services.sh)")
    print()
    print(f"{args.trials} trials per case on the example; {os.cpu_count()} CPUs")
    print(table(results))
    overhead = store_overhead(results)
    if overhead is not None:
        print(f"distributed stores add per trial: overhead {overhead['overhead_s_per_trial']:+.3f} s, record {overhead['record_s_per_trial']:+.3f} s "
              "(postgres-2 minus sqlite-2)")
    if args.json is not None:
        payload: dict[str, Any] = {"trials": args.trials, "cpus": os.cpu_count(), "results": [asdict(r) for r in results], "store_overhead": overhead}
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
