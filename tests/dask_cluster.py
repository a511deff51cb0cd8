"""A real Dask cluster on 127.0.0.1 for tests: ``dask scheduler`` and ``dask worker`` subprocesses, as a user starts them.

    with DaskCluster(tmp_path, [WorkerSpec("compile-0", {"compile": 1}),
                                WorkerSpec("pi-0", {"hailo8l": 1}, env=fake_hailo_env())]) as cluster:
        client = Client(cluster.address)
        ...
        cluster.kill("pi-0")          # SIGKILL: the worker is gone as if its Raspberry Pi lost power

Each worker runs ``--no-nanny`` by default: with a nanny, a SIGKILL'd worker process is restarted by its nanny (a
new worker with the same name and resources rejoins), which is not what a dead Pi does. Every process starts in its
own session, so ``kill`` and the teardown signal the whole process group (the nanny and its worker, if a nanny is
asked for) and leave nothing behind. Logs go to ``<dir>/<name>.log``; a process that dies on start is reported with
the end of its log. Register the ``dask_cluster`` fixture in ``tests/conftest.py`` with
``from tests.dask_cluster import dask_cluster  # noqa: F401``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

FAKES = Path(__file__).resolve().parent / "fakes"
START_TIMEOUT_S = 60.0  # a worker imports distributed (and, for our tasks, hailo_sweep) on a busy 2-core machine
STOP_GRACE_S = 5.0


def dask_command() -> list[str]:
    """The ``dask`` command of this interpreter's environment (the one pip installed with ``distributed``)."""
    script = Path(sys.executable).with_name("dask")
    return [str(script)] if script.exists() else [shutil.which("dask") or "dask"]


def fake_hailo_env(devices: str | None = None, **delays: float) -> dict[str, str]:
    """Environment of a worker that imports the contract fakes of the Hailo SDK instead of the real packages:
    ``devices`` like ``"0000:01:00.0=HAILO8L"`` (HAILO_FAKE_DEVICES); ``compile_delay_s=10`` etc. set the fake's
    HAILO_FAKE_<NAME> variables (see tests/fakes/_fake_hailo_core.py)."""
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(FAKES), os.environ.get("PYTHONPATH", "")) if p)}
    if devices is not None:
        env["HAILO_FAKE_DEVICES"] = devices
    for name, value in delays.items():
        env[f"HAILO_FAKE_{name.upper()}"] = str(value)
    return env


@dataclass(frozen=True)
class TlsFiles:
    """One CA and one certificate/key pair it signed, used by the scheduler, the workers and the client alike."""

    ca_file: Path
    cert: Path
    key: Path

    def flags(self) -> list[str]:
        return ["--tls-ca-file", str(self.ca_file), "--tls-cert", str(self.cert), "--tls-key", str(self.key)]


@dataclass(frozen=True)
class WorkerSpec:
    name: str
    resources: Mapping[str, float] = field(default_factory=dict)  # e.g. {"compile": 1}; {} for none
    env: Mapping[str, str] = field(default_factory=dict)  # added to this process's environment
    nanny: bool = False
    nthreads: int = 1

    def resources_flag(self) -> list[str]:
        if not self.resources:
            return []
        return ["--resources", " ".join(f"{name}={amount:g}" for name, amount in self.resources.items())]


class DaskCluster:
    """A scheduler and workers as subprocesses; a context manager. ``address`` is the scheduler's (tcp:// or tls://)."""

    def __init__(self, directory: Path, workers: Sequence[WorkerSpec] = (), *, tls: TlsFiles | None = None, timeout_s: float = START_TIMEOUT_S,
                 scheduler_env: Mapping[str, str] | None = None):
        self.directory = Path(directory)
        self.tls = tls
        self.scheduler_env = dict(scheduler_env or {})  # e.g. DASK_DISTRIBUTED__SCHEDULER__... settings
        self.timeout_s = timeout_s
        self.address = ""
        self._initial = list(workers)
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._specs: dict[str, WorkerSpec] = {}

    # -- life cycle ---------------------------------------------------------------------------------------------------
    def __enter__(self) -> DaskCluster:
        try:
            self._start_scheduler()
            for spec in self._initial:
                self.start_worker(spec)
            self.wait_for_workers(len(self._initial))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """SIGTERM every process group (workers first), SIGKILL what is left after a short grace."""
        names = [n for n in self._procs if n != "scheduler"] + (["scheduler"] if "scheduler" in self._procs else [])
        for name in names:
            _signal_group(self._procs[name], signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for name in names:
            proc = self._procs[name]
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)  # the group may hold children even when its leader has exited
            proc.wait()
        self._procs.clear()

    def _start_scheduler(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        scheduler_file = self.directory / "scheduler.json"
        scheduler_file.unlink(missing_ok=True)
        args = [*dask_command(), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--scheduler-file", str(scheduler_file)]
        if self.tls is not None:
            args += ["--protocol", "tls", *self.tls.flags()]
        proc = self._spawn("scheduler", args, self.scheduler_env)
        deadline = time.monotonic() + self.timeout_s
        while True:  # the file is written once the scheduler listens; the process may die first (a port, a flag)
            address = _read_address(scheduler_file)
            if address:
                self.address = address
                return
            if proc.poll() is not None:
                raise RuntimeError(f"dask scheduler exited with {proc.returncode}:\n{self.log_tail('scheduler')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"dask scheduler wrote no {scheduler_file} in {self.timeout_s:g} s:\n{self.log_tail('scheduler')}")
            time.sleep(0.05)

    def start_worker(self, spec: WorkerSpec) -> None:
        """Start one more worker (returns at once; ``wait_for_workers`` waits for it to join)."""
        if spec.name in self._procs:
            raise ValueError(f"a process named {spec.name!r} already runs")
        args = [*dask_command(), "worker", self.address, "--name", spec.name, "--nthreads", str(spec.nthreads),
                "--host", "127.0.0.1", "--no-dashboard", "--local-directory", str(self.directory / spec.name), "--nanny" if spec.nanny else "--no-nanny",
                *spec.resources_flag()]
        if self.tls is not None:
            args += self.tls.flags()
        self._specs[spec.name] = spec
        self._spawn(spec.name, args, dict(spec.env))

    def wait_for_workers(self, n: int) -> None:
        """Until ``n`` workers run (Dask's ``Client.wait_for_workers``), in rounds of a second so that a worker that
        exits meanwhile fails the wait at once, with its log."""
        from distributed import Client

        if n < 1:
            return

        deadline = time.monotonic() + self.timeout_s
        with Client(self.address, security=self.security(), timeout=self.timeout_s) as client:
            while True:
                try:
                    client.wait_for_workers(n, timeout=1.0)
                    return
                except TimeoutError:
                    pass
                dead = [name for name in self._specs if name in self._procs and self._procs[name].poll() is not None]
                if dead:
                    raise RuntimeError(f"dask worker {dead[0]} exited with {self._procs[dead[0]].returncode}:\n{self.log_tail(dead[0])}")
                if time.monotonic() > deadline:
                    logs = "\n".join(f"--- {name}\n{self.log_tail(name)}" for name in self._specs)
                    raise RuntimeError(f"fewer than {n} workers joined in {self.timeout_s:g} s:\n{logs}")

    # -- faults -------------------------------------------------------------------------------------------------------
    def kill(self, name: str) -> None:
        """SIGKILL the worker ``name`` (its whole process group), as a machine that loses power; waits for it to die."""
        proc = self._procs.pop(name)
        _signal_group(proc, signal.SIGKILL)
        proc.wait()

    def pid(self, name: str) -> int:
        return self._procs[name].pid

    # -- helpers ------------------------------------------------------------------------------------------------------
    def security(self) -> Any:
        if self.tls is None:
            return None
        from distributed.security import Security

        return Security(tls_ca_file=str(self.tls.ca_file), tls_client_cert=str(self.tls.cert), tls_client_key=str(self.tls.key), require_encryption=True)

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.directory / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        with open(self.directory / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env, start_new_session=True)
        self._procs[name] = proc
        return proc


def _read_address(path: Path) -> str | None:
    try:
        return str(json.loads(path.read_text())["address"])
    except (OSError, ValueError, KeyError):  # not written yet, or half written
        return None


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session: the group id is the leader's pid
    except (ProcessLookupError, PermissionError):
        pass


StartCluster = Callable[..., DaskCluster]


@pytest.fixture
def dask_cluster(tmp_path: Path) -> Iterator[StartCluster]:
    """``start(workers, tls=None) -> DaskCluster``, started and waited for; every cluster is torn down after the test."""
    started: list[DaskCluster] = []

    def start(workers: Sequence[WorkerSpec] = (), *, tls: TlsFiles | None = None) -> DaskCluster:
        cluster = DaskCluster(tmp_path / f"dask-{len(started)}", workers, tls=tls)
        started.append(cluster)
        return cluster.__enter__()

    yield start
    for cluster in reversed(started):
        cluster.close()
