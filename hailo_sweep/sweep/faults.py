"""Faults during a sweep (Ctrl-C, SIGTERM, full disks): the trial in progress ends with its reason in both stores.

- An interrupt (SIGINT or SIGTERM) ends the trial in progress as interrupted: its Optuna trial FAIL with
  ``interrupted``, ``failed_stage`` and ``error`` user attributes, its MLflow run KILLED with the state tag
  ``INTERRUPTED``. The next start enqueues it again (``requeue_interrupted``), so an interrupt costs no budget: the
  interrupted trial is superseded by its retry exactly like a trial whose worker died (``retry_history``).
- A full disk while recording (ENOSPC, EDQUOT) fails the trial and stops the sweep (``StoresFull``): every later
  trial would compute for nothing and fail at the same step. Any other write error while recording fails that trial only.
"""

from __future__ import annotations

import contextlib
import errno
import signal
import threading
from collections.abc import Iterator
from typing import Any

import optuna
from optuna.trial import TrialState

from hailo_sweep.tracking import Tracker

INTERRUPTED_ATTR = "interrupted"
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class SweepInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: the trial in progress is recorded as interrupted, then the process stops."""

    def __init__(self, signame: str = "SIGINT"):
        super().__init__(signame)
        self.signame = signame


class StoresFull(Exception):
    """The disk holding the stores is full: the trial that could not be recorded has failed; the sweep stops."""


def signame_of(exc: BaseException) -> str:
    return exc.signame if isinstance(exc, SweepInterrupted) else "SIGINT"


def is_disk_full(exc: BaseException) -> bool:
    """An OSError (or an error caused by one, e.g. sqlite's "database or disk is full") meaning no space is left."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in FULL_ERRNOS:
            return True
        if "disk is full" in str(seen).lower() or "no space left" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextlib.contextmanager
def interrupts_end_trials() -> Iterator[None]:
    """While the block runs, SIGINT and SIGTERM raise ``SweepInterrupted`` in the main thread (SIGTERM would otherwise
    kill the process with its trial RUNNING in both stores). Signals after the first are held back so that recording
    the interruption is not itself interrupted (the recording is bounded: the tracker's calls retry a bounded number
    of times). Elsewhere than in the main thread this does nothing (Python delivers signals to the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[str] = []

    def handler(signum: int, frame: Any) -> None:
        if fired:
            return  # already stopping
        fired.append(signal.Signals(signum).name)
        if _deferring["depth"]:
            _deferring["pending"] = fired[0]  # raised when the step in progress is whole (signals_deferred)
            return
        raise SweepInterrupted(fired[0])

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def not_yet_retried(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The interrupted trials that have no retry yet."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials}
    return [t for t in trials if t.state == TrialState.FAIL and t.user_attrs.get(INTERRUPTED_ATTR) and t.number not in retried]


def resume_line(t: optuna.trial.FrozenTrial) -> str:
    """What a start says about an interrupted trial it enqueued again."""
    return f"resuming: trial {t.number} was interrupted in stage {t.user_attrs.get('failed_stage', '?')}; it runs again first (it costs no budget)"


def requeue_interrupted(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Enqueue again every interrupted trial that has no retry yet (same params, the baseline mark kept); return them.

    Call it under the storage's lock: two workers starting together would each enqueue the same retry.
    """
    requeued = []
    for t in not_yet_retried(study):
        history = [*t.system_attrs.get("retry_history", []), t.number]
        system_attrs = {k: v for k, v in t.system_attrs.items() if k == "fixed_params"}
        study.add_trial(
            optuna.create_trial(
                state=TrialState.WAITING,
                params=t.params,
                distributions=t.distributions,
                user_attrs={"retry_of_interrupted": t.number, **({"baseline": True} if t.user_attrs.get("baseline") else {})},
                system_attrs={**system_attrs, "failed_trial": t.number, "retry_history": history},
            )
        )
        requeued.append(t)
    return requeued


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM ignored while the block runs (e.g. while waiting for workers that are recording an interrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


_deferring = {"depth": 0, "pending": None}  # see signals_deferred (main thread only, like every signal handler)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Under ``interrupts_end_trials``, a SIGINT or SIGTERM that arrives while the block runs is raised right after it:
    a step that writes to both stores (a trial created and its run opened) is done whole or not at all. (Blocking the
    signal with ``pthread_sigmask`` would not do: another thread of the process, e.g. Dask's event loop, receives it
    and Python runs the handler in the main thread all the same.)"""
    _deferring["depth"] += 1
    try:
        yield
    finally:
        _deferring["depth"] -= 1
        pending = _deferring["pending"]
        if _deferring["depth"] == 0 and pending is not None:
            _deferring["pending"] = None
            raise SweepInterrupted(str(pending))


def record_interrupted(trial: optuna.Trial, tracker: Tracker, run_id: str | None, stage: str, signame: str) -> None:
    """Both stores say interrupted, with the stage; the next start enqueues the trial again (``requeue_interrupted``)."""
    reason = f"interrupted by {signame} during stage {stage}; the next run retries it"
    trial.set_user_attr(INTERRUPTED_ATTR, signame)
    trial.set_user_attr("failed_stage", stage)
    trial.set_user_attr("error", reason)
    if run_id is None:
        return
    tags = {"hailo_sweep.state": "INTERRUPTED", "hailo_sweep.failed_stage": stage, "hailo_sweep.error": reason}
    if stage == "record":
        tags["hailo_sweep.artifacts"] = "partial"  # some of its files may have been uploaded before the signal
    try:
        tracker.end_as(run_id, "KILLED", tags)
    except Exception:  # noqa: BLE001  (tracking is down as well: `reconcile` ends the run at the next start)
        pass


def record_write_error(trial: optuna.Trial, tracker: Tracker, run_id: str, exc: BaseException) -> str:
    """A write failed while recording: the trial's reason in both stores, its run FAILED with state FAIL and its
    artifacts marked partial (some may be uploaded, the rest not). Returns the reason."""
    reason = f"recording failed: {type(exc).__name__}: {exc}"
    trial.set_user_attr("failed_stage", "record")
    trial.set_user_attr("error", reason[:2000])
    tags = {"hailo_sweep.state": "FAIL", "hailo_sweep.failed_stage": "record", "hailo_sweep.error": reason, "hailo_sweep.artifacts": "partial"}
    try:
        tracker.end_as(run_id, "FAILED", tags)
    except Exception:  # noqa: BLE001  (the tracking store is on the full disk too: `reconcile` fixes the run later)
        pass
    model_id = trial.user_attrs.get("mlflow_model_id")
    if model_id:  # logged before the write that failed: it belongs to a failed trial now
        tracker.fail_model(str(model_id))
    return reason


def reconcile(study: optuna.Study, tracker: Tracker) -> int:
    """Make the MLflow run of every failed Optuna trial agree with it: a run left RUNNING (tracking was down), or ended
    with a state tag that is not the trial's (a full disk cut its record short) ends FAILED (KILLED if interrupted)
    with the trial's state, stage and reason."""
    fixed = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = t.user_attrs.get("mlflow_run_id")
        if not run_id:
            continue
        run = tracker.get_run(run_id)
        interrupted = bool(t.user_attrs.get(INTERRUPTED_ATTR))
        state, status = ("INTERRUPTED", "KILLED") if interrupted else ("FAIL", "FAILED")
        if run is None or (run.info.status != "RUNNING" and run.data.tags.get("hailo_sweep.state") == state):
            continue
        tags = {"hailo_sweep.state": state, "hailo_sweep.reconciled": "true"}
        for key, attr in (("hailo_sweep.failed_stage", "failed_stage"), ("hailo_sweep.error", "error")):
            if attr in t.user_attrs:
                tags[key] = str(t.user_attrs[attr])
        if run.info.status in ("FINISHED", "RUNNING") and t.user_attrs.get("failed_stage") == "record":
            tags["hailo_sweep.artifacts"] = "partial"
        tracker.end_as(run_id, status if run.info.status in ("RUNNING", "FINISHED") else run.info.status, tags)
        fixed += 1
    return fixed
