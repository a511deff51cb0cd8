"""`hailo-sweep ui`: the MLflow runs page, rendered in headless Chromium, lists the sweep's trial runs."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from hailo_sweep.ui import free_port
from tests.browser import Browser, chromium_path

pytestmark = pytest.mark.slow

RUN_NAME_CELL = '[col-id="attributes.`Run Name`"]'


def read_url(proc: subprocess.Popen[str], timeout: float = 90.0) -> str:
    """Read the command's output until it prints the runs page URL (bounded by ``timeout``).

    A reader thread feeds a queue: polling the pipe with select() beside a buffered readline() misses lines that
    arrived in the same chunk as the previous one.
    """
    assert proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        match = re.search(r"runs page: (\S+)", line)
        if match:
            return match.group(1)
    raise AssertionError("no runs page URL printed:\n" + "".join(seen))


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.skipif(chromium_path() is None and not os.environ.get("CI"), reason="chromium not installed (.ci/run installs it)")
def test_ui_lists_the_trial_runs(sweep) -> None:
    study = sweep["study"]
    trial_names = sorted(f"trial-{t.number:04d}" for t in study.get_trials(deepcopy=False))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hailo_sweep.cli", "ui", str(sweep["config"]), "--port", str(port)],
        cwd=sweep["root"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "COLUMNS": "250"}, start_new_session=True,
    )
    browser = None
    try:
        url = read_url(proc)
        assert url.startswith(f"http://127.0.0.1:{port}/#/experiments/{study.user_attrs['mlflow_experiment_id']}/runs")
        assert "workflowType=machine_learning" in url
        browser = Browser()
        browser.goto(url)
        parent_name = sweep["cfg"]["name"]
        # the parent run is listed; its trial runs are nested under it, collapsed: expand them
        browser.wait_for(f"document.body.innerText.includes({parent_name!r})")
        clicked = browser.wait_for(
            f"""(() => {{ const b = document.querySelector('{RUN_NAME_CELL} button');
                         if (!b) return false; b.click(); return true; }})()"""
        )
        assert clicked
        text = browser.wait_for(
            f"(() => {{ const t = document.body.innerText; return {trial_names!r}.every(n => t.includes(n)) ? t : ''; }})()"
        )
        for name in trial_names:
            assert name in text
    finally:
        if browser is not None:
            browser.close()
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert not port_open(port), "the MLflow server is still listening after hailo-sweep ui stopped"
