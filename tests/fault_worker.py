"""A launcher for the fault tests, and the process bookkeeping they share.

Why a separate script: the faults under test (a worker killed mid-trial, workers racing to fail a stale trial) only
mean something across processes, and monkeypatching has to happen inside the process that runs the trial.

Usage:
    python tests/fault_worker.py hang-compile MARKER -- <hailo-sweep arguments>
        The first compile of this process writes MARKER (its trial work dir's name) and blocks forever, like a
        compiler that hangs or a machine that froze; the test then kills the process group.
    python tests/fault_worker.py fail-stale READY GO OPTUNA_URL MLFLOW_URI STUDY
        Opens the study with hailo-sweep's storage, writes READY, waits (bounded) until GO exists, then fails the
        study's stale trials, so that several processes do it at the same instant.

The tests import ``Processes`` and ``wait_until`` from here: every process a test starts is its own process group
(``start_new_session``) and is killed with its group when the test ends, pass or fail.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GO_TIMEOUT_S = 60.0
SELF = Path(__file__).resolve()


# -- used by the tests -------------------------------------------------------------------------------------------
def hailo_sweep(*args: str) -> list[str]:
    """The command line of ``hailo-sweep ARGS`` in this interpreter."""
    return [sys.executable, "-m", "hailo_sweep.cli", *args]


def launcher(*args: str) -> list[str]:
    """The command line of this script."""
    return [sys.executable, str(SELF), *args]


def wait_until(condition: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


#: the fault and distributed tests' space, 12 points: trials are quick, and concurrent workers rarely draw the same settings
SMALL_SPACE = {
    "optimization_level": [0, 1, 2],
    "compression_level": [0],
    "calibset_size": [64],
    "normalization_placement": ["host", "model"],
    "output_16bit": ["none", "logits"],
}


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""

    def wait(self, timeout: float) -> int:
        """The exit code; fails the test (with the process's output) if it does not exit within ``timeout``."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit within {timeout:g} s; its output:\n{self.output()[-4000:]}") from None

    def kill(self) -> None:
        """SIGKILL the whole process group (the worker and anything it started)."""
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(timeout=30)


class Processes:
    """Starts processes in their own process groups; on exit kills every group still alive and reaps it."""

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None):
        self.log_dir = log_dir
        self.env = {**os.environ, "COLUMNS": "200", **(env or {})}
        self.procs: list[Proc] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, cmd: Sequence[str], cwd: Path) -> Proc:
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as fh:  # the child keeps its own copy of the descriptor
            popen = subprocess.Popen(list(cmd), cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            if proc.popen.poll() is None:
                proc.kill()
            else:
                try:  # the leader exited; kill anything left in its group
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


# -- run as a script -----------------------------------------------------------------------------------------------
def install_hanging_compile(marker: Path) -> None:
    """From now on, this process's first compile writes ``marker`` (its trial work dir's name) and never returns
    (a signal handler that raises still ends the wait: lock waits are interruptible on POSIX)."""
    from hailo_sweep.backends.onnxruntime.backend import OnnxRuntimeBackend

    def hanging_compile(self, model, work_dir):  # type: ignore[no-untyped-def]
        tmp = marker.with_name(marker.name + ".tmp")
        tmp.write_text(Path(work_dir).name, encoding="utf-8")
        os.replace(tmp, marker)  # the test never sees a half-written marker
        threading.Event().wait()  # forever: the heartbeat thread keeps the trial alive until the process is killed

    OnnxRuntimeBackend.compile = hanging_compile  # type: ignore[method-assign]


def hang_compile(marker: Path, cli_args: list[str]) -> None:
    """Run ``hailo-sweep <cli_args>`` with a compile stage that announces itself and never returns."""
    from hailo_sweep.cli import app

    install_hanging_compile(marker)
    app(args=cli_args, prog_name="hailo-sweep")


def hanging_workers_env(site_dir: Path, marker_dir: Path) -> dict[str, str]:
    """The environment under which every Python process started (e.g. the workers of ``run --jobs N``, which the test
    cannot start itself) hangs in its first compile, writing ``marker_dir/<pid>``: a ``sitecustomize`` in ``site_dir``."""
    site_dir.mkdir(parents=True, exist_ok=True)
    marker_dir.mkdir(parents=True, exist_ok=True)
    (site_dir / "sitecustomize.py").write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "if sys.argv[1:2] == ['worker'] or 'hailo_sweep.cli' in ' '.join(sys.orig_argv):\n"
        "    from pathlib import Path\n"
        "    from tests.fault_worker import install_hanging_compile\n"
        f"    install_hanging_compile(Path({str(marker_dir)!r}) / str(os.getpid()))\n",
        encoding="utf-8",
    )
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(site_dir), os.environ.get("PYTHONPATH", "")) if p)}


def fail_stale(ready: Path, go: Path, optuna_url: str, mlflow_uri: str, study_name: str) -> None:
    """Fail the study's stale trials at the moment GO appears (the race between workers that notice the same death)."""
    import optuna

    from hailo_sweep.sweep import StaleTrialHandler, open_storage

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")
    storage = open_storage(optuna_url, heartbeat_interval=1, grace_period=2, on_stale=StaleTrialHandler(mlflow_uri, study_name, max_retry=1))
    study = optuna.load_study(study_name=study_name, storage=storage)
    study.get_trials(deepcopy=False)  # connections and caches warm before the start line
    ready.write_text(str(os.getpid()), encoding="utf-8")
    deadline = time.monotonic() + GO_TIMEOUT_S
    while not go.exists():  # a start line for all processes at once
        if time.monotonic() > deadline:
            raise SystemExit("fault_worker: GO never appeared")
        time.sleep(0.001)
    optuna.storages.fail_stale_trials(study)


def main(argv: list[str]) -> None:
    if len(argv) >= 3 and argv[0] == "hang-compile" and argv[2] == "--":
        hang_compile(Path(argv[1]), argv[3:])
    elif len(argv) == 6 and argv[0] == "fail-stale":
        fail_stale(Path(argv[1]), Path(argv[2]), argv[3], argv[4], argv[5])
    else:
        raise SystemExit(__doc__)



def assert_artifacts_whole(client: Any, study: Any, computed: list[Any], runs_by_id: dict[str, Any]) -> list[Any]:
    """Every computed trial's run has its report and one compiled model, uploaded whole (its size is the size the
    compile stage measured on disk), and there is exactly one LoggedModel per computed trial. Returns the models."""
    for t in computed:
        run_id = t.user_attrs["mlflow_run_id"]
        assert {"report.json", "compiled"} <= {a.path for a in client.list_artifacts(run_id)}
        compiled = client.list_artifacts(run_id, "compiled")
        assert [a.path for a in compiled] == ["compiled/model.int8.onnx"]
        assert compiled[0].file_size == runs_by_id[run_id].data.metrics["compile.size_bytes"]
    models = client.search_logged_models(experiment_ids=[study.user_attrs["mlflow_experiment_id"]])
    assert sorted(lm.model_id for lm in models) == sorted(t.user_attrs["mlflow_model_id"] for t in computed)
    return models

if __name__ == "__main__":
    main(sys.argv[1:])
