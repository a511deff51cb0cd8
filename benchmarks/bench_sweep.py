"""Benchmark of the walking skeleton on the example (issue: a complete sweep on the embedded backend).

Measures, on this machine, from a fresh project directory:
- wall time of ``hailo-sweep run configs/digits.yaml`` for a 30-trial sweep (process start to exit, imports included);
- the sweep process's peak RSS;
- the tool's own overhead per trial (trial wall time minus the time of its stages, record included), from the study;
- how many times the prepare stage ran (from the sweep's parent run);
- ``hailo-sweep ui``: seconds until the MLflow server answers /health, and the RSS of all its processes.

Usage: ``python benchmarks/bench_sweep.py [--trials 30] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna
import yaml
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"sweep_wall_s": 90.0, "overhead_per_trial_s": 0.25, "peak_rss_mb": 1536.0, "ui_start_s": 10.0, "ui_rss_mb": 700.0}


def tree_rss_mb(root_pid: int) -> float:
    """Sum of RSS over ``root_pid`` and all its descendants (the ui command, the server it starts in its own
    session, and the server's workers)."""
    parents: dict[int, int] = {}
    rss_kb: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid = int(stat.parent.name)
            parents[pid] = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # field 4 of /proc/PID/stat: ppid
            match = re.search(r"VmRSS:\s+(\d+)", (stat.parent / "status").read_text())
            rss_kb[pid] = int(match.group(1)) if match else 0
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        current = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == current and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    return sum(rss_kb.get(pid, 0) for pid in tree) / 1024


def run_sweep(root: Path, trials: int) -> dict[str, float]:
    config = root / "configs" / "digits.yaml"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "hailo_sweep.cli", "run", str(config), "--trials", str(trials)],
        cwd=root, capture_output=True, text=True, check=False,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(proc.stdout + proc.stderr)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    name = yaml.safe_load(config.read_text())["name"]
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{root / 'sweeps' / 'optuna.db'}")
    timings = [t.user_attrs["timing"] for t in study.get_trials(deepcopy=False) if "timing" in t.user_attrs]
    overheads = [t["overhead_s"] for t in timings]
    parent = MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}").get_run(study.user_attrs["mlflow_parent_run_id"])
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    return {
        "trials": float(len(states)),
        "trials_complete": float(states.count("COMPLETE")),
        "sweep_wall_s": wall,
        "peak_rss_mb": peak_mb,
        "overhead_per_trial_s": statistics.mean(overheads),
        "overhead_max_s": max(overheads),
        "trial_wall_mean_s": statistics.mean(t["wall_s"] for t in timings),
        "record_mean_s": statistics.mean(t["record_s"] for t in timings),
        "prepare_runs": parent.data.metrics["prepare_runs"],
        "prepare_s": parent.data.metrics["prepare_s"],
    }


def measure_ui(root: Path) -> dict[str, float]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "hailo_sweep.cli", "ui", "configs/digits.yaml", "--port", "0"],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "COLUMNS": "250"},
    )
    start = time.perf_counter()
    ready = None
    assert proc.stdout is not None
    output = []
    # blocking reads, bounded by a timer that ends the command (select() beside a buffered readline misses lines)
    watchdog = threading.Timer(120, lambda: os.killpg(proc.pid, signal.SIGKILL))
    watchdog.start()
    try:
        for line in proc.stdout:
            output.append(line)
            match = re.search(r"ready in ([0-9.]+) s", line)
            if match:
                ready = float(match.group(1))
                break
        if ready is None:
            raise SystemExit("ui did not start:\n" + "".join(output))
        rss = tree_rss_mb(proc.pid)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=90)
    return {"ui_start_s": ready, "ui_startup_wall_s": time.perf_counter() - start, "ui_rss_mb": rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hs-bench-"))
    try:
        shutil.copytree(REPO / "configs", root / "configs")
        subprocess.run([sys.executable, "-m", "hailo_sweep.examples.digits", str(root / "sweeps" / "data" / "digits")], check=True, capture_output=True)
        results = run_sweep(root, args.trials)
        results.update(measure_ui(root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{'measure':<24}{'value':>12}{'target':>12}")
    for key, value in results.items():
        target = TARGETS.get(key)
        verdict = "" if target is None else ("  ok" if value < target else "  MISSED")
        print(f"{key:<24}{value:>12.3f}{'' if target is None else f'< {target:g}':>12}{verdict}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
