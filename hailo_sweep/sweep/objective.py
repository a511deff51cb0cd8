"""What a sweep optimizes: config metric names to result keys, their checks, the objective and its constraints."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import optuna

from hailo_sweep import metrics as m
from hailo_sweep.config import SweepConfig
from hailo_sweep.diagnose.findings import FINDING_CODES
from hailo_sweep.errors import UserInputError
from hailo_sweep.task_metrics import PREFIX as TASK_PREFIX

DEVICE_ONLY_METRICS = {
    "throughput_fps": "device.throughput_fps", "latency_ms": "device.latency_ms", "size_bytes": "compile.size_bytes", "findings": "findings.count",
}
AGREEMENT_BASES = {"lsb_max", "lsb_mean", "lsb_p99", "identical_share"}
LABEL_BASES = {"accuracy", "accuracy_ref", "accuracy_drop", "softmax_label_mae", "prob_label_mae"}

# -- objective and constraints -----------------------------------------------------------------------------------
def metric_key(stage: str, metric: str) -> str:
    """The result key of a config metric name, e.g. ('device', 'logits.softmax_mae') -> 'device.logits.softmax_mae'."""
    if metric in DEVICE_ONLY_METRICS:
        return DEVICE_ONLY_METRICS[metric]
    if metric.startswith("findings."):
        return metric
    base = metric.rsplit(".", 1)[-1]
    if base in AGREEMENT_BASES:
        return f"agreement.{metric}"
    return f"{'device' if stage == 'device' else 'emulated'}.{metric}"


def check_metric(
    metric: str, stage: str, prepared_outputs: tuple[m.OutputSpec, ...], has_labels: bool, *, file: Path | None, key: str,
    tasks: Mapping[str, str] | None = None,
) -> None:
    """Refuse a config metric name that no trial would produce; ``tasks``: the config's task metrics and directions."""
    if metric in DEVICE_ONLY_METRICS:
        return
    if metric.startswith(TASK_PREFIX) or metric in (tasks or {}):
        name = metric.removeprefix(TASK_PREFIX)
        if name not in (tasks or {}):
            raise UserInputError(
                f"unknown task metric {name!r}", file=file, key=key,
                fix="declare it under metrics: {" + name + ": {function: 'file.py:function', direction: maximize}}"
                + (f", or use one of: {', '.join(TASK_PREFIX + t for t in tasks)}" if tasks else ""),
            )
        if not metric.startswith(TASK_PREFIX):
            raise UserInputError("task metrics are named task.<name> in objectives and constraints", file=file, key=key, fix=f"write {TASK_PREFIX}{name}")
        return
    if metric.startswith("findings."):
        code = metric.removeprefix("findings.")
        if code not in FINDING_CODES:
            raise UserInputError(f"unknown finding {code!r}", file=file, key=key, fix=f"use findings.<code> with a code of: {', '.join(FINDING_CODES)}")
        return
    output, _, base = metric.rpartition(".")
    names = {o.name: o for o in prepared_outputs}
    if not output or (output != "total" and output not in names):
        raise UserInputError(
            f"metric {metric!r} must be '<output>.<metric>' with an output of the model or 'total'",
            file=file, key=key, fix=f"e.g. total.nmae or {prepared_outputs[0].name}.mae; outputs: {', '.join(names)}",
        )
    try:
        m.direction_of(base)
    except KeyError:
        raise UserInputError(
            f"unknown metric {base!r}", file=file, key=key, fix=f"use one of: {', '.join(sorted(m.METRIC_DIRECTIONS))}"
        ) from None
    kinds = m.METRIC_KINDS.get(base)
    if kinds and output != "total" and names[output].kind not in kinds:
        raise UserInputError(
            f"{base} needs an output of kind {' or '.join(kinds)}, but {output!r} is kind {names[output].kind}",
            file=file, key=key, fix=f"set outputs.{output}.kind: {kinds[0]}",
        )
    if kinds and output == "total" and not any(o.kind in kinds for o in prepared_outputs):
        raise UserInputError(f"total.{base} needs at least one output of kind {' or '.join(kinds)}", file=file, key=key, fix=f"mark the classification output with kind: {kinds[0]}")
    if base in LABEL_BASES and not has_labels:
        raise UserInputError(f"{base} needs labels", file=file, key=key, fix="set data.labels_key to the labels array of the evaluation .npz")
    if base in AGREEMENT_BASES and stage != "device":
        raise UserInputError(f"{base} compares emulation with the device; it exists at stage device only", file=file, key=key)


THROUGHPUT_KEY = "device.throughput_fps"


def task_directions(config: SweepConfig) -> dict[str, str]:
    """The config's task metrics (``metrics:``) by name, with their directions."""
    return {name: spec.direction for name, spec in config.metrics.items()}


@dataclass(frozen=True)
class Objective:
    """What Optuna optimizes: one or two result keys with their directions, plus constraints the mode implies."""

    keys: tuple[str, ...]
    directions: tuple[str, ...]
    implied_constraints: tuple[tuple[str, str, float], ...] = ()  # (constraint name, result key, max)

    @property
    def key(self) -> str:
        return self.keys[0]

    @property
    def direction(self) -> str:
        return self.directions[0]

    @property
    def multi(self) -> bool:
        return len(self.keys) > 1

    def record(self) -> dict[str, list[str]]:
        return {"keys": list(self.keys), "directions": list(self.directions)}


def objective_of(config: SweepConfig, outputs: tuple[m.OutputSpec, ...], has_labels: bool) -> Objective:
    obj = config.objective
    tasks = task_directions(config)
    check_metric(obj.metric, obj.stage, outputs, has_labels, file=config.source, key="objective.metric", tasks=tasks)
    base = obj.metric.rpartition(".")[2]
    task = tasks.get(obj.metric.removeprefix(TASK_PREFIX)) if obj.metric.startswith(TASK_PREFIX) else None
    direction = obj.direction or task or m.direction_of(base)
    key = metric_key(obj.stage, obj.metric)
    if obj.mode == "fastest_within":
        assert obj.budget is not None
        if direction != "minimize":
            raise UserInputError(
                f"fastest_within keeps {obj.metric} under a budget, so it must be an error metric (lower is better)",
                file=config.source, key="objective.metric",
            )
        return Objective((THROUGHPUT_KEY,), ("maximize",), ((f"{obj.stage}.{obj.metric}.budget", key, obj.budget),))
    if obj.mode == "pareto":
        return Objective((key, THROUGHPUT_KEY), (direction, "maximize"))
    return Objective((key,), (direction,))


def chosen_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best feasible trial; with two objectives, the point of the Pareto front best on the first (the error)."""
    try:
        if len(study.directions) == 1:
            return study.best_trial  # feasibility-aware in Optuna 5
        front = study.best_trials
    except ValueError:
        return None
    if not front:
        return None
    sign = 1.0 if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else -1.0
    return min(front, key=lambda t: (sign * t.values[0], t.number))


def constraint_values(config: SweepConfig, metrics: dict[str, float], objective: Objective | None = None) -> dict[str, float]:
    """Optuna constraint values (feasible when <= 0) named after the config's constraints (and the mode's)."""
    values: dict[str, float] = {}
    for name, key, limit in objective.implied_constraints if objective is not None else ():
        value = metrics.get(key)
        values[name] = float("inf") if value is None else value - limit
    for c in config.constraints:
        value = metrics.get(metric_key(c.stage, c.metric))
        name = f"{c.stage}.{c.metric}.{'max' if c.max is not None else 'min'}"
        if value is None:
            values[name] = float("inf")
        elif c.max is not None:
            values[name] = value - c.max
        else:
            assert c.min is not None
            values[name] = c.min - value
    return values


def constraint_metric_names(config: SweepConfig, objective: Objective | None = None) -> dict[str, str]:
    """The MLflow metric of each constraint: ``<result key>.over_limit`` (negative = within the limit), so that it
    sorts right after the metric it limits instead of before every real metric."""
    names: dict[str, str] = {}
    for name, key, _ in objective.implied_constraints if objective is not None else ():
        names[name] = f"{key}.over_limit"
    for c in config.constraints:
        names[f"{c.stage}.{c.metric}.{'max' if c.max is not None else 'min'}"] = f"{metric_key(c.stage, c.metric)}.over_limit"
    return names


#: the few metrics a user compares, named to sort first in every MLflow table (and linked to each LoggedModel)
HEADLINE_METRICS = ("_objective", "_feasible", "_device_error", "_fps")


def headline_metrics(config: SweepConfig, metrics: dict[str, float], value: float, feasible: bool) -> dict[str, float]:
    """``_objective`` (the value Optuna optimizes), ``_feasible`` (1/0), ``_device_error`` (the objective's error metric
    measured on the device) and ``_fps`` (device throughput), where measured."""
    out = {"_objective": float(value), "_feasible": 1.0 if feasible else 0.0}
    error = metrics.get(metric_key("device", config.objective.metric))
    if error is not None and config.objective.metric not in DEVICE_ONLY_METRICS:
        out["_device_error"] = float(error)
    if THROUGHPUT_KEY in metrics:
        out["_fps"] = float(metrics[THROUGHPUT_KEY])
    return out


