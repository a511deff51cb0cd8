"""The study store: Optuna's RDB storage with hailo-sweep's locks and budget check, stale workers, scratch clean-up."""

from __future__ import annotations

import contextlib
import fcntl
import random
import shutil
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from hailo_sweep import sqlite_journal
from hailo_sweep.stores import redact_url
from hailo_sweep.sweep.budget import Budget, BudgetSpent
from hailo_sweep.tracking import Tracker

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
        sqlite_journal.use_wal(url)
    else:
        engine_kwargs["pool_pre_ping"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return SweepStorage(url, engine_kwargs=engine_kwargs, **kwargs)

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

