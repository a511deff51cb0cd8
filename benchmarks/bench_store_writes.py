"""What a trial's store writes cost in sqlite's rollback-journal mode vs WAL mode (``hailo_sweep.sqlite_journal``).

Per trial, about what a sweep writes: Optuna (ask, 10 suggested parameters, 6 user attributes, tell) and MLflow (a
child run with 10 params, a batch of 30 metrics and 5 tags, terminated). Each mode runs in its own subprocess on fresh
files in the same directory (``--dir``, default the system's temp dir: put it on the disk the stores would use), the
modes alternated ``--rounds`` times; the report gives seconds per trial for each round and the ratio.

Usage: ``python benchmarks/bench_store_writes.py [--trials 30] [--rounds 3] [--dir DIR]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, {repo!r})
import optuna
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from hailo_sweep import sqlite_journal
optuna.logging.set_verbosity(optuna.logging.WARNING)
root, wal, trials = {root!r}, {wal!r}, {trials!r}
opt, mlf = f"sqlite:///{{root}}/optuna.db", f"sqlite:///{{root}}/mlflow.db"
if wal:
    sqlite_journal.use_wal(opt); sqlite_journal.use_wal(mlf)
study = optuna.create_study(storage=opt, sampler=optuna.samplers.RandomSampler(0))
client = MlflowClient(tracking_uri=mlf)
exp = client.create_experiment("bench")
def trial_writes():
    t = study.ask()
    for i in range(10):
        t.suggest_categorical(f"k{{i}}", ["a", "b", "c"])
    for i in range(6):
        t.set_user_attr(f"u{{i}}", i)
    run = client.create_run(exp, run_name=f"t{{t.number}}")
    rid = run.info.run_id
    client.log_batch(rid, params=[Param(f"p{{i}}", str(i)) for i in range(10)])
    now = int(time.time() * 1000)
    client.log_batch(rid, metrics=[Metric(f"m{{i}}", float(i), now, 0) for i in range(30)], tags=[RunTag(f"t{{i}}", "x") for i in range(5)])
    client.set_terminated(rid, "FINISHED")
    study.tell(t, 1.0)
trial_writes()  # schema creation and first connections are not timed
start = time.perf_counter()
for _ in range(trials):
    trial_writes()
print(json.dumps({{"per_trial_s": (time.perf_counter() - start) / trials}}))
"""


def measure(wal: bool, trials: int, parent: Path) -> float:
    root = Path(tempfile.mkdtemp(prefix="stores-", dir=parent))
    code = CHILD.format(repo=str(REPO), root=str(root), wal=wal, trials=trials)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["per_trial_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    rollback, wal = [], []
    for r in range(args.rounds):
        pair = [(False, rollback), (True, wal)] if r % 2 == 0 else [(True, wal), (False, rollback)]
        for mode, into in pair:
            into.append(measure(mode, args.trials, args.dir))
        print(f"round {r + 1}: rollback {rollback[-1]:.3f} s/trial, WAL {wal[-1]:.3f} s/trial, ratio {rollback[-1] / wal[-1]:.2f}x", flush=True)
    ratios = [a / b for a, b in zip(rollback, wal, strict=True)]
    print(f"median: rollback {statistics.median(rollback):.3f} s/trial, WAL {statistics.median(wal):.3f} s/trial, "
          f"rollback/WAL {statistics.median(ratios):.2f}x (per round: {' '.join(f'{x:.2f}' for x in ratios)})")


if __name__ == "__main__":
    main()
