"""`hailo-sweep ui` and `dashboard`: the MLflow pages, rendered in headless Chromium, show what a user compares.

Checked from the rendered DOM: the trial runs open sorted by the objective with the headline metrics and the knobs
as columns; pages open in the model-training workspace; the Models tab shows each model's metrics and its registered
version; the registered version is described and tagged; the parent run's description links to the best trial. The
commands stop on SIGTERM or Ctrl-C without a traceback and leave nothing listening.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from hailo_sweep.ui import free_port
from tests.browser import Browser, chromium_path
from tests.conftest import cli

pytestmark = pytest.mark.slow

RUN_NAME_CELL = '[col-id="attributes.`Run Name`"]'
GENAI_ONLY = "Agent versions"  # in the side bar of MLflow's GenAI workspace only
ML_ONLY = "Model registry"  # in the side bar of the model-training workspace only
needs_chromium = pytest.mark.skipif(chromium_path() is None and not os.environ.get("CI"), reason="chromium not installed (.ci/run installs it)")


class Served:
    """A command that starts a server, prints links, and waits: its output lines, read by a thread into a queue.

    A reader thread feeds the queue: polling the pipe with select() beside a buffered readline() misses lines that
    arrived in the same chunk as the previous one.
    """

    def __init__(self, root, *args: str):  # type: ignore[no-untyped-def]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hailo_sweep.cli", *args], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env={**os.environ, "COLUMNS": "250"}, start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def read_until(self, marker: str, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            if marker in line:
                return "".join(self.seen)
        raise AssertionError(f"{marker!r} not printed:\n" + "".join(self.seen))

    def rest(self) -> str:
        while (line := self.lines.get(timeout=30)) is not None:
            self.seen.append(line)
        return "".join(self.seen)

    def stop(self, sig: int) -> int:
        os.killpg(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            raise


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def links(output: str) -> dict[str, str]:
    return dict(re.findall(r"^(.+?): (http://\S+)$", output, re.M))


def text_when(browser: Browser, *needles: str, timeout: float = 60.0) -> str:
    """The page's rendered text, once it contains every one of ``needles``."""
    return browser.wait_for(
        f"(() => {{ const t = document.body.innerText; return {list(needles)!r}.every(n => t.includes(n)) ? t : ''; }})()", timeout=timeout
    )


def rows_in_order(browser: Browser) -> list[str]:
    """The run names of the runs table, top to bottom (the grid positions its rows; their DOM order is not theirs)."""
    return browser.evaluate(
        f"""(() => {{ const rows = new Map();
            for (const cell of document.querySelectorAll('[row-index] {RUN_NAME_CELL}')) {{
                rows.set(Number(cell.closest('[row-index]').getAttribute('row-index')), cell.innerText.trim()); }}
            return [...rows.entries()].sort((a, b) => a[0] - b[0]).map(e => e[1]); }})()"""
    )


def column_ids(browser: Browser) -> list[str]:
    return browser.evaluate("[...new Set([...document.querySelectorAll('[col-id]')].map(e => e.getAttribute('col-id')))]")


@needs_chromium
def test_ui_pages_show_what_a_user_compares(sweep) -> None:
    study, client, name = sweep["study"], sweep["client"], sweep["cfg"]["name"]
    trials = study.get_trials(deepcopy=False)
    export = cli(sweep["root"], "best", str(sweep["config"]), "--export", str(sweep["root"] / "out-ui"))
    assert export.returncode == 0, export.stdout + export.stderr
    best_version = client.get_model_version_by_alias(name, "best")
    port = free_port()
    served = Served(sweep["root"], "ui", str(sweep["config"]), "--port", str(port))
    browser = None
    try:
        urls = links(served.read_until("press Ctrl-C"))
        exp_id = study.user_attrs["mlflow_experiment_id"]
        assert all(u.startswith(f"http://127.0.0.1:{port}/#/") and "workflowType=machine_learning" in u for u in urls.values())
        assert urls["trial runs, sorted by the objective"].startswith(f"http://127.0.0.1:{port}/#/experiments/{exp_id}/runs?")
        browser = Browser(width=4000)  # the tables render only the columns in view

        # the trial runs: every one listed (no parent row), sorted by the objective, headline metrics and knobs as columns
        browser.goto(urls["trial runs, sorted by the objective"])
        names = [f"trial-{t.number:04d}" for t in trials]
        text = text_when(browser, *names, f"{len(trials)} matching runs")
        columns = column_ids(browser)
        for key in ("_objective", "_feasible", "_device_error", "_fps"):
            assert f"metrics.`{key}`" in columns
        for knob in ("optimization_level", "compression_level", "calibset_size", "normalization_placement", "output_16bit"):
            assert f"params.`{knob}`" in columns
        complete = sorted((t for t in trials if t.values), key=lambda t: (t.values[0], t.number))
        shown = [n for n in rows_in_order(browser) if int(n[-4:]) in {t.number for t in complete}]
        values = [next(t.values[0] for t in complete if t.number == int(n[-4:])) for n in shown]
        assert values == sorted(values), shown
        assert ML_ONLY in text and GENAI_ONLY not in text

        # the whole experiment: the parent run, whose trial runs expand under it
        browser.goto(urls["runs page"])
        text_when(browser, name)
        assert browser.wait_for(f"(() => {{ const b = document.querySelector('{RUN_NAME_CELL} button'); if (!b) return false; b.click(); return true; }})()")
        text_when(browser, *names)

        # the best trial's run: model-training workspace, the headline metrics listed before the rest
        best_run = best_version.tags["mlflow_run_id"]
        assert urls["best trial's run"].endswith(f"/runs/{best_run}?workflowType=machine_learning")
        browser.goto(urls["best trial's run"])
        text = text_when(browser, "_objective", "device.logits.softmax_mae", ML_ONLY)
        assert GENAI_ONLY not in text
        assert text.index("_objective") < text.index("device.logits.softmax_mae")

        # the compare view of the top feasible trials, in the model-training workspace
        compare = urls.get("compare the top 5 feasible trials") or next(u for k, u in urls.items() if k.startswith("compare the top"))
        browser.goto(compare)
        feasible = sorted((t for t in trials if t.values and all(v <= 0 for v in t.constraints.values()) and "duplicate_of" not in t.user_attrs), key=lambda t: t.values[0])
        text = text_when(browser, *[f"trial-{t.number:04d}" for t in feasible[:2]], "_objective")
        assert GENAI_ONLY not in text

        # the parent run's description: the top trials and a link to the best one
        parent = study.user_attrs["mlflow_parent_run_id"]
        browser.goto(f"http://127.0.0.1:{port}/#/experiments/{exp_id}/runs/{parent}?workflowType=machine_learning")
        text_when(browser, "Best feasible", f"trial {best_version.tags['trial']}")
        href = browser.evaluate(f"(() => {{ const a = [...document.querySelectorAll('a')].find(a => (a.getAttribute('href') || '').includes('{best_run}')); return a ? a.getAttribute('href') : ''; }})()")
        assert best_run in href

        # the Models tab: one model per trial, named by it, with its metrics; the registered one shows its version
        browser.goto(urls["compiled models"])
        best_model = client.get_logged_model(best_version.source.removeprefix("models:/")).name
        text = text_when(browser, best_model, f"v{best_version.version}")
        assert best_model == f"{name}-trial-{int(best_version.tags['trial']):04d}"
        assert any('"metricKey":"_objective"' in c for c in column_ids(browser))

        # the registered version: described and tagged
        browser.goto(f"http://127.0.0.1:{port}/#/models/{name}/versions/{best_version.version}?workflowType=machine_learning")
        text = text_when(browser, f"Trial {best_version.tags['trial']} of sweep {name}", "objective_value", "backend", "target")
        assert ML_ONLY in text and GENAI_ONLY not in text

        # a page reached without the links falls back to the browser's choice; one switch is remembered
        run_page = f"http://127.0.0.1:{port}/#/experiments/{exp_id}/runs/{best_run}"
        browser.goto(run_page)
        text_when(browser, GENAI_ONLY)
        assert browser.evaluate("(() => { const e = [...document.querySelectorAll('[role=button], button')].find(e => e.innerText.trim() === 'Model training'); if (!e) return false; e.click(); return true; })()")
        browser.goto(f"http://127.0.0.1:{port}/#/models/{name}")
        text = text_when(browser, ML_ONLY, name)
        assert GENAI_ONLY not in text
    finally:
        if browser is not None:
            browser.close()
        code = served.stop(signal.SIGTERM)
    output = served.rest()
    assert code == 0 and "Traceback" not in output, output
    assert not port_open(port), "the MLflow server is still listening after hailo-sweep ui stopped"


def test_dashboard_serves_the_sweeps_study_and_stops_on_ctrl_c(sweep) -> None:
    pytest.importorskip("optuna_dashboard")
    port = free_port()
    served = Served(sweep["root"], "dashboard", str(sweep["config"]), "--port", str(port))
    try:
        out = served.read_until("press Ctrl-C")
        assert f"http://127.0.0.1:{port}/dashboard" in out
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=10) as resp:
            studies = json.loads(resp.read())["study_summaries"]
        assert [s["study_name"] for s in studies] == [sweep["cfg"]["name"]]
    finally:
        code = served.stop(signal.SIGINT)
    output = served.rest()
    assert code == 0 and "Traceback" not in output, output
    assert not port_open(port)
