"""A trial's wall time against a plain script doing the same measurements (issue 12: at most 1.3x), side by side.

One run alternates, round after round, on the same points (the embedded backend's defaults: MinMax, per-channel,
host normalization; 64, 128 and 256 calibration frames):
- ``hailo-sweep``: the real sweep (``Sweep.run``: Optuna, MLflow, the record stage, the uploads) on exactly those
  points, in a subprocess; each trial's wall time as the sweep measures it (``timing.wall_s``), matched to its point;
- ``before`` (``--before REV``): the same with the code of another revision (``git archive`` of REV, first on the path), to show what a change saved in the same run;
- ``rollback`` (``--rollback``): this revision with its sqlite stores left in sqlite's default rollback-journal mode
  (``hailo_sweep.sqlite_journal.use_wal`` disabled in the subprocess), to show what WAL mode saves in the same run;
- ``plain``: ``peers/qs_random.py --timing``: quantize_static, one QDQ emulation run, one integer run, per point.

The ratio of a round is the sum of a variant's trial walls over the plain script's sum in that round; the report gives
each round's ratio and their mean and spread (the machine is shared: only ratios taken side by side mean much). A
second ratio takes each trial from Optuna's ask to its tell (``datetime_start`` to ``datetime_complete``): the trial's
wall plus the storage writes that create and complete it. The three points share their leading calibration rows: a
MinMax pass caches the table at each 32-row boundary it crosses, which a smaller point reads and a larger one extends
(``Calibrator.minmax``), as in any sweep over calibration sizes; the plain script calibrates each point from scratch.

Usage: ``python benchmarks/bench_walltime.py [--rounds 3] [--before REV] [--rollback] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
SIZES = (64, 128, 256)
#: the plain script's point (MinMax, per-channel weights, nothing else), every knob fixed: the sweep's baseline is not
#: used, because projecting the backend's defaults gives a declared knob's first choice where the defaults leave it
#: unset (percentile calibration with configs/digits.yaml)
PLAIN_POINT: dict[str, list[object]] = {
    "optimization_level": [0], "compression_level": [0], "normalization_placement": ["host"], "output_16bit": ["none"],
    "equalization": ["disabled"], "bias_correction": ["disabled"], "calibration_method": ["minmax"],
}
#: the ``rollback`` variant: the sweep's sqlite stores are not switched to WAL mode
ROLLBACK_HOOK = """
import hailo_sweep.sqlite_journal as _journal
_journal.use_wal = lambda url: None
"""


def sweep_once(root: Path, out: Path, config_path: str | None = None) -> None:
    """In the subprocess: the real sweep over the points, each trial's wall time by its calibration size; on the digits
    example, or on the model and data of ``config_path`` (``--config``: its data must have been built).

    Only ``hailo_sweep.config`` and ``hailo_sweep.sweep.Sweep`` are used (and the example's data module), so that the
    same function runs another revision's code (``--before``) whatever its internal layout."""
    import warnings

    import optuna

    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from hailo_sweep.config import DiagnosticsConfig, SamplerConfig, SearchSpaceConfig, load_config
    from hailo_sweep.sweep import Sweep

    if config_path is None:
        shutil.copytree(REPO / "configs", root / "configs")
        subprocess.run([sys.executable, "-m", "hailo_sweep.examples.digits", str(root / "sweeps" / "data" / "digits")], check=True, capture_output=True)
        config = load_config(root / "configs" / "digits.yaml")
        objective = config.objective.model_copy(update={"metric": "logits.mae", "stage": "device", "direction": "minimize"})
    else:
        config = load_config(Path(config_path))
        objective = config.objective
    cfg = config.model_copy(update={
        "name": "bench-walltime", "backend": "onnxruntime", "search": SearchSpaceConfig(**PLAIN_POINT, calibset_size=list(SIZES)),
        "trials": len(SIZES), "constraints": [], "sampler": SamplerConfig(name="grid", seed=0), "diagnostics": DiagnosticsConfig(),
        "objective": objective, "stores": config.stores.model_copy(update={"root": root / "stores"}),
    })
    Sweep(cfg).run()
    study = optuna.load_study(study_name=cfg.name, storage=f"sqlite:///{root / 'stores' / 'sweeps' / 'optuna.db'}")
    # loop_s: from Optuna's ask (the trial's datetime_start) to its tell (datetime_complete), which the trial's own
    # wall_s (suggestion to record) leaves out: the storage writes of creating and completing the trial
    walls = {str(t.params["calibset_size"]): {**t.user_attrs["timing"], "loop_s": (t.datetime_complete - t.datetime_start).total_seconds()}
             for t in study.get_trials(deepcopy=False)}
    out.write_text(json.dumps(walls))


def run_sweep(variant: str, checkout: Path, root: Path, rollback: bool, config: Path | None) -> dict[str, dict[str, float]]:
    work = Path(tempfile.mkdtemp(prefix=f"{variant}-", dir=root))
    out = work / "walls.json"
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    code = (ROLLBACK_HOOK if rollback else "") + f"import sys; sys.path.insert(0, {str(HERE)!r}); import bench_walltime as b; from pathlib import Path; b.sweep_once(Path({str(work)!r}), Path({str(out)!r}), {str(config) if config else None!r})"
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    walls = json.loads(out.read_text())
    shutil.rmtree(work, ignore_errors=True)
    return walls


def run_plain(ort_py: Path, model: Path, data: Path, root: Path) -> dict[str, float]:
    walls = {}
    for n in SIZES:
        out = root / "plain.json"
        spec = {"method": "minmax", "per_channel": True, "n": n}
        subprocess.run([str(ort_py), str(HERE / "peers" / "qs_random.py"), str(model), str(data), str(out), "--timing", json.dumps(spec), "--repeat", "1"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        walls[str(n)] = json.loads(out.read_text())["walls"][0]
    return walls


def plain_data(root: Path, config_path: Path | None) -> tuple[Path, Path]:
    """The model and its data file for the plain script (as bench_peers writes it): the digits example's, or those of
    ``config_path``."""
    import numpy as np

    sys.path.insert(0, str(HERE))
    from bench_peers import example
    from bench_search import make_backend

    from hailo_sweep.data import feed
    from hailo_sweep.pipeline import prepare_sweep

    from hailo_sweep.config import load_config

    config = example(root / "plain-example", False)[0] if config_path is None else load_config(config_path)
    backend = make_backend(config, root / "plain-work")
    with backend:
        prepared = prepare_sweep(config, root / "plain-work", backend)
        ds = prepared.dataset
        calib = feed(ds.calibration, "host", prepared.normalization, config.data.domain).astype(np.float32)
        evaluation = feed(ds.evaluation, "host", prepared.normalization, config.data.domain).astype(np.float32)
        data = root / "data.npz"
        np.savez(data, calib=calib, eval=evaluation, **{f"ref_{k}": v for k, v in prepared.reference.items()})
    return Path(config.model), data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", help="a git revision to measure beside this one (its files from git archive)")
    parser.add_argument("--rollback", action="store_true", help="also this revision with its sqlite stores in rollback-journal mode (no WAL)")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hailo-sweep" / "peers")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--config", type=Path, help="a config whose model and data replace the digits example (build its data first), e.g. configs/real/ppocr_cls.yaml")
    args = parser.parse_args()
    config = args.config.resolve() if args.config else None
    sys.path.insert(0, str(HERE))
    from bench_peers import ensure_venv

    root = Path(tempfile.mkdtemp(prefix="hs-bench-walltime-"))
    variants: list[tuple[str, Path, bool]] = [("hailo-sweep", REPO, False)]
    try:
        if args.before:
            before = root / "before"
            before.mkdir()
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.before], check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
            variants.insert(0, (f"before ({args.before})", before, False))
        if args.rollback:
            variants.append(("rollback journal (no WAL)", REPO, True))
        ort_py = ensure_venv(args.cache, "ort")
        model, data = plain_data(root, config)
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            order = variants if r % 2 == 0 else variants[::-1]  # alternate the order: drift hits every variant alike
            result: dict[str, Any] = {"plain": run_plain(ort_py, model, data, root)}
            for label, checkout, rollback in order:
                result[label] = run_sweep(label.split()[0], checkout, root, rollback, config)
            rounds.append(result)
            line = "; ".join(f"{label} {sum(t['wall_s'] for t in result[label].values()) / sum(result['plain'].values()):.2f}x" for label, _, _ in variants)
            print(f"round {r + 1}: plain {sum(result['plain'].values()):.2f} s; {line}", flush=True)
        print(f"\nper trial, mean over {args.rounds} rounds (s): calibration size -> wall [stages]")
        for label, _, _ in variants:
            cells = []
            for n in map(str, SIZES):
                wall = statistics.fmean(rd[label][n]["wall_s"] for rd in rounds)
                stages = {k.removesuffix("_s"): statistics.fmean(rd[label][n].get(k, 0.0) for rd in rounds)
                          for k in rounds[0][label][n] if k not in ("wall_s", "stages_s", "overhead_s", "loop_s")}
                cells.append(f"{n}: {wall:.2f} [" + " ".join(f"{k} {v:.2f}" for k, v in stages.items()) + "]")
            print(f"  {label}: " + "; ".join(cells))
        print(f"  plain: " + "; ".join(f"{n}: {statistics.fmean(rd['plain'][str(n)] for rd in rounds):.2f}" for n in SIZES))
        print("\nratio to the plain script (sum of the 3 trials), per round and mean ± sample std")
        summary = {}
        for label, _, _ in variants:
            ratios = [sum(t["wall_s"] for t in rd[label].values()) / sum(rd["plain"].values()) for rd in rounds]
            sd = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
            summary[label] = {"ratios": ratios, "mean": statistics.fmean(ratios), "std": sd, "median": statistics.median(ratios)}
            print(f"  {label:<28} {' '.join(f'{x:.2f}' for x in ratios)}  mean {statistics.fmean(ratios):.2f} ± {sd:.2f}, "
                  f"median {statistics.median(ratios):.2f} "
                  f"(target <= 1.3x) -> {'ok' if statistics.fmean(ratios) <= 1.3 else 'MISSED'}")
        print("\nthe same with each trial from Optuna's ask to its tell (loop_s: the trial's creation and completion in the store too)")
        for label, _, _ in variants:
            if not all("loop_s" in t for rd in rounds for t in rd[label].values()):
                continue
            ratios = [sum(t["loop_s"] for t in rd[label].values()) / sum(rd["plain"].values()) for rd in rounds]
            sd = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
            summary[label]["loop_ratios"] = ratios
            print(f"  {label:<28} {' '.join(f'{x:.2f}' for x in ratios)}  mean {statistics.fmean(ratios):.2f} ± {sd:.2f}")
        if args.json:
            args.json.write_text(json.dumps({"rounds": rounds, "summary": summary}, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
