"""The task a compile host runs: optimize, emulate and compile one trial (``trial.build``), where the toolchain is.

Each worker process keeps one backend per sweep (``SweepPayload.key``): the model file is written once, the backend's
``prepare`` (translation, pre-processing) runs once, and every later trial of the sweep reuses them. A stage that
fails is returned in the result, not raised, so the driver records it like a local trial's failure.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hailo_sweep.backends import backend_class
from hailo_sweep.backends.base import Backend
from hailo_sweep.cluster.device_task import worker_name
from hailo_sweep.cluster.payloads import Built, BuildJob, DevicePart, SweepPayload
from hailo_sweep.trial import Fed, Ladder, build, finalize
from hailo_sweep.trial_result import TrialResult


@dataclass
class _Host:
    backend: Backend
    root: Path
    facts: dict[str, str | float]
    lock: threading.Lock


_HOSTS: dict[str, _Host] = {}
_HOSTS_LOCK = threading.Lock()


def _host(payload: SweepPayload) -> _Host:
    with _HOSTS_LOCK:
        host = _HOSTS.get(payload.key)
        if host is None:
            root = Path(tempfile.gettempdir()) / "hailo-sweep-worker" / payload.key
            model = root / "model" / payload.model_name
            model.parent.mkdir(parents=True, exist_ok=True)
            if not model.is_file() or model.read_bytes() != payload.model_bytes:
                model.write_bytes(payload.model_bytes)
            context = dataclasses.replace(payload.context, model_path=model, work_dir=root / "backend")
            backend = backend_class(payload.backend)(context)
            backend.__enter__()  # held for the worker's lifetime: later trials of this sweep reuse it
            facts = {f"backend.{k}": v for k, v in backend.prepare().items()}
            host = _HOSTS[payload.key] = _Host(backend, root, facts, threading.Lock())
        return host


def build_on_host(payload: SweepPayload, calibration: dict[str, np.ndarray], evaluation: dict[str, np.ndarray], job: BuildJob) -> Built:
    """One trial's optimize -> emulate -> compile on this host; the compiled file and the logs come back as data."""
    result = TrialResult(settings=job.settings)
    ladder = Ladder(result, None, {})  # stage time limits need the main thread: the driver bounds a task's wait instead
    built = Built(result=result, emulations={}, host=worker_name())
    try:
        host = _host(payload)
    except Exception as exc:  # a backend that cannot start here fails the trial with this host's reason
        result.fail("prepare", exc)
        return built
    built.facts = host.facts
    placement = job.settings.normalization_placement
    fed = Fed(calibration[placement], evaluation[placement])
    work_dir = host.root / "trials" / f"{job.trial:04d}-{uuid.uuid4().hex[:8]}"
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        with host.lock:
            _, built.emulations = build(host.backend, job.settings, fed, work_dir, ladder, layer_noise_samples=job.layer_noise_samples)
        compiled = result.compiled
        if compiled is not None:
            name = Path(compiled.path).name
            built.device = DevicePart(name, Path(compiled.path).read_bytes(), host.backend.device_spec(compiled))
            result.compiled = dataclasses.replace(compiled, path=Path(name))
    except Exception as exc:
        result.fail(ladder.current, exc)
    finally:
        finalize(result, work_dir)
        built.logs = {log.name: log.read_text(encoding="utf-8", errors="replace") for log in result.logs if log.is_file()}
        result.logs = []
        shutil.rmtree(work_dir, ignore_errors=True)
    return built


def chosen_backend(requested: str) -> tuple[str, str | None]:
    """What ``backend: requested`` means on this host (``auto``: hailo where its SDK imports), and the note to show."""
    from hailo_sweep.backends import select_backend

    cls, note = select_backend(requested)
    return cls.name, note


def device_part(built: Built) -> DevicePart | None:
    """Runs where ``built`` is (the compile host): only the compiled file and its spec go on to the device host."""
    return built.device

