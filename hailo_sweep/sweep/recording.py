"""Recording off the critical path: a trial's artifacts (plots, tables, the compiled model) and its LoggedModel files are
uploaded by one background thread while the next trial runs.

What the sweep and the sampler read is written before a trial returns: params, metrics, tags, the Optuna user attrs and
the LoggedModel's id. What only a person or ``best --export`` reads later (files) goes through this queue. Each job runs
in submission order; a job that fails is recorded on its run (tag ``hailo_sweep.upload_error``; the run ends as its trial
did: the measurements are on record, the tag says which files are missing) and counted, never raised into the sweep.
``flush`` waits for every job and is called before a sweep returns, so a finished sweep has every file in place. A run
whose upload was lost with the tracking store (left RUNNING) is ended by ``reconcile_uploads`` at the next start.
"""

from __future__ import annotations

import datetime
import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState

from hailo_sweep.tracking import Tracker

Job = Callable[[Tracker], None]


@dataclass
class UploadFailure:
    run_id: str
    what: str
    error: str


@dataclass
class _Item:
    run_id: str
    what: str
    job: Job
    staging: Path | None  # removed after the job, whatever its outcome
    run_failed: bool = False  # how the run ends if the job fails


@dataclass
class UploadStats:
    jobs: int = 0
    seconds: float = 0.0  # time spent uploading, in the background
    failures: list[UploadFailure] = field(default_factory=list)


class ArtifactUploader:
    """One background thread with its own MLflow client, fed through a FIFO queue."""

    def __init__(self, tracking_uri: str, experiment_name: str, artifact_location: str | None = None, *, background: bool = True):
        self._tracker_args = (tracking_uri, experiment_name, artifact_location)
        self._tracker: Tracker | None = None
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.background = background
        self.stats = UploadStats()
        self._lock = threading.Lock()

    def submit(self, run_id: str, what: str, job: Job, staging: Path | None = None, *, run_failed: bool = False) -> None:
        item = _Item(run_id, what, job, staging, run_failed)
        if not self.background:
            self._run(item)
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="hailo-sweep-uploads", daemon=True)
            self._thread.start()
        self._queue.put(item)

    def flush(self) -> UploadStats:
        """Wait until every submitted job has run; returns the totals so far (failures included)."""
        if self._thread is not None:
            self._queue.join()
        return self.stats

    def close(self) -> UploadStats:
        stats = self.flush()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        return stats

    # -- internals -----------------------------------------------------------------------------------------
    def _client(self) -> Tracker:
        if self._tracker is None:
            self._tracker = Tracker(*self._tracker_args)
        return self._tracker

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._run(item)
            finally:
                self._queue.task_done()

    def _run(self, item: _Item) -> None:
        start = time.perf_counter()
        try:
            item.job(self._client())
        except Exception as exc:  # an upload is a record, not a measurement: the sweep goes on, the run says what is missing
            error = f"{type(exc).__name__}: {str(exc)[:500]}"
            with self._lock:
                self.stats.failures.append(UploadFailure(item.run_id, item.what, error))
            try:
                tracker = self._client()
                tracker.set_tags(item.run_id, {"hailo_sweep.upload_error": f"{item.what}: {error}"})
                tracker.finish(item.run_id, failed=item.run_failed)
            except Exception:  # the store itself is gone: the failure stays in the stats (and the parent's count)
                pass
        finally:
            with self._lock:
                self.stats.jobs += 1
                self.stats.seconds += time.perf_counter() - start
            if item.staging is not None:
                shutil.rmtree(item.staging, ignore_errors=True)


UPLOAD_LOST = "upload lost: the tracking store was unreachable when the files were sent"


def reconcile_uploads(study: optuna.Study, tracker: Tracker, *, older_than_s: float) -> int:
    """End every run of a finished (non-duplicate) trial still RUNNING because its upload was lost; returns the count.

    Only trials finished more than ``older_than_s`` ago: another worker may still be uploading a recent one."""
    fixed = 0
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        run_id = t.user_attrs.get("mlflow_run_id")
        recent = t.datetime_complete is None or (now - t.datetime_complete.replace(tzinfo=None)).total_seconds() < older_than_s
        if run_id and not recent and "duplicate_of" not in t.user_attrs and tracker.run_status(run_id) == "RUNNING":
            tracker.set_tags(run_id, {"hailo_sweep.upload_error": UPLOAD_LOST, "hailo_sweep.reconciled": "true"})
            tracker.finish(run_id)
            fixed += 1
    return fixed
