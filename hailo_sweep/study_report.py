"""The sweep's summary on its MLflow parent run, and the ranked trial rows that ``best`` and the summary both show.

The parent run gets: a description (``mlflow.note.content``, Markdown) with the top trials and a link to the best
trial's run; the same table as ``summary/top_trials.md`` and every trial as ``summary/trials.csv``; Optuna's own
optimization-history and parameter-importance plots (and the Pareto front for two objectives). The experiment gets
two saved views of its runs table (trial runs sorted by the objective with the headline columns; all runs), which
``hailo-sweep ui`` links to. A summary that cannot be made is a message, never a failed sweep.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hailo_sweep.knob_table import KNOB_ORDER, knob_columns
from hailo_sweep.tracking import NOTE_TAG, Tracker
from hailo_sweep.ui import ALL_RUNS_VIEW, TRIALS_VIEW  # the saved views ``hailo-sweep ui`` links to
HEADLINE = ("_objective", "_feasible", "_device_error", "_fps")


def searched_knobs(study: optuna.Study) -> list[str]:
    """Every knob some trial of the study set (the base knobs and the algorithm knobs its config declares)."""
    trials = study.get_trials(deepcopy=False)
    return [k for k in KNOB_ORDER if any(k in t.params for t in trials)]


@dataclass(frozen=True)
class TrialRow:
    number: int
    value: float
    feasible: bool
    params: dict[str, Any]
    metrics: dict[str, float]
    run_id: str
    duplicate_of: int | None
    constraints: dict[str, float] = field(default_factory=dict)


def is_feasible(trial: FrozenTrial) -> bool:
    return all(v <= 0 for v in (trial.constraints or {}).values())


def top_trials(study: optuna.Study, k: int = 10) -> list[TrialRow]:
    """Completed trials, feasible first, then by the (first) objective in the study's direction."""
    sign = 1.0 if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else -1.0
    # a reused duplicate repeats its original's row: list each evaluated point once
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values and "duplicate_of" not in t.user_attrs]
    done.sort(key=lambda t: (not is_feasible(t), sign * float(t.values[0]), t.number))
    return [
        TrialRow(
            number=t.number,
            value=float(t.values[0]),
            feasible=is_feasible(t),
            params=dict(t.params),
            metrics=dict(t.user_attrs.get("metrics", {})),
            run_id=str(t.user_attrs.get("mlflow_run_id", "")),
            duplicate_of=t.user_attrs.get("duplicate_of"),
            constraints=dict(t.constraints or {}),
        )
        for t in done[:k]
    ]


def run_link(experiment_id: str, run_id: str) -> str:
    """A link that works inside the MLflow UI (Markdown in a run's description), in the model-training workspace."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def summary_markdown(study: optuna.Study, experiment_id: str, rows: list[TrialRow], best: FrozenTrial | None) -> str:
    keys = study.user_attrs.get("objective", {}).get("keys", ["value"])
    directions = study.user_attrs.get("objective", {}).get("directions", [d.name.lower() for d in study.directions])
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)}
    lines = [
        f"**{study.study_name}**: {len(trials)} trials ({', '.join(f'{v} {k}' for k, v in counts.items() if v)}); "
        f"objective `{keys[0]}` ({directions[0]})" + (f" and `{keys[1]}` ({directions[1]})" if len(keys) > 1 else "") + ".",
        "",
    ]
    if best is not None and best.values:
        run = best.user_attrs.get("mlflow_run_id")
        name = f"trial {best.number}"
        lines.append(f"Best feasible: **[{name}]({run_link(experiment_id, run)})** = {best.values[0]:.6g}" if run else f"Best feasible: {name} = {best.values[0]:.6g}")
    else:
        lines.append("No feasible completed trial yet.")
    columns = knob_columns([r.params for r in rows])
    lines += ["", "| trial | value | feasible | " + " | ".join(columns.varying) + " | fps |", "|" + "---|" * (len(columns.varying) + 4)]
    for r in rows:
        fps = r.metrics.get("device.throughput_fps")
        trial = f"[{r.number}]({run_link(experiment_id, r.run_id)})" if r.run_id else str(r.number)
        why = ", ".join(k for k, v in sorted(r.constraints.items()) if v > 0)
        lines.append(
            f"| {trial} | {r.value:.6g} | {'yes' if r.feasible else 'no: ' + why} | "
            + "".join(f"{columns.cell(k, r.params)} | " for k in columns.varying)
            + f"{'' if fps is None else f'{fps:.0f}'} |"
        )
    if columns.constant:
        lines += ["", "Same in every trial above: " + ", ".join(f"`{k}` {v}" for k, v in columns.constant.items()) + "."]
    return "\n".join(lines) + "\n"


def view_state(params: list[str], ascending: bool, only_trials: bool) -> dict[str, Any]:
    """A runs-table view in the UI's own format: the filter, the order, and the columns shown."""
    columns = ["attributes.`Models`"] + [f"metrics.`{k}`" for k in HEADLINE] + [f"params.`{p}`" for p in params]
    return {
        "searchFilter": "tags.`hailo_sweep.role` = 'trial'" if only_trials else "",
        "orderByKey": "metrics.`_objective`" if only_trials else "attributes.start_time",
        "orderByAsc": ascending if only_trials else False,
        "selectedColumns": columns,
    }


def log_summary(study: optuna.Study, tracker: Tracker, parent_run_id: str, work_dir: Path, say: Callable[[str], None]) -> None:
    """Write the summary (see the module docstring) to the parent run; failures are reported through ``say``."""
    from hailo_sweep.sweep import chosen_trial

    try:
        experiment_id = tracker.experiment_id
        rows = top_trials(study, 10)
        best = chosen_trial(study)
        note = summary_markdown(study, experiment_id, rows, best)
        work_dir.mkdir(parents=True, exist_ok=True)
        (work_dir / "top_trials.md").write_text(note, encoding="utf-8")
        _trials_csv(study, work_dir / "trials.csv")
        tracker.set_tags(parent_run_id, {NOTE_TAG: note})
        if best is not None and best.user_attrs.get("mlflow_run_id"):  # `hailo-sweep ui` links to it
            tracker.set_experiment_tags({"hailo_sweep.best_run_id": str(best.user_attrs["mlflow_run_id"]), "hailo_sweep.best_trial": str(best.number)})
        ascending = study.directions[0] == optuna.study.StudyDirection.MINIMIZE
        params = searched_knobs(study)
        tracker.save_view(TRIALS_VIEW, view_state(params, ascending, only_trials=True))
        tracker.save_view(ALL_RUNS_VIEW, view_state(params, ascending, only_trials=False))
        files = [work_dir / "top_trials.md", work_dir / "trials.csv", *_plots(study, work_dir, say)]
        for path in files:
            tracker.client.log_artifact(parent_run_id, str(path), artifact_path="summary")
    except Exception as exc:  # the trials are on record; only their summary is missing
        say(f"sweep summary incomplete: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")


def _trials_csv(study: optuna.Study, path: Path) -> None:
    trials = study.get_trials(deepcopy=False)
    knobs = searched_knobs(study)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["trial", "state", "value", "feasible", "duplicate_of", *knobs, "mlflow_run_id"])
        for t in trials:
            writer.writerow([
                t.number, t.state.name, "" if not t.values else t.values[0],
                "" if t.state != TrialState.COMPLETE else is_feasible(t), t.user_attrs.get("duplicate_of", ""),
                *(t.params.get(k, "") for k in knobs), t.user_attrs.get("mlflow_run_id", ""),
            ])


def _plots(study: optuna.Study, work_dir: Path, say: Callable[[str], None]) -> list[Path]:
    """Optuna's own matplotlib plots: optimization history, parameter importance, and the Pareto front (two objectives)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
    if not complete:
        return []
    keys = study.user_attrs.get("objective", {}).get("keys", ["value"])
    multi = len(study.directions) > 1
    target: dict[str, Any] = {"target": (lambda t: t.values[0]), "target_name": keys[0]} if multi else {"target_name": keys[0]}
    plots: list[tuple[str, Callable[[], Any]]] = [("optimization_history.png", lambda: ovm.plot_optimization_history(study, **target))]
    if len(complete) >= 2:
        plots.append(("param_importances.png", lambda: ovm.plot_param_importances(study, **target)))
    if multi:
        plots.append(("pareto_front.png", lambda: ovm.plot_pareto_front(study, target_names=keys[:2])))
    out = []
    for name, make in plots:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = make()
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            fig.savefig(work_dir / name, dpi=100)
            plt.close(fig)
            out.append(work_dir / name)
        except Exception as exc:  # e.g. importance needs some variation in the params
            say(f"plot {name} skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    return out
