"""Selecting the best trial, registering its model (alias ``best``) and exporting it with a manifest."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hailo_sweep.atomic import atomic_write_text
from hailo_sweep.config import SweepConfig
from hailo_sweep.errors import UserInputError
from hailo_sweep.model_io import file_sha256
from hailo_sweep.stores import Stores, resolve_stores, sqlite_store_missing
from hailo_sweep.study_report import TrialRow, is_feasible, top_trials  # noqa: F401  (re-exported for the commands)
from hailo_sweep.backends import backend_class
from hailo_sweep.sweep import chosen_trial, open_storage
from hailo_sweep.tracking import Tracker, redact_url

ALIAS = "best"


def load_study(config: SweepConfig) -> tuple[optuna.Study, Stores]:
    stores = resolve_stores(config)
    if sqlite_store_missing(stores.optuna_url):  # e.g. run from another directory than the sweep
        raise UserInputError(
            f"no sweep named '{config.name}': {redact_url(stores.optuna_url)} does not exist",
            file=config.source, key="name",
            fix=f"run it first (hailo-sweep run {config.source}), from the directory it ran in, or set stores.root",
        )
    try:
        study = optuna.load_study(study_name=config.name, storage=open_storage(stores.optuna_url))
    except KeyError:
        raise UserInputError(
            f"no sweep named '{config.name}' in {redact_url(stores.optuna_url)}",
            file=config.source, key="name", fix=f"run it first: hailo-sweep run {config.source}",
        ) from None
    return study, stores


def best_trial(study: optuna.Study, config: SweepConfig, pick: int | None = None, *, allow_infeasible: bool = False) -> FrozenTrial:
    """The trial to select: ``pick`` if given (a completed trial, e.g. another point of the Pareto front; one that
    misses a constraint only with ``allow_infeasible``), else the best feasible one (with two objectives: the front's
    point with the lowest error)."""
    if pick is not None:
        trials = {t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
        if pick not in trials:
            raise UserInputError(f"trial {pick} is not a completed trial of '{config.name}'", file=config.source, fix="pick a trial number from the table")
        trial = trials[pick]
        if not is_feasible(trial) and not allow_infeasible:
            missed = ", ".join(f"{k} (by {v:.3g})" for k, v in sorted((trial.constraints or {}).items()) if v > 0)
            raise UserInputError(
                f"trial {pick} misses the sweep's constraints: {missed}",
                file=config.source, key="constraints",
                fix="pick a feasible trial from the table, or add --allow-infeasible to export it anyway (the alias 'best' is not moved to it)",
            )
        return trial
    trial = chosen_trial(study)
    if trial is None:
        raise UserInputError(
            f"sweep '{config.name}' has no completed trial that meets its constraints",
            file=config.source, key="constraints",
            fix="relax the constraints, widen the search space, or run more trials",
        )
    return trial


def export_best(config: SweepConfig, out_dir: Path, pick: int | None = None, *, allow_infeasible: bool = False) -> dict[str, Any]:
    """Register the chosen trial's model (alias ``best`` when it is feasible) and write model, script and manifest to
    ``out_dir``. A trial registered before keeps its version."""
    study, stores = load_study(config)
    trial = best_trial(study, config, pick, allow_infeasible=allow_infeasible)
    model_id = trial.user_attrs.get("mlflow_model_id")
    if not model_id:
        raise UserInputError(f"trial {trial.number} has no compiled model on record", file=config.source)
    tracker = Tracker(stores.mlflow_uri, config.name, stores.artifact_location)
    feasible = is_feasible(trial)
    version = _register_once(tracker, model_id, config, trial, str(study.user_attrs.get("backend", "")), alias=ALIAS if feasible else None)
    source_run = tracker.client.get_logged_model(model_id).source_run_id
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export.", dir=out_dir) as tmp:
        tmp_dir = Path(tmp)
        model_dir = tracker.download_model(model_id, tmp_dir / "model")
        compiled_name = trial.user_attrs.get("compiled_name")
        compiled = next((p for p in model_dir.rglob("*") if p.is_file() and (compiled_name is None or p.name == compiled_name)), None)
        if compiled is None:
            raise UserInputError(f"the model artifact of trial {trial.number} is missing from the tracking store", file=config.source)
        root_files = {a.path: a for a in tracker.client.list_artifacts(source_run) if not a.is_dir}
        report = json.loads(Path(tracker.download(source_run, "report.json", tmp_dir / "run")).read_text()) if "report.json" in root_files else {}
        # plain file names only: the export (and `verify`, which reads lock.json's names) stay inside out_dir
        script_name = next((p for p in root_files if p not in ("report.json",) and Path(p).name == p), None)
        files = {"compiled": compiled.name}
        shutil.copy2(compiled, out_dir / compiled.name)
        if script_name:
            shutil.copy2(tracker.download(source_run, script_name, tmp_dir / "run"), out_dir / script_name)
            files["script"] = script_name
    manifest = _manifest(config, stores, trial, report, out_dir, files, model_id, source_run, version, str(study.user_attrs.get("backend", "")))
    if not feasible:
        manifest["mlflow"]["alias"] = None
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True, default=str))
    atomic_write_text(out_dir / LOCK_FILE, json.dumps(lock_of(config, manifest), indent=2, sort_keys=True, default=str))
    return manifest


LOCK_FILE = "lock.json"


def lock_of(config: SweepConfig, manifest: dict[str, Any]) -> dict[str, Any]:
    """Everything needed to rebuild the exported model and check it: ``hailo-sweep verify DIR`` reads this."""
    return {
        "format": 1,
        "sweep": config.name,
        "trial": manifest["trial"],
        "backend": manifest["backend"],
        "target": config.target,
        "seed": config.sampler.seed,
        "settings": manifest["settings"],
        "settings_sha256": manifest["settings_sha256"],
        "model": {"path": str(config.model), "sha256": file_sha256(config.model)},
        "data": {
            "calibration": {"path": str(config.data.calibration), "sha256": file_sha256(config.data.calibration)},
            "evaluation": {"path": str(config.data.evaluation), "sha256": file_sha256(config.data.evaluation)},
            **manifest["data"],
        },
        "config": json.loads(config.model_dump_json(exclude={"stores"})),
        "files": manifest["files"],
        "recorded_metrics": {k: v for k, v in manifest["metrics"].items() if k.startswith(("device.", "emulated."))},
        "versions": manifest["versions"],
    }


def _register_once(tracker: Tracker, model_id: str, config: SweepConfig, trial: FrozenTrial, backend: str, alias: str | None = ALIAS) -> str:
    """The registered version of this trial's model (made once, described and tagged), with ``alias`` pointed at it.

    Exporting or finalizing the same trial again reuses its version; ``alias=None`` (an infeasible pick) leaves the
    alias where it is.
    """
    name = config.name
    version = tracker.version_of(name, model_id)
    if version is None:
        objective = f"{config.objective.stage}.{config.objective.metric}"
        value = trial.values[0] if trial.values else float("nan")
        feasible = is_feasible(trial)
        description = (
            f"Trial {trial.number} of sweep {name}: {objective} = {value:.6g} ({config.objective.mode}), "
            f"{'feasible' if feasible else 'INFEASIBLE: misses ' + ', '.join(k for k, v in (trial.constraints or {}).items() if v > 0)}; "
            f"backend {backend}, target {config.target}."
        )
        tags = {
            "objective": objective, "objective_value": f"{value:.6g}", "feasible": str(feasible), "target": config.target,
            "backend": backend, "trial": str(trial.number), "mlflow_run_id": str(trial.user_attrs.get("mlflow_run_id", "")),
        }
        version = tracker.register(model_id, name, alias, description=description, tags=tags)
    elif alias is not None:
        tracker.set_alias(name, alias, version)
    return version


def _manifest(
    config: SweepConfig, stores: Stores, trial: FrozenTrial, report: dict[str, Any], out_dir: Path,
    files: dict[str, str], model_id: str, source_run: str, version: str, backend: str,
) -> dict[str, Any]:
    settings = report.get("settings") or dict(trial.params)
    settings_blob = json.dumps(settings, sort_keys=True).encode()
    placement = settings.get("normalization_placement")
    return {
        "sweep": config.name,
        "trial": trial.number,
        "target": config.target,
        "backend": backend,
        "objective": report.get("objective", {"values": trial.values}),
        "feasible": is_feasible(trial),
        # Optuna's constraint values: metric minus its limit (max) or limit minus metric (min); <= 0 is satisfied
        "constraints": {name: {"over_limit": v, "satisfied": v <= 0} for name, v in (trial.constraints or {}).items()},
        "settings": settings,
        "settings_sha256": hashlib.sha256(settings_blob).hexdigest(),
        "files": {role: {"name": name, "sha256": file_sha256(out_dir / name)} for role, name in files.items()},
        "model": {"path": str(config.model), "sha256": report.get("model_sha256")},
        "data": {"calibration_sha256": report.get("calibration_sha256"), "evaluation_sha256": report.get("evaluation_sha256")},
        "input": {
            "layout": "NCHW",
            "normalization_placement": placement,
            "normalization": config.normalization.model_dump() if config.normalization else None,
            "domain": list(config.data.domain),
            "note": "feed raw values when normalization_placement is 'model', (x - mean) / std otherwise",
        },
        "io": _compiled_io(backend, out_dir / files["compiled"]),
        "metrics": report.get("metrics", trial.user_attrs.get("metrics", {})),
        "versions": report.get("versions", {}),
        "mlflow": {
            "tracking_uri": redact_url(stores.mlflow_uri),
            "run_id": source_run,
            "model_id": model_id,
            "registered_model": config.name,
            "version": version,
            "alias": ALIAS,
        },
    }


def _compiled_io(backend: str, path: Path) -> dict[str, Any]:
    """The compiled file's inputs and outputs as its backend reads them (dtypes, shapes, how to dequantize raw integer
    outputs); a backend that cannot read it here, or a read that fails, says so instead of failing the export."""
    try:
        described = backend_class(backend).describe_compiled(path) if backend else {}
    except Exception as exc:  # the export stands without it
        return {"note": f"could not read the compiled file's inputs and outputs: {type(exc).__name__}: {str(exc)[:200]}"}
    return described or {"note": f"the {backend or 'unknown'} backend cannot read its compiled file here (for a HEF: HailoRT's vstream infos)"}


def finalize(config: SweepConfig) -> dict[str, Any]:
    """After the workers: reconcile the records, tag the best run and register its model under the alias ``best``."""
    from hailo_sweep.sweep.faults import reconcile

    study, stores = load_study(config)
    tracker = Tracker(stores.mlflow_uri, config.name, stores.artifact_location)
    reconcile(study, tracker)
    trial = best_trial(study, config)
    model_id = trial.user_attrs.get("mlflow_model_id")
    if not model_id:
        raise UserInputError(f"trial {trial.number} has no compiled model on record", file=config.source)
    version = _register_once(tracker, model_id, config, trial, str(study.user_attrs.get("backend", "")))
    run_id = str(trial.user_attrs.get("mlflow_run_id", ""))
    for previous in tracker.client.search_runs(
        [study.user_attrs["mlflow_experiment_id"]], filter_string="tags.`hailo_sweep.best` = 'true'", max_results=100
    ):
        if previous.info.run_id != run_id:
            tracker.set_tags(previous.info.run_id, {"hailo_sweep.best": "false"})
    tracker.set_tags(run_id, {"hailo_sweep.best": "true"})
    parent = study.user_attrs.get("mlflow_parent_run_id")
    if parent:
        tracker.set_tags(parent, {"hailo_sweep.best_run_id": run_id, "hailo_sweep.best_trial": str(trial.number), "hailo_sweep.finalized": "true"})
    return {"trial": trial.number, "value": trial.values[0], "run_id": run_id, "model_id": model_id, "registered_model": config.name, "version": version}


def pareto_front(study: optuna.Study) -> list[TrialRow]:
    """The feasible Pareto front of a two-objective sweep (error vs device throughput), best error first."""
    if len(study.directions) < 2:
        return []
    try:
        front = {t.number for t in study.best_trials}
    except ValueError:
        return []
    return [row for row in top_trials(study, k=10_000) if row.number in front]


def log_front(config: SweepConfig, study: optuna.Study, stores: Stores, work_dir: Path) -> Path | None:
    """Plot every feasible trial's error against its device throughput, front highlighted; log it to the parent run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = pareto_front(study)
    if not front:
        return None
    rows = [r for r in top_trials(study, k=10_000) if r.feasible]
    keys = study.user_attrs.get("objective", {}).get("keys", ["error", "device.throughput_fps"])
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    ax.scatter([r.metrics.get(keys[1], float("nan")) for r in rows], [r.value for r in rows], s=14, c="#9aa5b1", label="feasible trials")
    ordered = sorted(front, key=lambda r: r.metrics.get(keys[1], 0.0))
    ax.plot([r.metrics.get(keys[1], float("nan")) for r in ordered], [r.value for r in ordered], "o-", c="#c2410c", label="Pareto front")
    for r in ordered:
        ax.annotate(str(r.number), (r.metrics.get(keys[1], float("nan")), r.value), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(keys[1])
    ax.set_ylabel(keys[0])
    ax.set_title("Accuracy vs speed")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    work_dir.mkdir(parents=True, exist_ok=True)
    plot = work_dir / "pareto_front.png"
    fig.savefig(plot)
    plt.close(fig)
    table = work_dir / "pareto_front.json"
    table.write_text(json.dumps([{"trial": r.number, keys[0]: r.value, keys[1]: r.metrics.get(keys[1]), "params": r.params} for r in ordered], indent=1))
    parent = study.user_attrs.get("mlflow_parent_run_id")
    if parent:
        tracker = Tracker(stores.mlflow_uri, config.name, stores.artifact_location)
        for path in (plot, table):
            tracker.client.log_artifact(parent, str(path), artifact_path="pareto")
    return plot
