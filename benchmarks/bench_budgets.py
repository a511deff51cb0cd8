"""The sampler setup per budget (issue 12, "at no budget from 5 to 30 higher than the tool's own random sampler's
mean"): TPE variants vs the random sampler on the peers benchmark's space, every budget from 5 to 30.

The space, the data, the objective and the searches are those of ``benchmarks/bench_peers.py`` (digits example, fully
8-bit, device logits MAE, baseline enqueued first, a repeat free and replaced by an unevaluated point). Every point is
measured once through the real pipeline and kept in the same per-code cache file as bench_peers (``--fill`` measures
the whole space first, so that no study measures anything; ``--points FILE`` names a measured table explicitly, e.g.
one measured before a change that did not touch what a point measures).

Two readings of "budget n", both reported:
- ``curve``: one study of ``--evaluations`` (30) evaluations; its best after n evaluations, for every n;
- ``own``: a study of exactly n evaluations for each n (its start-up phase sized to n, as a sweep with ``trials: n``
  gets it); its best at the end.

Each TPE variant differs in one lever from the sweep's setup (``hailo_sweep.sweep.sampling.make_sampler``): the start-up
length, ``multivariate``/``group``, ``n_ei_candidates``. Output: per variant, the mean best at each budget and where it
is above the random sampler's mean.

Usage: ``python benchmarks/bench_budgets.py [--first-seed 0] [--seeds 5] [--variants all|name,name] [--readings
curve,own] [--fill] [--points FILE] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_peers import Evaluator, best_curve, example, load_points, point_runner, save_points, table_key, tool_search  # noqa: E402
from bench_search import make_backend  # noqa: E402

from hailo_sweep.sweep import sampling  # noqa: E402
from hailo_sweep.config import SamplerConfig  # noqa: E402
from hailo_sweep.pipeline import prepare_sweep  # noqa: E402

BUDGETS = range(5, 31)


@dataclass(frozen=True)
class Variant:
    """A TPE setup: start-up length as a function of (budget, points), and TPE's options."""

    startup: Callable[[int, int], int]
    multivariate: bool = True
    group: bool = True
    n_ei: int = 24

    def sampler(self, budget: int, points: int, seed: int) -> optuna.samplers.BaseSampler:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.startup(budget, points), multivariate=self.multivariate,
                                              group=self.group and self.multivariate, n_ei_candidates=self.n_ei)


def _share(share: float, low: int, high: int) -> Callable[[int, int], int]:
    return lambda budget, points: max(low, min(high, round(share * budget)))


def _fixed(n: int) -> Callable[[int, int], int]:
    return lambda budget, points: n


VARIANTS: dict[str, Variant | None] = {
    "random": None,
    "default (sampling.startup_trials, mv+group, ei24)": Variant(sampling.startup_trials),
    "startup budget/5 3..10 (previous default)": Variant(_share(0.2, 3, 10)),
    "startup budget/6 2..10": Variant(_share(1 / 6, 2, 10)),
    "startup fixed 3": Variant(_fixed(3)),
    "startup fixed 4": Variant(_fixed(4)),
    "startup fixed 5": Variant(_fixed(5)),
    "startup sqrt(points)/4": Variant(lambda b, p: max(2, min(10, round(p ** 0.5 / 4)))),
    "startup budget/5, multivariate, no group": Variant(_share(0.2, 3, 10), group=False),
    "startup budget/5, independent": Variant(_share(0.2, 3, 10), multivariate=False),
    "startup budget/5, ei 64": Variant(_share(0.2, 3, 10), n_ei=64),
    "startup budget/5, ei 8": Variant(_share(0.2, 3, 10), n_ei=8),
    "startup budget/6 2..10, ei 8": Variant(_share(1 / 6, 2, 10), n_ei=8),
    "startup budget/6 3..10": Variant(_share(1 / 6, 3, 10)),
    "startup budget/6 3..10, ei 8": Variant(_share(1 / 6, 3, 10), n_ei=8),
    "startup fixed 5, ei 8": Variant(_fixed(5), n_ei=8),
    "startup budget/6 2..10, independent": Variant(_share(1 / 6, 2, 10), multivariate=False),
}


def run_variant(space: Any, evaluate: Evaluator, variant: Variant | None, seeds: list[int], baseline: dict[str, Any], points: int,
                max_eval: int, readings: list[str]) -> dict[str, dict[int, list[float]]]:
    """Best value per budget and seed, for each reading."""
    sampler: Any = "random" if variant is None else SamplerConfig()
    out: dict[str, dict[int, list[float]]] = {}
    factory = None if variant is None else variant.sampler
    if "curve" in readings:
        curves = [best_curve([e["value"] for e in tool_search(space, evaluate, sampler, s, max_eval, baseline, points=points, factory=factory)], max_eval) for s in seeds]
        out["curve"] = {n: [c[n - 1] for c in curves if c[n - 1] is not None] for n in BUDGETS if n <= max_eval}
    if "own" in readings:
        out["own"] = {}
        for n in BUDGETS:
            if n > max_eval:
                break
            bests = [best_curve([e["value"] for e in tool_search(space, evaluate, sampler, s, n, baseline, points=points, factory=factory)], n)[-1] for s in seeds]
            out["own"][n] = [b for b in bests if b is not None]
    return out


def report(results: dict[str, dict[str, dict[int, list[float]]]], reading: str, seeds: list[int]) -> dict[str, Any]:
    print(f"\nreading '{reading}', mean best device logits MAE over seeds {seeds[0]}-{seeds[-1]} (5..30 evaluations)")
    rnd = {n: statistics.fmean(v) for n, v in results["random"][reading].items()}
    shown = [5, 6, 7, 8, 10, 12, 15, 20, 25, 30]
    print(f"{'variant':<52}" + "".join(f"{n:>9}" for n in shown) + "   above random at budgets (mean excess)")
    summary: dict[str, Any] = {}
    for label, by_reading in results.items():
        means = {n: statistics.fmean(v) for n, v in by_reading[reading].items()}
        above = [n for n in means if means[n] > rnd[n] + 1e-12]
        excess = statistics.fmean([means[n] - rnd[n] for n in means])
        summary[label] = {"means": means, "above_random": above, "mean_minus_random": excess,
                          "std": {n: statistics.stdev(v) if len(v) > 1 else 0.0 for n, v in by_reading[reading].items()}}
        print(f"{label:<52}" + "".join(f"{means[n]:>9.5f}" for n in shown if n in means)
              + f"   {above if above else 'none'} ({excess:+.5f} avg vs random)")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--evaluations", type=int, default=30)
    parser.add_argument("--variants", default="all", help="comma-separated labels' prefixes, or all (random is always run)")
    parser.add_argument("--readings", default="curve,own")
    parser.add_argument("--fill", action="store_true", help="measure every point of the space first")
    parser.add_argument("--points", type=Path, help="a measured points table (bench_peers' cache format) to use instead of the per-code cache")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hailo-sweep" / "peers")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    readings = args.readings.split(",")
    chosen = {k: v for k, v in VARIANTS.items() if k == "random" or args.variants == "all" or any(k.startswith(p) for p in args.variants.split(","))}
    root = Path(tempfile.mkdtemp(prefix="hs-bench-budgets-"))
    config, space = example(root, mixed=False)
    backend = make_backend(config, root / "work")
    with backend:
        prepared = prepare_sweep(config, root / "work", backend)
        table_file = args.points or args.cache / f"tool-points-{table_key(config, False)}.json"
        evaluate = Evaluator(point_runner(prepared, backend, space, config, root / "trial", False))
        load_points(evaluate, table_file)
        settings = space.all_settings()
        if args.fill:
            t0 = time.perf_counter()
            for i, s in enumerate(settings):
                evaluate(space.params_of(s))
                if i % 20 == 0:
                    save_points(evaluate, table_file)
                    print(f"  {len(evaluate.cache)}/{len(settings)} points measured ({time.perf_counter() - t0:.0f} s)", flush=True)
            save_points(evaluate, table_file)
        measured_before = len(evaluate.cache)
        baseline = space.params_of(space.project(backend.default_settings(space.max_calibset_size(), space.output_names)))
        points = len(settings)
        print(f"space: {points} distinct points; {measured_before} measured in {table_file}")
        t0 = time.perf_counter()
        results = {label: run_variant(space, evaluate, v, seeds, baseline, points, args.evaluations, readings) for label, v in chosen.items()}
        if len(evaluate.cache) > measured_before:
            save_points(evaluate, table_file)
        print(f"studies took {time.perf_counter() - t0:.0f} s ({len(evaluate.cache) - measured_before} points newly measured)")
    values = sorted(v["value"] for v in evaluate.cache.values() if v["value"] is not None)
    print(f"space optimum (of {len(values)} measured): {values[0]:.5f}; 5th best {values[min(4, len(values) - 1)]:.5f}")
    out = {reading: report(results, reading, seeds) for reading in readings}
    if args.json:
        args.json.write_text(json.dumps({"seeds": seeds, "summary": out, "results": results}, indent=1, default=str))
        print(f"saved to {args.json}")


if __name__ == "__main__":
    main()
