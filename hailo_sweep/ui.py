"""Starting and stopping the MLflow UI server (bound to 127.0.0.1 unless told otherwise)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass
class UiServer:
    process: subprocess.Popen[bytes]
    base_url: str

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server and every process it spawned (it runs in its own process group)."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=timeout)
        except ProcessLookupError:
            pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex((host, port)) == 0


def start(tracking_uri: str, artifact_root: Path | None, *, host: str = "127.0.0.1", port: int = 5000, log_file: Path | None = None) -> UiServer:
    """Start ``mlflow server`` with one worker and GenAI job execution off (2 processes, ~0.5 GB instead of ~1.8 GB)."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri, "--host", host, "--port", str(port), "--workers", "1"]
    if artifact_root is not None:
        artifact_root.mkdir(parents=True, exist_ok=True)
        cmd += ["--default-artifact-root", artifact_root.resolve().as_uri()]
    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    out = log_file.open("ab") if log_file is not None else subprocess.DEVNULL
    process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    return UiServer(process=process, base_url=f"http://{host}:{port}")


def wait_until_healthy(server: UiServer, timeout: float = 60.0) -> float:
    """Poll ``/health`` until it answers 200; returns the seconds it took. Raises if the server dies or times out."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if server.process.poll() is not None:
            raise RuntimeError(f"the MLflow server exited with code {server.process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{server.base_url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return time.monotonic() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the MLflow server did not answer {server.base_url}/health within {timeout:.0f} s")


def experiment_id(base_url: str, name: str | None) -> str:
    """The id of experiment ``name`` (or of the most recently updated one), asked from the server's REST API.

    The ``ui`` command uses this instead of the MLflow client so that it does not load MLflow itself: the command
    only waits next to the server, and every megabyte it holds counts against the UI's footprint.
    """
    body = json.dumps({"max_results": 200, "order_by": ["last_update_time DESC"]}).encode()
    req = urllib.request.Request(f"{base_url}/api/2.0/mlflow/experiments/search", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        experiments = json.loads(resp.read()).get("experiments", [])
    if name is not None:
        for exp in experiments:
            if exp["name"] == name:
                return str(exp["experiment_id"])
        raise LookupError(f"no experiment named {name!r} in this tracking store (run the sweep first)")
    named = [e for e in experiments if e["name"] != "Default"] or experiments
    if not named:
        raise LookupError("the tracking store has no experiment yet (run a sweep first)")
    return str(named[0]["experiment_id"])


def runs_url(base_url: str, experiment: str) -> str:
    # the plain experiment URL opens MLflow 3's GenAI overview; this one opens the runs table
    return f"{base_url}/#/experiments/{experiment}/runs?workflowType=machine_learning"
