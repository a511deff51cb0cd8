"""The cluster driver: Optuna and MLflow here, the stages on Dask workers (``hailo-sweep run CONFIG --cluster ADDR``).

``ClusterLoop`` is a ``TrialLoop`` for ``Sweep``: it asks Optuna for as many trials as there are compile slots (plus
``cluster.queued``), submits each trial's optimize -> emulate -> compile to a worker with the ``compile`` resource and
its device run to a worker with the target's resource (``hailo8l=1``), and records every trial here, through the same
``TrialRunner`` as the local loop: workers need neither a database nor tracking credentials. The model and the data
are scattered once per sweep; a compiled model goes from its compile host to the device host through Dask. While one
trial is on the device, the next compiles.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from hailo_sweep.backends.base import Backend
from hailo_sweep.cluster.build_task import build_on_host, chosen_backend
from hailo_sweep.cluster.device_task import check_device_host, run_on_device
from hailo_sweep.cluster.payloads import Built, BuildJob, DeviceJob, DeviceRun, SweepPayload
from hailo_sweep.cluster.resources import wait_for_resources, worker_resources
from hailo_sweep.config import SweepConfig
from hailo_sweep.data import feed
from hailo_sweep.errors import UserInputError
from hailo_sweep.pipeline import Prepared
from hailo_sweep.sweep.budget import Budget, BudgetSpent, waiting
from hailo_sweep.sweep.faults import signame_of
from hailo_sweep.sweep.runner import RunningTrial, TrialFailed, TrialRunner
from hailo_sweep.trial import Ladder, assess, finalize, measure_emulations
from hailo_sweep.trial_result import StageTiming, TrialResult

COMPILE = "compile"  # the resource a compile host declares


@dataclass
class _InFlight:
    running: RunningTrial
    build: Any  # distributed.Future of Built
    device: Any = None  # distributed.Future of DeviceRun, once built
    built: Built | None = None
    submitted: float = field(default_factory=time.monotonic)
    lost_workers: int = 0
    last_worker: str | None = None


class ClusterLoop:
    """Trials on a Dask cluster; see the module docstring."""

    stages_here = False

    def __init__(self, client: Any, config: SweepConfig, say: Callable[[str], None]):
        self.client = client
        self.config = config
        self.say = say
        self.scattered_bytes = 0
        self.task_bytes = 0
        self._inflight: list[_InFlight] = []
        self._study: optuna.Study | None = None
        self._runner: TrialRunner | None = None

    # -- before the first trial ----------------------------------------------------------------------------
    def resolve(self, config: SweepConfig) -> SweepConfig:
        """The config as the cluster runs it: ``backend: auto`` decided on a compile host (the driver may have no
        toolchain); pruning refused (it needs the study between emulation and compile, which run on a worker)."""
        if config.pruning.enabled:
            raise UserInputError("pruning decides between emulation and compile, which run in one task on a compile worker",
                                 file=config.source, key="pruning.enabled", fix="set pruning.enabled: false for a cluster sweep")
        if config.backend == "auto":
            hosts = wait_for_resources(self.client, [COMPILE], config.cluster.resource_timeout_s, self.say)
            name, note = self.client.submit(chosen_backend, "auto", workers=hosts[COMPILE][:1], pure=False).result()
            if note:
                self.say(f"{hosts[COMPILE][0]}: {note}")
            config = config.model_copy(update={"backend": name})
        self.config = config
        return config

    def check_devices(self, backend: Backend) -> list[str]:
        """The backend's device check on every worker that offers the target's resource."""
        cfg = self.config
        hosts = wait_for_resources(self.client, [COMPILE, cfg.target], cfg.cluster.resource_timeout_s, self.say)
        notes: list[str] = []
        for address in hosts[cfg.target]:
            outcome = self.client.submit(check_device_host, backend.name, backend.context, workers=[address], allow_other_workers=False,
                                         resources={cfg.target: 1}, pure=False).result()
            if outcome.refused is not None:
                raise UserInputError(f"device worker {address}: {outcome.refused}", file=cfg.source, key="target", fix=outcome.fix)
            notes.extend(outcome.notes)
        return notes

    # -- the loop ------------------------------------------------------------------------------------------
    def run(self, study: optuna.Study, runner: TrialRunner, budget: Budget) -> None:
        from distributed import wait

        cfg = self.config
        prepared = runner.prepared
        self._study, self._runner = study, runner
        hosts = wait_for_resources(self.client, [COMPILE, cfg.target], cfg.cluster.resource_timeout_s, self.say)
        slots = int(sum(worker_resources(self.client)[a].get(COMPILE, 0) for a in hosts[COMPILE])) + cfg.cluster.queued
        payload, calibration, evaluation = self._scatter(prepared, runner.backend, runner, hosts)
        fed_eval: dict[str, np.ndarray] = {}
        asking = True
        try:
            while True:
                while asking and len(self._inflight) < slots:
                    if budget.spent(study.get_trials(deepcopy=False), count_running=True) and not waiting(study):
                        asking = False
                        break
                    try:
                        trial = study.ask()
                    except BudgetSpent:
                        asking = False
                        break
                    begun = runner.begin(trial)
                    if not isinstance(begun, RunningTrial):
                        study.tell(trial, begun)  # a point already evaluated: reused, nothing submitted
                        continue
                    job = BuildJob(trial.number, begun.settings, self._noise_samples())
                    begun.stage = "optimize"
                    self._inflight.append(_InFlight(begun, self.client.submit(
                        build_on_host, payload, calibration, evaluation, job, resources={COMPILE: 1}, pure=False, key=f"build-{trial.number}-{study.study_name}")))
                if not self._inflight:
                    return
                futures = [f.device if f.device is not None else f.build for f in self._inflight]
                wait(futures, timeout=1.0, return_when="FIRST_COMPLETED")
                for item in list(self._inflight):
                    self._advance(item, study, runner, prepared, fed_eval, evaluation)
        except KeyboardInterrupt as exc:
            self._interrupt(study, runner, signame_of(exc))
            exc.trial_recorded = True  # type: ignore[attr-defined]
            raise
        except BaseException:
            self._cancel_all(study, runner, "the sweep stopped")
            raise

    def summary(self) -> dict[str, float]:
        return {"cluster.scattered_bytes": float(self.scattered_bytes), "cluster.task_bytes": float(self.task_bytes)}

    # -- one trial's progress ------------------------------------------------------------------------------
    def _advance(self, item: _InFlight, study: optuna.Study, runner: TrialRunner, prepared: Prepared,
                 fed_eval: dict[str, np.ndarray], evaluation: Any) -> None:
        cfg = self.config
        if item.device is None:
            if item.build.status == "pending":
                self._watch(item, item.build, self._build_limit(), "the compile host's stages")
                return
            built = self._result_of(item.build, "optimize")
            if isinstance(built, str) or not built.result.ok or built.device_spec is None:
                self._finish(item, study, runner, lambda: self._failed_build(item, built))
                return
            item.built = built
            item.running.stage = "device"
            job = DeviceJob(item.running.trial.number, item.running.settings.normalization_placement, cfg.diagnostics.determinism_samples)
            item.device = self.client.submit(run_on_device, item.build, evaluation, job, resources={cfg.target: 1}, pure=False,
                                             key=f"device-{item.running.trial.number}-{study.study_name}")
            item.submitted, item.last_worker, item.lost_workers = time.monotonic(), None, 0
            return
        if item.device.status == "pending":
            self._watch(item, item.device, cfg.timeouts.device, "the device run")
            return
        run = self._result_of(item.device, "device")
        assert item.built is not None
        built = item.built
        placement = item.running.settings.normalization_placement
        if placement not in fed_eval:
            fed_eval[placement] = feed(prepared.dataset.evaluation, placement, prepared.normalization, cfg.data.domain)
        self._finish(item, study, runner, lambda: self._assemble(item.running, built, run, prepared, fed_eval[placement]))

    def _finish(self, item: _InFlight, study: optuna.Study, runner: TrialRunner, produce: Callable[[], TrialResult]) -> None:
        self._inflight.remove(item)
        trial = item.running.trial
        try:
            value = runner.finish(item.running, produce)
        except TrialFailed:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return
        except BaseException:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        study.tell(trial, value)

    def _assemble(self, running: RunningTrial, built: Built, run: DeviceRun | str, prepared: Prepared, evaluation: np.ndarray) -> TrialResult:
        """The trial's result as a local trial would have it: files in its work dir, the device stage, the assessment."""
        start = time.perf_counter()
        result = self._with_files(running, built)
        result.params.update({"cluster.compile_host": built.host})
        measure_emulations(result, prepared, built.emulations)
        if isinstance(run, str) or run.outputs is None:
            reason = run if isinstance(run, str) else run.error or "no outputs"
            result.timings.append(StageTiming("device", 0.0 if isinstance(run, str) else run.seconds, False))
            result.failed_stage, result.error = "device", reason
            result.traceback = None if isinstance(run, str) else run.traceback
        else:
            result.params["cluster.device_host"] = run.host
            result.metrics.update(run.metrics)
            result.notes.extend(run.notes)
            result.timings.append(StageTiming("device", run.seconds, True))
            ladder = Ladder(result, None, {})
            with ladder.stage("diagnose"):
                assess(result, prepared, running.settings, evaluation, built.emulations, run.outputs, run.repeat, self.config.diagnostics)
        assert running.work_dir is not None
        finalize(result, running.work_dir)
        result.metrics["time.driver_s"] = time.perf_counter() - start + running.record_s
        return result

    def _failed_build(self, item: _InFlight, built: Built | str) -> TrialResult:
        if isinstance(built, str):
            result = TrialResult(settings=item.running.settings)
            result.failed_stage, result.error = item.running.stage, built
            return result
        result = self._with_files(item.running, built)
        if result.ok:  # compiled, but nothing a device could run
            result.failed_stage, result.error = "compile", "the compile host returned no compiled model"
        assert item.running.work_dir is not None
        finalize(result, item.running.work_dir)
        return result

    def _with_files(self, running: RunningTrial, built: Built) -> TrialResult:
        result = built.result
        work_dir = running.work_dir
        assert work_dir is not None
        for name, text in built.logs.items():
            (work_dir / Path(name).name).write_text(text, encoding="utf-8")
        if result.compiled is not None and built.compiled_bytes:
            path = work_dir / Path(result.compiled.path).name
            path.write_bytes(built.compiled_bytes)
            result.compiled = dataclasses.replace(result.compiled, path=path)
        return result

    # -- faults ----------------------------------------------------------------------------------------------
    def _result_of(self, future: Any, stage: str) -> Any:
        """The task's value, or the reason it has none (a worker that kept dying, a cancelled task) as a string."""
        try:
            return future.result()
        except Exception as exc:
            return f"{type(exc).__name__} in stage {stage}: {exc}"

    def _watch(self, item: _InFlight, future: Any, limit_s: float | None, what: str) -> None:
        """A task still pending: count the workers lost under it (one loss is retried by Dask on another worker with the
        same resource; a second fails the trial) and bound its wait by the stage's time limit."""
        processing = {key: address for address, keys in self.client.processing().items() for key in keys}
        worker = processing.get(future.key)
        if item.last_worker is not None and item.last_worker not in worker_resources(self.client):
            item.lost_workers += 1
            self.say(f"trial {item.running.trial.number}: worker {item.last_worker} was lost during {what}"
                     + ("; Dask runs it again on another worker with the same resource" if item.lost_workers == 1 else ""))
            item.last_worker = None
        if worker is not None:
            item.last_worker = worker
        reason = None
        if item.lost_workers > 1:
            reason = f"{what} lost its worker twice"
        elif limit_s and time.monotonic() - item.submitted > limit_s:
            reason = f"StageTimeout: {what} exceeded its time limit of {limit_s:g} s"
        if reason is not None:
            future.cancel()
            self._finish(item, self._study, self._runner, lambda: self._given_up(item, reason))

    def _given_up(self, item: _InFlight, reason: str) -> TrialResult:
        if item.built is None:
            return self._failed_build(item, reason)
        return self._assemble(item.running, item.built, reason, self._runner.prepared, np.empty(0))

    def _interrupt(self, study: optuna.Study, runner: TrialRunner, signame: str) -> None:
        """Ctrl-C / SIGTERM: every trial in flight is cancelled, on record as interrupted, and runs again next start."""
        for item in self._inflight:
            for future in (item.build, item.device):
                if future is not None:
                    future.cancel()
            runner.interrupted(item.running.trial, item.running, signame)
            study.tell(item.running.trial, state=optuna.trial.TrialState.FAIL)
        self._inflight.clear()

    def _cancel_all(self, study: optuna.Study, runner: TrialRunner, why: str) -> None:
        for item in self._inflight:
            for future in (item.build, item.device):
                if future is not None:
                    future.cancel()
            runner.interrupted(item.running.trial, item.running, "an error")
            study.tell(item.running.trial, state=optuna.trial.TrialState.FAIL)
        self._inflight.clear()

    # -- data -------------------------------------------------------------------------------------------------
    def _scatter(self, prepared: Prepared, backend: Backend, runner: TrialRunner, hosts: dict[str, list[str]]) -> tuple[Any, Any, Any]:
        """The model and the fed data sets, sent once to each worker that needs them (not with every task)."""
        cfg = self.config
        ds = prepared.dataset
        placements = runner.space.choices()["normalization_placement"]
        calibration = {p: feed(ds.calibration, p, prepared.normalization, cfg.data.domain) for p in placements}
        evaluation = {p: feed(ds.evaluation, p, prepared.normalization, cfg.data.domain) for p in placements}
        model_bytes = Path(cfg.model).read_bytes()
        key = hashlib.sha256(f"{cfg.name}|{prepared.model_sha256}|{ds.calibration_sha256}|{ds.evaluation_sha256}".encode()).hexdigest()[:16]
        payload = SweepPayload(key, backend.name, backend.context, Path(cfg.model).name, model_bytes)
        compile_hosts, device_hosts = hosts[COMPILE], hosts[cfg.target]
        everyone = sorted(set(compile_hosts) | set(device_hosts))
        sent_payload = self.client.scatter(payload, workers=compile_hosts, broadcast=True, hash=False)
        sent_calibration = self.client.scatter(calibration, workers=compile_hosts, broadcast=True, hash=False)
        sent_evaluation = self.client.scatter(evaluation, workers=everyone, broadcast=True, hash=False)
        size = lambda arrays: sum(a.nbytes for a in arrays.values())  # noqa: E731
        self.scattered_bytes = (len(model_bytes) * len(compile_hosts) + size(calibration) * len(compile_hosts)
                                + size(evaluation) * len(everyone))
        self.say(f"cluster: {len(compile_hosts)} compile worker(s), {len(device_hosts)} {cfg.target} worker(s); "
                 f"model and data sent once per worker ({self.scattered_bytes / 1e6:.1f} MB in all)")
        return sent_payload, sent_calibration, sent_evaluation

    def _noise_samples(self) -> int:
        diag = self.config.diagnostics
        return diag.layer_noise_samples if diag.layer_noise == "per_trial" else 0

    def _build_limit(self) -> float | None:
        t = self.config.timeouts
        limits = [t.optimize, t.emulate, t.compile]
        return sum(limits) if all(limits) else None  # type: ignore[arg-type]
