"""Sweep orchestration: Optuna proposes settings, the pipeline runs each trial, the tracker records it.

This is the only module that knows both Optuna and MLflow. The flow of one ``run``:
config -> inputs checked (nothing written yet) -> stores opened (study, experiment, parent run: created once) ->
baseline enqueued once -> prepare once -> for each trial: suggest -> pipeline -> metrics -> records.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shutil
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import optuna
from optuna.trial import TrialState

from hailo_sweep import __version__
from hailo_sweep import metrics as m
from hailo_sweep import study_report
from hailo_sweep.backends import select_backend
from hailo_sweep.backends.base import Backend
from hailo_sweep.config import SweepConfig
from hailo_sweep.errors import UserInputError
from hailo_sweep.pipeline import Prepared, StopTrial, TrialResult, backend_context, load_inputs, prepare_sweep, run_trial, softmax_findings
from hailo_sweep.diagnose import plots as diag_plots
from hailo_sweep.diagnose.findings import FINDING_CODES
from hailo_sweep.diagnose.ladder import explain
from hailo_sweep.best_noise import analyse_best, layer_noise_artifacts
from hailo_sweep.faults import (
    INTERRUPTED_ATTR, StoresFull, interrupts_end_trials, is_disk_full, reconcile, record_interrupted, record_write_error, requeue_interrupted,
    resume_line, signame_of,
)
from hailo_sweep.recording import ArtifactUploader, reconcile_uploads
from hailo_sweep.sampling import make_sampler, next_unevaluated, point_key
from hailo_sweep.search_space import SearchSpace
from hailo_sweep.settings import Settings
from hailo_sweep.stores import check_stores_writable, redact_url, resolve_stores
from hailo_sweep.task_metrics import PREFIX as TASK_PREFIX
from hailo_sweep.tracking import LoggedModelRecord, RunRecord, Tracker, TrackingUnavailable

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
DEVICE_ONLY_METRICS = {
    "throughput_fps": "device.throughput_fps", "latency_ms": "device.latency_ms", "size_bytes": "compile.size_bytes", "findings": "findings.count",
}
AGREEMENT_BASES = {"lsb_max", "lsb_mean", "lsb_p99", "identical_share"}
LABEL_BASES = {"accuracy", "accuracy_ref", "accuracy_drop", "softmax_label_mae", "prob_label_mae"}


class BudgetSpent(Exception):
    """Raised when a worker asks for a new trial after the sweep's budget is spent: the worker stops cleanly."""


class SweepStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage with the two steps where concurrent workers race made atomic.

    1. Changing a trial's state: Optuna relies on ``SELECT ... FOR UPDATE``, which sqlite ignores, so two workers
       starting together could both run the baseline, and two workers failing the same stale trial would retry it twice.
    2. Creating a new trial while the budget is nearly spent: every worker checks "finished + running < budget" and
       creates the trial under the same lock, so N workers never overshoot the budget.
    The lock is a file lock next to the database on sqlite (one host), a PostgreSQL advisory lock on PostgreSQL.
    """

    def __init__(self, url: str, **kwargs: Any):
        super().__init__(url, **kwargs)
        self.url = url
        self.budget: Budget | None = None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Serialize a critical section across workers (see the class docstring)."""
        if self.url.startswith("sqlite:///"):
            path = Path(self.url.removeprefix("sqlite:///"))
            with path.with_name(path.name + ".lock").open("a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)
        elif self.url.startswith("postgresql"):
            from sqlalchemy import text

            with self.engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _LOCK_KEY})
                try:
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _LOCK_KEY})
                    conn.commit()
        else:
            yield

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Any = None) -> bool:
        # every transition, not only WAITING -> RUNNING: workers that notice the same dead worker at once would
        # otherwise all fail its trial (sqlite reads the state unlocked) and each enqueue a retry of it
        with self.lock():
            if state == TrialState.FAIL:
                self._give_a_reason(trial_id)
            return super().set_trial_state_values(trial_id, state, values)

    def _give_a_reason(self, trial_id: int) -> None:
        """Every failed trial carries its stage and reason as user attributes; one failed from outside its worker (its
        heartbeat went stale) gets them here, while it can still be changed (a finished trial cannot)."""
        trial = self.get_trial(trial_id)
        if trial.state == TrialState.RUNNING and "error" not in trial.user_attrs:
            self.set_trial_user_attr(trial_id, "failed_stage", "unknown")
            self.set_trial_user_attr(trial_id, "error", "worker lost: its heartbeat stopped (the process died or was killed) before it recorded a reason")

    def _create_new_trial(self, study_id: int, template_trial: Any = None) -> Any:
        # Optuna's cached storage calls this private hook directly (optuna 5: _CachedStorage.create_new_trial)
        if template_trial is not None or self.budget is None:  # enqueued trials and retries are not new work
            return super()._create_new_trial(study_id, template_trial)
        with self.lock():
            if self.budget.spent(self.get_all_trials(study_id, deepcopy=False), count_running=True):
                raise BudgetSpent(f"the budget of {self.budget.total} evaluations is spent")
            return super()._create_new_trial(study_id, template_trial)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "url": self.url, "budget": self.budget}


_LOCK_KEY = 0x6861696C6F  # "hailo": the advisory lock id of hailo-sweep's trial claims


def open_storage(
    url: str,
    *,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    on_stale: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
) -> SweepStorage:
    """Optuna RDB storage; with heartbeats, a trial whose worker died is found, failed and handed to ``on_stale``."""
    engine_kwargs: dict[str, Any] = {}
    kwargs: dict[str, Any] = {
        "heartbeat_interval": heartbeat_interval,
        "grace_period": grace_period,
        "heartbeat_stale_trial_callback": on_stale if heartbeat_interval else None,
    }
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs["connect_args"] = {"timeout": 60}
    else:
        engine_kwargs["pool_pre_ping"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return SweepStorage(url, engine_kwargs=engine_kwargs, **kwargs)


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


# -- progress ------------------------------------------------------------------------------------------------
class SweepObserver(Protocol):
    def sweep_started(self, total: int, remaining: int) -> None: ...
    def message(self, text: str) -> None: ...
    def trial_started(self, number: int, settings: Settings) -> None: ...
    def stage_started(self, name: str) -> None: ...
    def trial_finished(
        self, number: int, state: str, value: float | None, feasible: bool | None, *,
        failed_stage: str | None = None, error: str | None = None, duplicate_of: int | None = None, violated: tuple[str, ...] = (),
    ) -> None: ...


class NullObserver:
    def sweep_started(self, total: int, remaining: int) -> None: ...
    def message(self, text: str) -> None: ...
    def trial_started(self, number: int, settings: Settings) -> None: ...
    def stage_started(self, name: str) -> None: ...
    def trial_finished(self, number: int, state: str, value: float | None, feasible: bool | None, **details: Any) -> None: ...


class TrialFailed(Exception):
    """A trial whose stage failed; already recorded. Caught by ``study.optimize``."""


@dataclass
class TrialTiming:
    number: int
    wall_s: float
    stages_s: float

    @property
    def overhead_s(self) -> float:
        return self.wall_s - self.stages_s


@dataclass
class SweepSummary:
    study_name: str
    experiment_id: str
    parent_run_id: str
    trials_run: int
    prepare_seconds: float
    prepare_runs: int
    timings: list[TrialTiming] = field(default_factory=list)
    best_number: int | None = None
    best_value: float | None = None


# -- the sweep -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepIds:
    study_name: str
    experiment_id: str
    parent_run_id: str


class Sweep:
    """One sweep, as described by a config.

    ``init`` creates the study, the experiment and the parent run once and enqueues the baseline; ``work`` joins the
    study and runs trials until the budget is spent (any number of workers, on any number of hosts); ``run`` is both.
    """

    def __init__(self, config: SweepConfig, observer: SweepObserver | None = None, worker_index: int | None = None):
        self.config = config
        self.observer: SweepObserver = observer or NullObserver()
        self.stores = resolve_stores(config)
        self.worker_index = worker_index
        self._opened_storage: SweepStorage | None = None
        self._budget_total: int | None = None  # the budget the sampler's start-up phase is sized to
        self.requeued: list[optuna.trial.FrozenTrial] = []  # interrupted trials enqueued again by this start

    # Everything that can be checked without touching a store is checked here, first.
    def preflight(self) -> tuple[Backend, SearchSpace, Objective]:
        cfg = self.config
        model_io, outputs, dataset, normalization = load_inputs(cfg)
        space = SearchSpace(cfg.search, model_io.output_names, cfg.source)
        n_calib = len(dataset.calibration)
        if space.max_calibset_size() > n_calib:
            raise UserInputError(
                f"calibset_size {space.max_calibset_size()} is larger than the calibration set ({n_calib} samples)",
                file=cfg.source, key="search.calibset_size", fix=f"use values <= {n_calib}, or provide more calibration data",
            )
        objective = objective_of(cfg, outputs, dataset.labels is not None)
        # a task metric's per-sample values are the metric itself, so either direction prunes correctly
        task_objective = cfg.objective.metric.startswith(TASK_PREFIX)
        if cfg.pruning.enabled and (objective.multi or (objective.direction != "minimize" and not task_objective) or objective.key == THROUGHPUT_KEY or not objective.key.startswith("device.")):
            raise UserInputError(
                "pruning compares per-sample errors after emulation; it needs an error metric to minimize at stage device",
                file=cfg.source, key="pruning.enabled", fix="use an error objective (e.g. logits.softmax_mae, total.nmae) or disable pruning",
            )
        for i, c in enumerate(cfg.constraints):
            check_metric(c.metric, c.stage, outputs, dataset.labels is not None, file=cfg.source, key=f"constraints[{i}].metric", tasks=task_directions(cfg))
        backend_cls, note = select_backend(cfg.backend)
        if note:
            self.observer.message(note)
        for finding in softmax_findings(cfg.model, outputs):
            self.observer.message(f"note: {finding.message}; {finding.fix}")
        backend = backend_cls(backend_context(cfg, model_io, normalization, self.stores.work_dir))
        space.check_supported(self._baseline(space, backend), backend.validate)
        advice = backend.calibration_advice(n_calib, space.choices()["optimization_level"])
        if advice:
            self.observer.message(advice)
        try:
            device_notes = backend.check_device()  # before the first trial: a device that cannot run the target refuses the sweep
        except UserInputError as exc:
            raise UserInputError(exc.problem, file=exc.file or cfg.source, key=exc.key, fix=exc.fix) from None
        for note in device_notes:
            self.observer.message(note)
        return backend, space, objective

    def _baseline(self, space: SearchSpace, backend: Backend) -> Settings:
        return space.project(backend.default_settings(space.max_calibset_size(), space.output_names))

    # -- commands ------------------------------------------------------------------------------------------
    def init(self) -> SweepIds:
        """Create (or find) the study, the experiment and the parent run; enqueue the baseline once."""
        backend, space, objective = self.preflight()
        study, tracker, parent = self._create_stores(objective, space, backend)
        return SweepIds(study.study_name, tracker.experiment_id, parent)

    def run(self, n_trials: int | None = None) -> SweepSummary:
        """``init`` then ``work`` in this process: the single-machine path."""
        self._budget_total = n_trials
        backend, space, objective = self.preflight()
        study, tracker, parent = self._create_stores(objective, space, backend)
        return self._work(backend, space, objective, study, tracker, parent, n_trials)

    def work(self, n_trials: int | None = None) -> SweepSummary:
        """Join a study created by ``init`` and run trials until the budget is spent."""
        self._budget_total = n_trials
        backend, space, objective = self.preflight()
        study, tracker, parent = self._join_stores(objective, space)
        return self._work(backend, space, objective, study, tracker, parent, n_trials)

    def _work(
        self, backend: Backend, space: SearchSpace, objective: Objective, study: optuna.Study, tracker: Tracker, parent_run_id: str, n_trials: int | None
    ) -> SweepSummary:
        total = n_trials or self.config.trials
        budget = Budget(total=total, points=space.point_count(), canonical=space.canonical_params)
        reconcile(study, tracker)
        reconcile_uploads(study, tracker, older_than_s=float(self.config.workers.grace_period))
        remove_dead_scratch(self.stores.work_dir / "trials")
        waiting = len(_waiting(study))  # enqueued points (the baseline, retries, the user's) run even when the budget is spent
        spent = budget.spent(study.get_trials(deepcopy=False), count_running=False)
        remaining = waiting if spent else max(1, total - budget_used(study, count_running=False))
        self.observer.sweep_started(total, remaining)
        for t in self.requeued:
            self.observer.message(resume_line(t))
        timings: list[TrialTiming] = []
        prepare_runs = 0
        prepare_seconds = 0.0
        tracker.reopen(parent_run_id)
        uploader = ArtifactUploader(self.stores.mlflow_uri, self.config.name, self.stores.artifact_location)
        remove_dead_scratch(self.stores.work_dir / "uploads")
        stopping: BaseException | None = None
        with interrupts_end_trials():  # until the parent run is summarized: a second signal must not cut that short
            try:
                with backend:
                    if remaining:
                        self.observer.stage_started("prepare")
                        prepared = prepare_sweep(self.config, self.stores.work_dir, backend)
                        prepare_runs, prepare_seconds = 1, prepared.prepare_seconds
                        objective_fn = _TrialRunner(self, prepared, backend, space, objective, tracker, parent_run_id, timings, uploader)
                        if self._opened_storage is not None:
                            self._opened_storage.budget = budget
                        self._optimize_until_spent(study, objective_fn, budget)
                        diag = self.config.diagnostics
                        if diag.layer_noise == "best" and diag.layer_noise_best:
                            self.observer.stage_started("layer noise (best trials)")
                            analyse_best(study, prepared, backend, space, uploader, k=diag.layer_noise_best,
                                         samples=diag.layer_noise_samples, message=self.observer.message,
                                         lock=self._opened_storage.lock if self._opened_storage is not None else contextlib.nullcontext)
            except BaseException as exc:
                stopping = exc
                if is_disk_full(exc) and not isinstance(exc, StoresFull):  # e.g. the Optuna store on a full disk
                    raise StoresFull(f"the stores ran out of space: {str(exc).splitlines()[0][:300]}; free some space and run the sweep again") from exc
                if isinstance(exc, KeyboardInterrupt) and not getattr(exc, "trial_recorded", False):
                    self.observer.message(f"sweep interrupted ({signame_of(exc)}) outside a trial: nothing was lost; run it again to continue")
                raise
            finally:
                uploads = uploader.close()  # every file of every trial is in place before the sweep returns
                for failure in uploads.failures:
                    self.observer.message(f"upload failed for run {failure.run_id} ({failure.what}): {failure.error}")
                extra = {"prepare_runs": float(prepare_runs), "prepare_s": prepare_seconds} if remaining else {}
                extra.update({"uploads_failed": float(len(uploads.failures)), "upload_s": uploads.seconds})
                try:
                    self._summarize_parent(study, tracker, parent_run_id, objective, extra)
                except Exception:
                    if stopping is None:
                        raise  # otherwise the reason the sweep stops (a full disk, an outage) is the error to report
        best = chosen_trial(study)
        return SweepSummary(
            study_name=study.study_name,
            experiment_id=tracker.experiment_id,
            parent_run_id=parent_run_id,
            trials_run=len(timings),
            prepare_seconds=prepare_seconds,
            prepare_runs=prepare_runs,
            timings=timings,
            best_number=best.number if best else None,
            best_value=best.values[0] if best else None,
        )

    def _optimize_until_spent(self, study: optuna.Study, objective_fn: Callable[[optuna.Trial], Any], budget: Budget) -> None:
        """Run trials until the budget is spent, then stay while other workers' trials are in progress.

        A trial whose worker died still counts as running until its heartbeat goes stale; this worker then fails it
        (Optuna calls ``StaleTrialHandler``, which retries it) and runs the retry. So no budget is lost to a dead worker.
        """
        # a short poll: waiting a whole heartbeat interval (30 s by default) kept every idle worker, and so `run --jobs N`,
        # alive up to 30 s after the last trial had finished
        poll = min(float(self.config.workers.heartbeat_interval), 1.0)

        def spent(count_running: bool) -> bool:
            return budget.spent(study.get_trials(deepcopy=False), count_running=count_running)

        while True:
            if not spent(True) or _waiting(study):
                try:
                    study.optimize(objective_fn, n_trials=budget.slack * budget.total, catch=(TrialFailed,))
                except BudgetSpent:
                    pass  # the remaining trials are taken by other workers
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # a dead worker's trial: failed here, and its retry enqueued
            if not spent(True) or _waiting(study):
                continue
            if not any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False)):
                return  # budget spent, nothing in progress anywhere
            time.sleep(poll)  # others' trials are in progress: wait for them to finish or to go stale

    # -- stores --------------------------------------------------------------------------------------------
    def _storage(self) -> SweepStorage:
        w = self.config.workers
        self._opened_storage = open_storage(
            self.stores.optuna_url,
            heartbeat_interval=w.heartbeat_interval,
            grace_period=w.grace_period,
            on_stale=StaleTrialHandler(self.stores.mlflow_uri, self.config.name, w.max_retry),
        )
        return self._opened_storage

    def _tracker(self) -> Tracker:
        if self.stores.mlflow_uri.startswith("sqlite:///"):
            Path(self.stores.mlflow_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return Tracker(self.stores.mlflow_uri, self.config.name, self.stores.artifact_location)

    def _check_objective(self, study: optuna.Study, objective: Objective) -> None:
        recorded = study.user_attrs.get("objective")
        if recorded is not None and recorded != objective.record():
            raise UserInputError(
                f"study '{self.config.name}' was created with objective {recorded}, the config now asks for {objective.record()}",
                file=self.config.source, key="objective",
                fix="restore the original objective, or give the sweep a new name so a new study is created",
            )

    def _create_stores(self, objective: Objective, space: SearchSpace, backend: Backend) -> tuple[optuna.Study, Tracker, str]:
        cfg = self.config
        check_stores_writable(self.stores, cfg.source)  # both stores writable and reachable before anything is created
        tracker = self._tracker()
        tracker.check_reachable()
        study = with_retries(
            lambda: optuna.create_study(
                study_name=cfg.name, storage=self._storage(), directions=list(objective.directions), sampler=self._sampler(space),
                pruner=self._pruner(), load_if_exists=True,
            ),
            what=f"open the study in {redact_url(self.stores.optuna_url)}",
        )
        self._check_objective(study, objective)
        assert self._opened_storage is not None
        # under the storage's lock: concurrent `init`s would each see no parent run and no baseline, and each create one
        with self._opened_storage.lock():
            parent = study.user_attrs.get("mlflow_parent_run_id")
            if parent is None or not tracker.run_exists(parent):
                parent = tracker.create_parent_run(
                    RunRecord(
                        name=cfg.name,
                        params=self._sweep_params(space, backend),
                        tags={"optuna.study_name": cfg.name, "hailo_sweep.backend": backend.name, "hailo_sweep.target": cfg.target},
                    )
                )
                study.set_user_attr("mlflow_parent_run_id", parent)
                study.set_user_attr("mlflow_experiment_id", tracker.experiment_id)
                study.set_user_attr("objective", objective.record())
                study.set_user_attr("backend", backend.name)
            self.requeued = requeue_interrupted(study)
            # enqueued until evaluated: an interrupted baseline was enqueued again just above, whoever ran it
            if cfg.sampler.name != "grid" and not any(_baseline_pending_or_done(t) for t in study.get_trials(deepcopy=False)):
                study.enqueue_trial(space.params_of(self._baseline(space, backend)), user_attrs={"baseline": True})
                study.set_user_attr("baseline_enqueued", True)
        return study, tracker, parent

    def _join_stores(self, objective: Objective, space: SearchSpace) -> tuple[optuna.Study, Tracker, str]:
        cfg = self.config
        check_stores_writable(self.stores, cfg.source)
        try:
            study = with_retries(
                lambda: optuna.load_study(study_name=cfg.name, storage=self._storage(), sampler=self._sampler(space), pruner=self._pruner()),
                what=f"open the study in {redact_url(self.stores.optuna_url)}",
            )
        except KeyError:
            study = None
        parent = study.user_attrs.get("mlflow_parent_run_id") if study is not None else None
        if study is None or parent is None:
            raise UserInputError(
                f"sweep '{cfg.name}' has not been initialized in {redact_url(self.stores.optuna_url)}",
                file=cfg.source, key="name", fix=f"run `hailo-sweep init {cfg.source}` once before starting workers",
            )
        self._check_objective(study, objective)
        assert self._opened_storage is not None
        with self._opened_storage.lock():
            self.requeued = requeue_interrupted(study)
        return study, self._tracker(), parent

    def _pruner(self) -> optuna.pruners.BasePruner:
        p = self.config.pruning
        if not p.enabled:
            return optuna.pruners.NopPruner()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.pruners.WilcoxonPruner(p_threshold=p.p_threshold, n_startup_steps=0)

    def _sampler(self, space: SearchSpace) -> optuna.samplers.BaseSampler:
        s = self.config.sampler
        seed = self._seed()
        budget = self._budget_total or self.config.trials
        return make_sampler(s, budget=budget, points=space.point_count(), choices=space.choices(), seed=seed)

    def _seed(self) -> int | None:
        seed = self.config.sampler.seed
        if seed is not None and self.worker_index is not None:
            seed = seed + 1000 * (self.worker_index + 1)  # workers must not replay each other's random sequence
        return seed

    def _sweep_params(self, space: SearchSpace, backend: Backend) -> dict[str, Any]:
        cfg = self.config
        return {
            "model": str(cfg.model),
            "target": cfg.target,
            "backend": backend.name,
            "objective": f"{cfg.objective.mode}:{cfg.objective.stage}:{cfg.objective.metric}" + (f"<={cfg.objective.budget}" if cfg.objective.budget is not None else ""),
            "sampler": f"{cfg.sampler.name}(seed={cfg.sampler.seed})",
            "trials": cfg.trials,
            "search_space": json.dumps(space.choices()),
            "constraints": json.dumps([c.model_dump() for c in cfg.constraints]),
            **self.stores.describe(),
        }

    def _summarize_parent(self, study: optuna.Study, tracker: Tracker, parent: str, objective: Objective, extra: dict[str, float]) -> None:
        trials = study.get_trials(deepcopy=False)
        counts = {state.name.lower(): sum(1 for t in trials if t.state == state) for state in FINISHED_STATES}
        metrics: dict[str, float] = {f"trials_{k}": float(v) for k, v in counts.items()}
        metrics.update(extra)
        compiled = [t for t in trials if "compile_s" in t.user_attrs.get("timing", {})]
        metrics["compiles_performed"] = float(len(compiled))
        metrics["compiles_avoided"] = float(counts.get("pruned", 0))
        if compiled:
            mean_compile = sum(t.user_attrs["timing"]["compile_s"] for t in compiled) / len(compiled)
            metrics["compile_time_saved_s_est"] = metrics["compiles_avoided"] * mean_compile
        best = chosen_trial(study)
        tags = {}
        if best is not None:
            metrics["best_value"] = float(best.values[0])
            metrics["best_trial"] = float(best.number)
        if objective.multi:
            try:
                metrics["pareto_front_size"] = float(len(study.best_trials))
            except ValueError:
                pass
        if best is not None:
            tags.update({"hailo_sweep.best_run_id": str(best.user_attrs.get("mlflow_run_id", "")), "hailo_sweep.best_trial": str(best.number)})
        tracker.log_to(parent, RunRecord(name="", metrics=metrics, tags=tags))
        study_report.log_summary(study, tracker, parent, self.stores.work_dir / "summary", self.observer.message)
        running = any(t.state == TrialState.RUNNING for t in trials)
        if not running:  # other workers are still at it: the last one to stop closes the parent
            tracker.finish(parent)


def _baseline_pending_or_done(t: optuna.trial.FrozenTrial) -> bool:
    """A baseline trial that is enqueued, running or evaluated (an interrupted one is not: it is enqueued again)."""
    return bool(t.user_attrs.get("baseline")) and not (t.state == TrialState.FAIL and t.user_attrs.get(INTERRUPTED_ATTR))


def _waiting(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.WAITING,))


def budget_used(study: optuna.Study, *, count_running: bool) -> int:
    """Evaluations that count against the budget: finished trials (a failed trial that was retried counts once,
    through its retry; a reused duplicate is free) and, with ``count_running``, the ones in progress on any worker."""
    return _used(study.get_trials(deepcopy=False), count_running=count_running)


def _evaluated(trials: Sequence[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    superseded = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return [
        t for t in trials
        if t.state in FINISHED_STATES and "duplicate_of" not in t.user_attrs and not (t.state == TrialState.FAIL and t.number in superseded)
    ]


def _used(trials: Sequence[optuna.trial.FrozenTrial], *, count_running: bool) -> int:
    used = len(_evaluated(trials))
    if count_running:
        used += sum(1 for t in trials if t.state == TrialState.RUNNING)
    return used


@dataclass(frozen=True)
class Budget:
    """When a sweep is done: ``total`` evaluations (the user's budget: a reused duplicate costs nothing), or every one
    of the search space's ``points`` evaluated, or ``slack`` x ``total`` trials in all (a sampler that keeps proposing
    finished points must still end)."""

    total: int
    points: int
    canonical: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # equivalent params -> one point
    slack: int = 4

    def spent(self, trials: Sequence[optuna.trial.FrozenTrial], *, count_running: bool) -> bool:
        if _used(trials, count_running=count_running) >= self.total:
            return True
        canonical = self.canonical or dict
        if len({point_key(canonical(dict(t.params))) for t in _evaluated(trials) if t.params}) >= self.points:
            return True
        return sum(1 for t in trials if t.state != TrialState.WAITING) >= self.slack * self.total


class StaleTrialHandler:
    """Optuna found a trial whose worker stopped sending heartbeats: end its MLflow run as FAILED, then retry it."""

    def __init__(self, tracking_uri: str, experiment_name: str, max_retry: int):
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            tracker = Tracker(self.tracking_uri, self.experiment_name)
            tracker.set_tags(run_id, {"hailo_sweep.state": "FAIL", "hailo_sweep.error": "worker lost: no heartbeat within the grace period"})
            tracker.finish(run_id, failed=True)
        self.retry(study, trial)


def remove_dead_scratch(trials_dir: Path) -> int:
    """Delete the scratch directories of workers on this host that died mid-trial (``NNNN-<host>-<pid>``)."""
    removed = 0
    host = socket.gethostname()
    for path in trials_dir.glob(f"*-{host}-*") if trials_dir.is_dir() else ():
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


def with_retries(fn: Callable[[], Any], *, what: str, attempts: int = 5, first_delay: float = 0.5) -> Any:
    """Call ``fn``; on a transient storage error (e.g. concurrent first-time schema creation) retry with backoff."""
    from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (IntegrityError, OperationalError, DBAPIError) as exc:
            if attempt == attempts:
                raise StoreUnavailable(
                    redact_url(f"could not {what} after {attempts} attempts: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
                ) from exc
            time.sleep(delay * (0.5 + random.random()))
            delay *= 2
    raise AssertionError("unreachable")


class StoreUnavailable(Exception):
    """A store stayed unreachable after bounded retries."""


class _TrialRunner:
    """The Optuna objective: one trial from suggestion to record."""

    def __init__(
        self,
        sweep: Sweep,
        prepared: Prepared,
        backend: Backend,
        space: SearchSpace,
        objective: Objective,
        tracker: Tracker,
        parent_run_id: str,
        timings: list[TrialTiming],
        uploader: ArtifactUploader | None = None,
    ):
        self.sweep, self.prepared, self.backend, self.space = sweep, prepared, backend, space
        self.objective, self.tracker, self.parent_run_id, self.timings = objective, tracker, parent_run_id, timings
        self.config = sweep.config
        self.uploader = uploader or ArtifactUploader(sweep.stores.mlflow_uri, sweep.config.name, sweep.stores.artifact_location, background=False)
        self.versions = {"hailo_sweep": __version__, "optuna": optuna.__version__, **_lib_versions(), **backend.versions()}

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        self.stage, self.run_id = "suggest", None
        try:
            return self._trial(trial)
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (see faults.py): on record, then the process stops
            self._record_interrupted(trial, signame_of(exc))
            exc.trial_recorded = True  # type: ignore[attr-defined]
            raise

    def _on_stage(self, name: str) -> None:
        self.stage = name
        self.sweep.observer.stage_started(name)

    def _trial(self, trial: optuna.Trial) -> float | list[float]:
        start = time.perf_counter()
        settings = self.space.suggest(trial)
        obs = self.sweep.observer
        obs.trial_started(trial.number, settings)
        duplicate = self._duplicate_of(trial)
        if duplicate is not None:
            return self._reuse(trial, settings, duplicate, start)
        record_s = 0.0
        t0 = time.perf_counter()
        self.stage = "start"
        try:
            run_id = self.tracker.start_child(
                self.parent_run_id, RunRecord(name=f"trial-{trial.number:04d}", params=self._params(settings), tags=self._tags(trial, settings))
            )
        except TrackingUnavailable as exc:
            # nothing has been computed yet: fail the trial with the reason and stop this worker (no unrecorded compiles)
            trial.set_user_attr("failed_stage", "record")
            trial.set_user_attr("error", str(exc)[:2000])
            raise
        self.run_id = run_id
        trial.set_user_attr("mlflow_run_id", run_id)
        record_s += time.perf_counter() - t0
        work_dir = self.sweep.stores.work_dir / "trials" / f"{trial.number:04d}-{socket.gethostname()}-{os.getpid()}"
        work_dir.mkdir(parents=True, exist_ok=True)
        try:
            try:
                result = run_trial(
                    self.prepared, self.backend, settings, work_dir, on_stage=self._on_stage,
                    timeouts=self.config.timeouts.model_dump(), diagnostics=self.config.diagnostics,
                    checkpoint=self._checkpoint(trial) if self.config.pruning.enabled else None,
                )
            except StopTrial as stop:
                assert stop.result is not None
                self.stage = "record"
                self._record_pruned(trial, run_id, stop.result, work_dir, str(stop))
                obs.trial_finished(trial.number, "PRUNED (before compile)", None, None)
                raise optuna.TrialPruned() from None
            self._on_stage("record")
            t0 = time.perf_counter()
            value, feasible = self._record(trial, run_id, result, work_dir, start, record_s)
            record_s += time.perf_counter() - t0
        except (optuna.TrialPruned, KeyboardInterrupt):
            raise
        except OSError as exc:  # a write error while recording (a full disk, an I/O error): this trial fails
            self._record_write_error(trial, run_id, exc)
            raise
        except BaseException as exc:
            if is_disk_full(exc):  # e.g. sqlite's "database or disk is full", wrapped by the tracking client
                self._record_write_error(trial, run_id, exc)
            if isinstance(exc, TrackingUnavailable):
                trial.set_user_attr("failed_stage", "record")
                trial.set_user_attr("error", str(exc)[:2000])
            elif not isinstance(exc, TrialFailed):  # any other error: the trial still says where and why
                trial.set_user_attr("failed_stage", self.stage)
                trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:2000])
            try:
                self.tracker.finish(run_id, failed=True)  # never leave the run RUNNING
            except TrackingUnavailable:
                pass  # the Optuna trial fails too; `reconcile` ends the run once the store is back
            raise
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        wall = time.perf_counter() - start
        timing = TrialTiming(trial.number, wall, result.stage_seconds() + record_s)
        self.timings.append(timing)
        timing_attr = {"wall_s": wall, "stages_s": timing.stages_s, "record_s": record_s, "overhead_s": timing.overhead_s}
        timing_attr.update({f"{t.name}_s": t.seconds for t in result.timings})  # every stage, compile_s included
        trial.set_user_attr("timing", timing_attr)
        if value is None:
            obs.trial_finished(trial.number, "FAIL", None, None, failed_stage=result.failed_stage, error=result.error)
            raise TrialFailed(f"trial {trial.number} failed in stage {result.failed_stage}: {result.error}")
        violated = tuple(k for k, v in (trial.constraints or {}).items() if v > 0)
        obs.trial_finished(trial.number, "COMPLETE", value[0], feasible, violated=violated)
        return value if self.objective.multi else value[0]  # type: ignore[return-value]

    # -- trials that did not complete ----------------------------------------------------------------------
    def _record_interrupted(self, trial: optuna.Trial, signame: str) -> None:
        record_interrupted(trial, self.tracker, self.run_id, self.stage, signame)
        self.sweep.observer.message(f"trial {trial.number} interrupted ({signame}) in stage {self.stage}: the next `hailo-sweep run` retries it")

    def _record_write_error(self, trial: optuna.Trial, run_id: str, exc: BaseException) -> None:
        """A write failed while recording: the trial fails; a full disk stops the sweep (see faults.py)."""
        reason = record_write_error(trial, self.tracker, run_id, exc)
        self.sweep.observer.trial_finished(trial.number, "FAIL", None, None, failed_stage="record", error=reason)
        if is_disk_full(exc):
            where = f"{exc.strerror} ({exc.filename or 'the stores'})" if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0][:300]
            raise StoresFull(f"trial {trial.number} could not be recorded: {where}; the sweep stopped, free some space and run it again") from exc
        raise TrialFailed(reason) from exc

    # -- pruning -------------------------------------------------------------------------------------------
    def _checkpoint(self, trial: optuna.Trial) -> Callable[[str, TrialResult, dict[str, np.ndarray]], None]:
        """After emulation: report paired per-sample errors of the objective; stop before the compile if pruned."""

        def check(stage: str, result: TrialResult, emulated: dict[str, np.ndarray]) -> None:
            metric = self.objective.key.removeprefix("device.")
            per_sample = self.prepared.per_sample(metric, emulated)
            groups = np.array_split(per_sample, min(self.config.pruning.groups, len(per_sample)))
            for step, group in enumerate(groups):
                trial.report(float(group.mean()), step)
            if trial.should_prune():
                raise StopTrial(f"pruned after {stage}")

        return check

    def _record_pruned(self, trial: optuna.Trial, run_id: str, result: TrialResult, work_dir: Path, reason: str) -> None:
        """A pruned trial keeps the emulated metrics it reached, and its stage and reason, in both stores."""
        metrics = dict(result.metrics)
        trial.set_user_attr("pruned_at", "emulate")
        trial.set_user_attr("reason", reason)
        trial.set_user_attr("metrics", {k: v for k, v in metrics.items() if k.startswith("emulated.total.") or k.startswith("time.")})
        artifacts: list[tuple[Path, str]] = []
        if result.script:
            script = work_dir / result.script_name
            script.write_text(result.script, encoding="utf-8")
            artifacts.append((script, ""))
        artifacts.extend((log, "logs") for log in result.logs if log.is_file())
        self.tracker.end_child(
            run_id,
            RunRecord(name="", params=result.params, metrics=metrics, artifacts=artifacts,
                      tags={"hailo_sweep.state": "PRUNED", "hailo_sweep.pruned_at": "emulate", "hailo_sweep.reason": reason}),
        )

    # -- record --------------------------------------------------------------------------------------------
    def _record(self, trial: optuna.Trial, run_id: str, result: TrialResult, work_dir: Path, start: float, record_s: float) -> tuple[float | None, bool]:
        """Write what the sweep and queries read now (params, metrics, tags, attrs); hand the files to the uploader."""
        t0 = time.perf_counter()
        metrics = dict(result.metrics)
        tags: dict[str, str] = {"hailo_sweep.flags": ",".join(result.flags)} if result.flags else {}
        value: list[float] | None = None
        feasible = False
        if result.ok:
            missing = [k for k in self.objective.keys if k not in metrics]
            if missing:
                result.failed_stage, result.error = "record", f"objective metric {', '.join(missing)} was not produced"
            else:
                value = [metrics[k] for k in self.objective.keys]
        if result.ok and value is not None:
            constraints = constraint_values(self.config, metrics, self.objective)
            if "optimization_level_lowered" in result.flags:
                # the toolchain measured another level than the one asked for: never count it as that level
                constraints["optimization_level_honoured"] = 1.0
            metric_names = constraint_metric_names(self.config, self.objective)
            for name, v in constraints.items():
                trial.set_constraint(name, v)
                metrics[metric_names.get(name, f"constraint.{name}")] = v
            feasible = all(v <= 0 for v in constraints.values())
            metrics.update(headline_metrics(self.config, metrics, value[0], feasible))
            tags.update({"hailo_sweep.state": "COMPLETE", "hailo_sweep.feasible": str(feasible)})
            if result.findings:
                tags["hailo_sweep.findings"] = ",".join(sorted({f.code for f in result.findings}))
        else:
            tags.update({"hailo_sweep.state": "FAIL", "hailo_sweep.failed_stage": str(result.failed_stage), "hailo_sweep.error": str(result.error)})
            trial.set_user_attr("failed_stage", result.failed_stage)
            trial.set_user_attr("error", (result.error or "")[:2000])
        staging = self._stage_files(work_dir)
        logs = [staging / log.relative_to(work_dir) if log.is_relative_to(work_dir) else log for log in result.logs]  # the toolchain's own words
        compiled = None
        model_id = None
        if value is not None and result.compiled is not None:
            compiled = staging / result.compiled.path.relative_to(work_dir) if result.compiled.path.is_relative_to(work_dir) else result.compiled.path
            # the id is needed now (trial attrs are read-only once the trial ends); the file is uploaded later
            model_id = self.tracker.create_model(
                run_id,
                LoggedModelRecord(
                    name=f"{self.config.name}-trial-{trial.number:04d}", path=compiled, model_type=result.compiled.kind,
                    params=self.space.params_of(result.settings),
                    tags={"optuna.trial_number": str(trial.number), "hailo_sweep.feasible": str(feasible)},
                ),
            )
            trial.set_user_attr("mlflow_model_id", model_id)
            trial.set_user_attr("compiled_name", result.compiled.path.name)
            # the compiled model is what `best --export` delivers: uploaded now, so a trial told COMPLETE always has it
            # (a write error here fails the trial, see _record_write_error); plots and reports follow in the background
            self.tracker.upload_model(model_id, compiled)
        report = self._report(trial, result, metrics, value, feasible)
        metrics["time.trial_s"] = time.perf_counter() - start
        metrics["time.record_s"] = record_s + (time.perf_counter() - t0)  # the synchronous part; uploads: time.upload_s
        report["metrics"] = metrics
        linked = [k for k in metrics if k in HEADLINE_METRICS or k in self.objective.keys or k.endswith(".over_limit")
                  or k in ("compile.size_bytes", "device.latency_ms")] if model_id else []  # the Models tab's columns
        self.tracker.log_to(run_id, RunRecord(name="", params=result.params, metrics=metrics, tags=tags, model_id=model_id, model_metrics=tuple(linked)))
        trial.set_user_attr("metrics", {k: metrics[k] for k in _summary_keys(metrics, self.objective.keys)})
        outputs = [o.name for o in self.prepared.outputs]
        self.uploader.submit(
            run_id, f"trial {trial.number} artifacts",
            partial(_upload_trial, run_id=run_id, staging=staging, result=result, metrics=metrics, report=report,
                    outputs=outputs, compiled=compiled, failed=value is None, logs=logs),
            staging, run_failed=value is None,
        )
        return value, feasible

    def _stage_files(self, work_dir: Path) -> Path:
        """Move the trial's scratch directory where the uploader picks it up (the trial's scratch is then free)."""
        staging = self.sweep.stores.work_dir / "uploads" / work_dir.name
        staging.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        try:
            work_dir.rename(staging)
        except OSError:  # another file system: copy
            shutil.copytree(work_dir, staging)
        return staging

    def _report(self, trial: optuna.Trial, result: TrialResult, metrics: dict[str, float], value: float | None, feasible: bool) -> dict[str, Any]:
        return {
            "trial": trial.number,
            "settings": result.settings.as_params(),
            "objective": {"keys": list(self.objective.keys), "directions": list(self.objective.directions),
                          "values": value, "value": value[0] if value else None},
            "feasible": feasible,
            "metrics": metrics,
            "backend_params": result.params,
            "flags": result.flags,
            "notes": result.notes,
            "stages": [{"name": t.name, "seconds": t.seconds, "ok": t.ok} for t in result.timings],
            "failed_stage": result.failed_stage,
            "error": result.error,
            "traceback": result.traceback,
            "lsb_histograms": result.lsb_histograms,
            "findings": [asdict(f) for f in result.findings],
            "explanation": explain(metrics, [o.name for o in self.prepared.outputs]) if result.ok else [],
            "versions": self.versions,
            "model_sha256": self.prepared.model_sha256,
            "calibration_sha256": self.prepared.dataset.calibration_sha256,
            "evaluation_sha256": self.prepared.dataset.evaluation_sha256,
        }

    def _params(self, settings: Settings) -> dict[str, Any]:
        return {
            **self.space.params_of(settings),  # spelled as in the config and in Optuna: output_16bit=all, not featmap,logits
            "target": self.config.target,
            "backend": self.backend.name,
            "calib.n": settings.calibset_size,
            "calib.sha256": self.prepared.dataset.calibration_sha256,
            "eval.n": len(self.prepared.dataset.evaluation),
            "eval.sha256": self.prepared.dataset.evaluation_sha256,
            "model.sha256": self.prepared.model_sha256,
        }

    def _tags(self, trial: optuna.Trial, settings: Settings) -> dict[str, str]:
        baseline = bool(trial.user_attrs.get("baseline")) or (
            self.config.sampler.name == "grid" and settings == self.sweep._baseline(self.space, self.backend)
        )
        return {
            "optuna.study_name": self.config.name,
            "optuna.trial_number": str(trial.number),
            "hailo_sweep.state": "RUNNING",
            "hailo_sweep.backend": self.backend.name,
            "hailo_sweep.target": self.config.target,
            "hailo_sweep.baseline": str(baseline),
            "hailo_sweep.worker": f"{socket.gethostname()}:{os.getpid()}",
            **{f"version.{k}": v for k, v in self.versions.items()},
        }

    # -- duplicates ----------------------------------------------------------------------------------------
    def _duplicate_of(self, trial: optuna.Trial) -> optuna.trial.FrozenTrial | None:
        """A finished trial at the same point (the same canonical settings: a knob without effect under the others,
        e.g. a clipping percentile under minmax calibration, does not make a new point): evaluating it again would
        repeat the same work."""
        mine = point_key(self.space.canonical_params(dict(trial.params)))
        for other in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if other.number != trial.number and point_key(self.space.canonical_params(dict(other.params))) == mine:
                return other
        return None

    def _replace_repeat(self, trial: optuna.Trial, original: optuna.trial.FrozenTrial) -> None:
        """The sampler proposed a finished point: enqueue one that no trial has taken, so the next trial makes progress."""
        s = self.config.sampler
        if not s.replace_repeats or s.name == "grid":
            return
        study = trial.study
        storage = self.sweep._opened_storage
        with storage.lock() if storage is not None else contextlib.nullcontext():
            trials = study.get_trials(deepcopy=False)
            total = self.sweep._budget_total or self.config.trials
            others = [t for t in trials if t.number != trial.number]  # this trial is a free repeat, running still
            if _used(others, count_running=True) + sum(t.state == TrialState.WAITING for t in others) >= total:
                return  # an enqueued trial runs even past the budget: only replace while it has room
            params = next_unevaluated(trials, self.space.choices(), random.Random(f"{self.sweep._seed()}-{trial.number}"), canonical=self.space.canonical_params)
            if params is not None:
                study.enqueue_trial(params, user_attrs={"replaces_repeat_of": original.number})

    def _reuse(self, trial: optuna.Trial, settings: Settings, original: optuna.trial.FrozenTrial, start: float) -> float:
        assert original.values is not None
        for name, v in (original.constraints or {}).items():
            trial.set_constraint(name, v)
        for step, v in original.intermediate_values.items():  # so the pruner can compare against it too
            trial.report(v, step)
        source_run = original.user_attrs.get("mlflow_run_id", "")
        metrics = dict(original.user_attrs.get("metrics", {}))
        tags = {
            **self._tags(trial, settings), "hailo_sweep.state": "COMPLETE",
            "hailo_sweep.duplicate_of": str(original.number), "hailo_sweep.duplicate_of_run_id": str(source_run),
        }
        feasible = all(v <= 0 for v in (original.constraints or {}).values())
        tags["hailo_sweep.feasible"] = str(feasible)
        metrics.update(headline_metrics(self.config, metrics, original.values[0], feasible))
        run_id = self.tracker.start_child(self.parent_run_id, RunRecord(name=f"trial-{trial.number:04d}", params=self._params(settings), metrics=metrics, tags=tags))
        self.tracker.finish(run_id)
        for key in ("mlflow_model_id", "compiled_name", "metrics"):
            if key in original.user_attrs:
                trial.set_user_attr(key, original.user_attrs[key])
        trial.set_user_attr("mlflow_run_id", run_id)
        trial.set_user_attr("duplicate_of", original.number)
        self.timings.append(TrialTiming(trial.number, time.perf_counter() - start, 0.0))
        violated = tuple(k for k, v in (original.constraints or {}).items() if v > 0)
        self.sweep.observer.trial_finished(trial.number, "COMPLETE (reused)", original.values[0], feasible, duplicate_of=original.number, violated=violated)
        self._replace_repeat(trial, original)
        return original.values if self.objective.multi else original.values[0]  # type: ignore[return-value]


def _upload_trial(
    tracker: Tracker, *, run_id: str, staging: Path, result: TrialResult, metrics: dict[str, float], report: dict[str, Any],
    outputs: list[str], compiled: Path | None, failed: bool, logs: Sequence[Path] = (),
) -> None:
    """The background half of recording a trial: plots, tables, the report and a copy of the compiled model as run
    artifacts; then the run ends. (The LoggedModel's file is uploaded synchronously by ``_record``.)"""
    start = time.perf_counter()
    artifacts: list[tuple[Path, str]] = []
    if result.script:
        script = staging / result.script_name
        script.write_text(result.script, encoding="utf-8")
        artifacts.append((script, ""))
    artifacts.extend((log, "logs") for log in logs if log.is_file())
    if compiled is not None:
        artifacts.append((compiled, "compiled"))
        artifacts.extend(_diagnosis_artifacts(result, metrics, outputs, staging))
    report_path = staging / "report.json"
    report_path.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    artifacts.append((report_path, ""))
    for local, artifact_dir in artifacts:
        tracker.client.log_artifact(run_id, str(local), artifact_path=artifact_dir or None)
    tracker.log_to(run_id, RunRecord(name="", metrics={"time.upload_s": time.perf_counter() - start}))
    tracker.finish(run_id, failed=failed)


def _diagnosis_artifacts(result: TrialResult, metrics: dict[str, float], outputs: list[str], work_dir: Path) -> list[tuple[Path, str]]:
    """Plots and tables that explain where this trial's error comes from (see ``hailo-sweep diagnose``)."""
    out = [(diag_plots.ladder_plot(metrics, outputs, work_dir / "error_ladder.png"), "plots")]
    if result.lsb_histograms:
        out.append((diag_plots.lsb_histogram_plot(result.lsb_histograms, work_dir / "lsb_histogram.png"), "plots"))
    if result.layer_noise:
        out.extend(layer_noise_artifacts(result.layer_noise, work_dir))
    findings = work_dir / "findings.json"
    findings.write_text(json.dumps([asdict(f) for f in result.findings], indent=1, default=str), encoding="utf-8")
    out.append((findings, "diagnosis"))
    return out


def _summary_keys(metrics: dict[str, float], objective_keys: Sequence[str]) -> list[str]:
    """The metrics kept in Optuna's user attrs (the full set lives in MLflow)."""
    keep = set(objective_keys)
    for k in metrics:
        if k.startswith(("device.total.", "emulated.total.", "agreement.total.", "constraint.", "findings.", "_")) or k.endswith(".over_limit") \
                or k in ("device.throughput_fps", "device.latency_ms", "compile.size_bytes"):
            keep.add(k)
        if k.startswith(("device.", "emulated.")) and (k.endswith((".accuracy", ".accuracy_drop", ".softmax_mae", ".prob_mae")) or ".task." in k):
            keep.add(k)
    return sorted(k for k in keep if k in metrics)


def _lib_versions() -> dict[str, str]:
    import mlflow
    import numpy

    return {"mlflow": mlflow.__version__, "numpy": numpy.__version__}

