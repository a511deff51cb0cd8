"""What a trial's store writes cost: sqlite's rollback-journal mode vs WAL mode (``hailo_sweep.sqlite_journal``), and
(``journal``) Optuna's journal-file storage beside MLflow in WAL mode, the option issue 12 leaves for later.

Per trial, about what a sweep writes: Optuna (ask, 10 suggested parameters, 6 user attributes, tell) and MLflow (a
child run with 10 params, a batch of 30 metrics and 5 tags, terminated). Each mode runs in its own subprocess on fresh
files in the same directory (``--dir``, default the system's temp dir: put it on the disk the stores would use), the
modes alternated ``--rounds`` times; the report gives seconds per trial (Optuna's part and MLflow's) for each round.

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
root, mode, trials = {root!r}, {mode!r}, {trials!r}
opt, mlf = f"sqlite:///{{root}}/optuna.db", f"sqlite:///{{root}}/mlflow.db"
if mode != "rollback":
    sqlite_journal.use_wal(opt); sqlite_journal.use_wal(mlf)
if mode == "journal":
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    opt = JournalStorage(JournalFileBackend(f"{{root}}/optuna.journal"))
study = optuna.create_study(storage=opt, sampler=optuna.samplers.RandomSampler(0))
spent = {{"optuna": 0.0, "mlflow": 0.0}}
client = MlflowClient(tracking_uri=mlf)
exp = client.create_experiment("bench")
def trial_writes():
    t0 = time.perf_counter()
    t = study.ask()
    for i in range(10):
        t.suggest_categorical(f"k{{i}}", ["a", "b", "c"])
    for i in range(6):
        t.set_user_attr(f"u{{i}}", i)
    t1 = time.perf_counter()
    run = client.create_run(exp, run_name=f"t{{t.number}}")
    rid = run.info.run_id
    client.log_batch(rid, params=[Param(f"p{{i}}", str(i)) for i in range(10)])
    now = int(time.time() * 1000)
    client.log_batch(rid, metrics=[Metric(f"m{{i}}", float(i), now, 0) for i in range(30)], tags=[RunTag(f"t{{i}}", "x") for i in range(5)])
    client.set_terminated(rid, "FINISHED")
    t2 = time.perf_counter()
    study.tell(t, 1.0)
    spent["optuna"] += (t1 - t0) + (time.perf_counter() - t2)
    spent["mlflow"] += t2 - t1
trial_writes()  # schema creation and first connections are not timed
spent = {{"optuna": 0.0, "mlflow": 0.0}}
start = time.perf_counter()
for _ in range(trials):
    trial_writes()
print(json.dumps({{"per_trial_s": (time.perf_counter() - start) / trials, **{{k + "_s": v / trials for k, v in spent.items()}}}}))
"""


MODES = ("rollback", "WAL", "journal")


def measure(mode: str, trials: int, parent: Path) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="stores-", dir=parent))
    code = CHILD.format(repo=str(REPO), root=str(root), mode=mode.lower(), trials=trials)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return {k: float(v) for k, v in json.loads(out.strip().splitlines()[-1]).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            results[mode].append(measure(mode, args.trials, args.dir))
        print(f"round {r + 1}: " + "; ".join(f"{m} {results[m][-1]['per_trial_s']:.3f} s/trial (Optuna {results[m][-1]['optuna_s']:.3f}, "
                                            f"MLflow {results[m][-1]['mlflow_s']:.3f})" for m in MODES), flush=True)
    medians = {m: {k: statistics.median(x[k] for x in results[m]) for k in results[m][0]} for m in MODES}
    print("median: " + "; ".join(f"{m} {v['per_trial_s']:.3f} s/trial (Optuna {v['optuna_s']:.3f}, MLflow {v['mlflow_s']:.3f})" for m, v in medians.items()))
    print(f"rollback/WAL {medians['rollback']['per_trial_s'] / medians['WAL']['per_trial_s']:.2f}x; "
          f"Optuna's part, WAL sqlite/journal file {medians['WAL']['optuna_s'] / medians['journal']['optuna_s']:.1f}x")

if __name__ == "__main__":
    main()
