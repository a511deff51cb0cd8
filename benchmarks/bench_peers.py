"""Benchmark against the peers (issue 12, "Numbers"): hailo-sweep's default sampler vs its random sampler, Intel Neural
Compressor 2.6 (``bayesian`` tuning) and a random search over plain ``quantize_static``, side by side on the digits
example, plus a trial's wall time against a plain script doing the same measurements.

Protocol (one run, one machine):
- the peers run as subprocesses in their own virtual environments under ``--cache`` (default
  ``~/.cache/hailo-sweep/peers``), created on first use from PyPI: ``inc`` (neural-compressor==2.6, onnx==1.16.2 and the
  onnxruntime it resolves) and ``ort`` (plain onnxruntime);
- the same calibration pool (the example's ``calib.npy``, fed as the float model expects it, host normalization) and
  the same evaluation set for all; objective: logits MAE against the float model on the device stage (integer
  kernels: ONNX Runtime's CPU provider on the QDQ/QOperator model with graph optimizations on);
- fully 8-bit by default: the tool's space is configs/digits.yaml's ``search`` with every 16-bit and 4-bit choice
  removed; every exported model is checked (no float compute layer, no tensor wider than 8 bit);
- ``--evaluations`` (30) evaluations per search, seeds ``--first-seed`` .. + ``--seeds`` (5); a reused duplicate is free, as
  in the sweep. The tool's searches run the sweep's own sampler setup (``hailo_sweep.sweep.sampling``) and baseline, and answer
  each point with the real pipeline (``run_trial``), memoized per point (the embedded backend is deterministic), so
  seeds and samplers share measurements;
- wall time: ``hailo-sweep run`` on a few points (the real sweep, MLflow and Optuna included) vs the plain script
  (``peers/qs_random.py --timing``: quantize_static, one QDQ emulation run, one integer run) on the same points;
- ``--mixed``: the same comparison with 16-bit outputs allowed (tool: ``output_16bit``; quantize_static: 16-bit output
  overrides; INC 2.6 has no 16-bit integer activations for ONNX, so it is not run there).

Usage: ``python benchmarks/bench_peers.py [--seeds 5] [--first-seed 0] [--evaluations 30] [--mixed] [--skip-inc]
[--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import optuna
from optuna.trial import TrialState

from hailo_sweep.config import DiagnosticsConfig, SamplerConfig, SearchSpaceConfig, SweepConfig, load_config
from hailo_sweep.data import feed
from hailo_sweep.pipeline import load_inputs, prepare_sweep
from hailo_sweep.trial import run_trial
from hailo_sweep.sweep.sampling import make_sampler, next_unevaluated, point_key
from hailo_sweep.search_space import SearchSpace

REPO = Path(__file__).resolve().parents[1]
PEERS = Path(__file__).resolve().parent / "peers"
sys.path.insert(0, str(PEERS))
from common import precision_report  # noqa: E402

from bench_search import make_backend  # noqa: E402

VENVS = {
    "inc": ["neural-compressor==2.6", "onnx==1.16.2", "onnxruntime<1.20", "six"],
    "ort": ["onnxruntime", "onnx", "numpy"],
}
OBJECTIVE = "device.logits.mae"
CHECKPOINTS = (5, 10, 15, 20, 25, 30)


# -- set-up ------------------------------------------------------------------------------------------------------
def ensure_venv(cache: Path, name: str) -> Path:
    python = cache / name / "bin" / "python"
    marker = cache / name / ".installed"
    if not marker.is_file():
        print(f"creating the {name} peer environment in {cache / name} ({', '.join(VENVS[name])})", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(cache / name)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *VENVS[name]], check=True)
        marker.write_text(" ".join(VENVS[name]))
    return python


def example(root: Path, mixed: bool) -> tuple[SweepConfig, SearchSpace]:
    shutil.copytree(REPO / "configs", root / "configs")
    subprocess.run([sys.executable, "-m", "hailo_sweep.examples.digits", str(root / "sweeps" / "data" / "digits")], check=True, capture_output=True)
    config = load_config(root / "configs" / "digits.yaml")
    search = config.search.model_dump(exclude_none=True)
    if not mixed:  # fully 8-bit: no 16-bit output, no 16-bit layer, no 4-bit weights
        search.update({"output_16bit": ["none"], "compression_level": [0], "noisy_layers_16bit": [0]})
        if "all_16bit" in search:
            search["all_16bit"] = ["none"]
    config = config.model_copy(update={
        "backend": "onnxruntime", "search": SearchSpaceConfig(**search), "constraints": [],
        "objective": config.objective.model_copy(update={"metric": "logits.mae", "stage": "device", "direction": "minimize"}),
        "diagnostics": DiagnosticsConfig(layer_noise="off", determinism_samples=0),
    })
    model_io = load_inputs(config)[0]
    return config, SearchSpace(config.search, model_io.output_names, config.source)


# -- the tool's searches -----------------------------------------------------------------------------------------
@dataclass
class Evaluator:
    """The real pipeline, once per point (memoized: the embedded backend is deterministic)."""

    run: Callable[[dict[str, Any]], dict[str, Any]]
    cache: dict[tuple[tuple[str, Any], ...], dict[str, Any]] = field(default_factory=dict)

    def __call__(self, params: dict[str, Any]) -> dict[str, Any]:
        key = point_key(params)
        if key not in self.cache:
            self.cache[key] = self.run(params)
        return self.cache[key]


def tool_search(space: SearchSpace, evaluate: Evaluator, sampler: str | SamplerConfig, seed: int, budget: int, baseline: dict[str, Any],
                points: int | None = None, factory: Callable[[int, int, int], optuna.samplers.BaseSampler] | None = None) -> list[dict[str, Any]]:
    """One study as the sweep runs it: baseline first, the sweep's sampler (``sampler``: a name, or a whole config
    whose seed is replaced by ``seed``; ``factory(budget, points, seed)``: another sampler, for comparisons), repeats
    free and replaced."""
    cfg = (SamplerConfig(name=sampler, seed=seed) if isinstance(sampler, str)  # type: ignore[arg-type]
           else sampler.model_copy(update={"seed": seed}))
    points = space.point_count() if points is None else points
    chosen = factory(budget, points, seed) if factory is not None else make_sampler(cfg, budget=budget, points=points, choices=space.choices(), seed=seed)
    study = optuna.create_study(direction="minimize", sampler=chosen)
    study.enqueue_trial(baseline)
    trace: list[dict[str, Any]] = []

    def objective(trial: optuna.Trial) -> float:
        space.suggest(trial)
        mine = point_key(space.canonical_params(dict(trial.params)))
        for other in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if point_key(space.canonical_params(dict(other.params))) == mine:
                trials = trial.study.get_trials(deepcopy=False)
                waiting = sum(t.state == TrialState.WAITING for t in trials)
                if cfg.replace_repeats and len(trace) + waiting < budget:
                    params = next_unevaluated(trials, space.choices(), random.Random(f"{seed}-{trial.number}"), canonical=space.canonical_params)
                    if params is not None:
                        trial.study.enqueue_trial(params)
                assert other.value is not None
                return other.value
        point = evaluate(space.canonical_params(dict(trial.params)))
        trace.append({"params": space.canonical_params(dict(trial.params)), **point})
        if point["value"] is None:
            raise optuna.TrialPruned()  # a failed point: never chosen, never repeated
        return float(point["value"])

    def stop(study: optuna.Study, _t: optuna.trial.FrozenTrial) -> None:
        if len(trace) >= budget or len({point_key(t["params"]) for t in trace}) >= points:
            study.stop()

    study.optimize(objective, n_trials=4 * budget, callbacks=[stop])
    return trace


def point_runner(prepared: Any, backend: Any, space: SearchSpace, config: SweepConfig, work: Path, mixed: bool) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """One point through the real pipeline (``run_trial``): its objective, stage seconds and precision check."""

    def run_point(params: dict[str, Any]) -> dict[str, Any]:
        settings = space.settings_from_params(params)
        t = time.perf_counter()
        result = run_trial(prepared, backend, settings, work, diagnostics=config.diagnostics)
        value = result.metrics.get(OBJECTIVE) if result.ok else None
        checked = precision_report(onnx.load(str(result.compiled.path))) if result.compiled is not None else None
        shutil.rmtree(work, ignore_errors=True)
        entry = {"value": value, "seconds": time.perf_counter() - t, "error": result.error, "precision": checked}
        return {**entry, "value": counted(entry, mixed)}

    return run_point


def load_points(evaluate: Evaluator, table_file: Path) -> None:
    """Reuse the measurements of an earlier run (``table_file`` is keyed on everything that decides them)."""
    if table_file.is_file():
        evaluate.cache = {point_key(e["params"]): e["result"] for e in json.loads(table_file.read_text())}
        print(f"  {len(evaluate.cache)} tool points reused from {table_file}", flush=True)


def save_points(evaluate: Evaluator, table_file: Path) -> None:
    table_file.write_text(json.dumps([{"params": dict(k), "result": v} for k, v in evaluate.cache.items()]))


def counted(entry: dict[str, Any], mixed: bool) -> float | None:
    """An evaluation's value, or None (not a candidate) when its exported model is not fully 8-bit in an 8-bit
    comparison: a float compute layer left (e.g. INC's fp32 fallback) or a tensor of another width."""
    report = entry.get("precision") or {}
    if entry.get("value") is None or report.get("float_layers") or (not mixed and report.get("non8bit_tensors")):
        return None
    return float(entry["value"])


def table_key(config: SweepConfig, mixed: bool) -> str:
    import hashlib

    h = hashlib.sha256()
    measuring = [REPO / "hailo_sweep" / f for f in ("pipeline.py", "metrics.py", "data.py", "settings.py", "search_space.py", "model_io.py",
                                                    "reference.py", "onnx_runner.py", "config.py")]
    measuring += sorted((REPO / "hailo_sweep" / "backends").rglob("*.py"))  # the code that decides a point's result
    for path in [config.model, config.data.calibration, config.data.evaluation, *measuring]:
        h.update(Path(path).read_bytes())
    h.update(f"{OBJECTIVE}|{mixed}".encode())
    return h.hexdigest()[:16]


# -- statistics ----------------------------------------------------------------------------------------------------
def best_curve(values: Sequence[float | None], upto: int) -> list[float | None]:
    out: list[float | None] = []
    best: float | None = None
    for v in list(values)[:upto]:
        if v is not None and (best is None or v < best):
            best = v
        out.append(best)
    while len(out) < upto:
        out.append(best)
    return out


def spread(values: Sequence[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.5f} ± {std:.5f} ({min(values):.5f}-{max(values):.5f})"


def mean_at(curves: list[list[float | None]], n: int) -> float:
    vals = [c[n - 1] for c in curves if c[n - 1] is not None]
    return statistics.fmean(vals) if vals else float("inf")


def sampler_verdicts(curves: dict[str, list[list[float | None]]], peers: Sequence[str], n_eval: int) -> dict[str, bool]:
    """Issue 12's verdicts on the mean best-so-far curves: the default sampler vs each peer at ``n_eval``, vs the tool's
    random sampler at 10, 20 and 30 and at every budget from 5 to ``n_eval``."""
    tpe, rnd = curves["hailo-sweep tpe"], curves["hailo-sweep random"]
    verdicts: dict[str, bool] = {}
    for name in peers:
        verdicts[f"tpe < {name} at {n_eval}"] = mean_at(tpe, n_eval) < mean_at(curves[name], n_eval)
    for c in (10, 20, 30):
        if c <= n_eval:
            verdicts[f"tpe < random at {c}"] = mean_at(tpe, c) < mean_at(rnd, c)
    verdicts["tpe <= random at every budget 5..30"] = all(mean_at(tpe, c) <= mean_at(rnd, c) + 1e-12 for c in range(5, n_eval + 1))
    return verdicts


# -- wall time -------------------------------------------------------------------------------------------------------
def sweep_wall_times(config: SweepConfig, root: Path, points: list[dict[str, Any]]) -> list[float]:
    """``hailo-sweep run`` (the real sweep, its stores included) over exactly ``points``: wall seconds of each trial."""
    from hailo_sweep.sweep import Sweep

    search = {k: sorted({p[k] for p in points}) for k in points[0]}
    cfg = config.model_copy(update={
        "name": "bench-walltime", "search": SearchSpaceConfig(**search), "trials": len(points),
        "sampler": SamplerConfig(name="grid", seed=0), "diagnostics": DiagnosticsConfig(),
        "stores": config.stores.model_copy(update={"root": root / "walltime"}),
    })
    summary = Sweep(cfg).run()
    study = optuna.load_study(study_name=cfg.name, storage=f"sqlite:///{root / 'walltime' / 'sweeps' / 'optuna.db'}")
    for t in study.get_trials(deepcopy=False):
        timing = t.user_attrs.get("timing", {})
        stages = {k.removesuffix("_s"): round(v, 2) for k, v in timing.items() if k not in ("wall_s", "stages_s", "record_s", "overhead_s")}
        print(f"  trial {t.number}: wall {timing.get('wall_s', 0):.2f} s = stages+record {timing.get('stages_s', 0):.2f} s "
              f"(record {timing.get('record_s', 0):.2f} s) + other {timing.get('overhead_s', 0):.2f} s {stages}")
    return [t.wall_s for t in summary.timings]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--evaluations", type=int, default=30)
    parser.add_argument("--mixed", action="store_true", help="allow 16-bit outputs (the mixed-precision comparison)")
    parser.add_argument("--skip-inc", action="store_true")
    parser.add_argument("--skip-walltime", action="store_true")
    parser.add_argument("--only-walltime", action="store_true", help="only the wall-time comparison")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hailo-sweep" / "peers")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    n_eval = args.evaluations
    args.cache.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="hs-bench-peers-"))
    report: dict[str, Any] = {"seeds": seeds, "evaluations": n_eval, "mixed": args.mixed}
    try:
        config, space = example(root, args.mixed)
        prepared_dir = root / "work"
        backend = make_backend(config, prepared_dir)
        with backend:
            prepared = prepare_sweep(config, prepared_dir, backend)
            ds = prepared.dataset
            data = root / "data.npz"
            calib = feed(ds.calibration, "host", prepared.normalization, config.data.domain).astype(np.float32)
            evaluation = feed(ds.evaluation, "host", prepared.normalization, config.data.domain).astype(np.float32)
            np.savez(data, calib=calib, eval=evaluation, **{f"ref_{k}": v for k, v in prepared.reference.items()})
            print(f"digits example: calibration pool {len(calib)} frames, evaluation {len(evaluation)} frames; "
                  f"tool space {space.grid_size()} points: {json.dumps(space.choices())}", flush=True)

            # -- peers (subprocesses, own venvs) ------------------------------------------------------------
            ort_py = ensure_venv(args.cache, "ort")
            baseline = space.params_of(space.project(backend.default_settings(space.max_calibset_size(), space.output_names)))
            if args.only_walltime:
                walltime(config, root, baseline, ort_py, data)
                return
            peers: dict[str, list[list[float]]] = {}
            peer_seconds: dict[str, list[float]] = {}
            peer_precision: dict[str, list[dict[str, Any]]] = {}
            t0 = time.perf_counter()
            out = root / "qs.json"
            cmd = [str(ort_py), str(PEERS / "qs_random.py"), str(config.model), str(data), str(out), "--seeds", ",".join(map(str, seeds)), "--evaluations", str(n_eval)]
            subprocess.run(cmd + (["--allow16"] if args.mixed else []), check=True)
            qs = json.loads(out.read_text())
            label = f"quantize_static random ({qs['grid_points']}-point space)"
            peers[label] = [[counted(e, args.mixed) for e in qs["seeds"][str(s)]] for s in seeds]
            peer_seconds[label] = [e["seconds"] for s in seeds for e in qs["seeds"][str(s)]]
            peer_precision[label] = [e["precision"] for s in seeds for e in qs["seeds"][str(s)]]
            print(f"  quantize_static random search: {time.perf_counter() - t0:.0f} s", flush=True)
            if not args.skip_inc and not args.mixed:
                inc_py = ensure_venv(args.cache, "inc")
                t0 = time.perf_counter()
                out = root / "inc.json"
                subprocess.run([str(inc_py), str(PEERS / "inc_search.py"), str(config.model), str(data), str(out),
                                "--seeds", ",".join(map(str, seeds)), "--evaluations", str(n_eval)], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root)  # INC writes nc_workspace/ in its cwd
                inc = json.loads(out.read_text())
                peers["INC 2.6 bayesian"] = [[counted(e, args.mixed) for e in inc["seeds"][str(s)]["trace"]] for s in seeds]
                peer_seconds["INC 2.6 bayesian"] = [e["seconds"] for s in seeds for e in inc["seeds"][str(s)]["trace"]]
                peer_precision["INC 2.6 bayesian"] = [e["precision"] for s in seeds for e in inc["seeds"][str(s)]["trace"]]
                print(f"  INC bayesian: {time.perf_counter() - t0:.0f} s", flush=True)

            # -- the tool -----------------------------------------------------------------------------------
            work = root / "trial"
            precision: list[dict[str, Any]] = []

            # measurements are kept between runs (e.g. for held-out seeds), keyed on everything that decides them
            table_file = args.cache / f"tool-points-{table_key(config, args.mixed)}.json"
            evaluate = Evaluator(point_runner(prepared, backend, space, config, work, args.mixed))
            load_points(evaluate, table_file)
            baseline = space.params_of(space.project(backend.default_settings(space.max_calibset_size(), space.output_names)))
            tool: dict[str, list[list[float | None]]] = {}
            t0 = time.perf_counter()
            for sampler in ("tpe", "random"):
                tool[f"hailo-sweep {sampler}"] = [[e["value"] for e in tool_search(space, evaluate, sampler, s, n_eval, baseline)] for s in seeds]
            print(f"  hailo-sweep searches: {time.perf_counter() - t0:.0f} s ({len(evaluate.cache)} distinct points measured)", flush=True)
            save_points(evaluate, table_file)
            precision.extend(e["precision"] for e in evaluate.cache.values() if e.get("precision"))
    finally:
        pass

    # -- report -------------------------------------------------------------------------------------------------
    curves = {k: [best_curve(v, n_eval) for v in vals] for k, vals in {**tool, **peers}.items()}
    checkpoints = [c for c in CHECKPOINTS if c <= n_eval]
    print(f"\nbest device logits MAE so far, mean over seeds {seeds[0]}-{seeds[-1]} (± sample std, range)")
    print(f"{'searcher':<44}" + "".join(f"{f'after {c}':>14}" for c in checkpoints))
    for name, cs in curves.items():
        print(f"{name:<44}" + "".join(f"{mean_at(cs, c):>14.5f}" for c in checkpoints))
    print()
    for name, cs in curves.items():
        print(f"  {name:<42} best after {n_eval}: {spread([c[n_eval - 1] for c in cs if c[n_eval - 1] is not None])}")
    report["curves"] = curves
    # precision checks
    all_precision = {"hailo-sweep": precision, **peer_precision}
    for name, reports in all_precision.items():
        floats = sum(bool(r["float_layers"]) for r in reports)  # such models are not counted as results (see counted)
        wide = sum(bool(r["non8bit_tensors"]) for r in reports)
        print(f"  precision check, {name}: {len(reports)} exported models, {floats} with float compute layers, {wide} with tensors wider/narrower than 8 bit")
    report["precision"] = {k: {"models": len(v), "with_float_layers": sum(bool(r["float_layers"]) for r in v),
                               "with_non8bit": sum(bool(r["non8bit_tensors"]) for r in v)} for k, v in all_precision.items()}

    verdicts = sampler_verdicts(curves, list(peers), n_eval)
    print("\nverdicts")
    for k, v in verdicts.items():
        print(f"  {k}: {'ok' if v else 'MISSED'}")
    report["verdicts"] = verdicts
    ranked = sorted(((v["value"], dict(k)) for k, v in evaluate.cache.items() if v["value"] is not None), key=lambda vp: vp[0])
    print(f"\nbest tool points measured (of {len(ranked)}):")
    for value, params in ranked[:5]:
        print(f"  {value:.5f}  " + ", ".join(f"{k}={v}" for k, v in params.items() if k not in ("compression_level", "noisy_layers_16bit")))
    report["tool_best_points"] = [{"value": v, "params": p} for v, p in ranked[:10]]
    report["tool_point_seconds"] = [e["seconds"] for e in evaluate.cache.values()]
    print(f"\nper evaluation (stage work only): hailo-sweep run_trial {spread(report['tool_point_seconds'])} s; "
          + "; ".join(f"{k} {spread(v)} s" for k, v in peer_seconds.items()))

    if not args.skip_walltime:
        report["walltime"] = walltime(config, root, baseline, ort_py, data)
    shutil.rmtree(root, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
        print(f"saved to {args.json}")


def walltime(config: SweepConfig, root: Path, baseline: dict[str, Any], ort_py: Path, data: Path) -> dict[str, Any]:
    """The real sweep's trials vs the plain script (median of 3 runs) on the same points."""
    plain_point = {"optimization_level": 0, "normalization_placement": "host", "equalization": "disabled",
                   "bias_correction": "disabled", "calibration_method": "minmax"}
    points = [{**baseline, **{k: v for k, v in plain_point.items() if k in baseline}, "calibset_size": n} for n in (64, 128, 256)]
    walls = sweep_wall_times(config, root, points)
    plain = []
    for p in points:
        out = root / "timing.json"
        spec = {"method": "minmax" if p.get("calibration_method", "minmax") == "minmax" else p["calibration_method"], "per_channel": True, "n": p["calibset_size"]}
        subprocess.run([str(ort_py), str(PEERS / "qs_random.py"), str(config.model), str(data), str(out), "--timing", json.dumps(spec), "--repeat", "3"], check=True)
        plain.append(statistics.median(json.loads(out.read_text())["walls"]))
    print("\nwall time per trial, the same points (MinMax, per-channel, host normalization, 64/128/256 calibration frames), side by side")
    for p, w, q in zip(points, walls, plain):
        print(f"  calib {p['calibset_size']:>4}: hailo-sweep run trial {w:.2f} s, plain script {q:.2f} s, ratio {w / q:.2f}x")
    ratio = sum(walls) / sum(plain)
    print(f"  total: {sum(walls):.2f} s vs {sum(plain):.2f} s = {ratio:.2f}x (target <= 1.3x) -> {'ok' if ratio <= 1.3 else 'MISSED'}")
    return {"points": points, "sweep": walls, "plain": plain, "ratio": ratio}


if __name__ == "__main__":
    main()
