"""Pool the seeds of several ``bench_peers.py --json`` runs (the same space and code, other seeds) and give the
sampler verdicts of issue 12 on the pooled means: the default sampler vs the tool's random sampler at every budget
from 5 to the evaluations, and vs each peer at the last budget.

Usage: ``python benchmarks/pool_seeds.py RUN.json [RUN.json ...]``, e.g. the development seeds and the held-out ones:
``bench_peers.py --json a.json`` (seeds 0-4), ``--first-seed 100 --json b.json``, ``--first-seed 200 --seeds 20
--json c.json``, then ``pool_seeds.py a.json b.json c.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_peers import mean_at, sampler_verdicts  # noqa: E402

TOOL, RANDOM = "hailo-sweep tpe", "hailo-sweep random"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    runs = [json.loads(p.read_text()) for p in args.runs]
    if len({(r["evaluations"], r["mixed"]) for r in runs}) != 1:
        raise SystemExit("the runs differ in --evaluations or --mixed: they cannot be pooled")
    n_eval = runs[0]["evaluations"]
    seeds = [s for r in runs for s in r["seeds"]]
    if len(seeds) != len(set(seeds)):
        raise SystemExit(f"a seed appears in two runs: {sorted(seeds)}")
    searchers = [name for name in runs[0]["curves"] if all(name in r["curves"] for r in runs)]
    pooled = {name: [c for r in runs for c in r["curves"][name]] for name in searchers}
    budgets = [n for n in (5, 10, 15, 20, 25, 30) if n <= n_eval]
    print(f"best device error so far, mean ± sample std over {len(seeds)} seeds ({', '.join(map(str, sorted(seeds)))})")
    print(f"{'searcher':<44}" + "".join(f"{'after ' + str(n):>20}" for n in budgets))
    for name, curves in pooled.items():
        cells = [(mean_at(curves, n), statistics.stdev(c[n - 1] for c in curves) if len(curves) > 1 else 0.0) for n in budgets]
        print(f"{name:<44}" + "".join(f"{m:>12.5f} ± {s:.5f}" for m, s in cells))
    print("\nverdicts (pooled means)")
    peers = [name for name in searchers if name not in (TOOL, RANDOM)]
    for verdict, ok in sampler_verdicts(pooled, peers, n_eval).items():
        print(f"  {verdict}: {'ok' if ok else 'MISSED'}")


if __name__ == "__main__":
    main()
