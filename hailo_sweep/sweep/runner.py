"""One trial from suggestion to record, shared by the local loop, the ``worker`` loop and the cluster driver.

``begin`` takes the sampler's point (a point already evaluated is reused, not run again) and opens the trial's run;
``finish`` records a ``TrialResult`` and says what Optuna is told. ``__call__`` is both around a local ``run_trial``:
the Optuna objective of ``study.optimize``. The cluster driver calls ``begin``, runs the stages on its workers, then
``finish``.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import optuna
from optuna.trial import TrialState

from hailo_sweep import __version__
from hailo_sweep.backends.base import Backend
from hailo_sweep.pipeline import Prepared
from hailo_sweep.trial import StopTrial, TrialResult, run_trial
from hailo_sweep.search_space import SearchSpace
from hailo_sweep.settings import Settings
from hailo_sweep.sweep.budget import used
from hailo_sweep.sweep.faults import StoresFull, is_disk_full, record_interrupted, record_write_error, signals_deferred, signame_of
from hailo_sweep.sweep.objective import Objective, headline_metrics
from hailo_sweep.sweep.observer import TrialTiming
from hailo_sweep.sweep.recorder import TrialRecorder, lib_versions
from hailo_sweep.sweep.recording import ArtifactUploader
from hailo_sweep.sweep.sampling import next_unevaluated, point_key
from hailo_sweep.tracking import RunRecord, Tracker, TrackingUnavailable

if TYPE_CHECKING:
    from hailo_sweep.sweep.orchestrate import Sweep


class TrialFailed(Exception):
    """A trial whose stage failed; already recorded. Caught by ``study.optimize`` (the driver tells FAIL)."""


@dataclass
class RunningTrial:
    """A trial between ``begin`` and ``finish``: its point, its run, its scratch directory and where it is."""

    trial: optuna.Trial
    settings: Settings
    start: float
    run_id: str | None = None
    work_dir: Path | None = None
    stage: str = "start"
    record_s: float = 0.0


class TrialRunner:
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
        uploader = uploader or ArtifactUploader(sweep.stores.mlflow_uri, sweep.config.name, sweep.stores.artifact_location, background=False)
        self.recorder = TrialRecorder(
            config=self.config, space=space, objective=objective, prepared=prepared, tracker=tracker, uploader=uploader,
            parent_run_id=parent_run_id, backend_name=backend.name, baseline=sweep.baseline(space, backend),
            versions={"hailo_sweep": __version__, "optuna": optuna.__version__, **lib_versions(), **backend.versions()},
            staging_root=sweep.stores.work_dir / "uploads",
        )
        self.current: RunningTrial | None = None  # the local loop's trial in progress (for an interrupt)
        self._points: dict[int, tuple[tuple[str, object], ...]] = {}  # finished trial -> its canonical point (_duplicate_of)

    # -- the local objective ---------------------------------------------------------------------------------
    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        self.current = None
        try:
            begun = self.begin(trial)
            if not isinstance(begun, RunningTrial):
                return begun
            return self.finish(begun, lambda: self._run_here(begun))
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (see faults.py): on record, then the process stops
            self.interrupted(trial, self.current, signame_of(exc))
            exc.trial_recorded = True  # type: ignore[attr-defined]
            raise

    def _run_here(self, running: RunningTrial) -> TrialResult:
        assert running.work_dir is not None

        def on_stage(name: str) -> None:
            running.stage = name
            self.sweep.observer.stage_started(name)

        try:
            return run_trial(
                self.prepared, self.backend, running.settings, running.work_dir, on_stage=on_stage,
                timeouts=self.config.timeouts.model_dump(), diagnostics=self.config.diagnostics,
                checkpoint=self._checkpoint(running.trial) if self.config.pruning.enabled else None,
            )
        except StopTrial as stop:
            assert stop.result is not None and running.run_id is not None
            running.stage = "record"
            self.recorder.pruned(running.trial, running.run_id, stop.result, running.work_dir, str(stop))
            self.sweep.observer.trial_finished(running.trial.number, "PRUNED (before compile)", None, None)
            raise optuna.TrialPruned() from None

    # -- the two halves ---------------------------------------------------------------------------------------
    def begin(self, trial: optuna.Trial) -> RunningTrial | float | list[float]:
        """The sampler's point and the trial's run; a point already evaluated returns its value (nothing runs)."""
        start = time.perf_counter()
        settings = self.space.suggest(trial)
        self.sweep.observer.trial_started(trial.number, settings)
        duplicate = self._duplicate_of(trial)
        if duplicate is not None:
            return self._reuse(trial, settings, duplicate, start)
        running = RunningTrial(trial, settings, start)
        t0 = time.perf_counter()
        try:
            with signals_deferred():  # the run exists only once the trial knows it (an interrupt then ends both)
                running.run_id = self.recorder.start(trial, settings)
                self.current = running
        except TrackingUnavailable as exc:
            # nothing has been computed yet: fail the trial with the reason and stop this worker (no unrecorded compiles)
            trial.set_user_attr("failed_stage", "record")
            trial.set_user_attr("error", str(exc)[:2000])
            raise
        running.record_s += time.perf_counter() - t0
        running.work_dir = self.sweep.stores.work_dir / "trials" / f"{trial.number:04d}-{socket.gethostname()}-{os.getpid()}"
        running.work_dir.mkdir(parents=True, exist_ok=True)
        return running

    def finish(self, running: RunningTrial, produce: Callable[[], TrialResult]) -> float | list[float]:
        """``produce()`` the trial's result, record it; return Optuna's value or raise ``TrialFailed`` / ``TrialPruned``."""
        trial, run_id, work_dir = running.trial, running.run_id, running.work_dir
        assert run_id is not None and work_dir is not None
        obs = self.sweep.observer
        try:
            result = produce()
            running.stage = "record"
            obs.stage_started("record")
            t0 = time.perf_counter()
            value, feasible, violated = self.recorder.record(trial, run_id, result, work_dir, running.start, running.record_s)
            running.record_s += time.perf_counter() - t0
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
                trial.set_user_attr("failed_stage", running.stage)
                trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:2000])
            try:
                self.tracker.finish(run_id, failed=True)  # never leave the run RUNNING
            except TrackingUnavailable:
                pass  # the Optuna trial fails too; `reconcile` ends the run once the store is back
            raise
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        wall = time.perf_counter() - running.start
        timing = TrialTiming(trial.number, wall, result.stage_seconds() + running.record_s)
        self.timings.append(timing)
        timing_attr = {"wall_s": wall, "stages_s": timing.stages_s, "record_s": running.record_s, "overhead_s": timing.overhead_s}
        timing_attr.update({f"{t.name}_s": t.seconds for t in result.timings})  # every stage, compile_s included
        trial.set_user_attr("timing", timing_attr)
        if value is None:
            obs.trial_finished(trial.number, "FAIL", None, None, failed_stage=result.failed_stage, error=result.error)
            raise TrialFailed(f"trial {trial.number} failed in stage {result.failed_stage}: {result.error}")
        obs.trial_finished(trial.number, "COMPLETE", value[0], feasible, violated=violated)
        return value if self.objective.multi else value[0]  # type: ignore[return-value]

    # -- trials that did not complete ----------------------------------------------------------------------
    def interrupted(self, trial: optuna.Trial, running: RunningTrial | None, signame: str) -> None:
        """A trial stopped by a signal: on record in both stores; the next start runs it again."""
        stage = running.stage if running is not None else "suggest"
        record_interrupted(trial, self.tracker, running.run_id if running is not None else None, stage, signame)
        self.sweep.observer.message(f"trial {trial.number} interrupted ({signame}) in stage {stage}: the next `hailo-sweep run` retries it")
        if running is not None and running.work_dir is not None:
            shutil.rmtree(running.work_dir, ignore_errors=True)

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

    # -- duplicates ----------------------------------------------------------------------------------------
    def _duplicate_of(self, trial: optuna.Trial) -> optuna.trial.FrozenTrial | None:
        """A finished trial at the same point (the same canonical settings: a knob without effect under the others,
        e.g. a clipping percentile under minmax calibration, does not make a new point): evaluating it again would
        repeat the same work."""
        mine = point_key(self.space.canonical_params(dict(trial.params)))
        for other in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            key = self._points.get(other.number)
            if key is None:  # a finished trial's params do not change: its point is computed once
                key = self._points[other.number] = point_key(self.space.canonical_params(dict(other.params)))
            if other.number != trial.number and key == mine:
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
            if used(others, count_running=True) + sum(t.state == TrialState.WAITING for t in others) >= total:
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
            **self.recorder.tags(trial, settings), "hailo_sweep.state": "COMPLETE",
            "hailo_sweep.duplicate_of": str(original.number), "hailo_sweep.duplicate_of_run_id": str(source_run),
            "hailo_sweep.plots": f"see the run of trial {original.number}, whose result this trial reused",
        }
        feasible = all(v <= 0 for v in (original.constraints or {}).values())
        tags["hailo_sweep.feasible"] = str(feasible)
        metrics.update(headline_metrics(self.config, metrics, original.values[0], feasible))
        run_id = self.tracker.start_child(self.parent_run_id, RunRecord(name=f"trial-{trial.number:04d}", params=self.recorder.params(settings), metrics=metrics, tags=tags))
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
