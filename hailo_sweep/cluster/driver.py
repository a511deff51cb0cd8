"""The cluster driver: Optuna and MLflow here, the stages on Dask workers (``hailo-sweep run CONFIG --cluster ADDR``).

``ClusterLoop`` is a ``TrialLoop`` for ``Sweep``: it asks Optuna for as many trials as there are compile slots (plus
``cluster.queued``), submits each trial's optimize -> emulate -> compile to a worker with the ``compile`` resource and
its device run to a worker with the target's resource (``hailo8l=1``), and records every trial here, through the same
``TrialRunner`` as the local loop: workers need neither a database nor tracking credentials. The model and the data
are scattered once per sweep; a compiled model goes from its compile host to the device host through Dask. While one
trial is on the device, the next compiles.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from hailo_sweep.backends.base import Backend
from hailo_sweep.cluster.build_task import build_on_host, chosen_backend, device_part
from hailo_sweep.cluster.device_task import check_device_host, run_on_device
from hailo_sweep.cluster.payloads import Built, BuildJob, DeviceJob, DeviceRun, SweepPayload
from hailo_sweep.cluster.resources import providers, wait_for_resources, worker_resources
from hailo_sweep.config import SweepConfig
from hailo_sweep.errors import ResourceMissing, UserInputError
from hailo_sweep.pipeline import Prepared
from hailo_sweep.sweep.budget import Budget, BudgetSpent, waiting
from hailo_sweep.sweep.faults import signals_deferred, signame_of
from hailo_sweep.sweep.runner import RunningTrial, TrialFailed, TrialRunner
from hailo_sweep.trial import Fed, Ladder, assess, fed_for, finalize, measure_emulations
from hailo_sweep.trial_result import StageTiming, TrialResult

COMPILE = "compile"  # the resource a compile host declares


@dataclass
class _InFlight:
    running: RunningTrial
    build: Any  # distributed.Future of Built
    device: Any = None  # distributed.Future of DeviceRun, once built
    built: Built | None = None
    submitted: float = field(default_factory=time.monotonic)


class ClusterLoop:
    """Trials on a Dask cluster; see the module docstring."""

    stages_here = False

    def __init__(self, client: Any, config: SweepConfig, say: Callable[[str], None]):
        self.client = client
        self.config = config
        self.say = say
        self.scattered_bytes = 0
        self.device_bytes = 0
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
        notes = self._retry_note()
        for address in hosts[cfg.target]:
            outcome = self.client.submit(check_device_host, backend.name, backend.context, workers=[address], allow_other_workers=False,
                                         resources={cfg.target: 1}, pure=False).result()
            if outcome.refused is not None:
                raise UserInputError(f"device worker {address}: {outcome.refused}", file=cfg.source, key="target", fix=outcome.fix)
            notes.extend(outcome.notes)
        return notes

    def _retry_note(self) -> list[str]:
        """How often the scheduler reruns a task whose worker died (Dask's ``allowed-failures``, set where the scheduler
        starts); when it cannot be read, say so rather than guess."""
        try:
            allowed = int(self.client.run_on_scheduler(_allowed_failures))
        except Exception as exc:
            return [f"cluster: could not read the scheduler's allowed-failures ({type(exc).__name__}); a task whose worker "
                    "dies is run again up to that many times (Dask's default: 3)"]
        if allowed == 1:
            return []
        return [f"cluster: the scheduler runs a task again up to {allowed} times after its worker dies; to retry a lost device "
                "run once only, start the scheduler with DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=1"]

    # -- the loop ------------------------------------------------------------------------------------------
    def run(self, study: optuna.Study, runner: TrialRunner, budget: Budget) -> None:
        from distributed import wait

        cfg = self.config
        prepared = runner.prepared
        self._study, self._runner = study, runner
        hosts = wait_for_resources(self.client, [COMPILE, cfg.target], cfg.cluster.resource_timeout_s, self.say)
        slots = int(sum(worker_resources(self.client)[a].get(COMPILE, 0) for a in hosts[COMPILE])) + cfg.cluster.queued
        amm_was_running = self._hold_replicas()
        payload, calibration, evaluation = self._scatter(prepared, runner.backend, runner, hosts)
        asking = True
        try:
            while True:
                while asking and len(self._inflight) < slots:
                    if budget.spent(study.get_trials(deepcopy=False), count_running=True) and not waiting(study):
                        asking = False
                        break
                    with signals_deferred():  # a trial is asked, opened and submitted whole: an interrupt finds it in flight
                        try:
                            with warnings.catch_warnings():  # ask/tell has no heartbeat thread: the driver is the trials' only writer
                                warnings.filterwarnings("ignore", message="Heartbeat of storage")
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
                            build_on_host, payload, calibration, evaluation, job, resources={COMPILE: 1}, pure=False,
                            key=f"build-{trial.number}-{study.study_name}")))
                if not self._inflight:
                    return
                futures = [f.device if f.device is not None else f.build for f in self._inflight]
                with contextlib.suppress(TimeoutError):  # a second without news: look at the workers (see _watch)
                    wait(futures, timeout=1.0, return_when="FIRST_COMPLETED")
                self._check_resources()
                for item in list(self._inflight):
                    self._advance(item, study, runner, prepared, evaluation)
        except KeyboardInterrupt as exc:
            self._stop_all(study, runner, signame_of(exc))
            exc.trial_recorded = True  # type: ignore[attr-defined]
            raise
        except BaseException as exc:
            self._stop_all(study, runner, f"the sweep stopped: {type(exc).__name__}")
            raise
        finally:
            if amm_was_running:
                with contextlib.suppress(Exception):
                    self.client.amm.start()

    def _check_resources(self) -> None:
        """A resource whose last worker left mid-sweep: wait for one (bounded), else stop the sweep; the trials in
        flight are then on record as interrupted and run again at the next start."""
        needed = [COMPILE, self.config.target]
        if all(providers(worker_resources(self.client), needed).values()):
            return
        try:
            wait_for_resources(self.client, needed, self.config.cluster.resource_timeout_s, self.say)
        except ResourceMissing as exc:
            names = ", ".join(repr(n) for n in exc.missing)
            raise ResourceMissing(exc.missing, f"the last Dask worker with the resource {names} left during the sweep and none "
                                               f"came back within {self.config.cluster.resource_timeout_s:g} s; the trials in flight "
                                               "run again at the next start") from None

    def _hold_replicas(self) -> bool:
        """Keep the data sent once on every worker: Dask's Active Memory Manager (on by default) drops every replica no
        waiting task needs, and the data would then travel again with each trial (measured in bench_cluster.py). It is
        paused for the sweep and started again after; returns whether it was running."""
        try:
            running = bool(self.client.amm.running())
            if running:
                self.client.amm.stop()
                self.say("cluster: the scheduler's Active Memory Manager is paused for this sweep (it would drop the copies "
                         "of the data sent once to each worker); it starts again when the sweep ends")
            return running
        except Exception as exc:  # an older scheduler without the AMM API: the data may travel more than once
            self.say(f"cluster: could not pause the scheduler's Active Memory Manager ({type(exc).__name__}); data sent once "
                     "per worker may be sent again")
            return False

    def summary(self) -> dict[str, float]:
        return {"cluster.scattered_bytes": float(self.scattered_bytes), "cluster.device_bytes": float(self.device_bytes)}

    # -- one trial's progress ------------------------------------------------------------------------------
    def _advance(self, item: _InFlight, study: optuna.Study, runner: TrialRunner, prepared: Prepared, evaluation: Any) -> None:
        cfg = self.config
        if item.device is None:
            if item.build.status == "pending":
                self._watch(item, item.build, self._build_limit(), "the compile host's stages")
                return
            built = self._result_of(item.build, "optimize")
            if isinstance(built, str) or not built.result.ok or built.device is None:
                self._finish(item, study, runner, lambda: self._failed_build(item, built))
                return
            item.built = built
            item.running.stage = "device"
            job = DeviceJob(item.running.trial.number, item.running.settings.normalization_placement, cfg.diagnostics.determinism_samples)
            # the compiled file is cut out where it was built, so only it (not the emulations) goes to the device host
            holder = list(self.client.who_has([item.build]).get(item.build.key, ()))
            part = self.client.submit(device_part, item.build, workers=holder or None, pure=False,
                                      key=f"handoff-{item.running.trial.number}-{study.study_name}")
            item.device = self.client.submit(run_on_device, part, evaluation, job, resources={cfg.target: 1}, pure=False,
                                             key=f"device-{item.running.trial.number}-{study.study_name}")
            self.device_bytes += len(built.device.compiled_bytes)
            item.submitted = time.monotonic()
            return
        if item.device.status == "pending":
            self._watch(item, item.device, cfg.timeouts.device, "the device run")
            return
        run = self._result_of(item.device, "device")
        assert item.built is not None
        built = item.built
        fed = fed_for(prepared, item.running.settings.normalization_placement)
        self._finish(item, study, runner, lambda: self._assemble(item.running, built, run, prepared, fed))

    def _finish(self, item: _InFlight, study: optuna.Study, runner: TrialRunner, produce: Callable[[], TrialResult]) -> None:
        """Record the trial and tell Optuna. An interrupt while recording leaves it in flight, for ``_stop_all``."""
        trial = item.running.trial
        try:
            value = runner.finish(item.running, produce)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            with signals_deferred():
                self._inflight.remove(item)
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            if isinstance(exc, TrialFailed):
                return
            raise
        with signals_deferred():
            self._inflight.remove(item)
            study.tell(trial, value)

    def _assemble(self, running: RunningTrial, built: Built, run: DeviceRun | str, prepared: Prepared, fed: Fed) -> TrialResult:
        """The trial's result as a local trial would have it: files in its work dir, the device stage, the assessment.
        Like ``run_trial``, a stage that fails here fails the trial with its reason; it never stops the sweep."""
        start = time.perf_counter()
        result = self._with_files(running, built)
        result.params.update({"cluster.compile_host": built.host})
        stage = "emulate"
        try:
            measure_emulations(result, prepared, built.emulations)
            stage = "device"
            self._device_part(result, running, built, run, prepared, fed)
        except Exception as exc:
            result.fail(stage, exc)
        assert running.work_dir is not None
        finalize(result, running.work_dir)
        result.metrics["time.driver_s"] = time.perf_counter() - start + running.record_s
        return result

    def _device_part(self, result: TrialResult, running: RunningTrial, built: Built, run: DeviceRun | str, prepared: Prepared,
                     fed: Fed) -> None:
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
                assess(result, prepared, running.settings, fed, built.emulations, run.outputs, run.repeat, self.config.diagnostics)

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
        if result.compiled is not None and built.device is not None:
            path = work_dir / Path(result.compiled.path).name
            path.write_bytes(built.device.compiled_bytes)
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
        """A task still pending: bound its wait by the stage's time limit (a worker cannot interrupt a running task, so
        the limit is kept here). A worker that dies under a task is Dask's to handle: the scheduler runs the task again
        on another worker with the same resource, up to its ``allowed-failures``, then the task fails (``KilledWorker``)
        and so does the trial, with that reason."""
        if limit_s and time.monotonic() - item.submitted > limit_s:
            future.cancel()
            reason = f"StageTimeout: {what} exceeded its time limit of {limit_s:g} s"
            self._finish(item, self._study, self._runner, lambda: self._given_up(item, reason))

    def _given_up(self, item: _InFlight, reason: str) -> TrialResult:
        if item.built is None:
            return self._failed_build(item, reason)
        prepared = self._runner.prepared
        return self._assemble(item.running, item.built, reason, prepared, fed_for(prepared, item.running.settings.normalization_placement))

    def _stop_all(self, study: optuna.Study, runner: TrialRunner, reason: str) -> None:
        """The sweep stops (Ctrl-C / SIGTERM, or an error such as a resource gone): every trial in flight is cancelled,
        on record as interrupted with ``reason``, and runs again at the next start."""
        for item in self._inflight:
            for future in (item.build, item.device):
                if future is not None:
                    future.cancel()
            runner.interrupted(item.running.trial, item.running, reason)
            study.tell(item.running.trial, state=optuna.trial.TrialState.FAIL)
        self._inflight.clear()

    # -- data -------------------------------------------------------------------------------------------------
    def _scatter(self, prepared: Prepared, backend: Backend, runner: TrialRunner, hosts: dict[str, list[str]]) -> tuple[Any, Any, Any]:
        """The model and the fed data sets, sent once to each worker that needs them (not with every task)."""
        cfg = self.config
        ds = prepared.dataset
        placements = runner.space.choices()["normalization_placement"]
        calibration = {p: fed_for(prepared, p).calibration for p in placements}
        evaluation = {p: fed_for(prepared, p).evaluation for p in placements}
        model_bytes = Path(cfg.model).read_bytes()
        key = hashlib.sha256(f"{cfg.name}|{prepared.model_sha256}|{ds.calibration_sha256}|{ds.evaluation_sha256}".encode()).hexdigest()[:16]
        payload = SweepPayload(key, backend.name, backend.context, Path(cfg.model).name, model_bytes)
        compile_hosts, device_hosts = hosts[COMPILE], hosts[cfg.target]
        everyone = sorted(set(compile_hosts) | set(device_hosts))
        # one future per object (a scattered dict would become one future per value, keyed by the dict's keys)
        [sent_payload] = self.client.scatter([payload], workers=compile_hosts, broadcast=True, hash=False)
        [sent_calibration] = self.client.scatter([calibration], workers=compile_hosts, broadcast=True, hash=False)
        [sent_evaluation] = self.client.scatter([evaluation], workers=everyone, broadcast=True, hash=False)
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


def _allowed_failures(dask_scheduler: Any) -> int:
    """Runs on the scheduler (``Client.run_on_scheduler``)."""
    return int(dask_scheduler.allowed_failures)

