"""MLflow tracking: one experiment per sweep, one parent run, one child run per trial, compiled models as LoggedModels.

This module knows MLflow and nothing about Hailo or Optuna: it logs ``RunRecord``s built by the sweep. Logging is
manual and batched (one ``log_batch`` call per run) because per-call logging is 4-10x slower on sqlite.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS, MLFLOW_PARENT_RUN_ID

from hailo_sweep import sqlite_journal
from hailo_sweep.stores import redact_url  # noqa: F401  (re-exported: the tracking store's URLs are redacted too)

MAX_PARAM_LEN = 6000
MAX_TAG_LEN = 5000
ROLE_TAG = "hailo_sweep.role"
#: the experiment tag the MLflow UI reads for the kind of experiment; ours are model training, not GenAI
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
NOTE_TAG = "mlflow.note.content"  # a run's (or experiment's) description, rendered as Markdown by the UI
SHARED_VIEW_TAG = "mlflow.sharedViewState."  # + key: a saved runs-table view, opened with ?viewStateShareKey=<key>


def quiet_mlflow_env() -> None:
    """Telemetry off, no URL printing, bounded HTTP retries; each unless the user chose otherwise in their environment."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")



@dataclass
class RunRecord:
    name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    artifacts: Sequence[tuple[Path, str]] = field(default_factory=list)  # (local file, artifact directory)
    failed: bool = False
    model_id: str | None = None  # metrics named in ``model_metrics`` are also the LoggedModel's (the Models tab)
    model_metrics: Sequence[str] = ()


@dataclass
class LoggedModelRecord:
    name: str
    path: Path
    model_type: str
    params: Mapping[str, Any] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)


class TrackingUnavailable(Exception):
    """The tracking store stayed unreachable after bounded retries."""


_TRANSIENT_TEXT = ("connection refused", "max retries exceeded", "database is locked", "could not connect", "temporarily unavailable", "timed out", "connection reset", "server closed the connection")


def _transient(exc: BaseException) -> bool:
    import requests
    from sqlalchemy.exc import OperationalError

    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, OperationalError, ConnectionError, TimeoutError)):
        return True
    return isinstance(exc, mlflow.exceptions.MlflowException) and any(t in str(exc).lower() for t in _TRANSIENT_TEXT)


class _RetryingClient:
    """``MlflowClient`` whose calls retry transient failures a bounded number of times, then raise ``TrackingUnavailable``."""

    def __init__(self, client: MlflowClient, uri: str, attempts: int = 3, first_delay: float = 1.0):
        self._client, self._uri, self._attempts, self._first_delay = client, uri, attempts, first_delay

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._client, name)
        if not callable(target):
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            delay = self._first_delay
            for attempt in range(1, self._attempts + 1):
                try:
                    return target(*args, **kwargs)
                except Exception as exc:
                    if not _transient(exc):
                        raise
                    if attempt == self._attempts:
                        raise TrackingUnavailable(
                            f"the MLflow tracking store {redact_url(self._uri)} did not answer {name}() after {self._attempts} attempts: "
                            f"{type(exc).__name__}: {redact_url(str(exc).splitlines()[0])[:300]}"  # the client's error repeats the URL
                        ) from exc
                    time.sleep(delay)
                    delay *= 2
            raise AssertionError("unreachable")

        return call


class Tracker:
    """Thin, explicit wrapper over ``MlflowClient`` bound to one tracking URI and one experiment."""

    def __init__(self, tracking_uri: str, experiment_name: str, artifact_location: str | None = None):
        quiet_mlflow_env()
        sqlite_journal.use_wal(tracking_uri)
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.artifact_location = artifact_location
        # Only the explicit client is used: mlflow.set_tracking_uri() would also set MLFLOW_TRACKING_URI in this
        # process's environment and leak one sweep's store into the next.
        self.client: Any = _RetryingClient(MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri), tracking_uri)
        self._experiment_id: str | None = None

    # -- experiment and parent ---------------------------------------------------------------------------
    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment_name)
            if exp is None:
                try:
                    self._experiment_id = self.client.create_experiment(
                        self.experiment_name, artifact_location=self.artifact_location, tags=dict([EXPERIMENT_KIND])
                    )
                except mlflow.exceptions.MlflowException:  # created concurrently by another process
                    exp = self.client.get_experiment_by_name(self.experiment_name)
                    if exp is None:
                        raise
                    self._experiment_id = exp.experiment_id
            else:
                if exp.lifecycle_stage == "deleted":
                    self.client.restore_experiment(exp.experiment_id)
                if exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:  # created by an older version
                    self.client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    def create_parent_run(self, record: RunRecord) -> str:
        run = self.client.create_run(self.experiment_id, run_name=record.name, tags={ROLE_TAG: "sweep", **record.tags})
        self._log_batch(run.info.run_id, record)
        return run.info.run_id

    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def finish(self, run_id: str, *, failed: bool = False) -> None:
        self.client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")

    def end_as(self, run_id: str, status: str, tags: Mapping[str, str]) -> None:
        """End a trial run that did not complete (``FAILED``, or ``KILLED`` when interrupted) with its state and reason
        tags, so that no ended run still says ``RUNNING`` or ``COMPLETE``."""
        self.set_tags(run_id, tags)
        self.client.set_terminated(run_id, status=status)

    def check_reachable(self) -> None:
        """One cheap read, so that an unreachable store is found before anything is created anywhere."""
        self.client.search_experiments(max_results=1)

    def run_status(self, run_id: str) -> str | None:
        try:
            return str(self.client.get_run(run_id).info.status)
        except mlflow.exceptions.MlflowException:
            return None

    def get_run(self, run_id: str) -> Any:
        try:
            return self.client.get_run(run_id)
        except mlflow.exceptions.MlflowException:
            return None

    def run_exists(self, run_id: str) -> bool:
        try:
            run = self.client.get_run(run_id)
        except mlflow.exceptions.MlflowException:
            return False
        return run.info.lifecycle_stage == "active"

    def log_to(self, run_id: str, record: RunRecord) -> None:
        self._log_batch(run_id, record)

    # -- trials --------------------------------------------------------------------------------------------
    def start_child(self, parent_run_id: str, record: RunRecord) -> str:
        """Create the child run (RUNNING) under ``parent_run_id`` and log params, metrics and tags in one batch.

        The parent link is the ``mlflow.parentRunId`` tag, exactly what ``mlflow.start_run(parent_run_id=...)`` sets,
        written through the client so that no process-global "active run" is involved (safe in threads and workers).
        """
        run = self.client.create_run(
            self.experiment_id,
            run_name=record.name,
            tags={MLFLOW_PARENT_RUN_ID: parent_run_id, ROLE_TAG: "trial", **{k: _text(v, MAX_TAG_LEN) for k, v in record.tags.items()}},
        )
        if record.params or record.metrics:  # the tags are the run's already
            self._log_batch(run.info.run_id, dataclasses.replace(record, tags={}))
        return run.info.run_id

    def end_child(self, run_id: str, record: RunRecord) -> None:
        """Log the rest of the record (artifacts included) and end the run as FINISHED or FAILED."""
        self._log_batch(run_id, record)
        self.log_files(run_id, record.artifacts)
        self.client.set_terminated(run_id, status="FAILED" if record.failed else "FINISHED")

    def log_files(self, run_id: str, artifacts: Sequence[tuple[Path, str]]) -> None:
        """Log files as run artifacts, each as (local file, artifact directory; "" for the top), in one
        ``log_artifacts`` call: every ``log_artifact`` call reads the whole run from the store first (10 ms per file
        for a trial's run in sqlite). The files are hard-linked (copied across file systems) into a temporary tree
        beside the first file (not in /tmp, which may be in memory: a compiled model can be large)."""
        if not artifacts:
            return
        with tempfile.TemporaryDirectory(prefix="hailo-sweep-artifacts-", dir=Path(artifacts[0][0]).parent) as tmp:
            for local, artifact_dir in artifacts:
                dst = Path(tmp, artifact_dir, Path(local).name)
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(local, dst)
                except OSError:
                    shutil.copyfile(local, dst)
            self.client.log_artifacts(run_id, tmp)

    def log_model(self, run_id: str, model: LoggedModelRecord) -> str:
        """A LoggedModel holding the compiled file, linked to its trial run; returns the model id."""
        model_id = self.create_model(run_id, model)
        self.upload_model(model_id, model.path)
        return model_id

    def create_model(self, run_id: str, model: LoggedModelRecord) -> str:
        """The LoggedModel's record only (PENDING until ``upload_model``): its id can be stored before the file is uploaded."""
        lm = self.client.create_logged_model(
            self.experiment_id,
            name=model.name,
            source_run_id=run_id,
            model_type=model.model_type,
            params={k: _text(v, MAX_PARAM_LEN) for k, v in model.params.items()},
            tags=dict(model.tags),
        )
        return str(lm.model_id)

    def upload_model(self, model_id: str, path: Path) -> None:
        """Upload the LoggedModel's file and mark it READY; a failed upload marks it FAILED and partial, then raises."""
        try:
            self.client.log_model_artifact(model_id, str(path))
        except BaseException:
            self.fail_model(model_id)  # never left PENDING, never taken for a whole model
            raise
        self.client.finalize_logged_model(model_id, "READY")

    def fail_model(self, model_id: str) -> None:
        """Mark a LoggedModel whose files may be partly uploaded (its trial could not be recorded): FAILED, tagged
        ``hailo_sweep.artifacts=partial``. Best effort: the store may be what failed."""
        for call in (lambda: self.client.set_logged_model_tags(model_id, {"hailo_sweep.artifacts": "partial"}),
                     lambda: self.client.finalize_logged_model(model_id, "FAILED")):
            try:
                call()
            except Exception:  # noqa: BLE001
                pass

    def register(self, model_id: str, name: str, alias: str | None, *, description: str = "", tags: Mapping[str, str] | None = None) -> str:
        """Register a LoggedModel under ``name`` (described and tagged) and point ``alias`` at the new version (unless
        ``alias`` is None); returns the version."""
        try:
            self.client.create_registered_model(name)
        except mlflow.exceptions.MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source_run = self.client.get_logged_model(model_id).source_run_id
        with _global_tracking_uri(self.tracking_uri):  # the registry resolves models:/ through the global URI
            version = self.client.create_model_version(
                name, source=f"models:/{model_id}", run_id=source_run, model_id=model_id,
                description=description or None, tags={k: _text(v, MAX_TAG_LEN) for k, v in (tags or {}).items()},
            )
        # what mlflow.register_model() also does: the Models tab's "Registered models" column reads this tag
        links = json.loads(self.client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
        links.append({"name": name, "version": version.version})
        self.client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(links)})
        if alias is not None:
            self.client.set_registered_model_alias(name, alias, version.version)
        return str(version.version)

    def version_of(self, name: str, model_id: str) -> str | None:
        """The registered version of ``name`` made from LoggedModel ``model_id``, if there is one."""
        try:
            versions = self.client.search_model_versions(f"name = '{name}'")
        except mlflow.exceptions.MlflowException:
            return None
        for v in versions:
            if model_id in (getattr(v, "model_id", None), str(v.source).removeprefix("models:/")):
                return str(v.version)
        return None

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)

    def set_experiment_tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_experiment_tag(self.experiment_id, k, v)

    def save_view(self, key: str, state: Mapping[str, Any]) -> None:
        """A saved view of the experiment's runs table (filter, order, columns, expanded rows), as the UI's "Share"
        button writes it; opened with ``#/experiments/<id>/runs?viewStateShareKey=<key>``."""
        self.client.set_experiment_tag(self.experiment_id, SHARED_VIEW_TAG + key, json.dumps(dict(state)))

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, _text(v, MAX_TAG_LEN)) for k, v in tags.items()])

    def download(self, run_id: str, artifact_path: str, dst: Path) -> Path:
        dst.mkdir(parents=True, exist_ok=True)
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(dst), tracking_uri=self.tracking_uri))

    def download_model(self, model_id: str, dst: Path) -> Path:
        """The files of a LoggedModel (``models:/<id>`` resolves through the global URI, so bind it for the call)."""
        dst.mkdir(parents=True, exist_ok=True)
        with _global_tracking_uri(self.tracking_uri):
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_id}", dst_path=str(dst), tracking_uri=self.tracking_uri))

    # -- internals -----------------------------------------------------------------------------------------
    def _log_batch(self, run_id: str, record: RunRecord) -> None:
        now = int(time.time() * 1000)
        linked = set(record.model_metrics) if record.model_id else set()
        # the UI lists a run's metrics in the order they were logged: the headline ones ("_objective", ...) first
        ordered = sorted(record.metrics.items(), key=lambda kv: not kv[0].startswith("_"))
        metrics = [Metric(k, float(v), now, 0, model_id=record.model_id if k in linked else None) for k, v in ordered if _finite(v)]
        params = [Param(k, _text(v, MAX_PARAM_LEN)) for k, v in record.params.items()]
        tags = [RunTag(k, _text(v, MAX_TAG_LEN)) for k, v in record.tags.items()]
        # MLflow caps one batch at 1000 metrics, 100 params and 100 tags
        chunks = max(math.ceil(len(metrics) / 1000), math.ceil(len(params) / 100), math.ceil(len(tags) / 100))
        for i in range(chunks):
            self.client.log_batch(
                run_id,
                metrics=metrics[i * 1000 : (i + 1) * 1000],
                params=params[i * 100 : (i + 1) * 100],
                tags=tags[i * 100 : (i + 1) * 100],
            )


@contextlib.contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """Temporarily point MLflow's process-global tracking URI (and MLFLOW_TRACKING_URI) at ``uri``, then restore."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # None unsets the variable again


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _text(v: Any, limit: int) -> str:
    s = str(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."
