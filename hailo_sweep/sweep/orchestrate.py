"""A sweep on this machine (``run``) or as one of many workers (``init`` + ``work``): stores, preflight, the loop.

The flow of one ``run``: config -> inputs checked (nothing written yet) -> stores opened (study, experiment, parent
run: created once) -> baseline enqueued once -> prepare once -> for each trial: suggest -> pipeline -> metrics ->
records (``runner.TrialRunner``) -> the parent run summarized.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from hailo_sweep import study_report
from hailo_sweep.backends import backend_class, select_backend
from hailo_sweep.backends.base import Backend
from hailo_sweep.sweep.best_noise import analyse_best
from hailo_sweep.config import SweepConfig
from hailo_sweep.errors import UserInputError
from hailo_sweep.pipeline import backend_context, load_inputs, prepare_sweep, softmax_findings
from hailo_sweep.search_space import SearchSpace
from hailo_sweep.settings import Settings
from hailo_sweep.stores import check_stores_writable, redact_url, resolve_stores
from hailo_sweep.sweep.budget import FINISHED_STATES, Budget, BudgetSpent, baseline_pending_or_done, budget_used, waiting
from hailo_sweep.sweep.faults import StoresFull, interrupts_end_trials, is_disk_full, reconcile, requeue_interrupted, resume_line, signame_of
from hailo_sweep.sweep.objective import THROUGHPUT_KEY, Objective, check_metric, chosen_trial, objective_of, task_directions
from hailo_sweep.sweep.observer import NullObserver, SweepIds, SweepObserver, SweepSummary, TrialLoop, TrialTiming
from hailo_sweep.sweep.recording import ArtifactUploader, reconcile_uploads
from hailo_sweep.sweep.runner import TrialFailed, TrialRunner
from hailo_sweep.sweep.sampling import make_sampler
from hailo_sweep.sweep.storage import StaleTrialHandler, SweepStorage, open_storage, remove_dead_scratch, with_retries
from hailo_sweep.task_metrics import PREFIX as TASK_PREFIX
from hailo_sweep.tracking import RunRecord, Tracker
from hailo_sweep.trial import feed_placements


class Sweep:
    """One sweep, as described by a config.

    ``init`` creates the study, the experiment and the parent run once and enqueues the baseline; ``work`` joins the
    study and runs trials until the budget is spent (any number of workers, on any number of hosts); ``run`` is both.
    """

    def __init__(
        self, config: SweepConfig, observer: SweepObserver | None = None, worker_index: int | None = None, loop: TrialLoop | None = None,
    ):
        self.config = config
        self.loop = loop  # None: the stages run in this process
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
        if self.loop is None or self.loop.stages_here:
            backend_cls, note = select_backend(cfg.backend)
        else:  # the toolchain is on the workers: not imported here (``auto`` was decided on a compile host)
            backend_cls, note = backend_class(cfg.backend), None
        if note:
            self.observer.message(note)
        for finding in softmax_findings(cfg.model, outputs):
            self.observer.message(f"note: {finding.message}; {finding.fix}")
        backend = backend_cls(backend_context(cfg, model_io, normalization, self.stores.work_dir))
        space.check_supported(self.baseline(space, backend), backend.validate)
        advice = backend.calibration_advice(n_calib, space.choices()["optimization_level"])
        if advice:
            self.observer.message(advice)
        try:
            # before the first trial: a device that cannot run the target refuses the sweep (on the device hosts, in a cluster)
            device_notes = backend.check_device() if self.loop is None else self.loop.check_devices(backend)
        except UserInputError as exc:
            raise UserInputError(exc.problem, file=exc.file or cfg.source, key=exc.key, fix=exc.fix) from None
        for note in device_notes:
            self.observer.message(note)
        return backend, space, objective

    def baseline(self, space: SearchSpace, backend: Backend) -> Settings:
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
        n_waiting = len(waiting(study))  # enqueued points (the baseline, retries, the user's) run even when the budget is spent
        spent = budget.spent(study.get_trials(deepcopy=False), count_running=False)
        remaining = n_waiting if spent else max(1, total - budget_used(study, count_running=False))
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
                here = self.loop is None or self.loop.stages_here
                with backend if here else contextlib.nullcontext():
                    if remaining:
                        self.observer.stage_started("prepare")
                        prepared = prepare_sweep(self.config, self.stores.work_dir, backend if here else None)
                        # the data as fed, once before the trials, and shown to the backend: its time is preparation
                        fed_seconds, notes = feed_placements(prepared, backend if here else None, space.choices()["normalization_placement"])
                        prepare_runs, prepare_seconds = 1, prepared.prepare_seconds + fed_seconds
                        for note in notes:
                            self.observer.message(note)
                        for finding in prepared.findings:
                            if finding.code == "normalization_unset":  # said once here; softmax heads were said in preflight
                                self.observer.message(f"note: {finding.message}; {finding.fix}")
                        objective_fn = TrialRunner(self, prepared, backend, space, objective, tracker, parent_run_id, timings, uploader)
                        if self._opened_storage is not None:
                            self._opened_storage.budget = budget
                        (self._optimize_until_spent if self.loop is None else self.loop.run)(study, objective_fn, budget)
                        diag = self.config.diagnostics
                        objective_fn.recorder.draw_best_plots(study)
                        if diag.layer_noise == "best" and diag.layer_noise_best and not here:
                            self.observer.message("per-layer noise of the best trials needs the toolchain here: run "
                                                  f"`hailo-sweep diagnose {self.config.source} --trial N` on a compile host")
                        elif diag.layer_noise == "best" and diag.layer_noise_best:
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
                if self.loop is not None:
                    extra.update(self.loop.summary())
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
            if not spent(True) or waiting(study):
                try:
                    study.optimize(objective_fn, n_trials=budget.slack * budget.total, catch=(TrialFailed,))
                except BudgetSpent:
                    pass  # the remaining trials are taken by other workers
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # a dead worker's trial: failed here, and its retry enqueued
            if not spent(True) or waiting(study):
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
            if cfg.sampler.name != "grid" and not any(baseline_pending_or_done(t) for t in study.get_trials(deepcopy=False)):
                study.enqueue_trial(space.params_of(self.baseline(space, backend)), user_attrs={"baseline": True})
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


