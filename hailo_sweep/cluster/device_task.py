"""The task a device host runs: one compiled model on its device. Imports the runtime only (see ``payloads``).

A Raspberry Pi with HailoRT and ``hailo-sweep`` installed runs this; the compiler, MLflow, Optuna and ONNX Runtime
are never imported here (``tests/test_cluster.py`` checks it from ``sys.modules``).
"""

from __future__ import annotations

import socket
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

from hailo_sweep.backends.base import BackendContext
from hailo_sweep.cluster.payloads import DeviceCheck, DeviceJob, DevicePart, DeviceRun
from hailo_sweep.device_stage import run_device
from hailo_sweep.errors import UserInputError


def run_on_device(part: DevicePart | None, evaluation: dict[str, np.ndarray], job: DeviceJob) -> DeviceRun:
    """Run the compiled model on this host's device over the evaluation set fed as ``job.placement``.

    A device failure is returned, not raised (the driver records it as the trial's device stage); a dead worker is
    Dask's to handle (the task is run again on another worker with the same resource).
    """
    host = worker_name()
    start = time.perf_counter()
    notes: list[str] = []
    metrics: dict[str, float] = {}
    if part is None:
        return DeviceRun(None, error="the compile host returned no compiled model", host=host)
    try:
        with tempfile.TemporaryDirectory(prefix=f"hailo-sweep-device-{job.trial:04d}-") as tmp:
            path = Path(tmp) / Path(part.compiled_name).name
            path.write_bytes(part.compiled_bytes)
            dev, repeat = run_device(part.device_spec, path, evaluation[job.placement], job.determinism_samples, notes, metrics)
        return DeviceRun(dev, repeat, notes, metrics, time.perf_counter() - start, host=host)
    except Exception as exc:  # the trial fails in stage device, with this host's reason
        return DeviceRun(None, None, notes, metrics, time.perf_counter() - start, f"{type(exc).__name__}: {exc}", traceback.format_exc(), host)


def check_device_host(backend: str, context: BackendContext) -> DeviceCheck:
    """Before the first trial, on each device host: the backend's own device check (``Backend.check_device``); a
    device that cannot run the target (e.g. a Hailo-8 on a worker that offers hailo8l) comes back as ``refused``."""
    from hailo_sweep.backends import backend_class

    host = socket.gethostname()
    try:
        notes = backend_class(backend)(context).check_device()
    except UserInputError as exc:
        return DeviceCheck(refused=f"{host}: {exc.problem}", fix=exc.fix)
    return DeviceCheck(notes=[f"{host}: {note}" for note in notes])


def worker_name() -> str:
    """``host (dask worker name)``: which device host ran it, as the run's params say."""
    host = socket.gethostname()
    try:
        from distributed import get_worker

        return f"{host} ({get_worker().name})"
    except (ImportError, ValueError):  # not inside a Dask worker (a test calling the task directly)
        return host

