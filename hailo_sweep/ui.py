"""Starting and stopping the MLflow UI server and optuna-dashboard (bound to 127.0.0.1 unless told otherwise).

Both run in their own process group; the command waits next to them and, on SIGTERM or Ctrl-C, ends the group within
about 2 s (SIGTERM, then SIGKILL after a short grace), quietly.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class UiServer:
    process: subprocess.Popen[bytes]
    base_url: str

    def stop(self, grace: float = 1.0) -> None:
        """Stop the server and every process it spawned (its own process group): SIGTERM, then SIGKILL after ``grace``.

        uvicorn waits for open browser connections before it exits on SIGTERM (about 30 s with a page open), so the
        grace is short: the server holds nothing that needs a clean shutdown (every write is a committed transaction).
        """
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            return
        # the group leader is gone; its children (uvicorn workers) may not be yet
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)


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


def wait_until_healthy(server: UiServer, timeout: float = 60.0, path: str = "/health") -> float:
    """Poll ``/health`` until it answers 200; returns the seconds it took. Raises if the server dies or times out."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if server.process.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{server.base_url}{path}", timeout=2) as resp:
                if resp.status == 200:
                    return time.monotonic() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the server did not answer {server.base_url}{path} within {timeout:.0f} s")


def experiment(base_url: str, name: str | None) -> dict[str, Any]:
    """Experiment ``name`` (or the most recently updated one) with its tags, asked from the server's REST API.

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
                return dict(exp)
        raise LookupError(f"no experiment named {name!r} in this tracking store (run the sweep first)")
    named = [e for e in experiments if e["name"] != "Default"] or experiments
    if not named:
        raise LookupError("the tracking store has no experiment yet (run a sweep first)")
    return dict(named[0])


def experiment_id(base_url: str, name: str | None) -> str:
    return str(experiment(base_url, name)["experiment_id"])


def runs_url(base_url: str, experiment: str, view: str | None = None) -> str:
    """The runs table in the model-training workspace; ``view`` names a saved view (``mlflow.sharedViewState.<view>``).

    MLflow 3.17's UI chooses the workspace from ``workflowType`` (the URL, else the browser's last choice, else GenAI);
    it does not read the experiment's ``mlflow.experimentKind`` tag for that, so the parameter is always given.
    """
    url = f"{base_url}/#/experiments/{experiment}/runs?workflowType=machine_learning"
    return url + (f"&viewStateShareKey={view}" if view else "")


def run_url(base_url: str, experiment: str, run_id: str) -> str:
    return f"{base_url}/#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning"


def compare_url(base_url: str, experiment: str, run_ids: list[str]) -> str:
    query = urllib.parse.urlencode({"runs": json.dumps(run_ids), "experiments": json.dumps([experiment]), "workflowType": "machine_learning"})
    return f"{base_url}/#/compare-runs?{query}"


def top_runs(base_url: str, experiment: str, ascending: bool, k: int = 5) -> list[str]:
    """The ``k`` best feasible trial runs by ``_objective`` (each evaluated point once), from the REST API."""
    body = json.dumps({
        "experiment_ids": [experiment], "max_results": 4 * k,
        "filter": "tags.`hailo_sweep.role` = 'trial' and tags.`hailo_sweep.feasible` = 'True'",
        "order_by": [f"metrics.`_objective` {'ASC' if ascending else 'DESC'}"],
    }).encode()
    req = urllib.request.Request(f"{base_url}/api/2.0/mlflow/runs/search", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        runs = json.loads(resp.read()).get("runs", [])
    own = [r for r in runs if not any(t["key"] == "hailo_sweep.duplicate_of" for t in r.get("data", {}).get("tags", []))]
    return [str(r["info"]["run_id"]) for r in own[:k]]


def models_url(base_url: str, experiment: str) -> str:
    return f"{base_url}/#/experiments/{experiment}/models?workflowType=machine_learning"


class _Stop(Exception):
    """SIGTERM or SIGINT arrived while waiting next to a server."""


def _raise_stop(*_: object) -> None:
    raise _Stop()


def wait_and_stop(server: UiServer, announce: str | None, out: Any, err: Any, *, health_path: str = "/health", lines: Any = None) -> None:
    """Wait until the server answers, print ``announce`` (and ``lines(server)``), then wait until SIGTERM or Ctrl-C
    and stop it; a server that dies or never answers is an error (exit 1). Never ends with a traceback."""
    import typer

    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        seconds = wait_until_healthy(server, path=health_path)
        out.print(f"ready in {seconds:.1f} s", highlight=False)
        for line in ([announce] if announce else []) + (list(lines(server)) if lines else []):
            out.print(line, soft_wrap=True, highlight=False)
        out.print("press Ctrl-C to stop", highlight=False)
        server.process.wait()
        err.print(f"[bold red]error:[/] the server exited with code {server.process.returncode}")
        code = 1
    except _Stop:
        pass
    except (RuntimeError, TimeoutError, LookupError, OSError) as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        code = 1
    finally:
        for sig in previous:  # a second signal during the stop must not interrupt it
            signal.signal(sig, signal.SIG_IGN)
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code:
        raise typer.Exit(code)


def serve(server: UiServer, tracking_uri: str, experiment_name: str | None, out: Any, err: Any) -> None:
    """``hailo-sweep ui``: wait for the MLflow server, print the links to the sweep's pages, stop on a signal."""
    from hailo_sweep.stores import redact_url

    def links(s: UiServer) -> list[str]:
        exp = experiment(s.base_url, experiment_name)
        exp_id = str(exp["experiment_id"])
        tags = {t["key"]: t["value"] for t in exp.get("tags", [])}
        views = {k.removeprefix(SHARED_VIEW_TAG) for k in tags if k.startswith(SHARED_VIEW_TAG)}
        trials_view = TRIALS_VIEW if TRIALS_VIEW in views else None
        out_lines = [
            f"trial runs, sorted by the objective: {runs_url(s.base_url, exp_id, trials_view)}",
            f"runs page: {runs_url(s.base_url, exp_id, ALL_RUNS_VIEW if ALL_RUNS_VIEW in views else None)}",
            f"compiled models: {models_url(s.base_url, exp_id)}",
        ]
        best_run = tags.get("hailo_sweep.best_run_id")
        if best_run:
            out_lines.append(f"best trial's run: {run_url(s.base_url, exp_id, best_run)}")
        try:
            ascending = bool(json.loads(tags.get(SHARED_VIEW_TAG + TRIALS_VIEW, "{}")).get("orderByAsc", True))
        except ValueError:
            ascending = True
        top = top_runs(s.base_url, exp_id, ascending)
        if len(top) >= 2:
            out_lines.append(f"compare the top {len(top)} feasible trials: {compare_url(s.base_url, exp_id, top)}")
        out_lines.append(WORKSPACE_NOTE)
        return out_lines

    wait_and_stop(server, f"MLflow UI on {redact_url(tracking_uri)}", out, err, lines=links)


WORKSPACE_NOTE = (
    "these links open MLflow's model-training pages; pages reached by clicking through fall back to the browser's "
    "last choice (GenAI at first): if you see 'Evaluations' and 'Agent versions' in the side bar, pick "
    "'Model training' at its top once and the browser keeps it"
)

#: saved views of the runs table, written by ``hailo_sweep.tracking`` as experiment tags
SHARED_VIEW_TAG = "mlflow.sharedViewState."
TRIALS_VIEW = "hailo-sweep-trials"
ALL_RUNS_VIEW = "hailo-sweep-runs"


def start_dashboard(storage_url: str, *, host: str = "127.0.0.1", port: int = 8080) -> UiServer:
    """Start optuna-dashboard on ``storage_url`` through its public ``run_server`` (the stdlib WSGI server: the
    command line's ``--server auto`` would pick gunicorn, which writes ``~/.gunicorn``); a clear install hint when
    the optional extra is missing."""
    import importlib.util

    from hailo_sweep.errors import UserInputError

    if importlib.util.find_spec("optuna_dashboard") is None:
        raise UserInputError("optuna-dashboard is not installed", fix="pip install 'hailo-sweep[dashboard]'")
    code = "import sys, optuna_dashboard; optuna_dashboard.run_server(sys.argv[1], host=sys.argv[2], port=int(sys.argv[3]))"
    cmd = [sys.executable, "-c", code, storage_url, host, str(port)]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True)
    return UiServer(process=process, base_url=f"http://{host}:{port}")
